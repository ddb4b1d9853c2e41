"""The low-rank routed FFN's per-slot part through the compiled CPU kernel (``train_cpu.cpp``), forward and backward.

:func:`ders_peft.functional.lowrank_routed_ffn` computes the base and ``A`` products of the tokens with autograd and
hands the per-slot part (delta ``B`` products, SiLU(gate) * up, router mixing, down-side ``A`` product) to
:class:`_LowRankSlots` of ``functional``, a dozen tensor operations per token chunk, recomputed in backward. Where
:func:`applies` (kernels enabled, CPU, float32, gated SiLU, rank 1/2/4/8/16, not under ``torch.compile``),
:func:`slots` runs that part as one compiled loop per pass instead: each slot's row of the intermediate width is
computed in registers, and nothing of size ``(tokens, slots, intermediate)`` is stored or written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import decode_kernel

RANKS = (1, 2, 4, 8, 16)
"""The ranks the kernel is compiled for (others keep the Python path)."""


def applies(x: torch.Tensor, dtype: torch.dtype, rank: int, silu: bool, gated: bool) -> bool:
    """Whether :func:`slots` can run this layer call (``dtype``: the compute dtype after autocast)."""
    if not (gated and silu and rank in RANKS and x.device.type == "cpu" and dtype == torch.float32):
        return False
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        return False
    return decode_kernel() is not None


def expert_major(b: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """A stacked factor ``(out, E*r)`` as ``(E, r, out)`` (differentiable), so a slot reads its expert's rows only."""
    return b.view(b.shape[0], num_experts, rank).permute(1, 2, 0).contiguous()


def slots(
    weights: torch.Tensor,
    expert_idx: torch.Tensor,
    z: torch.Tensor,
    base: torch.Tensor,
    in_bs: Sequence[torch.Tensor],
    a_out: torch.Tensor,
    num_experts: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mixed, z_out)`` as ``functional._LowRankSlots`` returns them.

    ``weights``/``expert_idx``: ``(T, S)``; ``z``: ``(T, n_in * E*r)``; ``base``: ``(T, 2I)`` (gate, then up);
    ``in_bs``: the scaled ``B`` ``(out_j, E*r)`` of the one or two input projections; ``a_out``: ``(E*r, I)``.
    """
    width = base.shape[1] // 2
    if len(in_bs) == 2:
        bg, bu = (expert_major(b, num_experts, rank) for b in in_bs)
        offsets = (0, num_experts * rank)
    else:  # one fused gate_up projection: its B's first half feeds the gate, its second half the up projection
        bg, bu = expert_major(in_bs[0][:width], num_experts, rank), expert_major(in_bs[0][width:], num_experts, rank)
        offsets = (0, 0)
    a = a_out.view(num_experts, rank, width)
    return _Slots.apply(offsets, rank, weights.float().contiguous(), expert_idx.contiguous(), z, base, bg, bu, a)


class _Slots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, offsets, rank, weights, expert_idx, z, base, bg, bu, a):
        z, base = z.contiguous(), base.contiguous()
        kernel = decode_kernel()
        mixed, z_out, z_slots = kernel.lowrank_slots_forward(base, z, *offsets, expert_idx, weights, bg, bu, a, rank)
        ctx.offsets, ctx.rank, ctx.kernel = offsets, rank, kernel
        ctx.save_for_backward(weights, expert_idx, z, base, bg, bu, a, z_slots)
        return mixed, z_out

    @staticmethod
    def backward(ctx, d_mixed, d_z_out):
        weights, expert_idx, z, base, bg, bu, a, z_slots = ctx.saved_tensors
        d_w, d_z, d_base, d_bg, d_bu, d_a = ctx.kernel.lowrank_slots_backward(
            d_mixed.float().contiguous(), d_z_out.float().contiguous(), base, z, *ctx.offsets, expert_idx, weights,
            bg, bu, a, z_slots, ctx.rank,
        )
        need = ctx.needs_input_grad
        grads = (d_w, None, d_z, d_base, d_bg, d_bu, d_a)
        return None, None, *(g if n else None for g, n in zip(grads, need[2:], strict=True))
