"""Low-rank compression of expert deltas (D2-MoE section 3.3) and the rank budget arithmetic (section 3.5)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

DEFAULT_DAMPING = 1e-2


def _check_rank(delta: torch.Tensor, rank: int) -> int:
    if delta.ndim != 2:
        raise ValueError(f"`delta` must be a 2-D (out, in) matrix, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(delta.shape):
        raise ValueError(f"`rank` must be an int in [0, {min(delta.shape)}], got {rank!r}")
    return rank


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].clamp(min=0).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(
    delta: torch.Tensor, rank: int, *, compute_dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation U @ V of ``delta`` (out, in) in Frobenius norm (Eckart-Young).

    Returns U (out, r) = U_r sqrt(Sigma_r) and V (r, in) = sqrt(Sigma_r) V_r^T in ``delta``'s dtype; the SVD runs in
    ``compute_dtype`` (float32 is much faster for large matrices).
    """
    rank = _check_rank(delta, rank)
    u, s, vh = torch.linalg.svd(delta.detach().to(compute_dtype), full_matrices=False)
    a, b = _split(u, s, vh, rank)
    return a.to(delta.dtype), b.to(delta.dtype)


def whitened_svd(
    delta: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncation-aware SVD: the rank-``rank`` U @ V minimising ||(delta - U V) X^T||_F for inputs X with
    Gram ``gram`` = X^T X (in, in).

    S is the lower Cholesky factor of gram + damping * mean(diag(gram)) * I (default ``damping`` = 1e-2; on
    failure retried once with 10x the damping). Then delta @ S = U Sigma V^T, U' = U_r sqrt(Sigma_r) and
    V' = sqrt(Sigma_r) V_r^T S^{-1} (a triangular solve). A zero / non-finite Gram (an expert that received no
    token) or a Cholesky that fails twice falls back to :func:`truncated_svd` (identity whitening).
    Returns U (out, r), V (r, in) in ``delta``'s dtype.
    """
    rank = _check_rank(delta, rank)
    n = delta.shape[1]
    if gram.shape != (n, n):
        raise ValueError(
            f"`gram` must be ({n}, {n}) for a delta of shape {tuple(delta.shape)}, got {tuple(gram.shape)}"
        )
    if damping < 0:
        raise ValueError(f"`damping` must be >= 0, got {damping}")
    g = gram.detach().to(delta.device, compute_dtype)
    scale = g.diagonal().mean()
    if not torch.isfinite(g).all() or not scale > 0:
        return truncated_svd(delta, rank, compute_dtype=compute_dtype)
    eye = torch.eye(n, dtype=compute_dtype, device=g.device)
    chol = None
    for factor in (damping, 10 * damping if damping > 0 else DEFAULT_DAMPING):
        chol, info = torch.linalg.cholesky_ex(g + factor * scale * eye)
        if int(info) == 0 and torch.isfinite(chol).all():
            break
        chol = None
    if chol is None:
        return truncated_svd(delta, rank, compute_dtype=compute_dtype)
    u, s, vh = torch.linalg.svd(delta.detach().to(compute_dtype) @ chol, full_matrices=False)
    a, b = _split(u, s, vh, rank)
    b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)  # b @ chol^{-1}
    return a.to(delta.dtype), b.to(delta.dtype)


def rank_for_ratio(
    num_experts: int, out_features: int, in_features: int, ratio: float, *, base_fraction: float = 1.0
) -> int:
    """Largest delta rank r such that the compressed block removes at least ``ratio`` of the experts' parameters.

    Paper accounting (section 3.5) per weight matrix kind (gate, up or down; all I x H, so one rank serves all):
    the original block stores E * m parameters (m = out * in); the compressed one stores the shared base once,
    ``base_fraction`` * m (< 1 after base pruning), plus E * r * (out + in) for the U, V factors. Hence
    r = floor(((1 - ratio) * E * m - base_fraction * m) / (E * (out + in))), clamped to [0, min(out, in)]
    (the upper clamp never binds: r * (out + in) < m). Shared experts and routers are not counted.

    Raises ValueError when even rank 0 keeps too much, i.e. ratio > 1 - base_fraction / E.
    """
    for name, value in (("num_experts", num_experts), ("out_features", out_features), ("in_features", in_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    num_experts, out_features, in_features = int(num_experts), int(out_features), int(in_features)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"`ratio` must be in [0, 1), got {ratio}")
    if not 0.0 <= base_fraction <= 1.0:
        raise ValueError(f"`base_fraction` must be in [0, 1], got {base_fraction}")
    m = out_features * in_features
    budget = (1.0 - ratio) * num_experts * m - base_fraction * m
    if budget < -1e-9 * m:
        raise ValueError(
            f"ratio {ratio} is unreachable with {num_experts} experts: the shared base alone keeps "
            f"{base_fraction / num_experts:.4f} of the expert parameters "
            f"(max ratio {1 - base_fraction / num_experts:.4f})"
        )
    rank = math.floor(budget / (num_experts * (out_features + in_features)) + 1e-9)
    return max(0, min(rank, out_features, in_features))


def achieved_ratio(
    num_experts: int, out_features: int, in_features: int, rank: int, *, base_fraction: float = 1.0
) -> float:
    """Share of the experts' parameters removed by a base (``base_fraction`` kept) plus rank-``rank`` deltas."""
    m = out_features * in_features
    return 1.0 - (base_fraction * m + num_experts * rank * (out_features + in_features)) / (num_experts * m)


