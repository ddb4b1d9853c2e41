"""Sliding-window perplexity and bits per byte of a causal LM on one long text (what ``ders-peft eval-ppl`` runs)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def sliding_window_nll(
    model: nn.Module, ids: torch.Tensor, max_length: int, stride: int, progress: bool = False
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of predicted tokens of the 1-D token ids ``ids``.

    Windows of at most ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens the
    previous window did not (so every token but the first is predicted exactly once, with up to
    ``max_length - stride`` tokens of context carried over), as in transformers' perplexity guide. ``progress``
    draws a tqdm bar over the windows on stderr.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} is invalid: must be between 1 and max_length={max_length}")
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens of text to score, got {ids.numel()}")
    from tqdm.auto import tqdm

    total, count, scored_to = 0.0, 0, 1  # the first token is never predicted
    starts = range(0, ids.numel() - 1, stride)
    windows = 1 + max(0, -(-(ids.numel() - max_length) // stride))  # the last window ends at the last token
    bar = tqdm(total=windows, desc="eval-ppl", unit="window", disable=not progress)
    for begin in starts:
        end = min(begin + max_length, ids.numel())
        window = ids[begin:end].unsqueeze(0)
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        nll = F.cross_entropy(logits, targets, reduction="none")  # nll[j] predicts token begin + j + 1
        first = max(scored_to, begin + 1) - (begin + 1)
        total += float(nll[first:].sum())
        count += nll.numel() - first
        scored_to = end
        bar.update(1)
        if end == ids.numel():
            break
    bar.close()
    return total, count


def perplexity_report(nll: float, tokens: int, text_bytes: int) -> dict:
    """Perplexity ``exp(nll / tokens)`` and bits per byte ``nll / ln 2 / bytes`` from a summed NLL."""
    return {
        "tokens": tokens,
        "bytes": text_bytes,
        "nll_per_token": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / text_bytes,
    }
