"""Routing, kept apart from the experts: router module, top-k dispatch plan and router losses.

The router turns token states into a :class:`RoutingPlan` (which experts each token uses, with which weights);
the expert computations in :mod:`ders_peft.functional` and :mod:`ders_peft.deltas` only consume the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Linear gate ``logits = x W_R^T`` (a leaf module with ``.weight``, as FSDP auto-wrapping expects)."""

    def __init__(self, hidden_size: int, num_experts: int, init_std: float = 0.02, generator=None, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        if self.weight.device.type != "meta":
            with torch.no_grad():
                w = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32) * init_std
                self.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Routing is sensitive to rounding: keep the gate in the router's dtype (fp32 after peft's adapter upcast) even
        # under autocast, which SFTConfig turns on (bf16) by default, on CPU too.
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.to(self.weight.dtype), self.weight)
        return F.linear(x.to(self.weight.dtype), self.weight)


@dataclass
class RoutingPlan:
    """Which expert each (token, slot) uses and with what weight, plus lazily computed dispatch helpers.

    ``expert_idx`` and ``weights`` have shape ``(T, S)``: S = top_k routed slots, plus one always-on slot (the
    universal expert, index ``num_experts - 1``) when the layer has a shared expert.
    """

    expert_idx: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        return self.expert_idx.shape[1]

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """``(T, S, E)`` one-hot expert mask."""
        key = ("one_hot", dtype)
        if key not in self._cache:
            self._cache[key] = one_hot(self.expert_idx, self.num_experts, dtype)
        return self._cache[key]

    def gate_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """``(T, E)`` dense gating matrix: the weight each token gives each expert (0 if not chosen)."""
        key = ("gate", dtype)
        if key not in self._cache:
            self._cache[key] = torch.einsum("tse,ts->te", self.one_hot(dtype), self.weights.to(dtype))
        return self._cache[key]

    def sorted_slots(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Permutation of the flattened slots grouping them by expert: ``(order, inverse, counts)``.

        ``order[j]`` is the flat slot index (``token * S + slot``) at sorted position j; ``inverse`` undoes it;
        ``counts[e]`` is the number of slots routed to expert e, as Python ints: the per-expert products slice by
        them, so this is the one host synchronisation of a layer call that groups by expert (on CUDA the host waits
        for the router). Computed once per layer call and shared by forward and backward.
        """
        if "sorted" not in self._cache:
            flat = self.expert_idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            positions = torch.arange(order.numel(), device=order.device)
            inverse = torch.empty_like(order).scatter_(0, order, positions)
            # not bincount: on CUDA it reads the largest index back to the host first (a second sync)
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
            counts = counts.scatter_add_(0, flat, torch.ones_like(flat)).tolist()
            self._cache["sorted"] = (order, inverse, counts)
        return self._cache["sorted"]


SHARED_EXPERT_MIX = 0.5


def one_hot(idx: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``F.one_hot(idx, num_classes).to(dtype)`` without its range checks, which read the smallest and largest index
    back to the host (a synchronisation per call on CPU; the indices here come from ``topk`` and are in range)."""
    return (idx.unsqueeze(-1) == torch.arange(num_classes, device=idx.device)).to(dtype)


def route(
    logits: torch.Tensor,
    top_k: int,
    normalize: bool,
    shared_expert: bool = False,
    shared_gate_logit: torch.Tensor | None = None,
) -> tuple[RoutingPlan, torch.Tensor]:
    """Softmax over the experts, keep the ``top_k`` largest, optionally renormalise them to sum to one.

    Returns the plan and the full softmax probabilities ``(T, N)`` (for the load-balancing loss). With
    ``shared_expert`` an extra slot routes every token to the universal expert (index N); the routed mixture and the
    universal expert are then averaged (weights halved, universal weight 0.5), so an upcycled model whose experts all
    equal the dense FFN computes exactly the dense FFN. (A Qwen2-MoE shared-expert gate of zero is sigmoid(0) = 0.5.)
    With ``shared_gate_logit`` ``(T, 1)`` (Qwen2-MoE's ``shared_expert_gate``) the universal expert's weight is
    ``sigmoid(shared_gate_logit)`` and the routed weights are used as they are.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    num_experts = logits.shape[-1]
    if shared_expert:
        always = torch.full_like(idx[:, :1], num_experts)
        idx = torch.cat([idx, always], dim=1)
        if shared_gate_logit is None:
            weights = torch.cat([weights, torch.ones_like(weights[:, :1])], dim=1) * SHARED_EXPERT_MIX
        else:
            weights = torch.cat([weights, torch.sigmoid(shared_gate_logit.float())], dim=1)
        num_experts += 1
    return RoutingPlan(idx, weights, num_experts), probs


def load_balancing_loss(
    probs: torch.Tensor, expert_idx: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss ``N * sum_e f_e * P_e``.

    ``f_e`` is the fraction of routed slots sent to expert e (summed over the top-k slots, as transformers' Mixtral
    does), ``P_e`` the mean router probability of expert e. ``token_mask`` (T,) excludes padding tokens; a mask with
    no real token gives 0. Each DeRS layer adds ``coef *`` its own loss, so the total is a sum over layers (as in
    DeepSpeed-MoE / MoE-LLaVA, which the paper builds on); transformers' Mixtral instead pools every layer's tokens
    into one loss.
    """
    counts = one_hot(expert_idx, num_experts, probs.dtype).sum(dim=1)  # (T, N)
    if token_mask is None:
        frac = counts.mean(dim=0)
        mean_prob = probs.mean(dim=0)
    else:
        m = token_mask.to(probs.dtype).unsqueeze(-1)
        denom = m.sum().clamp_min(1.0)
        frac = (counts * m).sum(dim=0) / denom
        mean_prob = (probs * m).sum(dim=0) / denom
    return num_experts * (frac * mean_prob).sum()


def z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean of ``logsumexp(logits)^2`` over (non-padding) tokens."""
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)
    if token_mask is None:
        return z.mean()
    m = token_mask.to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)


class _InjectAuxLoss(torch.autograd.Function):
    """Identity on ``output``; in backward hands ``aux`` a gradient of ``scale`` (so it reaches the optimizer)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        ctx.aux_dtype = aux.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, grad_aux, None


def inject_aux_loss(output: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return ``output`` unchanged, with ``scale * aux`` added to whatever loss is later backpropagated through it.

    Works with any trainer (TRL's SFTTrainer ignores ``outputs.loss``), because the auxiliary gradient travels with
    the layer output. ``scale`` is ``1 / gradient_accumulation_steps`` under gradient accumulation.
    """
    if not (aux.requires_grad and output.requires_grad):
        return output
    return _InjectAuxLoss.apply(output, aux, scale)
