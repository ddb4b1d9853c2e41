"""``ders-peft inspect``: expert similarity, router load and delta spectra of an adapter or a MoE, as PNGs + JSON."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Run the diagnostics and print the summary and where the files went."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens} is invalid: must be at least 1")
    from ..diagnostics import inspect_path
    from ..diagnostics.api import summary_text

    result = inspect_path(
        args.path,
        base=args.base,
        text_file=args.text,
        out_dir=args.out,
        max_tokens=args.max_tokens,
        progress=not args.no_progress,
    )
    print(summary_text(result).rstrip())
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0