def adaptive_ranks(sensitivity: Sequence[float], mean_rank: int, max_rank: int) -> list[int]:
    """Per-layer ranks proportional to ``sensitivity`` with the same total as ``mean_rank`` everywhere (appendix A.7).

    Equal-shaped layers, so an equal rank sum is an equal parameter budget. Largest-remainder rounding; ranks are
    capped at ``max_rank`` and the excess goes to the remaining layers in proportion. All-zero sensitivities give
    the uniform allocation.
    """
    n = len(sensitivity)
    if n == 0:
        return []
    if any(not math.isfinite(s) or s < 0 for s in sensitivity):
        raise ValueError("`sensitivity` must be finite and non-negative")
    if not 0 <= mean_rank <= max_rank:
        raise ValueError(f"need 0 <= mean_rank <= max_rank, got mean_rank={mean_rank}, max_rank={max_rank}")
    weights = list(sensitivity) if sum(sensitivity) > 0 else [1.0] * n
    ranks = [0.0] * n
    free, budget = set(range(n)), float(mean_rank * n)
    while free and budget > 1e-9:
        total = sum(weights[i] for i in free)
        share = {i: budget * (weights[i] / total if total > 0 else 1.0 / len(free)) for i in free}
        capped = {i for i in free if ranks[i] + share[i] >= max_rank}
        if not capped:
            for i in free:
                ranks[i] += share[i]
            break
        for i in capped:
            budget -= max_rank - ranks[i]
            ranks[i] = float(max_rank)
        free -= capped
    floors = [math.floor(r + 1e-9) for r in ranks]
    order = sorted(range(n), key=lambda i: ranks[i] - floors[i], reverse=True)
    for i in order[: mean_rank * n - sum(floors)]:
        floors[i] += 1
    return floors


def shared_v_svd(
    deltas: torch.Tensor,
    gram: torch.Tensor | None,
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ShareV: one ``V`` (r, in) for every expert and a ``U_e`` (out, r) each, from the SVD of the experts' deltas
    stacked row-wise ``[Delta_1; ...; Delta_E]`` (E*out, in), whitened by the Cholesky factor of ``gram`` (the
    experts' input Grams summed; ``None``: plain). Returns ``U`` (E, out, r), ``V`` (r, in) in ``deltas``' dtype."""
    e, out, n = deltas.shape
    stacked = deltas.reshape(e * out, n)
    if gram is None:
        u, v = truncated_svd(stacked, rank, compute_dtype=compute_dtype)
    else:
        u, v = whitened_svd(stacked, gram, rank, damping=damping, compute_dtype=compute_dtype)
    return u.reshape(e, out, -1), v


def shared_v_rank(num_experts: int, out_features: int, in_features: int, ratio: float, base_fraction: float) -> int:
    """Largest ShareV rank removing ``ratio`` of the experts' parameters: the base, ``E * r * out`` for the U's and
    ``r * in`` for the one V: r = floor(((1 - ratio) E m - base_fraction m) / (E out + in)), clamped to the stacked
    deltas' rank ``min(E * out, in)``."""
    m = out_features * in_features
    budget = (1.0 - ratio) * num_experts * m - base_fraction * m
    if budget < -1e-9 * m:
        raise ValueError(f"ratio {ratio} is unreachable with {num_experts} experts (the base alone keeps more)")
    rank = math.floor(budget / (num_experts * out_features + in_features) + 1e-9)
    return max(0, min(rank, num_experts * out_features, in_features))  # one V spans the stacked deltas' rows
