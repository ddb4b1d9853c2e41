"""The routed-FFN math as plain functions, plus the naive reference the tests compare it with.

``routed_ffn`` computes, for tokens x and a routing plan (expert e and weight w per slot),

    pre(t, s) = x_t W_in_base^T + x_t Delta_in[e]^T + b_in[e]
    h(t, s)   = act(gate) * up            (gated)   or   act(pre)   (plain)
    y_t       = (sum_s w h(t, s)) W_out_base^T + sum_s w h(t, s) Delta_out[e]^T + sum_s w b_out[e]

The base projections run once per token and the base down projection once on the weighted sum, so the shared base
costs exactly the dense FFN's FLOPs; only the deltas and the activation run per slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .deltas import Delta, LowRankDelta
from .routing import RoutingPlan

Activation = Callable[[torch.Tensor], torch.Tensor]


def routed_ffn(
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
) -> torch.Tensor:
    """Mixture of FFN experts ``W_base + Delta_e`` for ``x`` of shape ``(T, hidden)``; returns ``(T, hidden)``.

    ``in_base``/``out_base`` are ``(out, in)`` base weights (``None`` where the deltas hold whole expert weights);
    ``in_bias``/``out_bias`` are ``(E, out)`` per-expert biases or ``None``.
    """
    if _lowrank_fast_path(x, in_base, out_base, in_deltas, out_delta, in_bias):
        return lowrank_routed_ffn(x, plan, in_base, out_base, in_deltas, out_delta, out_bias, act, gated)
    pieces = []
    for weight, delta, bias in zip(in_base, in_deltas, in_bias, strict=True):
        piece = delta(x, plan)  # (T, S, out)
        if weight is not None:
            piece = piece + (x @ weight.t()).unsqueeze(1)
        if bias is not None:
            piece = piece + bias.to(piece.dtype)[plan.expert_idx]
        pieces.append(piece)
    pre = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    h = swiglu_or_act(pre, act, gated)
    y = out_delta(h, plan, weighted=True)
    if out_base is not None:
        mixed = torch.einsum("tsi,ts->ti", h, plan.weights.to(h.dtype))
        y = y + mixed @ out_base.t()
    if out_bias is not None:
        y = y + plan.gate_matrix(y.dtype) @ out_bias.to(y.dtype)
    return y


SLOT_CHUNK_ELEMENTS = 2**19
"""Per-slot work of the low-rank path runs in token chunks whose ``(S, chunk, intermediate)`` tensors hold about this
many elements (2 MiB in fp32), so the elementwise work stays in cache; tunable (2**19 measured best of 2**16-2**23
on a 2-core Xeon, hidden 512, intermediate 1408, 2048 tokens, top-2)."""


def _lowrank_fast_path(x, in_base, out_base, in_deltas, out_delta, in_bias) -> bool:
    deltas = [*in_deltas, out_delta]
    if not all(type(d) is LowRankDelta for d in deltas) or any(b is not None for b in in_bias):
        return False
    weights = [*in_base, out_base]
    if any(w is None or w.dtype != x.dtype for w in weights) or any(d.param_dtype != x.dtype for d in deltas):
        return False
    return len({(d.num_experts, d.rank) for d in deltas}) == 1 and len(in_deltas) in (1, 2)


def lowrank_routed_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    in_base: Sequence[torch.Tensor],
    out_base: torch.Tensor,
    in_deltas: Sequence[LowRankDelta],
    out_delta: LowRankDelta,
    out_bias: torch.Tensor | None,
    act: Activation,
    gated: bool,
) -> torch.Tensor:
    """``routed_ffn`` for low-rank deltas without per-expert input biases (same result, faster, less memory).

    The base and ``A`` projections of ``x`` run once per token (autograd); the per-slot part (block-masked ``B``
    products, activation, router mixing, down-side ``A`` product) runs in :class:`_LowRankSlots`, which works in
    token chunks and recomputes it in backward instead of storing ``(T, S, intermediate)`` activations.
    """
    rank = out_delta.rank
    flat: list[torch.Tensor] = []
    for weight, delta in zip(in_base, in_deltas, strict=True):
        flat += [x @ weight.t(), x @ delta.lora_a.weight.t(), _scaled_b(delta)]
    widths = [f.shape[-1] for f in flat[::3]]
    if (gated and len(widths) == 2 and widths[0] != widths[1]) or (gated and len(widths) == 1 and widths[0] % 2):
        raise ValueError(f"gated FFN needs gate and up projections of equal width, got {widths}")
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    flat = [t.to(dtype) for t in flat]  # under autocast: one compute dtype, cast outside (autograd casts grads back)
    mask = plan.slot_rank_mask(rank, dtype)
    weights = plan.weights.to(dtype).t()
    with torch.autocast(device, enabled=False):
        mixed, z_out = _LowRankSlots.apply((act, gated), weights, mask, out_delta.lora_a.weight.to(dtype), *flat)
    y = torch.addmm(mixed @ out_base.t(), z_out, _scaled_b(out_delta).t())
    if out_bias is not None:
        y = y + plan.gate_matrix(y.dtype) @ out_bias.to(y.dtype)
    return y


def _scaled_b(delta: LowRankDelta) -> torch.Tensor:
    b = delta.lora_b.weight
    return b * delta.scale if delta.scale != 1.0 else b


def _slot_chunk(num_slots: int, width: int, tokens: int) -> int:
    return max(1, min(tokens, SLOT_CHUNK_ELEMENTS // max(1, num_slots * width)))


def _slot_pre(flat, mask_c: torch.Tensor, rows: slice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-slot pre-activations ``base + (z * mask) B^T`` of one token chunk, and the masked ``z`` (for backward)."""
    pres, masked = [], []
    for base, z, b in zip(flat[0::3], flat[1::3], flat[2::3], strict=True):
        zm = z[rows].unsqueeze(0) * mask_c  # (S, c, E*r)
        pre = (zm.reshape(-1, zm.shape[-1]) @ b.t()).view(*zm.shape[:2], b.shape[0])
        pres.append(pre.add_(base[rows]))
        masked.append(zm)
    return pres, masked


