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

from . import ffn
from .deltas import Delta, LowRankDelta
from .grouped_path import grouped_routed_ffn
from .grouped_path import supports as grouped_supports
from .joined import joined_product
from .kernels import lowrank_train
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
    if _lowrank_fast_path(x, in_base, out_base, in_deltas, out_delta, in_bias, act, gated):
        return lowrank_routed_ffn(x, plan, in_base, out_base, in_deltas, out_delta, out_bias, act, gated)
    if grouped_supports([*in_deltas, out_delta]) and all(w is not None for w in (*in_base, out_base)):
        return grouped_routed_ffn(x, plan, in_base, out_base, in_deltas, out_delta, in_bias, out_bias, act, gated)
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
"""Per-slot work of the low-rank path runs in token chunks whose ``(chunk, S, intermediate)`` tensors hold about this
many elements (2 MiB in fp32), so the elementwise work stays in cache; tunable (2**18-2**19 measured best of
2**16-2**23 on a 2-core Xeon, hidden 512, intermediate 1408, 2048 tokens, top-2)."""


STACKED_MAX_COLUMNS = 64
"""Low-rank deltas whose stacked factors have at most this many columns (experts x rank) take the stacked-and-masked
path, whose per-slot work grows with experts x rank; wider ones the path grouped by expert (``grouped_path``), whose
work grows with top_k only. Measured by ``benchmarks/thresholds.py`` (docs/benchmarks_thresholds.md, 2026-12-03, one
FFN layer fwd+bwd, hidden 512, intermediate 1408, 2048 tokens, top-2, one thread; stacked / grouped, relative to the
dense layer): E*r = 16: 1.38 / 2.03; 32: 1.45 / 1.99; 64 (E=16, r=4): 1.62 / 2.01 and (E=4, r=16): 1.62 / 1.99;
128: 1.92 / 1.95 (a tie); 256 (E=16, r=16): 2.56 / 2.07. The measured crossover lies between 128 and 256 columns,
above this constant."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _lowrank_fast_path(x, in_base, out_base, in_deltas, out_delta, in_bias, act, gated) -> bool:
    deltas = [*in_deltas, out_delta]
    if not all(type(d) is LowRankDelta for d in deltas) or any(b is not None for b in in_bias):
        return False
    # deltas in another dtype (peft keeps a bf16 model's adapters in fp32) are cast to the tokens' dtype, as the
    # grouped path does; the base weights must already be in it
    if any(w is None or w.dtype != x.dtype for w in [*in_base, out_base]):
        return False
    if len({(d.num_experts, d.rank) for d in deltas}) != 1 or len(in_deltas) not in (1, 2):
        return False
    if out_delta.num_experts * out_delta.rank <= STACKED_MAX_COLUMNS:
        return True
    # the compiled kernel's per-slot work does not grow with experts x rank: it takes wide factors too
    return lowrank_train.applies(x, _compute_dtype(x), out_delta.rank, ffn.is_silu(act), gated)


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

    The base and ``A`` projections of ``x`` run once per token (one matmul each for all input projections,
    autograd); the per-slot part (block-masked ``B`` products, activation, router mixing, down-side ``A`` product)
    runs in :class:`_LowRankSlots`, which works in token chunks and recomputes it in backward instead of storing
    ``(T, S, intermediate)`` activations.
    """
    widths = [w.shape[0] for w in in_base]
    if (gated and len(widths) == 2 and widths[0] != widths[1]) or (gated and len(widths) == 1 and widths[0] % 2):
        raise ValueError(f"gated FFN needs gate and up projections of equal width, got {widths}")
    base = joined_product(x, in_base)  # (T, sum of out_j): every input projection's base product at once
    # (T, n_in * E*r): their A products, from joined factors (a small copy; one pass over x beats one per factor)
    a_in = torch.cat([d.lora_a.weight for d in in_deltas]) if len(in_deltas) > 1 else in_deltas[0].lora_a.weight
    z = x @ a_in.to(x.dtype).t()
    device = x.device.type
    dtype = _compute_dtype(x)
    if lowrank_train.applies(x, dtype, out_delta.rank, ffn.is_silu(act), gated):  # the compiled CPU kernel
        f32 = torch.float32
        mixed, z_out = lowrank_train.slots(
            plan.weights,
            plan.expert_idx,
            z.to(f32),
            base,
            [_scaled_b(d).to(f32) for d in in_deltas],
            out_delta.lora_a.weight.to(f32),
            out_delta.num_experts,
            out_delta.rank,
        )
    else:
        # under autocast: one compute dtype, cast outside (autograd casts grads back)
        flat = [t.to(dtype) for t in (z, base, *(_scaled_b(d) for d in in_deltas))]
        mask = slot_rank_mask(plan, out_delta.rank, dtype)
        with torch.autocast(device, enabled=False):
            mixed, z_out = _LowRankSlots.apply(
                (act, gated), plan.weights.to(dtype), mask, out_delta.lora_a.weight.to(dtype), *flat
            )
    y, b_out = mixed @ out_base.t(), _scaled_b(out_delta).to(z_out.dtype)
    # the down-side delta added in place (no copy of the base part) where the dtypes agree, else autocast's addmm
    y = y.addmm_(z_out, b_out.t()) if y.dtype == z_out.dtype else torch.addmm(y, z_out, b_out.t())
    if out_bias is not None:
        y = y + plan.gate_matrix(y.dtype) @ out_bias.to(y.dtype)
    return y


