"""``ders-peft`` command line (local directories only, never the Hub).

- ``ders-peft export --base <dense dir> --adapter <adapter dir> --out <dir> [--architecture mixtral|...]``: a standard
  transformers MoE checkpoint with a model card (:func:`ders_peft.export.export_moe`).
- ``ders-peft params <model dir> [--adapter <dir> | DeRS options] [--json]``: the parameter report, on the meta
  device (:func:`ders_peft.parameter_report`).
- ``ders-peft train --base <dense dir> --data FILE|DIR --out <dir> [DeRS options] [SFTConfig options] [--resume]``:
  TRL ``SFTTrainer`` with CPU-safe defaults; the adapter goes to ``<out>/adapter``.
- ``ders-peft eval-ppl <model, adapter or MoE dir> [--base <dir>] --data FILE``: sliding-window perplexity and bits
  per byte (:mod:`ders_peft.diagnostics.perplexity`).
- ``ders-peft inspect <adapter or MoE dir> [--base <dense dir>] [--text FILE] --out <dir>``: diagnostics PNGs + JSON
  (:func:`ders_peft.diagnostics.inspect_path`).
- ``ders-peft compress --base <dense dir> (--adapter <DeRS full adapter dir> | --moe <MoE dir>) --method dare
  --drop-rate 0.9 --out <dir>``: a compressed DeRS adapter over the dense model (:func:`ders_peft.compress`).

Every input directory and the destination are checked before a model is loaded; outputs are written atomically
(:mod:`ders_peft.atomic`). A user error is one line on stderr naming the option and the file, exit status 2; an
unexpected error exits 1 (``--debug`` shows tracebacks); see ``EPILOG``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_OK, EXIT_INTERNAL, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
EPILOG = """exit status:
  0    success
  2    refused input: a usage error, a bad option, a missing, corrupt or foreign file or directory (named in
       the message), a model or adapter with no exact result, a failed export check, or a file-system error
  1    unexpected internal error (a bug): rerun with --debug and report the traceback
  130  interrupted (Ctrl-C); the output directory is left as it was
Errors are one line on stderr; --debug shows the traceback."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _build_parser() -> argparse.ArgumentParser:
    from ..export import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="ders-peft",
        description="DeRS Mixture-of-Experts upcycling tools.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--version", action="version", version=f"ders-peft {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser(
        "export",
        parents=[common],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    _add_compress_parser(sub, common)
    from . import eval_ppl, inspect, params, train

    train.add_parser(sub, common, EPILOG)
    eval_ppl.add_parser(sub, common, EPILOG)
    params.add_parser(sub, common, EPILOG)
    inspect.add_parser(sub, common, EPILOG)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ders_peft")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _add_compress_parser(sub, common) -> None:
    from ..compression.config import BITS

    com = sub.add_parser(
        "compress",
        parents=[common],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compress a trained vanilla-upcycled MoE into a DeRS adapter with sparse or quantized deltas",
        description="Split a trained MoE into its dense model's FFN (the shared base) plus per-expert deltas, "
        "compressed by DARE, magnitude pruning or k-bit quantization, and save it as a DeRS adapter over the dense "
        "model.",
    )
    com.add_argument("--base", required=True, help="local directory of the dense model the MoE was upcycled from")
    src = com.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="local directory of a DeRS adapter with delta_type='full' over --base")
    src.add_argument("--moe", help="local directory of a Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint")
    com.add_argument(
        "--method",
        choices=("dare", "magnitude", "quantize"),
        required=True,
        help="how the deltas are compressed (D2-MoE, which needs calibration data, is the Python API's "
        "compress(method='d2moe'))",
    )
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


