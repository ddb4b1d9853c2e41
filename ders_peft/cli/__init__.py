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

The parser and ``main`` live in the light package :mod:`ders_peft_cli` (so ``--help`` imports no torch); this package
holds what each subcommand runs (:data:`COMMANDS`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ders_peft_cli import EPILOG, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, main

from . import eval_ppl, inspect, params, train

__all__ = ["COMMANDS", "EPILOG", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REFUSED", "main"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


class _ExportCheckLine(logging.Handler):
    """Keeps the export check's log message, printed with the export's result."""

    line: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.line = record.getMessage()


def _export(args: argparse.Namespace) -> int:
    base, adapter = Path(args.base), Path(args.adapter)
    _check_model_dir("base", base)
    adapter_cfg = _check_adapter_dir(adapter)
    from ..export import check_export_dir

    check_export_dir(args.out, "--out")  # before loading anything

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..export import export_moe, writing

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter), local_files_only=True).eval()
    check = _ExportCheckLine()
    level = writing.logger.level
    writing.logger.addHandler(check)
    writing.logger.setLevel(logging.INFO)
    try:
        out = export_moe(
            model,
            args.out,
            architecture=args.architecture,
            tokenizer=_load_tokenizer(adapter, base),
            base_model=adapter_cfg.get("base_model_name_or_path") or str(base),
            verify=not args.no_verify,
        )
    finally:
        writing.logger.removeHandler(check)
        writing.logger.setLevel(level)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {arch} checkpoint to {out} ({check.line or 'logit check skipped (--no-verify)'})")
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


def _lm_eval(args: argparse.Namespace) -> int:
    import importlib.util

    from ..integrations.lm_eval import cli_evaluate

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("ders-peft lm-eval needs lm-eval: pip install 'ders_peft[eval]' (or lm-eval==0.4.13)")
    try:
        cli_evaluate(args.lm_eval_args)
    except SystemExit as stop:  # lm-eval's argparse and its own errors exit
        return stop.code if isinstance(stop.code, int) else EXIT_REFUSED
    return EXIT_OK


COMMANDS = {
    "export": _export,
    "compress": _compress,
    "train": train.run,
    "eval-ppl": eval_ppl.run,
    "params": params.run,
    "inspect": inspect.run,
    "lm-eval": _lm_eval,
}