def _split_gate_up(pres: list[torch.Tensor], gated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not gated:
        return pres[0], None
    if len(pres) == 2:
        return pres[0], pres[1]
    gate, up = pres[0].chunk(2, dim=-1)
    return gate, up


class _LowRankSlots(torch.autograd.Function):
    """Per-slot core of the low-rank routed FFN: returns ``mixed = sum_s w_s h_s`` ``(T, I)`` and
    ``z_out = sum_s w_s mask_s * (h_s A_out^T)`` ``(T, E*r)``, where ``h_s = act(pre_gate_s) * pre_up_s`` (or
    ``act(pre_s)``) and ``pre_j,s = base_j + (z_j * mask_s) B_j^T``. Inputs: ``weights`` ``(S, T)``, ``mask``
    ``(S, T, E*r)``, ``a_out`` ``(E*r, I)`` and per input projection ``base_j`` ``(T, out_j)``, ``z_j`` ``(T, E*r)``,
    ``B_j`` ``(out_j, E*r)``. Nothing of size ``(S, T, I)`` is stored for backward: it is recomputed per chunk."""

    @staticmethod
    def forward(ctx, spec, weights, mask, a_out, *flat):
        act, gated = spec
        S, T = weights.shape
        width = a_out.shape[1]
        mixed = flat[0].new_empty(T, width)
        z_out = flat[0].new_empty(T, a_out.shape[0])
        z_slots = mask.new_empty(mask.shape)  # per-slot h_s A_out^T, small, kept for the router-weight gradient
        chunk = _slot_chunk(S, width, T)
        for start in range(0, T, chunk):
            rows = slice(start, start + chunk)
            mask_c, w_c = mask[:, rows], weights[:, rows].unsqueeze(-1)
            pres, _ = _slot_pre(flat, mask_c, rows)
            gate, up = _split_gate_up(pres, gated)
            h = act(gate) * up if gated else act(gate)
            mixed_c = torch.mul(h[0], w_c[0], out=mixed[rows])
            for s in range(1, S):
                mixed_c.addcmul_(h[s], w_c[s])
            zd = (h.reshape(-1, width) @ a_out.t()).view_as(mask_c)
            z_slots[:, rows] = zd
            torch.sum(zd * (mask_c * w_c), dim=0, out=z_out[rows])
        ctx.spec, ctx.dtype = spec, mixed.dtype
        ctx.save_for_backward(weights, mask, a_out, z_slots, *flat)
        return mixed, z_out

    @staticmethod
    def backward(ctx, d_mixed, d_z_out):
        with torch.autocast(d_mixed.device.type, enabled=False):  # backward may run inside an autocast region
            return _LowRankSlots._backward(ctx, d_mixed.to(ctx.dtype), d_z_out.to(ctx.dtype))

    @staticmethod
    def _backward(ctx, d_mixed, d_z_out):
        act, gated = ctx.spec
        weights, mask, a_out, z_slots, *flat = ctx.saved_tensors
        need = ctx.needs_input_grad
        S, T = weights.shape
        width = a_out.shape[1]
        d_weights = torch.empty_like(weights) if need[1] else None  # every row block is written once below
        d_a_out = torch.zeros_like(a_out) if need[3] else None
        d_flat = [  # base and z gradients are written per row block; B gradients accumulate
            (torch.zeros_like(t) if i % 3 == 2 else torch.empty_like(t)) if need[4 + i] else None
            for i, t in enumerate(flat)
        ]
        chunk = _slot_chunk(S, width, T)
        for start in range(0, T, chunk):
            rows = slice(start, start + chunk)
            mask_c, w_c = mask[:, rows], weights[:, rows].unsqueeze(-1)
            pres, masked = _slot_pre(flat, mask_c, rows)
            gate, up = _split_gate_up(pres, gated)
            with torch.enable_grad():
                gate_leaf = gate.detach().requires_grad_()
                activated = act(gate_leaf)
            h = activated.detach() * up if gated else activated.detach()
            dm = d_mixed[rows].unsqueeze(0)
            d_zd = d_z_out[rows].unsqueeze(0) * mask_c * w_c  # (S, c, E*r)
            d_h = (d_zd.reshape(-1, d_zd.shape[-1]) @ a_out).view_as(h).addcmul_(w_c, dm)
            if d_weights is not None:
                zd = z_slots[:, rows]
                d_weights[:, rows] = (h * dm).sum(-1) + (zd * mask_c * d_z_out[rows].unsqueeze(0)).sum(-1)
            if d_a_out is not None:
                d_a_out.addmm_(d_zd.reshape(-1, d_zd.shape[-1]).t(), h.reshape(-1, width))
            d_act = d_h * up if gated else d_h
            (d_gate,) = torch.autograd.grad(activated, gate_leaf, d_act)
            if not gated:
                d_pres = [d_gate]
            elif len(pres) == 2:
                d_pres = [d_gate, d_h * activated.detach()]
            else:
                d_pres = [torch.cat([d_gate, d_h * activated.detach()], dim=-1)]
            for j, (d_pre, zm) in enumerate(zip(d_pres, masked, strict=True)):
                d_base, d_z, d_b = d_flat[3 * j : 3 * j + 3]
                b = flat[3 * j + 2]
                d_pre2 = d_pre.reshape(-1, d_pre.shape[-1])
                if d_base is not None:
                    torch.sum(d_pre, dim=0, out=d_base[rows])
                if d_z is not None:
                    d_z[rows] = ((d_pre2 @ b).view_as(zm) * mask_c).sum(0)
                if d_b is not None:
                    d_b.addmm_(d_pre2.t(), zm.reshape(-1, zm.shape[-1]))
        return None, d_weights, None, d_a_out, *d_flat


def swiglu_or_act(pre: torch.Tensor, act: Activation, gated: bool) -> torch.Tensor:
    """``act(gate) * up`` on the two halves of ``pre`` for gated FFNs, else ``act(pre)``."""
    if not gated:
        return act(pre)
    gate, up = pre.chunk(2, dim=-1)
    return act(gate) * up


def reference_moe_ffn(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    in_weights: Sequence[torch.Tensor],
    out_weight: torch.Tensor,
    in_bias: Sequence[torch.Tensor | None],
    out_bias: torch.Tensor | None,
    act: Activation,
    gated: bool,
) -> torch.Tensor:
    """Naive MoE: expert e is a plain FFN with explicit ``(E, out, in)`` weights; loop over experts and slots."""
    num_experts = out_weight.shape[0]
    y = torch.zeros(x.shape[0], out_weight.shape[1], dtype=x.dtype, device=x.device)
    for e in range(num_experts):
        pre = []
        for w, b in zip(in_weights, in_bias, strict=True):
            p = x @ w[e].t()
            pre.append(p + b[e] if b is not None else p)
        h = swiglu_or_act(torch.cat(pre, dim=-1), act, gated)
        out = h @ out_weight[e].t()
        if out_bias is not None:
            out = out + out_bias[e]
        gate = (weights * (expert_idx == e)).sum(dim=1, keepdim=True).to(x.dtype)
        y = y + gate * out
    return y
