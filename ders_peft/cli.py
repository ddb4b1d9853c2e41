"""``ders-peft`` command line.

``ders-peft export --base <dense model dir> --adapter <adapter dir> --out <dir> [--architecture mixtral|...]``
loads the dense model and the DeRS adapter from local directories (never from the Hub), and writes a standard
transformers MoE checkpoint with a model card (see :func:`ders_peft.export.export_moe`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _build_parser() -> argparse.ArgumentParser:
    from .export import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="ders-peft", description="DeRS Mixture-of-Experts upcycling tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "export",
        help="write a DeRS model as a standard transformers MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE)",
        description="Merge a DeRS adapter into its dense base model and save the exact standard MoE equivalent.",
    )
    exp.add_argument("--base", required=True, help="local directory of the dense base model")
    exp.add_argument("--adapter", required=True, help="local directory of the DeRS adapter (adapter_config.json)")
    exp.add_argument(
        "--out", required=True, help="output directory: new, empty or a previous export (replaced only on success)"
    )
    exp.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=None,
        help="target architecture (default: the first exact one)",
    )
    exp.add_argument("--dtype", choices=_DTYPES, default="auto", help="dtype to load and save the model in")
    exp.add_argument("--no-verify", action="store_true", help="skip the logit check against the DeRS model")
    return parser


def _load_tokenizer(*dirs: Path):
    for d in dirs:
        if any((d / name).exists() for name in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return None


def _export(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .export import export_moe

    base, adapter = Path(args.base), Path(args.adapter)
    for flag, path, marker in (("--base", base, "config.json"), ("--adapter", adapter, "adapter_config.json")):
        if not (path / marker).is_file():
            raise ValueError(f"{flag}={str(path)!r} is invalid: it must be a local directory containing {marker}.")
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    if adapter_cfg.get("peft_type") != "DERS":
        raise ValueError(
            f"--adapter={str(adapter)!r} is invalid: its peft_type is {adapter_cfg.get('peft_type')!r}, "
            "expected 'DERS'."
        )
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).eval()
    out = export_moe(
        model,
        args.out,
        architecture=args.architecture,
        tokenizer=_load_tokenizer(adapter, base),
        base_model=adapter_cfg.get("base_model_name_or_path") or str(base),
        verify=not args.no_verify,
    )
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {arch} checkpoint to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ders-peft`` console script; returns the exit code (2 for refused input)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "export":
            return _export(args)
    except ValueError as err:
        print(f"ders-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
