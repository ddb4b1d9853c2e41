"""``ders-peft`` command line (local directories only, never the Hub).

- ``ders-peft export --base <dense dir> --adapter <adapter dir> --out <dir> [--architecture mixtral|...]``: a standard
  transformers MoE checkpoint with a model card (:func:`ders_peft.export.export_moe`).
- ``ders-peft compress --base <dense dir> (--adapter <DeRS full adapter dir> | --moe <MoE dir>) --method dare
  --drop-rate 0.9 --out <dir>``: a compressed DeRS adapter over the dense model (:func:`ders_peft.compress`).
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
    _add_compress_parser(sub)
    return parser


def _add_compress_parser(sub) -> None:
    from .compression.config import BITS, METHODS

    com = sub.add_parser(
        "compress",
        help="compress a trained vanilla-upcycled MoE into a DeRS adapter with sparse or quantized deltas",
        description="Split a trained MoE into its dense model's FFN (the shared base) plus per-expert deltas, "
        "compressed by DARE, magnitude pruning or k-bit quantization, and save it as a DeRS adapter over the dense "
        "model.",
    )
    com.add_argument("--base", required=True, help="local directory of the dense model the MoE was upcycled from")
    src = com.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="local directory of a DeRS adapter with delta_type='full' over --base")
    src.add_argument("--moe", help="local directory of a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint")
    com.add_argument("--method", choices=METHODS, required=True, help="how the deltas are compressed")
    com.add_argument("--drop-rate", type=float, default=None, help="dare/magnitude: share of entries dropped [0, 1)")
    com.add_argument("--bits", type=int, choices=BITS, default=None, help="quantize: bits per entry")
    com.add_argument("--group-size", type=int, default=None, help="quantize: entries per scale (default: per row)")
    com.add_argument("--seed", type=int, default=None, help="dare: seed of the kept entries (default 0)")
    com.add_argument(
        "--no-compress-shared", action="store_true", help="keep the universal FFN / shared expert's delta whole"
    )
    com.add_argument("--dtype", choices=_DTYPES, default="auto", help="dtype to load the models in")
    com.add_argument("--out", required=True, help="output directory for the adapter: new or empty")


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


def _compression_config(args: argparse.Namespace):
    from .compression import CompressionConfig

    given = {
        "--drop-rate": args.drop_rate is not None,
        "--bits": args.bits is not None,
        "--group-size": args.group_size is not None,
        "--seed": args.seed is not None,
    }
    used = {"dare": ("--drop-rate", "--seed"), "magnitude": ("--drop-rate",), "quantize": ("--bits", "--group-size")}
    ignored = [flag for flag, is_given in given.items() if is_given and flag not in used[args.method]]
    if ignored:
        raise ValueError(f"{', '.join(ignored)} do not apply to --method {args.method} (it uses {used[args.method]})")
    if args.method in ("dare", "magnitude") and args.drop_rate is None:
        raise ValueError(f"--method {args.method} needs --drop-rate (the share of delta entries dropped, in [0, 1))")
    if args.method == "quantize" and args.bits is None:
        raise ValueError("--method quantize needs --bits (1-8)")
    kwargs = {"method": args.method, "compress_shared": not args.no_compress_shared}
    for name in ("drop_rate", "bits", "group_size", "seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    try:
        return CompressionConfig(**kwargs)
    except ValueError as err:  # name the flag, not the dataclass field
        raise ValueError(str(err).replace("CompressionConfig.", "--").replace("_", "-")) from err


def _new_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out={str(out)!r} is invalid: it exists and is not an empty directory; choose a new one.")


def _compress(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from .compression import compress, compression_report

    config = _compression_config(args)
    base = Path(args.base)
    source_flag, source = ("--adapter", Path(args.adapter)) if args.adapter else ("--moe", Path(args.moe))
    marker = "adapter_config.json" if args.adapter else "config.json"
    for flag, path, name in (("--base", base, "config.json"), (source_flag, source, marker)):
        if not (path / name).is_file():
            raise ValueError(f"{flag}={str(path)!r} is invalid: it must be a local directory containing {name}.")
    out = Path(args.out)
    _new_output_dir(out)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    load = {"local_files_only": True, "dtype": dtype}
    if args.adapter:
        from peft import PeftModel

        adapter_cfg = json.loads((source / "adapter_config.json").read_text())
        if adapter_cfg.get("peft_type") != "DERS" or adapter_cfg.get("delta_type") != "full":
            raise ValueError(
                f"--adapter={str(source)!r} is invalid: it must be a DeRS adapter with delta_type 'full' (vanilla "
                f"experts); its peft_type is {adapter_cfg.get('peft_type')!r}, delta_type "
                f"{adapter_cfg.get('delta_type')!r}."
            )
        dense = AutoModelForCausalLM.from_pretrained(str(base), **load)
        moe = PeftModel.from_pretrained(dense, str(source), local_files_only=True).eval()
        small = compress(moe, config)
    else:
        moe = AutoModelForCausalLM.from_pretrained(str(source), **load).eval()
        small = compress(moe, config, dense_model=str(base))
    small.peft_config[small.active_adapter].base_model_name_or_path = str(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        small.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = compression_report(small, uncompressed=moe, saved_dir=out).as_dict()
    print(
        f"wrote a DeRS {config.method} adapter to {out}: added params {report['added_params']:,}, adapter files "
        f"{report['file_bytes']:,} bytes; experts stored in {report['experts_ratio']:.1%} of the MoE's expert bytes, "
        f"whole model {report['total_ratio']:.1%}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ders-peft`` console script; returns the exit code (2 for refused input)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "export":
            return _export(args)
        if args.command == "compress":
            return _compress(args)
    except ValueError as err:
        print(f"ders-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