def _check_model_dir(flag: str, path: Path) -> None:
    """A local transformers model directory: a config.json object with a model_type and complete weight files."""
    from ..registration import check_safetensors

    config = _read_json(flag, path, "config.json")
    if not isinstance(config.get("model_type"), str):
        raise ValueError(f"--{flag}={str(path)!r} is invalid: {str(path / 'config.json')!r} has no 'model_type'.")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(flag, path, index.name).get("weight_map", {}).values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise ValueError(f"--{flag}={str(path)!r} is invalid: the weight file {shard!r} is missing.")
            check_safetensors(str(path / shard))
    elif (path / "model.safetensors").is_file():
        check_safetensors(str(path / "model.safetensors"))
    elif not any((path / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(
            f"--{flag}={str(path)!r} is invalid: it has config.json but no weights (model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin); it must be a saved model directory."
        )


def _read_json(flag: str, path: Path, name: str) -> dict:
    file = path / name
    if not file.is_file():
        raise ValueError(f"--{flag}={str(path)!r} is invalid: it must be a local directory containing {name}.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"--{flag}={str(path)!r} is invalid: {str(file)!r} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"--{flag}={str(path)!r} is invalid: {str(file)!r} holds a JSON {type(data).__name__}, not an object."
        )
    return data


def _check_adapter_dir(path: Path) -> dict:
    from ..registration import check_adapter_dir

    config = _read_json("adapter", path, "adapter_config.json")
    if config.get("peft_type") != "DERS":
        raise ValueError(
            f"--adapter={str(path)!r} is invalid: its peft_type is {config.get('peft_type')!r}, expected 'DERS'."
        )
    check_adapter_dir(path)
    return config


def _export(args: argparse.Namespace) -> int:
    base, adapter = Path(args.base), Path(args.adapter)
    _check_model_dir("base", base)
    adapter_cfg = _check_adapter_dir(adapter)
    from ..export import check_export_dir

    check_export_dir(args.out, "--out")  # before loading anything

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..export import export_moe

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
    return EXIT_OK


def _compression_config(args: argparse.Namespace):
    from ..compression import CompressionConfig

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


def _new_output_dir(out_dir: str) -> Path:
    import warnings

    from ..atomic import check_destination, recover

    out = check_destination(out_dir, "--out")
    for action in recover(out):  # an interrupted earlier write: restore or clean up first, then check
        warnings.warn(action, stacklevel=2)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out={str(out)!r} is invalid: it exists and is not an empty directory; choose a new one.")
    return out


def _compress(args: argparse.Namespace) -> int:
    config = _compression_config(args)
    base = Path(args.base)
    _check_model_dir("base", base)
    if args.adapter:
        source = Path(args.adapter)
        adapter_cfg = _check_adapter_dir(source)
        if adapter_cfg.get("delta_type") != "full":
            raise ValueError(
                f"--adapter={str(source)!r} is invalid: it must be a DeRS adapter with delta_type 'full' (vanilla "
                f"experts); its delta_type is {adapter_cfg.get('delta_type')!r}."
            )
    else:
        source = Path(args.moe)
        _check_model_dir("moe", source)
    out = _new_output_dir(args.out)  # before loading anything

    import torch
    from transformers import AutoModelForCausalLM

    from ..atomic import write_dir
    from ..compression import compress, compression_report

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    load = {"local_files_only": True, "dtype": dtype}
    if args.adapter:
        from peft import PeftModel

        dense = AutoModelForCausalLM.from_pretrained(str(base), **load)
        moe = PeftModel.from_pretrained(dense, str(source), local_files_only=True).eval()
        small = compress(moe, config)
    else:
        moe = AutoModelForCausalLM.from_pretrained(str(source), **load).eval()
        small = compress(moe, config, dense_model=str(base))
    small.peft_config[small.active_adapter].base_model_name_or_path = str(base)
    _new_output_dir(args.out)  # still new or empty after the work
    write_dir(out, small.save_pretrained, what="--out")
    report = compression_report(small, uncompressed=moe, saved_dir=out).as_dict()
    print(
        f"wrote a DeRS {config.method} adapter to {out}: added params {report['added_params']:,}, adapter files "
        f"{report['file_bytes']:,} bytes; experts stored in {report['experts_ratio']:.1%} of the MoE's expert bytes, "
        f"whole model {report['total_ratio']:.1%}"
    )
    return EXIT_OK


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.replace("\n  ", "; ").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ders-peft`` console script; returns the exit code (see ``EPILOG``)."""
    args = _build_parser().parse_args(argv)
    from . import eval_ppl, inspect, params, train

    commands = {"export": _export, "compress": _compress, "inspect": inspect.run, "params": params.run}
    run = (commands | {"eval-ppl": eval_ppl.run, "train": train.run})[args.command]
    if args.debug:
        return run(args)
    from ..export import ExportCheckError

    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"ders-peft {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, ExportCheckError) as err:
        print(f"ders-peft {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        print(
            f"ders-peft {args.command}: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug "
            "for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
