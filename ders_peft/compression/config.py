"""`CompressionConfig`: how :func:`ders_peft.compress` turns a trained MoE into a shared base plus compact deltas."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

METHODS = ("dare", "magnitude", "quantize")
BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _bad(field_name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"CompressionConfig.{field_name}={value!r} is invalid: {allowed}.")


@dataclass
class CompressionConfig:
    """Settings of DeRS compression (arXiv 2503.01359, appendix): ``W_e = W_base + Delta_e`` with ``W_base`` the
    dense FFN the experts were upcycled from, and each ``Delta_e`` compressed.

    Args:
        method: ``"dare"`` (keep each entry with probability ``1 - drop_rate``, rescale the kept ones; unbiased),
            ``"magnitude"`` (keep the ``1 - drop_rate`` largest ``|Delta|`` entries of each expert's matrix, no
            rescaling) or ``"quantize"`` (symmetric ``bits``-bit codes with per-row or per-group scales). DARE and
            magnitude give an ordinary sparse DeRS adapter (values + int32 indices), quantization a quantized one.
        drop_rate: share of each delta's entries dropped (``"dare"``, ``"magnitude"``), in ``[0, 1)``.
        bits: bits per delta entry (``"quantize"``), 1-8; 1 bit is sign times a scale.
        group_size: entries of a row sharing one scale (``"quantize"``); ``None`` for one scale per output row.
        compress_shared: with a universal FFN (extended DeRS) or a Qwen2-MoE shared expert: ``True`` compresses its
            delta like the experts' (N + 1 deltas over one base); ``False`` keeps its delta whole (dense).
        seed: seed of DARE's random choice of kept entries (the same seed gives the same adapter).
    """

    method: Literal["dare", "magnitude", "quantize"] = "dare"
    drop_rate: float = 0.9
    bits: int = 4
    group_size: int | None = None
    compress_shared: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed for any invalid setting."""
        if self.method not in METHODS:
            hint = " (D2-MoE, for MoEs without a dense ancestor, is not built yet)" if self.method == "d2moe" else ""
            raise _bad("method", self.method, f"allowed values are {METHODS}{hint}")
        rate = self.drop_rate
        if not isinstance(rate, int | float) or isinstance(rate, bool) or math.isnan(rate) or not 0 <= rate < 1:
            raise _bad("drop_rate", rate, "must be a number in [0, 1) (the share of delta entries dropped)")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise _bad("bits", self.bits, f"allowed values are {BITS}")
        size = self.group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise _bad("group_size", size, "must be None (one scale per output row) or an integer >= 1")
        if not isinstance(self.compress_shared, bool):
            raise _bad("compress_shared", self.compress_shared, "must be True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _bad("seed", self.seed, "must be an integer >= 0")

    def describe(self) -> dict:
        """The settings that matter for ``method`` (recorded in the adapter's config)."""
        keep = {"method", "compress_shared"}
        keep |= {"bits", "group_size"} if self.method == "quantize" else {"drop_rate"}
        keep |= {"seed"} if self.method == "dare" else set()
        return {k: v for k, v in asdict(self).items() if k in keep}
