"""``ders-peft params``: the parameter report of a local model directory, built on the meta device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    p.add_argument("--num-experts", type=int, default=8, help="experts per upcycled block (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--delta-type", default="lowrank", help="lowrank, sparse, full or quantized (default lowrank)")
    p.add_argument("--rank", type=int, default=4, help="lowrank: rank of each delta (default 4)")
    p.add_argument("--sparse-rate", type=float, default=0.9, help="sparse: share of zero entries (default 0.9)")
    p.add_argument("--bits", type=int, default=None, help="quantized: bits per entry")
    p.add_argument("--shared-expert", action="store_true", help="add the always-on universal FFN")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _config(args: argparse.Namespace):
    from ..config import DeRSConfig

    if args.adapter is None:
        kwargs = {"num_experts": args.num_experts, "top_k": args.top_k, "delta_type": args.delta_type}
        kwargs |= {"rank": args.rank, "sparse_rate": args.sparse_rate, "shared_expert": args.shared_expert}
        if args.bits is not None:
            kwargs["bits"] = args.bits
        return DeRSConfig(task_type="CAUSAL_LM", **kwargs)
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
