"""Quality under a strong domain shift (issue 12): the small Python-pretrained Llama, continued training on C headers.

Base: :func:`ders_peft.local_corpus.pretrained_base` (the cached tiny Llama + byte-level BPE of
``benchmarks/quality.py``, pretrained on Python's documentation and standard-library source). New domain: the C header
files under ``/usr/include`` (``*.h``; the C++, LLVM, Node/V8, ICU and Python trees left out, so it is C), split by
file into train / validation / test. C headers rather than perl's pod documentation: this machine's perl ships a
single pod file (``perldiag.pod``), which cannot be split by document, and pod is English prose, close to the pydoc
text the base was pretrained on; the C headers are thousands of documents (about 27 MB) in another language's syntax
(preprocessor directives, braces, declarations, licence blocks), far from both pretraining sources.

Every arm trains on the same batches in the same order (per seed) for the same number of steps, hence the same
token budget, with the AdamW schedule of :func:`ders_peft.local_corpus.pretrain`. Per budget and arm the learning
rate is chosen on the validation split (seed 0) from ``--lr-grid``; the other seeds run at the chosen rate. Test
losses are computed for every run but only those of the chosen rates are reported (selection never sees them).

Arms: ``base`` (no training), ``dense`` (full fine-tuning), ``vanilla`` (upcycling, ``delta_type="full"``), ``lora``
(all linear layers, rank matched to DeRS-LM r=4's trainable count), ``lm_r<r>`` (DeRS-LM, ``--rank``), ``sm``
(DeRS-SM). Levers: ``--router-init kmeans`` (:func:`ders_peft.training.init_routers_kmeans` on a sample of training
blocks, forward only), ``--delta-init small``, ``--lr-groups router=4,delta_b=4`` (learning-rate multipliers per
parameter group, :func:`ders_peft.training.param_groups`; ``loraplus=16`` too), ``--experts`` / ``--top-k`` /
``--aux-coef``; per arm too, with suffixes: ``lm_r4+kmeans+small``.

Usage: ``python benchmarks/quality_shift.py [--quick] [--budgets 300,1000] [--seeds 0,1] [--arms ...] [--jobs 2]``.
Writes ``docs/benchmarks_quality_shift.json`` (command, date, commit, per-arm test loss per seed, parameters),
``.md`` and ``.png`` (``--quick``: a temporary folder).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import quality  # noqa: E402

import ders_peft  # noqa: E402
from ders_peft import local_corpus as lc  # noqa: E402
from ders_peft.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from ders_peft.training import GROUPS, init_routers_kmeans, param_groups  # noqa: E402

transformers.logging.set_verbosity_error()
HEADERS = Path("/usr/include")
SKIPPED_TREES = ("c++", "llvm", "node", "python", "unicode")  # C++ / V8 / ICU / the Python C API: not plain C
LR_GROUP_KEYS = (*(g for g in GROUPS if g != "other"), "loraplus")
REFERENCE_RANK = 4  # LoRA is matched to this DeRS-LM arm's trainable count


@dataclass(frozen=True)
class Settings:
    """Everything that defines the numbers (recorded in the JSON)."""

    base: dict = field(default_factory=lambda: dict(quality.Settings().base))
    seq_len: int = 128
    batch_size: int = 8
    budgets: tuple[int, ...] = (300, 1000)
    seeds: tuple[int, ...] = (0, 1)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    num_experts: int = 8
    top_k: int = 2
    ranks: tuple[int, ...] = (1, 4, 16)
    sparse_rate: float = 0.9
    aux_coef: float = 0.01
    router_init: str = "random"
    delta_init: str = "zero"
    delta_init_std: float = 1e-2
    lr_groups: tuple[tuple[str, float], ...] = ()  # learning-rate multipliers per group (DeRS arms)
    train_chars: int | None = 4_000_000
    eval_chars: int | None = 400_000
    max_eval_blocks: int | None = 256
    kmeans_blocks: int = 32
    split_seed: int = 0


QUICK = Settings(
    base=dict(quality.QUICK.base),
    seq_len=64,
    batch_size=4,
    budgets=(3,),
    seeds=(0,),
    lr_grid=(1e-3,),
    num_experts=4,
    ranks=(1, 4),
    train_chars=60_000,
    eval_chars=20_000,
    max_eval_blocks=8,
    kmeans_blocks=4,
)


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "base" | "dense" | "lora" | "ders" (the kinds quality.count_params knows)
    ders: tuple[tuple[str, object], ...] = ()
    router_init: str = "random"
    delta_init: str = "zero"


def parse_arm(name: str, settings: Settings) -> Arm:
    """``<arm>[+kmeans][+small]``: an arm of the module docstring with per-arm levers."""
    head, *levers = name.split("+")
    kinds = {"base": "base", "dense": "dense", "lora": "lora", "vanilla": "ders", "sm": "ders"}
    ders: dict[str, object] = {}
    if head == "vanilla":
        ders = {"delta_type": "full"}
    elif head == "sm":
        ders = {"delta_type": "sparse", "sparse_rate": settings.sparse_rate}
    elif head.startswith("lm_r") and head[4:].isdigit() and int(head[4:]) >= 1:
        ders, kinds[head] = {"delta_type": "lowrank", "rank": int(head[4:])}, "ders"
    if head not in kinds:
        raise ValueError(
            f"unknown arm {name!r}: use base, dense, lora, vanilla, sm or lm_r<rank>, plus +kmeans/+small"
        )
    router_init, delta_init = settings.router_init, settings.delta_init
    for lever in levers:
        if lever == "kmeans" and kinds[head] == "ders":
            router_init = "kmeans"
        elif lever == "small" and ders.get("delta_type") in ("lowrank", "sparse"):
            delta_init = "small"
        else:
            raise ValueError(f"arm {name!r}: lever {lever!r} does not apply (kmeans: DeRS arms; small: lm_r*, sm)")
    if ders.get("delta_type") not in ("lowrank", "sparse"):
        delta_init = "zero"  # vanilla experts are whole copies: no delta to initialise
    return Arm(name, kinds[head], tuple(ders.items()), router_init, delta_init)


def default_arms(settings: Settings) -> list[str]:
    return ["base", "dense", "vanilla", "lora", *(f"lm_r{r}" for r in settings.ranks), "sm"]


def ders_config(arm: Arm, settings: Settings, seed: int) -> ders_peft.DeRSConfig:
    return ders_peft.DeRSConfig(
        target_modules=["mlp"],
        num_experts=settings.num_experts,
        top_k=settings.top_k,
        seed=seed,
        task_type="CAUSAL_LM",
        router_aux_loss_coef=settings.aux_coef,
        delta_init=arm.delta_init,
        delta_init_std=settings.delta_init_std,
        **dict(arm.ders),
    )


def lora_rank(model: torch.nn.Module, settings: Settings) -> int:
    """The rank of an all-linear LoRA whose parameter count is closest to DeRS-LM r=4's trainable count."""
    ref = Arm("ref", "ders", (("delta_type", "lowrank"), ("rank", REFERENCE_RANK)))
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(model.config)
    target = ders_peft.parameter_report(get_peft(meta, ders_config(ref, settings, 0))).trainable_params
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    per_rank = sum(m.in_features + m.out_features for m in linears)
    cap = min(min(m.in_features, m.out_features) for m in linears)
    return max(1, min(cap, round(target / per_rank)))


