"""Cosine similarity of the experts' weights (the DeRS paper's Figure 1): each expert to the base and expert to expert.

Weights are flattened; per projection (``gate_proj``/``up_proj``/``down_proj`` or the layout's own names) and for the
whole FFN (``"ffn"``: all projections concatenated). The dot products are accumulated in float64 over column chunks,
so no float64 copy of a large matrix is made.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .experts import ExpertSet, expert_sets

_CHUNK = 1 << 20  # columns per chunk of the Gram accumulation


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` in float64 for ``rows`` ``(n, ...)`` flattened to ``(n, m)``, summed over column chunks."""
    flat = rows.reshape(rows.shape[0], -1)
    out = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], _CHUNK):
        part = flat[:, start : start + _CHUNK].double()
        out += part @ part.t()
    return out


def _cosines(g: torch.Tensor) -> dict[str, list]:
    """From the Gram matrix of ``[base, e_1..e_E]``: cosine of each expert to the base and the ``(E, E)`` matrix."""
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms.unsqueeze(0) * norms.unsqueeze(1)
    cos = torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.full_like(g, math.nan))
    return {"to_base": cos[0, 1:].tolist(), "pairwise": cos[1:, 1:].tolist()}


def layer_similarity(experts: ExpertSet) -> dict[str, dict[str, list]]:
    """Per projection and for ``"ffn"``: ``to_base`` (E,) and ``pairwise`` (E x E) cosines (NaN for a zero matrix)."""
    out, total = {}, None
    for proj, weights in experts.experts.items():
        rows = torch.cat([experts.bases[proj].unsqueeze(0), weights]).reshape(weights.shape[0] + 1, -1)
        g = gram(rows)
        out[proj] = _cosines(g)
        total = g if total is None else total + g
    out["ffn"] = _cosines(total)
    return out


def expert_similarity(model: nn.Module) -> dict[str, dict]:
    """Per MoE layer of ``model`` (DeRS layers, or a transformers MoE's blocks with base = mean of the experts):
    ``{"experts": names, "base": what the base is, "projections": layer_similarity(...)}``."""
    return {
        s.name: {"experts": s.expert_names, "base": s.base_kind, "projections": layer_similarity(s)}
        for s in expert_sets(model)
    }
