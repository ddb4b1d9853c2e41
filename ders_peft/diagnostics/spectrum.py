"""Singular-value energy of the deltas ``Delta_e = W_e - W_base``: how low-rank what the experts learned is.

For each layer, projection and expert: the singular values ``s`` of ``Delta_e``; the energy kept by the top r is
``sum_{i<=r} s_i^2 / sum_i s_i^2``; ``rank90`` / ``rank99`` are the smallest r keeping 90% / 99% (0 for a zero delta).
The stored curve is the mean over experts, sampled at up to :data:`CURVE_POINTS` ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import ExpertSet, expert_sets

CURVE_POINTS = 64
THRESHOLDS = (0.9, 0.99)


def energy_curve(singular_values: torch.Tensor) -> torch.Tensor:
    """Cumulative energy ``(..., k)`` of singular values ``(..., k)`` (zeros where the matrix is zero)."""
    energy = singular_values.double().pow(2)
    total = energy.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, energy.cumsum(dim=-1) / total.clamp_min(1e-300), torch.zeros_like(energy))


def rank_for(curve: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest rank whose cumulative energy reaches ``fraction`` (per row of ``curve``; 0 for a zero matrix)."""
    reached = curve >= fraction - 1e-12
    first = reached.double().argmax(dim=-1) + 1
    return torch.where(reached.any(dim=-1), first, torch.zeros_like(first))


def _sample_points(k: int) -> list[int]:
    if k <= CURVE_POINTS:
        return list(range(1, k + 1))
    points = torch.logspace(0, torch.log10(torch.tensor(float(k))), CURVE_POINTS).round().long().tolist()
    return sorted(set(points) | {k})


def layer_spectrum(experts: ExpertSet) -> dict[str, dict]:
    """Per projection: ``shape``, ``rank90``/``rank99`` per expert, ``energy_curve`` {``rank``, ``energy``} (mean
    over experts) and the largest singular value per expert."""
    out = {}
    for proj, deltas in experts.deltas.items():
        s = torch.linalg.svdvals(deltas.float())  # (E, min(out, in))
        curve = energy_curve(s)
        points = _sample_points(curve.shape[-1])
        mean = curve.mean(dim=0)
        entry = {"shape": list(deltas.shape[1:]), "top_singular_value": s[:, 0].tolist()}
        for frac in THRESHOLDS:
            entry[f"rank{round(frac * 100)}"] = rank_for(curve, frac).tolist()
        entry["energy_curve"] = {"rank": points, "energy": [float(mean[p - 1]) for p in points]}
        out[proj] = entry
    return out


def delta_spectrum(model: nn.Module) -> dict[str, dict]:
    """Per MoE layer of ``model``: ``{"experts": names, "base": what the base is, "projections": layer_spectrum}``."""
    return {
        s.name: {"experts": s.expert_names, "base": s.base_kind, "projections": layer_spectrum(s)}
        for s in expert_sets(model)
    }