def get_peft(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


def build_model(base: torch.nn.Module, arm: Arm, settings: Settings, seed: int, rank: int) -> torch.nn.Module:
    from peft import LoraConfig

    torch.manual_seed(seed)  # LoRA's A draws from the global generator
    if arm.kind in ("base", "dense"):
        return base
    if arm.kind == "lora":
        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft(base, cfg)
    return get_peft(base, ders_config(arm, settings, seed))


def run_one(job: dict) -> dict:
    """One run: build the arm on a fresh base, apply its levers, train, evaluate validation and test loss."""
    torch.set_num_threads(job["threads"])
    settings = settings_from_dict(job["settings"])
    arm, seed, lr, steps = parse_arm(job["arm"], settings), job["seed"], job["lr"], job["steps"]
    data = torch.load(job["data_path"])
    base = transformers.LlamaForCausalLM.from_pretrained(job["base_dir"], dtype=torch.float32)
    model = build_model(base, arm, settings, seed, job["lora_rank"])
    out = {"arm": arm.name, "seed": seed, "lr": lr, "steps": steps, "params": quality.count_params(model, arm)}
    if arm.kind == "base":
        out["params"]["trainable"] = 0
    else:
        if arm.router_init == "kmeans":
            order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed))
            sample = data["train"][order[: settings.kmeans_blocks]]
            stats = init_routers_kmeans(model, list(sample.split(settings.batch_size)), seed=seed)
            out["kmeans"] = {k: statistics.fmean(s[k] for s in stats.values()) for k in ("logit_std", "scale")}
        groups = None
        if settings.lr_groups and arm.kind == "ders":
            mult = dict(settings.lr_groups)
            kw = {f"{g}_lr": lr * m for g, m in mult.items() if g != "loraplus"}
            groups = param_groups(model, lr, loraplus_ratio=mult.get("loraplus"), **kw)
        start = time.perf_counter()
        losses = lc.pretrain(
            model, data["train"], steps, settings.batch_size, lr, seed, weight_decay=0.0, param_groups=groups
        )
        out |= {"train_loss_last10": statistics.fmean(losses[-10:]), "train_seconds": time.perf_counter() - start}
    out["val_loss"] = lc.evaluate_loss(model, data["val"])
    out["test_loss"] = lc.evaluate_loss(model, data["test"])
    return out


