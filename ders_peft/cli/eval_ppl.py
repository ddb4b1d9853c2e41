"""``ders-peft eval-ppl``: sliding-window perplexity and bits per byte of a dense model, a DeRS adapter or a MoE."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _read(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--data={path!r} is invalid: it is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data={path!r} is invalid: not UTF-8 text ({err})") from None


def read_jsonl_texts(path: str) -> list[str]:
    """The string ``text`` field of every non-empty line of a ``.jsonl`` file; ``ValueError`` naming the line."""
    texts = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"--data={path!r} is invalid: line {n} is not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"--data={path!r} is invalid: line {n} has no string field 'text'")
        texts.append(row["text"])
    return texts


def read_text(path: str) -> str:
    """The text of a ``.txt`` file, or the ``text`` fields of a ``.jsonl`` file joined by blank lines."""
    return "\n\n".join(read_jsonl_texts(path)) if Path(path).suffix == ".jsonl" else _read(path)


def run(args: argparse.Namespace) -> int:
    """Print perplexity, bits per byte and the token count."""
    if args.max_length < 2 or not 1 <= args.stride <= args.max_length:
        raise ValueError(
            f"--max-length={args.max_length} / --stride={args.stride} are invalid: need max-length >= 2 and "
            "1 <= stride <= max-length"
        )
    text = read_text(args.data)
    from ..diagnostics.api import load_for_inspection
    from ..diagnostics.perplexity import perplexity_report, sliding_window_nll

    model, tokenizer, what = load_for_inspection(args.model, args.base)
    if tokenizer is None:
        raise ValueError(f"{args.model!r} (and its base) has no tokenizer files: save the tokenizer beside the model")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nll, tokens = sliding_window_nll(model.eval(), ids, args.max_length, args.stride, progress=not args.no_progress)
    result = {"model": what, "data": args.data} | perplexity_report(nll, tokens, len(text.encode("utf-8")))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(
            f"{what} on {args.data}: perplexity {result['perplexity']:.4f}, {result['bits_per_byte']:.4f} bits per "
            f"byte ({tokens:,} tokens predicted, window {args.max_length}, stride {args.stride})"
        )
    return 0
