"""Added parameters of vanilla upcycling vs DeRS-SM vs DeRS-LM on real-size configurations (built on the meta device).

Every other block upcycled, N=4 experts (top-2; top-k does not change the counts). Counts come from
``ders_peft.parameter_report`` (the paper's counting: router + deltas + extra per-expert bias copies; sparse deltas
count their values, the fixed int32 indices are reported as storage). Nothing is allocated: the models live on the
meta device.

Usage: ``python benchmarks/param_efficiency.py [--quick] [--out-dir DIR]``; writes ``benchmarks_params.json`` and
``benchmarks_params_tables.md`` (default ``docs/``; ``--quick`` without ``--out-dir``: a new temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import ders_peft  # noqa: E402

transformers.logging.set_verbosity_error()

# name -> (config class, model class, config kwargs, FFN target module name)
CONFIGS: dict[str, tuple[str, str, dict]] = {
    "Llama-3.2-1B-like": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    ),
    "Llama-3.2-3B-like": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    ),
    "StableLM-2-1.6B-like": (
        "StableLmConfig",
        "StableLmForCausalLM",
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=100352),
    ),
    "Phi-2-like": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
             vocab_size=51200),
    ),
}  # fmt: skip

QUICK_CONFIGS = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                                           num_attention_heads=4, vocab_size=256)),
    "tiny-phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                                                     num_attention_heads=4, vocab_size=256)),
}  # fmt: skip

METHODS: list[tuple[str, dict]] = [
    ("vanilla (full copies)", dict(delta_type="full")),
    ("DeRS-SM p=0.9", dict(delta_type="sparse", sparse_rate=0.9)),
    ("DeRS-SM p=0.999", dict(delta_type="sparse", sparse_rate=0.999)),
    ("DeRS-SM p=0.9999", dict(delta_type="sparse", sparse_rate=0.9999)),
    ("DeRS-LM r=16", dict(delta_type="lowrank", rank=16)),
    ("DeRS-LM r=4", dict(delta_type="lowrank", rank=4)),
    ("DeRS-LM r=1", dict(delta_type="lowrank", rank=1)),
]


def meta_model(spec: tuple[str, str, dict]) -> torch.nn.Module:
    cfg_name, model_name, kwargs = spec
    cfg = getattr(transformers, cfg_name)(**kwargs)
    with torch.device("meta"):
        return getattr(transformers, model_name)(cfg)


def count(spec: tuple[str, str, dict], method: dict, num_experts: int, shared: bool) -> dict:
    model = meta_model(spec)
    layers = spec[2]["num_hidden_layers"]
    cfg = ders_peft.DeRSConfig(
        target_modules=["mlp"],
        layers_to_transform=list(range(0, layers, 2)),
        num_experts=num_experts,
        top_k=2,
        shared_expert=shared,
        **method,
    )
    report = ders_peft.parameter_report(get_peft_model(model, cfg))
    return report.as_dict() | {"moe_layers": len(report.layers)}


def run(configs: dict, methods: list[tuple[str, dict]], num_experts: int, shared_too: bool, log) -> dict:
    out: dict = {}
    for cname, spec in configs.items():
        out[cname] = {}
        for shared in (False, True) if shared_too else (False,):
            key = "shared_expert" if shared else "routed_only"
            rows = {}
            for mname, method in methods:
                rep = count(spec, method, num_experts, shared)
                rows[mname] = {k: rep[k] for k in ("dense_params", "added_params", "trainable_params", "index_bytes")}
                rows[mname]["moe_layers"] = rep["moe_layers"]
            vanilla = rows["vanilla (full copies)"]["added_params"]
            for r in rows.values():
                r["reduction_vs_vanilla"] = vanilla / r["added_params"] if r["added_params"] else float("inf")
            out[cname][key] = rows
            log(f"{cname} {key}: vanilla adds {_common.fmt_params(vanilla)}")
    return out


def tables(results: dict, num_experts: int) -> str:
    parts = []
    for cname, variants in results["configs"].items():
        for key, rows in variants.items():
            first = next(iter(rows.values()))
            parts.append(
                f"\n### {cname} ({_common.fmt_params(first['dense_params'])} dense parameters; "
                f"{first['moe_layers']} of {results['layers'][cname]} blocks upcycled, N={num_experts}"
                + (", plus the universal shared expert" if key == "shared_expert" else "")
                + ")\n"
            )
            body = [
                [
                    m,
                    f"{r['added_params']:,}",
                    f"{100 * r['added_params'] / r['dense_params']:.3f}%",
                    f"{r['reduction_vs_vanilla']:.1f}x",
                    f"{r['trainable_params']:,}",
                    f"{r['index_bytes'] / 2**20:.1f} MiB" if r["index_bytes"] else "-",
                ]
                for m, r in rows.items()
            ]
            header = ["method", "added params", "% of dense", "reduction vs vanilla", "trainable", "index storage"]
            parts.append(_common.markdown_table(header, body))
    return "\n".join(parts).lstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny configurations only (CI smoke run)")
    ap.add_argument(
        "--out-dir", type=Path, default=None, help="default: docs/ (full run), a new temporary folder (--quick)"
    )
    ap.add_argument("--num-experts", type=int, default=4)
    args = ap.parse_args(argv)
    args.out_dir = _common.output_dir(args.out_dir, args.quick)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    configs = QUICK_CONFIGS if args.quick else CONFIGS
    results = {
        "command": "python benchmarks/param_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _common.machine_note(),
        "num_experts": args.num_experts,
        "layers": {c: s[2]["num_hidden_layers"] for c, s in configs.items()},
        "configs": run(configs, METHODS, args.num_experts, shared_too=True, log=log),
    }
    _common.write_json(args.out_dir / "benchmarks_params.json", results)
    text = tables(results, args.num_experts)
    (args.out_dir / "benchmarks_params_tables.md").write_text(text)
    print(text)
    log(f"wrote {args.out_dir / 'benchmarks_params.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
