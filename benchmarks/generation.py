"""Greedy generation speed and peak memory: dense model vs DeRS (factorised) vs merged DeRS vs the exported standard
MoE checkpoint.

Every arm runs in its own subprocess (so its peak resident memory is its own), loads its model from disk and
generates the same number of new tokens greedily from the same prompt (batch 1). The arms are timed in interleaved
rounds (one process generates at a time) so that a change of machine load hits them alike; the report gives the median
tokens/s per arm. The exported arm never imports ``ders_peft``. The DeRS arms must generate the same tokens as the
exported model.

    python benchmarks/generation.py            # full run, writes docs/benchmarks_generation.{json,md}
    python benchmarks/generation.py --quick    # small model, < 1 min, for CI (writes into a temporary folder)

The JSON holds the command, date, commit, load average (start and end) and every arm's numbers; the markdown page,
its prose included, is generated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ARMS = ("dense", "ders", "ders_kernel", "ders_merged", "exported")
REPO = Path(__file__).resolve().parents[1]

FULL = [
    {
        "hidden": 512,
        "intermediate": 1408,
        "layers": 6,
        "heads": 8,
        "kv_heads": 4,
        "vocab": 8192,
        "prompt": 32,
        "new_tokens": 128,
        "runs": 5,
    },
    {
        "hidden": 1024,
        "intermediate": 2816,
        "layers": 8,
        "heads": 16,
        "kv_heads": 4,
        "vocab": 8192,
        "prompt": 32,
        "new_tokens": 128,
        "runs": 5,
    },
]
QUICK = {
    "hidden": 64,
    "intermediate": 176,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 512,
    "prompt": 8,
    "new_tokens": 16,
    "runs": 1,
}


# ------------------------------------------------------------------------------------------------------ setup
def build_checkpoints(work: Path, size: dict, ders: dict) -> None:
    """Save the dense base, the DeRS adapter (random non-zero deltas and router) and its standard MoE export."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import ders_peft

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=size["prompt"] + size["new_tokens"] + 16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    dense = LlamaForCausalLM(cfg).eval()
    dense.save_pretrained(work / "dense")
    model = get_peft_model(dense, ders_peft.DeRSConfig(**ders))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ders_delta" in name or "ders_router" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(work / "adapter")
    ders_peft.export_moe(model, work / "exported", base_model="random-llama")


