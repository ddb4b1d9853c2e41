"""`CompressionConfig`: how :func:`ders_peft.compress` turns a trained MoE into a shared base plus compact deltas."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

METHODS = ("dare", "magnitude", "quantize", "d2moe")
BASE_MERGES = ("fisher", "frequency", "mean")
SVD_KINDS = ("whitened", "plain")
BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def _bad(field_name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"CompressionConfig.{field_name}={value!r} is invalid: {allowed}.")


def _is_fraction(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value) and 0 <= value < 1


@dataclass
class CompressionConfig:
    """Settings of DeRS compression (arXiv 2503.01359, appendix): ``W_e = W_base + Delta_e`` with ``W_base`` the
    dense FFN the experts were upcycled from, and each ``Delta_e`` compressed.

    Args:
        method: ``"d2moe"`` (any MoE, no dense model needed: a merged base plus whitened low-rank deltas, see
            :mod:`ders_peft.compression.d2moe`), ``"dare"`` (keep each entry with probability ``1 - drop_rate``,
            rescale the kept ones; unbiased),
            ``"magnitude"`` (keep the ``1 - drop_rate`` largest ``|Delta|`` entries of each expert's matrix, no
            rescaling) or ``"quantize"`` (symmetric ``bits``-bit codes with per-row or per-group scales). DARE and
            magnitude give an ordinary sparse DeRS adapter (values + int32 indices), quantization a quantized one.
        drop_rate: share of each delta's entries dropped (``"dare"``, ``"magnitude"``), in ``[0, 1)``.
        bits: bits per delta entry (``"quantize"``), 1-8 or 16; 1 bit is sign times a scale.
        group_size: entries of a row sharing one scale (``"quantize"``); ``None`` (the default) for one scale per
            output row. Chosen by measurement (docs/compression.md): on the trained benchmark MoE, groups of 64
            changed the test perplexity by under 0.1 % at 3-8 bits and by 0.14 points at 2 bits (+1.81 % vs
            +1.95 %), for 6-25 % more bytes (an fp32 scale per 64 entries); groups pay off on heavy-tailed deltas
            (Student-t(3) matrices: 4-bit error 0.28 per row vs 0.14 with groups of 32).
        compress_shared: the universal FFN (extended DeRS) or shared expert: compressed as one more delta over the
            same base (``True``) or kept whole (``False``). ``None`` (default): DeRS methods compress it; D2-MoE
            compresses a shared expert that has the routed experts' shape and keeps any other whole (``True`` then
            refuses a shared expert of another width).
        seed: seed of DARE's random choice of kept entries (the same seed gives the same adapter).
        ratio: ``"d2moe"``: target share of the MoE's expert parameters removed (the D2-MoE paper's compression
            ratio), which sets each matrix's delta rank; ignored when ``rank`` is given.
        rank: ``"d2moe"``: one delta rank for every matrix instead of ``ratio`` (clamped to each matrix's smaller
            side, so a large value reproduces the MoE).
        base_merge: ``"d2moe"``: how the shared base is merged from the experts: ``"fisher"`` (element-wise
            Fisher-weighted, D2-MoE eq. 11), ``"frequency"`` (weighted by router frequency) or ``"mean"``.
        svd: ``"d2moe"``: ``"whitened"`` (truncation-aware SVD of ``Delta_e S_e``, ``S_e`` the Cholesky factor of
            the expert's input Gram matrix) or ``"plain"`` truncated SVD.
        base_prune: ``"d2moe"``: share of the base down projection's intermediate channels pruned, half statically
            (by ``||W[:, j]|| * ||X_j||`` on calibration data, not stored) and half per batch (dynamic).
        adaptive_ranks: ``"d2moe"``: spread the rank budget over layers by their delta energy (appendix A.7)
            instead of one rank per matrix kind everywhere.
        share_v: ``"d2moe"``: one ``V`` per matrix shared by all experts (ShareV: the stacked deltas' SVD), each
            expert keeping its own ``U``; the saved budget buys a higher rank.
        trim_experts: ``"d2moe"``: per layer, drop the deltas of this many least-used experts (by calibration router
            frequency): they compute the base alone. Removes more than ``ratio``; the achieved share is reported.
    """

    method: Literal["dare", "magnitude", "quantize"] = "dare"
    drop_rate: float = 0.9
    bits: int = 4
    group_size: int | None = None
    compress_shared: bool | None = None
    seed: int = 0
    ratio: float = 0.4
    rank: int | None = None
    base_merge: Literal["fisher", "frequency", "mean"] = "fisher"
    svd: Literal["whitened", "plain"] = "whitened"
    base_prune: float = 0.0
    adaptive_ranks: bool = False
    share_v: bool = False
    trim_experts: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed for any invalid setting."""
        if self.method not in METHODS:
            raise _bad("method", self.method, f"allowed values are {METHODS}")
        if not _is_fraction(self.drop_rate):
            raise _bad("drop_rate", self.drop_rate, "must be a number in [0, 1) (the share of delta entries dropped)")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise _bad("bits", self.bits, f"allowed values are {BITS}")
        size = self.group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise _bad("group_size", size, "must be None (one scale per output row) or an integer >= 1")
        if self.compress_shared is not None and not isinstance(self.compress_shared, bool):
            raise _bad("compress_shared", self.compress_shared, "must be None (automatic), True or False")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise _bad("seed", self.seed, "must be an integer >= 0")
        for name in ("ratio", "base_prune"):
            if not _is_fraction(getattr(self, name)):
                raise _bad(name, getattr(self, name), "must be a number in [0, 1)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0):
            raise _bad("rank", self.rank, "must be None (use ratio) or an integer >= 0")
        if self.base_merge not in BASE_MERGES:
            raise _bad("base_merge", self.base_merge, f"allowed values are {BASE_MERGES}")
        if self.svd not in SVD_KINDS:
            raise _bad("svd", self.svd, f"allowed values are {SVD_KINDS}")
        for name in ("adaptive_ranks", "share_v"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "must be True or False")
        trim = self.trim_experts
        if isinstance(trim, bool) or not isinstance(trim, int) or trim < 0:
            raise _bad("trim_experts", trim, "must be an integer >= 0 (experts per layer whose delta is dropped)")
        if self.share_v and (trim or self.adaptive_ranks):
            raise _bad("share_v", True, "cannot be combined with trim_experts or adaptive_ranks (one V per matrix)")

    def describe(self) -> dict:
        """The settings that matter for ``method`` (recorded in the adapter's config)."""
        keep = {"method", "compress_shared"}
        if self.method == "d2moe":
            keep = {"method", "base_merge", "svd", "base_prune", "adaptive_ranks", "share_v", "trim_experts"}
            keep |= {"compress_shared"}
            keep |= {"rank"} if self.rank is not None else {"ratio"}
        elif self.method == "quantize":
            keep |= {"bits", "group_size"}
        else:
            keep |= {"drop_rate", "seed"} if self.method == "dare" else {"drop_rate"}
        return {k: v for k, v in asdict(self).items() if k in keep}
