"""Serve exported DeRS MoE checkpoints in a real engine and compare with transformers: greedy tokens and tokens/s.

For each case a tiny dense model is upcycled with DeRS deltas large enough that swapping two experts changes the
greedy tokens (checked: the ``swapped`` row), exported with ``export_moe``, and generated from with transformers and
with each engine that is available, in a fresh process per export: vLLM (``vllm.LLM(model=DIR, dtype="float32",
enforce_eager=True)``) and llama.cpp (``convert_hf_to_gguf.py DIR --outtype f32`` then llama-cpp-python). Same
tokens = every prompt's ``new_tokens`` greedy tokens are equal. Needs the ``serve`` extra (``pip install -e
.[serve]``) and, for llama.cpp, ``LLAMA_CPP_CONVERT`` naming its converter (docs/serving.md); an engine that is not
available is recorded as not run, with the reason.

    python benchmarks/serve.py [--archs mixtral,qwen2_moe,qwen2_moe_all,qwen3_moe] [--new-tokens 20] [--out DIR]

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

# case -> (target architecture, source family, DeRS options, upcycled blocks of 3; None = all): the options the
# engine runs cover. ``qwen2_moe`` has a dense block (vLLM serves it, llama.cpp's converter refuses it);
# ``qwen2_moe_all`` is the Qwen2-MoE llama.cpp can express (every block, no top-k renormalisation).
CASES: dict[str, tuple[str, str, dict, list[int] | None]] = {
    "mixtral": ("mixtral", "llama", {}, None),
    "qwen2_moe": ("qwen2_moe", "llama", {"shared_expert": True}, [0, 2]),
    "qwen2_moe_all": ("qwen2_moe", "llama", {"shared_expert": True, "normalize_top_k": False}, None),
    "qwen3_moe": ("qwen3_moe", "qwen3", {}, None),
}
ENGINES = ("vllm", "llama.cpp")


def local_tokenizer():
    """A byte-level BPE of ``VOCAB`` tokens trained on stdlib sources (GPT-2's pre-tokenizer), so an export carries
    a tokenizer (llama.cpp's converter needs one; the engines are fed token ids)."""
    import inspect
    import json as json_module
    import textwrap

    from ders_peft.local_corpus import train_tokenizer

    texts = [inspect.getsource(m) for m in (json_module, inspect, textwrap, argparse, importlib.util, tempfile)]
    return train_tokenizer(texts, vocab_size=VOCAB)


def build_export(case: str, out_dir: Path, seed: int = 0) -> Path:
    """Export a tiny DeRS model of ``CASES[case]`` with :func:`local_tokenizer` to ``out_dir`` (fp32; head_dim 64,
    which vLLM's CPU attention supports). Returns the export path."""
    import torch
    import transformers
    from peft import get_peft_model

    import ders_peft
    from ders_peft.layer import DeRSLayer

    arch, family, options, blocks = CASES[case]
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
    return ders_peft.export_moe(peft_model.eval(), out_dir, arch, tokenizer=local_tokenizer())


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


# llama.cpp: ``convert_hf_to_gguf.py`` (f32 GGUF), then llama-cpp-python fed token ids, greedy by argmax, with an
# f32 KV cache (the f16 default moves logits by ~1e-3, enough to flip a near-tie in a router's top-k).
_LLAMA_CONVERT_SCRIPT = """
import runpy, sys
from pathlib import Path
converter = sys.argv[1]
sys.path.insert(0, str(Path(converter).parent))
from conversion import base
recognised = base.TextModel.get_vocab_base_pre
def pre_tokenizer(self, tokenizer):
    # the converter knows BPE pre-tokenizers by a hash of published models' token ids; ours is trained locally with
    # GPT-2's byte-level pre-tokenizer, so name that one when the hash is unknown (tokenizer metadata only)
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre_tokenizer
sys.argv = [converter] + sys.argv[2:]
runpy.run_path(converter, run_name="__main__")
"""

_LLAMA_SCRIPT = """
import json, sys, time
import numpy as np
from llama_cpp import Llama, __version__
gguf, new_tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
start = time.perf_counter()
llm = Llama(model_path=gguf, n_ctx=256, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)  # 0 = f32
load = time.perf_counter() - start
def one_at_a_time():
    out = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        out.append(tokens)
    return out
one_at_a_time()  # warm-up
times = []
for _ in range(3):  # the median of 3 timed runs (the machine is shared)
    start = time.perf_counter()
    tokens = one_at_a_time()
    times.append(time.perf_counter() - start)
seconds = sorted(times)[1]
print(json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds,
                  "load_seconds": load, "version": __version__}))
"""


def llama_converter() -> Path | None:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``$LLAMA_CPP_CONVERT`` (docs/serving.md says how to get it)."""
    path = os.environ.get("LLAMA_CPP_CONVERT")
    return Path(path) if path else None


def engine_missing(engine: str) -> str | None:
    """Why ``engine`` cannot run here (None where it can)."""
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed (pip install -e .[serve]; docs/serving.md)"
        return None
    if engine == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama_cpp is not installed (pip install -e .[serve]; docs/serving.md)"
        converter = llama_converter()
        if converter is None:
            return "LLAMA_CPP_CONVERT is not set (the path of llama.cpp's convert_hf_to_gguf.py; docs/serving.md)"
        if not converter.is_file():
            return f"LLAMA_CPP_CONVERT={str(converter)!r} is not a file (expected convert_hf_to_gguf.py)"
        return None
    raise ValueError(f"engine={engine!r} is invalid: allowed values are {ENGINES}.")


def _subprocess_json(argv: list[str], what: str, timeout: float, env: dict | None = None) -> dict:
    """Run a Python snippet in a fresh process and return the JSON line it prints last (engines log to stdout too)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"tokens"')]
    if not lines:
        raise RuntimeError(f"{what} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def vllm_tokens(export: Path, new_tokens: int, timeout: float = 900.0) -> dict:
    """Greedy tokens and rates from vLLM (a fresh process: one engine per process)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    argv = ["-c", _VLLM_SCRIPT, str(export), str(new_tokens), json.dumps(PROMPTS)]
    return _subprocess_json(argv, f"vLLM on {export}", timeout, env)


def convert_to_gguf(export: Path, out: Path, timeout: float = 600.0) -> Path:
    """``convert_hf_to_gguf.py EXPORT --outtype f32`` (see ``_LLAMA_CONVERT_SCRIPT``); returns the GGUF path."""
    import subprocess

    argv = ["-c", _LLAMA_CONVERT_SCRIPT, str(llama_converter()), str(export), "--outtype", "f32"]
    argv += ["--outfile", str(out)]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not out.is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {export}: {lines[-1] if lines else proc.returncode}")
    return out


def llama_cpp_tokens(export: Path, new_tokens: int, timeout: float = 600.0) -> dict:
    """Convert ``export`` to an f32 GGUF beside it and return llama.cpp's greedy tokens and rate."""
    gguf = convert_to_gguf(export, export.parent / f"{export.name}.gguf", timeout)
    return _subprocess_json(["-c", _LLAMA_SCRIPT, str(gguf), str(new_tokens), json.dumps(PROMPTS)],
                            f"llama.cpp on {gguf}", timeout)  # fmt: skip


def engine_row(engine: str, export: Path, new_tokens: int, want: list[list[int]]) -> dict:
    """One engine's result on ``export``: its tokens and rates and whether they equal ``want``, or the error."""
    try:
        if engine == "vllm":
            out = vllm_tokens(export, new_tokens)
            out["batched_same_tokens"] = out["batched_tokens"] == want
        else:
            out = llama_cpp_tokens(export, new_tokens)
    except RuntimeError as err:
        return {"error": str(err)[-2000:]}
    out["same_tokens"] = out["tokens"] == want
    return out


def run(cases: list[str], new_tokens: int, work: Path) -> dict:
    from ders_peft.export import engine_compatibility

    results: dict = {"prompts": PROMPTS, "new_tokens": new_tokens, "archs": {}}
    missing = {engine: engine_missing(engine) for engine in ENGINES}
    results["engines_not_run"] = {k: v for k, v in missing.items() if v}
    if not missing["vllm"]:
        import vllm

        results["vllm_version"] = vllm.__version__
    for case in cases:
        export = build_export(case, work / case)
        arch, family, options, blocks = CASES[case]
        row = {
            "options": {"arch": arch, "source": family, **options, "upcycled_blocks": blocks or "all"},
            "compatibility": engine_compatibility(export),
            "transformers": transformers_tokens(export, new_tokens),
        }
        row["swapped_experts_change_tokens"] = (
            transformers_tokens(export, new_tokens, swapped=True)["tokens"] != row["transformers"]["tokens"]
        )
        for engine in ENGINES:
            if not missing[engine]:
                row[engine] = engine_row(engine, export, new_tokens, row["transformers"]["tokens"])
        results["archs"][case] = row
        print(f"{case}: " + json.dumps({k: v for k, v in row.items() if k != "compatibility"})[:400], flush=True)
    return results


def _engine_cells(out: dict | None, batched: bool) -> list[str]:
    if out is None:
        return ["not run", "", ""] + ([""] if batched else [])
    if "error" in out:
        return ["failed: " + out["error"].strip().splitlines()[-1][:120], "", ""] + ([""] if batched else [])
    same = out["same_tokens"] and out.get("batched_same_tokens", True)
    cells = ["yes" if same else "NO", f"{out['tokens_per_s']:.1f}"]
    if batched:
        cells.append(f"{out['batched_tokens_per_s']:.1f}")
    return cells + [f"{out['load_seconds']:.0f}"]


def markdown(result: dict) -> str:
    rows = []
    for case, row in result["archs"].items():
        opts = ", ".join(f"{k}={val}" for k, val in row["options"].items())
        swap = "yes" if row["swapped_experts_change_tokens"] else "NO"
        rows.append([
            case, opts, swap, f"{row['transformers']['tokens_per_s']:.1f}",
            *_engine_cells(row.get("vllm"), batched=True), *_engine_cells(row.get("llama.cpp"), batched=False),
        ])  # fmt: skip
    header = [
        "case", "export options", "swapping 2 experts changes tokens", "transformers tok/s", "vLLM same tokens",
        "vLLM tok/s (1 request)", "vLLM tok/s (3 batched)", "vLLM load s", "llama.cpp same tokens",
        "llama.cpp tok/s (1 request)", "llama.cpp load s",
    ]  # fmt: skip
    versions = f"vLLM {result.get('vllm_version', 'not installed')}, llama-cpp-python {_llama_version(result)}"
    lines = [
        "# Serving benchmark: exported DeRS MoE checkpoints in vLLM and llama.cpp vs transformers",
        "",
        _common.provenance_line(result),
        "",
        f"{len(result['prompts'])} prompts x {result['new_tokens']} greedy tokens, fp32, tiny models (hidden 128, "
        "3 blocks, 4 experts, top-2, rank 8; deltas large enough that swapping two experts changes the tokens). "
        "Tokens/s: one request at a time, median of 3 runs after a warm-up (transformers `generate`, vLLM "
        "`LLM.generate`, llama.cpp `Llama.eval` + argmax on an f32 GGUF with an f32 KV cache); vLLM also with the 3 "
        f"prompts batched. {versions}.",
        "",
        _common.markdown_table(header, rows),
        "",
    ]
    for engine, why in result["engines_not_run"].items():
        lines.append(f"- {engine}: not run: {why}.")
    return "\n".join(lines) + "\n"


def _llama_version(result: dict) -> str:
    versions = {row["llama.cpp"].get("version") for row in result["archs"].values() if "llama.cpp" in row}
    versions.discard(None)
    return ", ".join(sorted(versions)) or "not run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(CASES), help=f"comma-separated cases of {tuple(CASES)}")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="result folder (default docs/)")
    args = parser.parse_args(argv)
    cases = [a for a in args.archs.split(",") if a]
    bad = [a for a in cases if a not in CASES]
    if bad:
        parser.error(f"--archs {bad} are invalid: allowed values are {tuple(CASES)}")
    out = args.out or _common.DOCS
    with tempfile.TemporaryDirectory(prefix="ders_serve_") as work:
        result = run(cases, args.new_tokens, Path(work))
    result.update(
        command=_common.command_line("serve.py", argv), machine=_common.machine_note(), commit=_common.git_commit()
    )
    _common.write_json(out / "benchmarks_serve.json", result)
    (out / "benchmarks_serve.md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {out / 'benchmarks_serve.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