# ------------------------------------------------------------------------------------------------------ one arm
def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far. ``VmHWM`` is reset at exec; ``ru_maxrss`` is not (a child
    started from a large parent inherits its peak), so it is only the fallback off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Arm:
    """One arm's model, loaded once; ``run()`` times one greedy generation."""

    def __init__(self, arm: str, work: Path, size: dict, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM

        self.arm, self.size = arm, size
        self.rss_imports = _peak_rss_mib()
        if arm == "exported":
            model = AutoModelForCausalLM.from_pretrained(work / "exported", dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
            if arm != "dense":
                from peft import PeftModel

                import ders_peft  # noqa: F401  (registers the DeRS peft type)

                model = PeftModel.from_pretrained(model, work / "adapter")
                if arm == "ders_merged":
                    model.merge_adapter()
                if arm == "ders_kernel":  # built by the driver beforehand: this loads the cached build
                    from ders_peft import kernels

                    kernels.build()
        self.model = model.eval()
        prompt = torch.randint(3, size["vocab"], (1, size["prompt"]), generator=torch.Generator().manual_seed(7))
        self.prompt = prompt
        self.kwargs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "do_sample": False}
        self.kwargs["pad_token_id"] = 0
        self.times: list[float] = []
        self.out = None
        self._generate(4)  # warm-up

    def _generate(self, new_tokens: int):
        import torch

        if "ders_peft" in sys.modules:  # the compiled decode kernel for its arm only (--quick runs arms in-process)
            from ders_peft import kernels

            (kernels.enable_cpu_kernels if self.arm == "ders_kernel" else kernels.disable_cpu_kernels)()
        with torch.inference_mode():
            return self.model.generate(**self.kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def run(self) -> float:
        start = time.perf_counter()
        self.out = self._generate(self.size["new_tokens"])
        self.times.append(time.perf_counter() - start)
        return self.times[-1]

    def summary(self) -> dict:
        new = self.out.shape[1] - self.prompt.shape[1]
        return {
            "arm": self.arm,
            "tokens_per_s": new / statistics.median(self.times),
            "times_s": self.times,
            "new_tokens": new,
            "rss_after_imports_mib": self.rss_imports,
            "peak_rss_mib": _peak_rss_mib(),
            "generated": self.out[0, self.prompt.shape[1] :].tolist(),
            "ders_peft_imported": "ders_peft" in sys.modules,
        }


def worker(arm: str, work: Path, size: dict, threads: int) -> None:
    """Subprocess side: load the arm, then answer ``run`` (one timed generation) and ``summary`` on stdin/stdout."""
    model = Arm(arm, work, size, threads)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(model.run()), flush=True)
        elif line.strip() == "summary":
            print(json.dumps(model.summary()), flush=True)
            return


# ------------------------------------------------------------------------------------------------------ driver
class _Worker:
    def __init__(self, arm: str, work: Path, size: dict, threads: int, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--work", str(work)]
        cmd += ["--size", json.dumps(size), "--threads", str(threads)]
        self.arm = arm
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._expect("ready")

    def _expect(self, what: str | None = None) -> str:
        line = self.proc.stdout.readline()
        if not line or (what and line.strip() != what):
            self.proc.kill()
            raise RuntimeError(f"benchmark arm {self.arm!r} failed (got {line!r}); rerun it with --arm to see why")
        return line

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect())


def run_arms(work: Path, size: dict, threads: int, in_process: bool, env: dict[str, str] | None = None) -> dict:
    """Load every arm (each in its own process unless ``in_process``; ``env``: extra variables of those processes),
    then time them in interleaved rounds so that a change of machine load hits every arm alike; one process generates
    at a time."""
    if in_process:
        arms = {arm: Arm(arm, work, size, threads) for arm in ARMS}
        for _ in range(size["runs"]):
            for arm in ARMS:
                arms[arm].run()
        return {arm: arms[arm].summary() for arm in ARMS}
    workers = {}
    try:
        for arm in ARMS:
            workers[arm] = _Worker(arm, work, size, threads, env)
        for _ in range(size["runs"]):
            for arm in ARMS:
                workers[arm].ask("run")
        return {arm: workers[arm].ask("summary") for arm in ARMS}
    finally:
        for w in workers.values():
            w.proc.kill()
            w.proc.wait()


def _paired(results: dict, arm: str) -> float:
    """Median over the rounds of the dense arm's time over ``arm``'s in the same round (tokens/s relative to dense):
    the arms of one round run back to back, so a load change between rounds cancels out of each ratio."""
    return statistics.median(d / a for d, a in zip(results["dense"]["times_s"], results[arm]["times_s"], strict=True))


def _table(results: dict, size: dict, ders: dict, threads: int) -> str:
    dense = results["dense"]
    lines = [
        "| arm | tokens/s (median) | x dense | x dense, per round (median) | peak RSS (MiB) | added by model (MiB) | "
        "same tokens as export |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "dense": "dense Llama",
        "ders": "DeRS, factorised",
        "ders_kernel": "DeRS, factorised + CPU kernel",
        "ders_merged": "DeRS, merge_adapter()",
        "exported": "exported standard MoE",
    }
    for arm in ARMS:
        r = results[arm]
        same = (
            "n/a (different model)"
            if arm == "dense"
            else ("yes" if r["generated"] == results["exported"]["generated"] else "NO")
        )
        lines.append(
            f"| {names[arm]} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / dense['tokens_per_s']:.2f} | "
            f"{_paired(results, arm):.2f} | {r['peak_rss_mib']:.0f} | "
            f"{r['peak_rss_mib'] - r['rss_after_imports_mib']:.0f} | {same} |"
        )
    return "\n".join(lines)


def _model_line(size: dict) -> str:
    return (
        f"Llama, hidden {size['hidden']}, intermediate {size['intermediate']}, {size['layers']} layers, "
        f"{size['heads']} heads ({size['kv_heads']} KV), vocab {size['vocab']}, fp32, random weights"
    )


def bench_one(
    size: dict, ders: dict, threads: int, quick: bool, env: dict[str, str] | None = None
) -> tuple[dict, str]:
    """Build the checkpoints for one model size, time every arm, check the generated tokens; returns the results and
    the markdown table."""
    with tempfile.TemporaryDirectory(prefix="ders-gen-bench-") as tmp:
        work = Path(tmp)
        build_checkpoints(work, size, ders)
        # --quick runs the arms in this process (fast enough for CI; memory and import isolation not measured)
        results = run_arms(work, size, threads, in_process=quick, env=env)
    print(_model_line(size))
    for arm, r in results.items():
        print(f"  {arm:12s} {r['tokens_per_s']:8.1f} tok/s  peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    if not quick and results["exported"]["ders_peft_imported"]:
        raise RuntimeError("the exported arm imported ders_peft; it must load with transformers alone")
    return results, _table(results, size, ders, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and few tokens (< 1 min), for CI")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per arm (default 1: on a small shared machine more threads make timings erratic)",
    )
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--delta-types",
        default="lowrank,sparse",
        help="comma-separated delta types (lowrank, sparse, full; default lowrank,sparse; --quick: lowrank)",
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sizes", default=None, help="comma-separated hidden sizes of FULL to run (default: all)")
    parser.add_argument("--runs", type=int, default=None, help="timed rounds per arm (default: 5; --quick: 1)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for benchmarks_generation.{json,md} (default: docs/ for a full run, a new temporary folder for "
        "--quick)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="markdown results file (the JSON goes next to it, same name, .json); overrides --out-dir",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only rewrite the markdown page from an existing benchmarks_generation.json (no timing)",
    )
    parser.add_argument(
        "--malloc",
        choices=("fixed", "default"),
        default="fixed",
        help="glibc thresholds of the arms' processes: fixed (reproducible peak RSS, see _common.FIXED_MALLOC) or "
        "glibc's default",
    )
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.arm:  # worker mode
        worker(args.arm, Path(args.work), json.loads(args.size), args.threads)
        return 0
    if args.render:
        page = _report(json.loads(args.render.read_text()), args.render.name)
        args.render.with_suffix(".md").write_text(page, encoding="utf-8")
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0

    sizes = [QUICK] if args.quick else FULL
    if args.sizes and not args.quick:
        wanted = {int(h) for h in args.sizes.split(",")}
        sizes = [size for size in FULL if size["hidden"] in wanted]
        if not sizes:
            parser.error(f"--sizes={args.sizes!r}: allowed hidden sizes are {[size['hidden'] for size in FULL]}")
    if args.runs is not None:
        if args.runs < 1:
            parser.error(f"--runs must be a positive integer, got {args.runs}")
        sizes = [{**size, "runs": args.runs} for size in sizes]
    delta_types = ["lowrank"] if args.quick else args.delta_types.split(",")
    bad = [d for d in delta_types if d not in ("lowrank", "sparse", "full")]
    if bad:
        parser.error(f"--delta-types={args.delta_types!r}: allowed values are lowrank, sparse, full")
    if args.out:
        md_path = Path(args.out)
    else:
        md_path = _common.output_dir(args.out_dir, args.quick) / "benchmarks_generation.md"
    result = {
        "command": _common.command_line("generation.py", argv),
        "machine": _common.machine_note(),
        "commit": _common.git_commit(),
        "settings": {"threads_per_arm": args.threads, "quick": args.quick, "arms": list(ARMS), "malloc": args.malloc},
        "sections": [],
    }
    from ders_peft import kernels

    kernels.build(verbose=True)  # the ders_kernel arm's compiled decode kernel, once (cached for the workers)
    started = time.perf_counter()
    failed = []
    for delta_type in delta_types:
        ders = {"num_experts": args.num_experts, "top_k": args.top_k, "delta_type": delta_type}
        ders.update({"rank": args.rank} if delta_type == "lowrank" else {})
        ders.update({"sparse_rate": 0.999} if delta_type == "sparse" else {})
        for size in sizes:
            env = _common.FIXED_MALLOC if args.malloc == "fixed" else None
            results, table = bench_one(dict(size), ders, args.threads, args.quick, env)
            section = _section(size, ders, results)
            print(table)
            print(f"factorised DeRS / dense tokens/s: {section['x_dense']['ders']:.2f} (goal >= {GOAL})")
            print(
                f"  with the CPU kernel: {section['x_dense']['ders_kernel']:.2f} (goal >= {KERNEL_GOAL}); per round: "
                f"{section['x_dense_per_round']['ders_kernel']:.2f}"
            )
            result["sections"].append(section)
            failed += [
                f"{a} ({delta_type}, hidden {size['hidden']})"
                for a, same in section["same_tokens_as_export"].items()
                if not same
            ]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    try:
        result["loadavg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        result["loadavg_1_5_15_end"] = None
    _common.write_json(md_path.with_suffix(".json"), result)
    md_path.write_text(_report(result, md_path.with_suffix(".json").name), encoding="utf-8")
    print(f"wrote {md_path} and {md_path.with_suffix('.json')}")
    if failed:
        print(f"ERROR: {failed} generated different tokens than the exported model", file=sys.stderr)
        return 1
    return 0


GOAL = 0.85  # factorised DeRS tokens/s over the dense model's
KERNEL_GOAL = 0.95  # issue 15: factorised DeRS with the compiled CPU decode kernel
KERNEL_TYPES = ("lowrank", "sparse")  # the delta types the kernel covers
NAMES = {
    "dense": "dense Llama",
    "ders": "DeRS, factorised",
    "ders_kernel": "DeRS, factorised + CPU kernel",
    "ders_merged": "DeRS, merge_adapter()",
    "exported": "exported standard MoE",
}


def _section(size: dict, ders: dict, results: dict) -> dict:
    """One (delta type, model size) result: every arm's summary, tokens/s relative to dense, token agreement."""
    dense = results["dense"]["tokens_per_s"]
    for r in results.values():
        times = r["times_s"]
        r["spread"] = (max(times) - min(times)) / statistics.median(times)  # (max - min) / median of the rounds
    return {
        "delta_type": ders["delta_type"],
        "model": dict(size),
        "ders": dict(ders),
        "arms": results,
        "x_dense": {arm: results[arm]["tokens_per_s"] / dense for arm in ARMS},
        "x_dense_per_round": {arm: _paired(results, arm) for arm in ARMS},
        "same_tokens_as_export": {
            arm: results[arm]["generated"] == results["exported"]["generated"]
            for arm in ("ders", "ders_kernel", "ders_merged")
        },
    }


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} to {fmt.format(hi)}"


def _findings(sections: list[dict], quick: bool) -> list[str]:
    """The page's reading of the numbers, each sentence computed from them (nothing is asserted that they do not
    show)."""
    lines = []
    ratios = [s["x_dense"]["ders"] for s in sections]
    met = [s for s in sections if s["x_dense"]["ders"] >= GOAL]
    spread = max(r["spread"] for s in sections for r in s["arms"].values())
    rounds = min(len(r["times_s"]) for s in sections for r in s["arms"].values())
    noise = (
        "One timed round per arm: the timing noise is not measured."
        if rounds < 2
        else f"The timed rounds of one arm differ by up to {spread:.0%} of their median (max - min), so ratios that "
        "differ by a few hundredths are not distinguishable here."
    )
    lines.append(
        f"- Goal (factorised DeRS >= {GOAL}x the dense model's tokens/s): met in {len(met)} of {len(sections)} "
        f"sections (factorised DeRS at {_range(ratios)}x dense"
        + (f"; lowest margin {min(ratios) - GOAL:+.2f}" if met else "")
        + f"). {noise}"
    )
    covered = [s for s in sections if s["delta_type"] in KERNEL_TYPES]
    if covered:
        kr = [s["x_dense"]["ders_kernel"] for s in covered]
        lines.append(
            f"- Goal of issue 15 (factorised DeRS with the compiled CPU decode kernel, `ders_peft.kernels`, >= "
            f"{KERNEL_GOAL}x dense): met in {sum(r >= KERNEL_GOAL for r in kr)} of {len(covered)} low-rank and "
            f"sparse sections ({_range(kr)}x dense, against {_range([s['x_dense']['ders'] for s in covered])}x for "
            "the Python decode path). Whole-expert (`full`) layers keep the Python path."
        )
    by_type: dict[str, list[dict]] = {}
    for s in sections:
        by_type.setdefault(s["delta_type"], []).append(s)
    for delta_type, group in by_type.items():
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda s: s["model"]["hidden"])
        steps = ", ".join(f"{s['x_dense']['ders']:.2f}x at hidden {s['model']['hidden']}" for s in group)
        change = group[-1]["x_dense"]["ders"] - group[0]["x_dense"]["ders"]
        if abs(change) < 0.02:
            trend = "about the same at every size (change below 0.02)"
        elif change > 0:
            trend = (
                f"closer to dense for the larger model ({change:+.2f}), as a fixed cost per layer (the router, the "
                "block-masked low-rank products or the sparse gather/scatter of `ders_peft/decode.py`) would be"
            )
        else:
            trend = f"further from dense for the larger model ({change:+.2f})"
        lines.append(f"- {delta_type} deltas, factorised DeRS over dense by size: {steps}: {trend}.")
    whole = [s for s in sections if s["ders"]["delta_type"] != "full"]
    if whole:
        slower = [
            s
            for s in whole
            if max(s["arms"]["ders_merged"]["tokens_per_s"], s["arms"]["exported"]["tokens_per_s"])
            < s["arms"]["ders"]["tokens_per_s"]
        ]
        merged = [s["x_dense"][a] for s in whole for a in ("ders_merged", "exported")]
        lines.append(
            f"- `merge_adapter()` and the exported MoE run top_k whole experts per token ({_range(merged)}x dense): "
            f"slower than factorised DeRS in {len(slower)} of {len(whole)} sections with low-rank or sparse deltas. "
            "The export exists for serving engines that only know standard architectures, not to be faster in "
            "transformers."
        )
    if quick:
        lines.append("- Memory: not measured (`--quick` runs every arm in one process).")
    else:
        extra = [s["arms"]["ders"]["peak_rss_mib"] - s["arms"]["dense"]["peak_rss_mib"] for s in sections]
        merged_extra = [s["arms"]["ders_merged"]["peak_rss_mib"] - s["arms"]["ders"]["peak_rss_mib"] for s in sections]
        export_extra = [s["arms"]["exported"]["peak_rss_mib"] - s["arms"]["dense"]["peak_rss_mib"] for s in sections]
        lines.append(
            f"- Memory (peak RSS): factorised DeRS {_range(extra, '{:+.0f}')} MiB over dense (it keeps the trainable "
            "base copy next to the frozen dense FFN, so that `disable_adapter()` gives the dense model exactly); "
            f"`merge_adapter()` {_range(merged_extra, '{:+.0f}')} MiB over factorised (every expert's full weights); "
            f"the export {_range(export_extra, '{:+.0f}')} MiB over dense (N full experts per block)."
        )
    bad = [s for s in sections if not all(s["same_tokens_as_export"].values())]
    lines.append(
        "- Tokens: the DeRS arms (factorised, with the CPU kernel, and merged) generate exactly the exported "
        "checkpoint's tokens in "
        + ("every section." if not bad else f"{len(sections) - len(bad)} of {len(sections)} sections (see NO above).")
    )
    return lines


def _report(result: dict, json_name: str = "benchmarks_generation.json") -> str:
    import torch
    import transformers

    sections = result["sections"]
    first = sections[0]["model"]
    threads = result["settings"]["threads_per_arm"]
    end = result.get("loadavg_1_5_15_end")
    lines = [
        "# Generation benchmark: dense vs DeRS vs merged vs exported MoE",
        "",
        "Generated by `python benchmarks/generation.py` (`--quick` for the CI-sized smoke run) with its numbers in "
        f"[{json_name}]({json_name}). "
        + _common.provenance_line(result)
        + (f" Load average at the end: {end[0]:g} / {end[1]:g} / {end[2]:g}." if end else "")
        + f" Wall time {result['wall_seconds']:.0f} s.",
        "",
        "Each arm runs in its own subprocess, loads its model from disk and generates greedily (batch 1, KV cache) "
        f"{first['new_tokens']} new tokens after a {first['prompt']}-token prompt; the arms are timed in "
        f"{first['runs']} interleaved rounds after a warm-up (one process generates at a time, so a change of machine "
        "load hits every arm alike) and tokens/s is the median per arm; 'x dense, per round' is the median over the "
        "rounds of each round's ratio to the dense arm, which a load change between rounds does not move. Peak "
        "memory is the process's peak resident set (`VmHWM`), including the imported libraries; the next column "
        "subtracts the peak reached right after the imports (what loading the model and generating added). The "
        "last column checks that the DeRS arms generate exactly the tokens of the exported checkpoint.",
        "",
        "- DeRS: every block upcycled, random non-zero deltas and router (settings per section); export target "
        "Mixtral (loaded with transformers' default experts implementation)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch "
        f"{torch.__version__} ({threads} thread per arm), transformers {transformers.__version__}, glibc malloc "
        f"thresholds: {result['settings'].get('malloc', 'default')} (`--malloc`)",
        "",
        "## Findings",
        "",
        *_findings(sections, result["settings"]["quick"]),
        "",
    ]
    for s in sections:
        ders, size, ratio = s["ders"], s["model"], s["x_dense"]["ders"]
        settings = ", ".join(f"{k}={v}" for k, v in ders.items())
        verdict = "met" if ratio >= GOAL else "not met"
        lines += [
            f"## {ders['delta_type']} deltas; {_model_line(size)}",
            "",
            f"DeRS settings: {settings}.",
            "",
            _table(s["arms"], size, ders, threads),
            "",
            f"Factorised DeRS runs at **{ratio:.2f}x** the dense model's tokens/s (goal >= {GOAL}x: {verdict}).",
            "",
        ]
        if ders["delta_type"] in KERNEL_TYPES:
            kernel = s["x_dense"]["ders_kernel"]
            lines += [
                f"With the compiled CPU decode kernel: **{kernel:.2f}x** (goal >= {KERNEL_GOAL}x: "
                f"{'met' if kernel >= KERNEL_GOAL else 'not met'}); per round (the median of the rounds' ratios): "
                f"{s['x_dense_per_round']['ders_kernel']:.2f}x.",
                "",
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
