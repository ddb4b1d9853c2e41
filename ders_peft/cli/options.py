"""DeRS options shared by the subcommands that build a :class:`~ders_peft.DeRSConfig` (``params``, ``train``)."""

from __future__ import annotations

import argparse


def ders_config(args: argparse.Namespace):
    """The :class:`~ders_peft.DeRSConfig` of the options (its own validation names a bad field)."""
    from ..config import DeRSConfig

    kwargs = {"num_experts": args.num_experts, "top_k": args.top_k, "delta_type": args.delta_type}
    kwargs |= {"rank": args.rank, "sparse_rate": args.sparse_rate, "shared_expert": args.shared_expert}
    if args.bits is not None:
        kwargs["bits"] = args.bits
    return DeRSConfig(task_type="CAUSAL_LM", **kwargs)
