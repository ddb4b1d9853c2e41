"""``ders-peft params``: the parameter report of a local model directory, built on the meta device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import ders_config


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
