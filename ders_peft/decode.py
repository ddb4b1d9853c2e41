"""Inference paths of the routed FFN for a few tokens at a time (generation: one new token per sequence per step).

At that size the routed layer's cost is not FLOPs but the number of tensor operations, so these functions compute the
same result as :func:`ders_peft.functional.routed_ffn` with as few operations as possible, and without autograd
(they are used only when no gradient is needed):

- low-rank deltas: the base projections run once on ``x``, ``z = x A_all^T`` once for all experts, a block mask picks
  each slot's ``r`` columns, one matmul with ``B_all`` per projection; the down side mixes the slots by router weight;
- whole expert weights (vanilla experts, or experts materialised by ``merge_adapter``): one plain FFN per slot on the
  selected expert's matrices, with no sorting or permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .deltas import Delta, FullDelta, LowRankDelta
from .routing import RoutingPlan

Activation = Callable[[torch.Tensor], torch.Tensor]

MAX_DECODE_TOKENS = 16
"""Up to this many tokens per layer call the small-batch paths below are used (when no gradient is needed)."""

_BLOCK_MASKS: dict[tuple, torch.Tensor] = {}


def block_mask(num_experts: int, rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(E, E * rank)`` 0/1 matrix whose row e keeps the ``rank`` columns of expert e in a stacked factor (cached)."""
    key = (num_experts, rank, dtype, str(device))
    if key not in _BLOCK_MASKS:
        eye = torch.eye(num_experts, dtype=dtype, device=device)
        _BLOCK_MASKS[key] = eye.repeat_interleave(rank, dim=1)
    return _BLOCK_MASKS[key]


def small_batch_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    in_base: Sequence[torch.Tensor | None],
    out_base: torch.Tensor | None,
    in_deltas: Sequence[Delta],
    out_delta: Delta,
    in_bias: Sequence[torch.Tensor | None],
    out_bias: torch.Tensor | None,
    act: Activation,
    gated: bool,
) -> torch.Tensor | None:
    """``routed_ffn`` for a few tokens without autograd, or ``None`` when no small-batch path applies.

    Same arguments as :func:`ders_peft.functional.routed_ffn`.
    """
    if torch.is_grad_enabled() or x.shape[0] > MAX_DECODE_TOKENS:
        return None
    deltas = [*in_deltas, out_delta]
    if all(type(d) is LowRankDelta for d in deltas):
        if (
            all(w is not None and w.dtype == x.dtype for w in (*in_base, out_base))
            and all(d.lora_a.weight.dtype == x.dtype for d in deltas)
            and len({(d.num_experts, d.rank) for d in deltas}) == 1
        ):
            return _lowrank(x, plan, in_base, out_base, in_deltas, out_delta, in_bias, out_bias, act, gated)
    elif all(isinstance(d, FullDelta) and d.weight.dtype == x.dtype for d in deltas):
        return _per_slot_experts(x, plan, in_deltas, out_delta, in_bias, out_bias, act, gated)
    return None


def _activate(pres: list[torch.Tensor], act: Activation, gated: bool) -> torch.Tensor:
    if not gated:
        return act(pres[0])
    if len(pres) == 2:
        return act(pres[0]) * pres[1]
    gate, up = pres[0].chunk(2, dim=-1)
    return act(gate) * up


def _scaled_b(delta: LowRankDelta) -> torch.Tensor:
    b = delta.lora_b.weight
    return b * delta.scale if delta.scale != 1.0 else b


def _lowrank(x, plan, in_base, out_base, in_deltas, out_delta, in_bias, out_bias, act, gated) -> torch.Tensor:
    T, S = plan.expert_idx.shape
    mask = block_mask(out_delta.num_experts, out_delta.rank, x.dtype, x.device)[plan.expert_idx]  # (T, S, E*r)
    flat_mask = mask.view(T * S, -1)
    pres = []
    for weight, delta, bias in zip(in_base, in_deltas, in_bias, strict=True):
        base, z = x @ weight.t(), x @ delta.lora_a.weight.t()  # (T, out), (T, E*r)
        if T > 1:
            base, z = base.repeat_interleave(S, dim=0), z.repeat_interleave(S, dim=0)
        pre = torch.addmm(base, z * flat_mask, _scaled_b(delta).t())  # (T*S, out): slot keeps its expert's columns
        if bias is not None:
            pre = pre + bias.to(pre.dtype)[plan.expert_idx.reshape(-1)]
        pres.append(pre)
    h = _activate(pres, act, gated)  # (T*S, I)
    w = plan.weights.to(x.dtype)  # (T, S)
    mixed = torch.bmm(w.unsqueeze(1), h.view(T, S, -1)).squeeze(1)  # (T, I)
    zd = (h @ out_delta.lora_a.weight.t()) * (flat_mask * w.reshape(-1, 1))  # (T*S, E*r)
    zd = zd.view(T, S, -1).sum(dim=1)
    y = torch.addmm(mixed @ out_base.t(), zd, _scaled_b(out_delta).t())
    if out_bias is not None:
        y = y + plan.gate_matrix(y.dtype) @ out_bias.to(y.dtype)
    return y


def _per_slot_experts(x, plan, in_deltas, out_delta, in_bias, out_bias, act, gated) -> torch.Tensor:
    T, S = plan.expert_idx.shape
    idx = plan.expert_idx.tolist()
    w = plan.weights.to(x.dtype)
    rows = []
    for t in range(T):
        xt = x[t : t + 1]
        yt = None
        for s in range(S):
            e = idx[t][s]
            pres = []
            for delta, bias in zip(in_deltas, in_bias, strict=True):
                pres.append(torch.nn.functional.linear(xt, delta.weight[e], None if bias is None else bias[e]))
            h = _activate(pres, act, gated)
            out = torch.nn.functional.linear(h, out_delta.weight[e], None if out_bias is None else out_bias[e])
            yt = out * w[t, s] if yt is None else yt.add_(out * w[t, s])
        rows.append(yt)
    return rows[0] if T == 1 else torch.cat(rows)