def settings_from_dict(d: dict) -> Settings:
    tuples = ("budgets", "seeds", "lr_grid", "ranks")
    d = {k: tuple(v) if k in tuples else v for k, v in d.items()}
    return Settings(**d | {"lr_groups": tuple(tuple(x) for x in d["lr_groups"])})


def header_files() -> list[Path]:
    files = [
        p
        for p in HEADERS.rglob("*.h")
        if p.is_file() and not p.relative_to(HEADERS).parts[0].startswith(SKIPPED_TREES)
    ]
    if len(files) < 30:
        raise SystemExit(f"quality_shift needs the C headers under {HEADERS} (found {len(files)} files)")
    return sorted(files)


def prepare_data(tokenizer, settings: Settings, path: Path) -> dict:
    splits = dict(zip(("train", "val", "test"), lc.split_by_file(header_files(), seed=settings.split_seed)))
    blocks, info = {}, {}
    for name, files in splits.items():
        files = list(files)
        random.Random(settings.split_seed).shuffle(files)  # a character budget then samples every header tree
        limit = settings.train_chars if name == "train" else settings.eval_chars
        blocks[name] = lc.pack_tokens(tokenizer, lc.read_texts(files, limit), settings.seq_len)
        if name != "train" and settings.max_eval_blocks is not None:
            blocks[name] = blocks[name][: settings.max_eval_blocks]
        info[name] = {"files": len(files), "blocks": len(blocks[name]), "tokens": blocks[name].numel()}
    torch.save(blocks, path)
    return info


def execute(jobs: list[dict], workers: int, log) -> list[dict]:
    """Results of ``jobs`` in order: in this process (``workers=1``) or in ``workers`` spawned processes."""
    results: list[dict] = []
    if workers <= 1:
        for job in jobs:
            results.append(run_one(job))
            log(_describe(results[-1]))
        return results
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(run_one, jobs):
            results.append(result)
            log(_describe(result))
    return results


def _describe(r: dict) -> str:
    losses = f"val {r['val_loss']:.4f} test {r['test_loss']:.4f}"
    return f"  {r['arm']} s{r['seed']} lr {r['lr']:g} {r['steps']} steps: {losses}"


def aggregate(runs: list[dict], settings: Settings, arms: list[str]) -> dict:
    """Per budget and arm: validation loss per learning rate (seed 0), the chosen rate, test loss over seeds."""
    out: dict[str, dict] = {}
    for steps in settings.budgets:
        per_arm = {}
        for arm in arms:
            mine = [r for r in runs if r["arm"] == arm and r["steps"] == steps]
            sweep = sorted((r for r in mine if r["seed"] == settings.seeds[0]), key=lambda r: r["lr"])
            lr, val_by_lr = quality.choose(sweep, [r["lr"] for r in sweep])
            chosen = [r for r in mine if r["lr"] == lr]
            per_arm[arm] = {
                "lr": lr,
                "lr_at_grid_edge": len(sweep) > 1 and lr in (sweep[0]["lr"], sweep[-1]["lr"]),
                "val_loss_by_lr": val_by_lr,
                "test_loss": quality.summarize([r["test_loss"] for r in chosen]),
                "val_loss": quality.summarize([r["val_loss"] for r in chosen]),
                "params": chosen[0]["params"],
                "kmeans": chosen[0].get("kmeans"),
            }
        out[str(steps)] = per_arm
    return out


