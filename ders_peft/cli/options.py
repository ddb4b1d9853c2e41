"""DeRS options shared by the subcommands that build a :class:`~ders_peft.DeRSConfig` (``params``, ``train``)."""

from __future__ import annotations

import argparse


def add_ders_options(p: argparse.ArgumentParser) -> None:
    """Add the DeRS options (experts, top-k, delta type, rank, sparse rate, bits, universal FFN) to ``p``."""
    g = p.add_argument_group("DeRS options")
    g.add_argument("--num-experts", type=int, default=8, help="experts per upcycled block (default 8)")
    g.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    g.add_argument("--delta-type", default="lowrank", help="lowrank, sparse, full or quantized (default lowrank)")
    g.add_argument("--rank", type=int, default=4, help="lowrank: rank of each delta (default 4)")
    g.add_argument("--sparse-rate", type=float, default=0.9, help="sparse: share of zero entries (default 0.9)")
    g.add_argument("--bits", type=int, default=None, help="quantized: bits per entry")
    g.add_argument("--shared-expert", action="store_true", help="add the always-on universal FFN")


def ders_config(args: argparse.Namespace):
    """The :class:`~ders_peft.DeRSConfig` of the options (its own validation names a bad field)."""
    from ..config import DeRSConfig

    kwargs = {"num_experts": args.num_experts, "top_k": args.top_k, "delta_type": args.delta_type}
    kwargs |= {"rank": args.rank, "sparse_rate": args.sparse_rate, "shared_expert": args.shared_expert}
    if args.bits is not None:
        kwargs["bits"] = args.bits
    return DeRSConfig(task_type="CAUSAL_LM", **kwargs)
