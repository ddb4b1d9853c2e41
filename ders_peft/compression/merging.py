"""Merging the experts of one MoE block into a shared base weight (D2-MoE section 3.2)."""

from __future__ import annotations

import torch

MERGE_METHODS = ("mean", "frequency", "fisher")


def merge_base(
    weights: torch.Tensor,
    method: str = "fisher",
    frequency: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shared base W_b (out, in) of the expert weights ``weights`` (E, out, in); computed in float64.

    * ``"mean"``: (1/E) sum_e W_e.
    * ``"frequency"``: sum_e f_e W_e / sum_e f_e with ``frequency`` (E,) >= 0 (router token counts or shares);
      all-zero frequencies fall back to the mean.
    * ``"fisher"``: element-wise sum_e F_e * W_e / sum_e F_e with ``fisher`` (E, out, in) >= 0 (D2-MoE eq. 5 /
      the paper's Fisher merging); elements where sum_e F_e == 0 (no expert got a gradient there, e.g. all
      starved) take the mean instead.

    The result has ``weights``' dtype and device.
    """
    if not isinstance(weights, torch.Tensor) or weights.ndim != 3 or weights.shape[0] == 0:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"`weights` must be a (num_experts, out, in) tensor with num_experts >= 1, got {shape}")
    if method not in MERGE_METHODS:
        raise ValueError(f"`method` must be one of {MERGE_METHODS}, got {method!r}")
    w = weights.detach().double()
    mean = w.mean(dim=0)
    if method == "mean":
        return mean.to(weights.dtype)
    if method == "frequency":
        if frequency is None:
            raise ValueError("`frequency` is required for method='frequency'")
        f = torch.as_tensor(frequency).detach().to(w.device, torch.float64)
        if f.shape != (w.shape[0],):
            raise ValueError(f"`frequency` must have shape ({w.shape[0]},), got {tuple(f.shape)}")
        if not torch.isfinite(f).all() or (f < 0).any():
            raise ValueError("`frequency` must be finite and non-negative")
        total = f.sum()
        if total <= 0:
            return mean.to(weights.dtype)
        return torch.einsum("e,eoi->oi", f / total, w).to(weights.dtype)
    if fisher is None:
        raise ValueError("`fisher` is required for method='fisher'")
    if tuple(fisher.shape) != tuple(w.shape):
        raise ValueError(f"`fisher` must have the shape of `weights` {tuple(w.shape)}, got {tuple(fisher.shape)}")
    fi = fisher.detach().to(w.device, torch.float64)
    if not torch.isfinite(fi).all() or (fi < 0).any():
        raise ValueError("`fisher` must be finite and non-negative")
    den = fi.sum(dim=0)
    num = (fi * w).sum(dim=0)
    ok = den > 0
    base = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), mean)
    return base.to(weights.dtype)
