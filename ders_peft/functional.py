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

from .deltas import Delta
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