def slot_rank_mask(plan: RoutingPlan, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Token-major ``(T, S, E * rank)`` 0/1 mask keeping, per slot, the ``rank`` columns of its expert in a stacked
    low-rank factor (expert-major blocks)."""
    hot = plan.one_hot(dtype)  # (T, S, E)
    return hot.unsqueeze(-1).expand(*hot.shape, rank).reshape(*hot.shape[:2], -1)


def _scaled_b(delta: LowRankDelta) -> torch.Tensor:
    b = delta.lora_b.weight
    return b * delta.scale if delta.scale != 1.0 else b


class _ChunkScratch:
    """Chunk-sized work tensors, allocated once per call and reused by every chunk: a fresh allocation per chunk
    costs page faults that cost more than the elementwise work itself."""

    def __init__(
        self, like: torch.Tensor, chunk: int, num_slots: int, pre_width: int, width: int, z_width: int, k: int
    ):
        new = like.new_empty
        self.zm = new(chunk, num_slots, z_width)  # z of every input projection, masked to the slot's expert
        self.pre = new(chunk, num_slots, pre_width)  # pre-activations of every input projection, side by side
        self.act = new(chunk, num_slots, width)  # act(gate)
        self.h = new(chunk, num_slots, width)  # act(gate) * up
        self.small = new(chunk, num_slots, k)

    def rows(self, c: int) -> tuple[torch.Tensor, ...]:
        return self.zm[:c], self.pre[:c], self.act[:c], self.h[:c], self.small[:c]


def _slot_forward(spec, z_c, mask_c, bs, base_c, scratch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-slot ``pre_j = base_j + (z_j * mask) B_j^T``, ``act(gate)`` and ``h`` of one chunk, into ``scratch``;
    returns ``h`` ``(c, S, width)``."""
    act, gated, silu = spec
    zm, pre, a, h, _ = scratch
    c, S, k = mask_c.shape
    torch.mul(z_c.view(c, 1, -1, k), mask_c.unsqueeze(2), out=zm.view(c, S, -1, k))
    zm2, pre2 = zm.view(c * S, -1), pre.view(c * S, -1)
    col = 0
    for j, b in enumerate(bs):
        torch.mm(zm2[:, j * k : (j + 1) * k], b.t(), out=pre2[:, col : col + b.shape[0]])
        col += b.shape[0]
    pre.add_(base_c.unsqueeze(1))
    width = a.shape[-1]
    if silu:
        torch.ops.aten.silu.out(pre[..., :width], out=a)
    else:
        a.copy_(act(pre[..., :width]))
    return torch.mul(a, pre[..., width:], out=h) if gated else a


class _LowRankSlots(torch.autograd.Function):
    """Per-slot core of the low-rank routed FFN: returns ``mixed = sum_s w_s h_s`` ``(T, I)`` and
    ``z_out = sum_s w_s mask_s * (h_s A_out^T)`` ``(T, E*r)``, where ``h_s = act(pre_gate_s) * pre_up_s`` (or
    ``act(pre_s)``) and ``pre_j,s = base_j + (z_j * mask_s) B_j^T``. Inputs: ``weights`` ``(T, S)``, ``mask``
    ``(T, S, E*r)``, ``a_out`` ``(E*r, I)``, ``z`` ``(T, n*E*r)`` (the ``z_j`` side by side), ``base`` ``(T, sum_j
    out_j)`` (the ``base_j`` side by side), then the ``n`` input projections' ``B_j`` ``(out_j, E*r)``. Nothing of
    size ``(T, S, I)`` is stored for backward: it is recomputed per chunk, in scratch tensors reused across chunks."""

    @staticmethod
    def forward(ctx, spec, weights, mask, a_out, z, base, *bs):
        act, gated = spec
        T, S = weights.shape
        width, k = a_out.shape[1], a_out.shape[0]
        mixed = z.new_empty(T, width)
        z_out = z.new_empty(T, k)
        z_slots = mask.new_empty(mask.shape)  # per-slot h_s A_out^T, small, kept for the router-weight gradient
        chunk = _slot_chunk(S, width, T)
        scratch = _ChunkScratch(z, chunk, S, base.shape[-1], width, z.shape[-1], k)
        fspec = (act, gated, ffn.is_silu(act))
        for start in range(0, T, chunk):
            rows = slice(start, start + chunk)
            mask_c, w_c = mask[rows], weights[rows].unsqueeze(-1)
            work = scratch.rows(mask_c.shape[0])
            h = _slot_forward(fspec, z[rows], mask_c, bs, base[rows], work)
            mixed_c = torch.mul(h[:, 0], w_c[:, 0], out=mixed[rows])
            for s in range(1, S):
                mixed_c.addcmul_(h[:, s], w_c[:, s])
            zd = z_slots[rows]
            torch.mm(h.view(-1, width), a_out.t(), out=zd.view(-1, k))
            torch.sum(torch.mul(mask_c, w_c, out=work[-1]).mul_(zd), dim=1, out=z_out[rows])
        ctx.spec, ctx.dtype = fspec, mixed.dtype
        ctx.save_for_backward(weights, mask, a_out, z, base, z_slots, *bs)
        return mixed, z_out

    @staticmethod
    def backward(ctx, d_mixed, d_z_out):
        with torch.autocast(d_mixed.device.type, enabled=False):  # backward may run inside an autocast region
            return _LowRankSlots._backward(ctx, d_mixed.to(ctx.dtype), d_z_out.to(ctx.dtype))

    @staticmethod
    def _backward(ctx, d_mixed, d_z_out):
        act, gated, silu = ctx.spec
        weights, mask, a_out, z, base, z_slots, *bs = ctx.saved_tensors
        need = ctx.needs_input_grad
        T, S = weights.shape
        width, k = a_out.shape[1], a_out.shape[0]
        pre_width = base.shape[-1]
        d_weights = torch.empty_like(weights) if need[1] else None  # every row block is written once below
        d_a_out = torch.zeros_like(a_out) if need[3] else None
        d_z = torch.empty_like(z) if need[4] else None
        d_base = torch.empty_like(base) if need[5] else None
        d_bs = [torch.zeros_like(b) if need[6 + j] else None for j, b in enumerate(bs)]  # accumulate over chunks
        chunk = _slot_chunk(S, width, T)
        scratch = _ChunkScratch(z, chunk, S, pre_width, width, z.shape[-1], k)
        new = z.new_empty
        d_h_all, d_pre_all, tmp_all = new(chunk, S, width), new(chunk, S, pre_width), new(chunk, S, width)
        d_zm_all = new(chunk, S, z.shape[-1])
        for start in range(0, T, chunk):
            rows = slice(start, start + chunk)
            mask_c, w_c = mask[rows], weights[rows].unsqueeze(-1)
            c = mask_c.shape[0]
            work = scratch.rows(c)
            zm, pre, a, _, d_zd = work
            d_h, d_pre, tmp, d_zm = d_h_all[:c], d_pre_all[:c], tmp_all[:c], d_zm_all[:c]
            h = _slot_forward(ctx.spec, z[rows], mask_c, bs, base[rows], work)
            dm = d_mixed[rows].unsqueeze(1)
            torch.mul(mask_c, w_c, out=d_zd).mul_(d_z_out[rows].unsqueeze(1))  # (c, S, E*r)
            torch.mm(d_zd.view(-1, k), a_out, out=d_h.view(-1, width))
            d_h.addcmul_(w_c, dm)
            if d_weights is not None:
                dw = torch.sum(torch.mul(h, dm, out=tmp), dim=-1, out=d_weights[rows])
                dw.add_((z_slots[rows] * mask_c * d_z_out[rows].unsqueeze(1)).sum(-1))
            if d_a_out is not None:
                d_a_out.addmm_(d_zd.view(-1, k).t(), h.view(-1, width))
            gate, d_gate = pre[..., :width], d_pre[..., :width]
            d_act = torch.mul(d_h, pre[..., width:], out=tmp) if gated else d_h
            if silu:  # d silu(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))), one fused kernel
                torch.ops.aten.silu_backward.grad_input(d_act, gate, grad_input=d_gate)
            else:
                with torch.enable_grad():
                    gate_leaf = gate.detach().requires_grad_()
                    activated = act(gate_leaf)
                d_gate.copy_(torch.autograd.grad(activated, gate_leaf, d_act)[0])
            if gated:
                torch.mul(d_h, a, out=d_pre[..., width:])
            if d_base is not None:  # the base is shared by the slots: sum their gradients
                d_base_c = d_base[rows]
                if S == 1:
                    d_base_c.copy_(d_pre[:, 0])
                else:
                    torch.add(d_pre[:, 0], d_pre[:, 1], out=d_base_c)
                for s in range(2, S):
                    d_base_c.add_(d_pre[:, s])
            d_pre2, zm2, d_zm2 = d_pre.view(c * S, -1), zm.view(c * S, -1), d_zm.view(c * S, -1)
            col = 0
            for j, b in enumerate(bs):
                cols, zcols = slice(col, col + b.shape[0]), slice(j * k, (j + 1) * k)
                if d_z is not None:
                    torch.mm(d_pre2[:, cols], b, out=d_zm2[:, zcols])
                if d_bs[j] is not None:
                    d_bs[j].addmm_(d_pre2[:, cols].t(), zm2[:, zcols])
                col = cols.stop
            if d_z is not None:
                d_zm.view(c, S, -1, k).mul_(mask_c.unsqueeze(2))
                torch.sum(d_zm, dim=1, out=d_z[rows])
        return None, d_weights, None, d_a_out, d_z, d_base, *d_bs


def _slot_chunk(num_slots: int, width: int, tokens: int) -> int:
    return max(1, min(tokens, SLOT_CHUNK_ELEMENTS // max(1, num_slots * width)))


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
