"""Serve exported DeRS MoE checkpoints in a real engine and compare with transformers: greedy tokens and tokens/s.

For each target architecture a tiny dense model is upcycled with DeRS deltas large enough that swapping two experts
changes the greedy tokens (checked: the ``swapped`` row), exported with ``export_moe``, and generated from with
transformers and with each engine that is importable (vLLM: ``vllm.LLM(model=DIR, dtype="float32",
enforce_eager=True)``, in a fresh process per export). Same tokens = every prompt's ``new_tokens`` greedy tokens are
equal. Needs the ``serve`` extra (``pip install -e .[serve]``, see docs/serving.md); an engine that is not installed
is recorded as not run, with the reason.

    python benchmarks/serve.py [--archs mixtral,qwen2_moe,qwen3_moe] [--new-tokens 20] [--out DIR]

Writes ``benchmarks_serve.json`` and ``benchmarks_serve.md`` (``docs/`` by default) with the command, date and commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VOCAB = 512
REPS = 3
PROMPTS = [[5, 17, 42, 99, 7], [300, 12, 12, 250, 3, 88, 61, 140, 9], [401, 2, 77, 77, 160, 33, 21, 5, 480, 64, 11]]

# arch -> (source family, DeRS options, upcycled blocks of 3; None = all): the options each engine run covers
CASES: dict[str, tuple[str, dict, list[int] | None]] = {
    "mixtral": ("llama", {}, None),
    # dense block 1 (mlp_only_layers) and the universal FFN as the shared expert behind the 1e-20 gate
    "qwen2_moe": ("llama", {"shared_expert": True}, [0, 2]),
    "qwen3_moe": ("qwen3", {}, None),
}


def build_export(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Export a tiny DeRS model of ``CASES[arch]`` to ``out_dir`` (fp32; head_dim 64, which vLLM's CPU attention
    supports). Returns the export path."""
    import torch
    import transformers
    from peft import get_peft_model

    import ders_peft
    from ders_peft.layer import DeRSLayer

    family, options, blocks = CASES[arch]
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # off the initial values: norms and embeddings matter too
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    subset = {} if blocks is None else {"target_modules": ["mlp"], "layers_to_transform": blocks}
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, rank=8, **options, **subset)
    peft_model = get_peft_model(model.eval(), cfg)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, DeRSLayer):
                for container in ("ders_router", "ders_delta"):
                    for p in getattr(module, container).parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return ders_peft.export_moe(peft_model.eval(), out_dir, arch)


def swap_experts(model, a: int = 0, b: int = 1) -> None:
    """Swap the weights of routed experts ``a`` and ``b`` in every MoE block (the router unchanged): a wrong expert
    order, which a token comparison must detect."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts is None:
                continue
            for w in (experts.gate_up_proj, experts.down_proj):
                w[[a, b]] = w[[b, a]].clone()


def transformers_tokens(export: Path, new_tokens: int, swapped: bool = False) -> dict:
    """Greedy tokens of each prompt (one request at a time) and the decode rate, with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    if swapped:
        swap_experts(model)
    gen_cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run() -> list[list[int]]:
        out = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = torch.tensor([prompt])
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
                out.append(seq[0, len(prompt) :].tolist())
        return out

    run()  # warm-up
    times = []
    for _ in range(REPS):  # the median of REPS timed runs (the machine is shared)
        start = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - start)
    seconds = _common.median(times)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds}


_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
export, new_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
start = time.perf_counter()
llm = LLM(model=export, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=256, seed=0)
load = time.perf_counter() - start
params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
def one_at_a_time():
    return [list(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p in prompts]
one_at_a_time()  # warm-up
def timed(fn):
    times = []
    for _ in range(3):  # the median of 3 timed runs (the machine is shared)
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[1]
tokens, seconds = timed(one_at_a_time)
batch, batch_seconds = timed(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds,
                  "batched_tokens": [list(o.outputs[0].token_ids) for o in batch],
                  "batched_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in batch) / batch_seconds,
                  "load_seconds": load}))