def tables(result: dict) -> str:
    s = result["settings"]
    parts = [
        "# Quality under a strong domain shift (Python-pretrained Llama -> C headers)",
        *([f"**{result['note']}**"] if result.get("note") else []),
        f"Command: `{result['command']}`  \nDate: {result['machine']['date']}; commit {result['commit']}; "
        f"wall {result['wall_seconds_total']:.0f} s; load average {result['machine']['loadavg_1_5_15']}.",
        f"Data (split by file): {result['data']}. Base model before training: test loss "
        f"{result['base_test_loss']:.4f}. N={s['num_experts']} top-{s['top_k']}, batch {s['batch_size']} x "
        f"{s['seq_len']} tokens, seeds {s['seeds']}, lr grid {s['lr_grid']} (chosen on validation, seed 0); "
        f"levers: router_init={s['router_init']}, delta_init={s['delta_init']} (std {s['delta_init_std']}), "
        f"lr_groups={dict(s['lr_groups']) or 'none'}, aux_coef={s['aux_coef']}; LoRA rank {result['lora_rank']}.",
    ]
    header = ["arm", "lr", "val loss per lr", "test loss per seed", "mean", "vs vanilla", "added", "trainable"]
    for steps, arms in result["budgets"].items():
        van = arms.get("vanilla", {}).get("test_loss", {}).get("mean")
        rows = []
        for name, a in arms.items():
            t = a["test_loss"]
            edge = " (edge)" if a["lr_at_grid_edge"] else ""
            rows.append(
                [
                    name,
                    f"{a['lr']:g}{edge}",
                    ", ".join(f"{k}: {v:.4f}" for k, v in a["val_loss_by_lr"].items()),
                    ", ".join(f"{v:.4f}" for v in t["values"]),
                    f"{t['mean']:.4f}",
                    "-" if van is None else f"{t['mean'] - van:+.4f}",
                    _common.fmt_params(a["params"]["added"]),
                    _common.fmt_params(a["params"]["trainable"]),
                ]
            )
        tokens = int(steps) * s["batch_size"] * s["seq_len"]
        parts += [f"## {steps} steps ({tokens:,} training tokens per run)", _common.markdown_table(header, rows)]
    return "\n\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = result["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 5), squeeze=False)
    for ax, (steps, arms) in zip(axes[0], budgets.items()):
        for i, (name, a) in enumerate(arms.items()):
            t, added = a["test_loss"], a["params"]["added"]
            if added == 0:  # base / dense add nothing: reference lines
                ax.axhline(t["mean"], ls="--" if name == "base" else "-.", color="gray", lw=1, label=name)
                continue
            err = [[t["mean"] - t["min"]], [t["max"] - t["mean"]]]
            ax.errorbar(added, t["mean"], yerr=err, fmt="osD^v<>pX*"[i % 10], capsize=3, label=name, alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("added parameters (log)")
        ax.set_ylabel("test loss (nats/token)")
        ax.set_title(f"{steps} steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Python-pretrained Llama -> C headers: test loss, mean over seeds, bars = range", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def parse_lr_groups(text: str) -> tuple[tuple[str, float], ...]:
    """``router=4,delta_b=4`` -> multipliers of the run's learning rate (``loraplus``: B = ratio x A)."""
    out = []
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in LR_GROUP_KEYS or not value:
            raise argparse.ArgumentTypeError(f"--lr-groups item {item!r}: use name=multiplier, names {LR_GROUP_KEYS}")
        out.append((key, float(value)))
    return tuple(out)


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()[:12] + (" (uncommitted changes)" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test, about 20 s)")
    p.add_argument("--out", default=None, help="JSON path (default docs/benchmarks_quality_shift.json)")
    p.add_argument("--cache", default="~/.cache/ders_peft/base", help="cache of the pretrained base")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: every arm of the docstring)")
    p.add_argument("--budgets", type=_ints, default=None, help="training steps per run, e.g. 300,1000")
    p.add_argument("--seeds", type=_ints, default=None)
    p.add_argument("--lr-grid", type=_floats, default=None)
    p.add_argument("--rank", type=_ints, default=None, help="DeRS-LM ranks of the default arms, e.g. 1,4,16")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--aux-coef", type=float, default=None)
    p.add_argument("--router-init", choices=("random", "kmeans"), default=None)
    p.add_argument("--delta-init", choices=("zero", "small"), default=None)
    p.add_argument("--delta-init-std", type=float, default=None)
    p.add_argument("--lr-groups", type=parse_lr_groups, default=None, help="e.g. router=4,delta_b=4 or loraplus=16")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (spawned processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--note", default="", help="a line printed in bold at the top of the markdown (e.g. 'partial')")
    p.add_argument("--replot", action="store_true", help="only rewrite the .md and .png from the --out JSON")
    args = p.parse_args(argv)
    if args.replot:
        if not args.out:
            p.error("--replot needs --out (the JSON to redraw)")
        result = json.loads(Path(args.out).read_text())
        atomic_write_text(Path(args.out).with_suffix(".md"), tables(result))
        plot(result, Path(args.out).with_suffix(".png"))
        return result
    settings = QUICK if args.quick else Settings()
    overrides = {
        "budgets": args.budgets,
        "seeds": args.seeds,
        "lr_grid": args.lr_grid,
        "ranks": args.rank,
        "num_experts": args.experts,
        "top_k": args.top_k,
        "aux_coef": args.aux_coef,
        "router_init": args.router_init,
        "delta_init": args.delta_init,
        "delta_init_std": args.delta_init_std,
        "lr_groups": args.lr_groups,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if min(settings.budgets) < 1 or not settings.seeds or not settings.lr_grid:
        p.error("--budgets must be positive; --seeds and --lr-grid must not be empty")
    arms = args.arms.split(",") if args.arms else default_arms(settings)
    try:  # every arm name and DeRS setting is checked before anything runs
        for arm in (parse_arm(name, settings) for name in arms):
            if arm.kind == "ders":
                ders_config(arm, settings, 0)
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out) if args.out else _common.output_dir(None, args.quick) / "benchmarks_quality_shift.json"
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    cache = Path(args.cache).expanduser()
    base, tokenizer = lc.pretrained_base(cache, **settings.base)
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    data_path = cache / f"quality-shift-data-{Path(base.name_or_path).name}-{key}.pt"
    data_info = prepare_data(tokenizer, settings, data_path)
    data = torch.load(data_path)
    base_test = lc.evaluate_loss(base, data["test"])
    rank = lora_rank(base, settings)
    log(f"data {data_info}; base test loss {base_test:.4f}; LoRA rank {rank}")
    common = {
        "settings": asdict(settings),
        "base_dir": base.name_or_path,
        "data_path": str(data_path),
        "threads": args.threads,
        "lora_rank": rank,
    }
    lr_of = {"base": settings.lr_grid[:1]}  # the untrained base has no learning rate: one run
    sweep = [
        common | {"arm": a, "seed": settings.seeds[0], "lr": lr, "steps": steps}
        for steps in settings.budgets
        for a in arms
        for lr in lr_of.get(a, settings.lr_grid)
    ]
    runs = execute(sweep, args.jobs, log)
    chosen = aggregate(runs, replace(settings, seeds=settings.seeds[:1]), arms)
    more = [
        common | {"arm": a, "seed": s, "lr": chosen[str(steps)][a]["lr"], "steps": steps}
        for steps in settings.budgets
        for a in arms
        for s in settings.seeds[1:]
    ]
    runs += execute(more, args.jobs, log)
    result = {
        "command": "python benchmarks/quality_shift.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": args.note,
        "machine": _common.machine_note(),
        "commit": _commit(),
        "settings": asdict(settings),
        "arms": arms,
        "data": data_info,
        "base_test_loss": base_test,
        "lora_rank": rank,
        "budgets": aggregate(runs, settings, arms),
        "runs": runs,
        "wall_seconds_total": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), tables(result))
    plot(result, out.with_suffix(".png"))
    print(tables(result))
    log(f"wrote {out} (+ .md, .png)")
    return result


if __name__ == "__main__":
    main()
