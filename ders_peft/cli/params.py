"""``ders-peft params``: the parameter report of a local model directory, built on the meta device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_ders_options, ders_config

EXAMPLE = """examples:
  ders-peft params path/to/llama-7b --num-experts 8 --top-k 2 --delta-type lowrank --rank 4
  ders-peft params out/demo/dense_base --adapter out/demo/adapter --json"""


def add_parser(sub, common, epilog: str) -> None:
    """Register the ``params`` subcommand."""
    p = sub.add_parser(
        "params",
        parents=[common],
        epilog=f"{EXAMPLE}\n\n{epilog}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="parameter report (added / trainable / total) of a DeRS config or adapter on a local model's config",
        description="Build the model from its config.json on the meta device (no weights are read, so a 7B config "
        "answers in seconds), apply the DeRS config given by --adapter or the options, and print the report.",
    )
    p.add_argument("model", help="local model directory (only its config.json is read)")
    p.add_argument("--adapter", default=None, help="DeRS adapter directory whose adapter_config.json is used")
    add_ders_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _config(args: argparse.Namespace):
    if args.adapter is None:
        return ders_config(args)
    from ..config import DeRSConfig
    from . import _check_adapter_dir

    _check_adapter_dir(Path(args.adapter))
    return DeRSConfig.from_pretrained(args.adapter)


def run(args: argparse.Namespace) -> int:
    """Print the report (a table, or JSON with ``--json``)."""
    from . import _read_json

    _read_json("model", Path(args.model), "config.json")
    config = _config(args)
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..report import parameter_report

    model_config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    report = parameter_report(get_peft_model(model, config))
    print(json.dumps(report.as_dict(), indent=1) if args.json else str(report))
    return 0