"""


def engine_missing(engine: str) -> str | None:
    """Why ``engine`` cannot run here (None where it can)."""
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed (pip install -e .[serve]; docs/serving.md)"
        return None
    if engine == "llama.cpp":
        return (
            "not implemented: the llama.cpp arm (convert_hf_to_gguf.py + llama-cpp-python) was not built in this "
            "session (it compiles for 10+ minutes on 2 cores); docs/serving.md has the earlier findings"
        )
    raise ValueError(f"engine={engine!r} is invalid: allowed values are 'vllm', 'llama.cpp'.")


def vllm_tokens(export: Path, new_tokens: int, timeout: float = 900.0) -> dict:
    """Greedy tokens and rates from vLLM (a fresh process: one engine per process)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(export), str(new_tokens), json.dumps(PROMPTS)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM failed on {export} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"tokens"')]  # vLLM logs to stdout too
    if not lines:
        raise RuntimeError(f"vLLM printed no result for {export}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def run(archs: list[str], new_tokens: int, work: Path) -> dict:
    results: dict = {"prompts": PROMPTS, "new_tokens": new_tokens, "archs": {}}
    missing = {engine: engine_missing(engine) for engine in ("vllm", "llama.cpp")}
    results["engines_not_run"] = {k: v for k, v in missing.items() if v}
    if not missing["vllm"]:
        import vllm

        results["vllm_version"] = vllm.__version__
    for arch in archs:
        export = build_export(arch, work / arch)
        from ders_peft.export import engine_compatibility

        row = {
            "options": {"source": CASES[arch][0], **CASES[arch][1], "upcycled_blocks": CASES[arch][2] or "all"},
            "compatibility": engine_compatibility(export),
            "transformers": transformers_tokens(export, new_tokens),
        }
        row["swapped_experts_change_tokens"] = (
            transformers_tokens(export, new_tokens, swapped=True)["tokens"] != row["transformers"]["tokens"]
        )
        if not missing["vllm"]:
            try:
                out = vllm_tokens(export, new_tokens)
                out["same_tokens"] = out["tokens"] == row["transformers"]["tokens"]
                out["batched_same_tokens"] = out["batched_tokens"] == row["transformers"]["tokens"]
            except RuntimeError as err:
                out = {"error": str(err)[-2000:]}
            row["vllm"] = out
        results["archs"][arch] = row
        print(f"{arch}: " + json.dumps({k: v for k, v in row.items() if k != "compatibility"})[:400], flush=True)
    return results


def markdown(result: dict) -> str:
    rows = []
    for arch, row in result["archs"].items():
        hf, v = row["transformers"], row.get("vllm")
        if v is None:
            vcells = ["not run", "", "", ""]
        elif "error" in v:
            vcells = ["failed: " + v["error"].strip().splitlines()[-1][:120], "", "", ""]
        else:
            vcells = [
                "yes" if v["same_tokens"] and v["batched_same_tokens"] else "NO",
                f"{v['tokens_per_s']:.1f}",
                f"{v['batched_tokens_per_s']:.1f}",
                f"{v['load_seconds']:.0f}",
            ]
        opts = ", ".join(f"{k}={val}" for k, val in row["options"].items())
        swap = "yes" if row["swapped_experts_change_tokens"] else "NO"
        rows.append([arch, opts, swap, f"{hf['tokens_per_s']:.1f}", *vcells])
    header = [
        "target", "export options", "swapping 2 experts changes tokens", "transformers tok/s", "vLLM same tokens",
        "vLLM tok/s (1 request)", "vLLM tok/s (3 batched)", "vLLM load s",
    ]  # fmt: skip
    lines = [
        "# Serving benchmark: exported DeRS MoE checkpoints in vLLM vs transformers",
        "",
        _common.provenance_line(result),
        "",
        f"{len(result['prompts'])} prompts x {result['new_tokens']} greedy tokens, fp32, tiny models (hidden 128, "
        "3 blocks, 4 experts, top-2, rank 8; deltas large enough that swapping two experts changes the tokens). "
        "Tokens/s: one request at a time, median of 3 runs after a warm-up (transformers `generate`, vLLM "
        "`LLM.generate`); vLLM "
        "also with the 3 prompts batched. vLLM: " + result.get("vllm_version", "not installed") + ".",
        "",
        _common.markdown_table(header, rows),
        "",
    ]
    for engine, why in result["engines_not_run"].items():
        lines.append(f"- {engine}: not run: {why}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(CASES), help=f"comma-separated targets of {tuple(CASES)}")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="result folder (default docs/)")
    args = parser.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    bad = [a for a in archs if a not in CASES]
    if bad:
        parser.error(f"--archs {bad} are invalid: allowed values are {tuple(CASES)}")
    out = args.out or _common.DOCS
    with tempfile.TemporaryDirectory(prefix="ders_serve_") as work:
        result = run(archs, args.new_tokens, Path(work))
    result.update(
        command=_common.command_line("serve.py", argv), machine=_common.machine_note(), commit=_common.git_commit()
    )
    _common.write_json(out / "benchmarks_serve.json", result)
    (out / "benchmarks_serve.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out / 'benchmarks_serve.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
