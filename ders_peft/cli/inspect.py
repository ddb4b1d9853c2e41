"""``ders-peft inspect``: expert similarity, router load and delta spectra of an adapter or a MoE, as PNGs + JSON."""

from __future__ import annotations

import argparse

EXAMPLE = """example:
  ders-peft inspect out/demo/adapter --base out/demo/dense_base --text notes.txt --out out/inspect
  ders-peft inspect out/demo/mixtral --out out/inspect-mixtral"""


def add_parser(sub, common, epilog: str) -> None:
    """Register the ``inspect`` subcommand."""
    p = sub.add_parser(
        "inspect",
        parents=[common],
        epilog=f"{EXAMPLE}\n\n{epilog}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="diagnostics of a DeRS adapter or a transformers MoE: expert similarity, router load, delta spectra",
        description="Write diagnostics.json, summary.txt and PNG plots: per layer the cosine similarity of each "
        "expert's weights to the base and to each other, the singular-value energy of the deltas and, with --text, "
        "the router's load (token share, balance, entropy) on that text.",
    )
    p.add_argument("path", help="local directory of a DeRS adapter (adapter_config.json) or of a MoE model")
    p.add_argument("--base", default=None, help="dense base model directory of an adapter (default: the one it names)")
    p.add_argument("--text", default=None, help="text file for the router load (without it: no router statistics)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of --text used (default 4096)")
    p.add_argument("--out", required=True, help="output directory (files of the same names are replaced)")


def run(args: argparse.Namespace) -> int:
    """Run the diagnostics and print the summary and where the files went."""
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens} is invalid: must be at least 1")
    from ..diagnostics import inspect_path
    from ..diagnostics.api import summary_text

    result = inspect_path(args.path, base=args.base, text_file=args.text, out_dir=args.out, max_tokens=args.max_tokens)
    print(summary_text(result).rstrip())
    for path in result["files"].values():
        print(f"wrote {path}")
    return 0
