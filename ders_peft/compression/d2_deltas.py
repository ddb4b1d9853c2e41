"""`FlexLowRankDelta`: low-rank expert deltas with a rank per expert (0 = the delta trimmed away) or one ``V`` shared
by every expert (D2-MoE's ShareV), plus its :class:`~ders_peft.grouped_path.ExpertOp` for the grouped path.

``Delta_e = B_e A_e`` with ``B`` ``(out, sum r_e)`` holding the experts' blocks side by side and ``A`` ``(sum r_e,
in)``, or with ``shared_a`` one ``A`` ``(r, in)`` for all (then every expert has rank r).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..deltas import Delta, _Factor, grouped_apply
from ..grouped_path import EXPERT_OPS, ExpertOp


class FlexLowRankDelta(Delta):
    """Per-expert ranks ``ranks`` (a list, zeros allowed) or, with ``shared_a``, one shared ``A`` of rank
    ``ranks[0]``. Factors start at zero."""

    kind = "flex_lowrank"

    def __init__(self, num_experts, out_features, in_features, ranks: Sequence[int], shared_a: bool = False, **fk):
        super().__init__(num_experts, out_features, in_features, 1.0)
        ranks = [int(r) for r in ranks]
        if len(ranks) != num_experts or any(r < 0 for r in ranks) or (shared_a and len(set(ranks)) != 1):
            raise ValueError(
                f"FlexLowRankDelta: ranks={ranks} is invalid for {num_experts} experts (one rank >= 0 per expert; "
                "all equal with shared_a)"
            )
        self.ranks, self.shared_a = ranks, shared_a
        self.offsets = [0]
        for r in ranks:
            self.offsets.append(self.offsets[-1] + r)
        a_rows = ranks[0] if shared_a else self.offsets[-1]
        self.lora_a = _Factor(torch.zeros(a_rows, in_features, **fk))
        self.lora_b = _Factor(torch.zeros(out_features, self.offsets[-1], **fk))

    def a_rows(self, e: int) -> slice:
        return slice(0, self.ranks[0]) if self.shared_a else slice(self.offsets[e], self.offsets[e + 1])

    def b_cols(self, e: int) -> slice:
        return slice(self.offsets[e], self.offsets[e + 1])

    @torch.no_grad()
    def load_(self, u: Sequence[torch.Tensor], v: Sequence[torch.Tensor] | torch.Tensor) -> FlexLowRankDelta:
        """``u[e]`` ``(out, r_e)``; ``v[e]`` ``(r_e, in)`` per expert, or one ``(r, in)`` tensor with ``shared_a``."""
        for e in range(self.num_experts):
            self.lora_b.weight[:, self.b_cols(e)] = u[e]
            if not self.shared_a:
                self.lora_a.weight[self.a_rows(e)] = v[e]
        if self.shared_a:
            self.lora_a.weight.copy_(v)
        return self

    def expert_delta(self, e: int) -> torch.Tensor:
        return self.lora_b.weight[:, self.b_cols(e)] @ self.lora_a.weight[self.a_rows(e)]

    def materialize(self) -> torch.Tensor:
        return torch.stack([self.expert_delta(e) for e in range(self.num_experts)]) * self.scale

    def _apply_slots(self, x: torch.Tensor, plan, weighted: bool) -> torch.Tensor:
        def one(e: int, rows: torch.Tensor) -> torch.Tensor:
            return (rows @ self.lora_a.weight[self.a_rows(e)].t()) @ self.lora_b.weight[:, self.b_cols(e)].t()

        out = grouped_apply(x, plan, one, self.out_features)
        return torch.einsum("tso,ts->to", out, plan.weights.to(out.dtype)) if weighted else out


@dataclass(frozen=True)
class FlexLowRankOp(ExpertOp):
    """Products of :class:`FlexLowRankDelta`: two thin matmuls per expert on its own (possibly empty) blocks."""

    a_slices: tuple[slice, ...]
    b_slices: tuple[slice, ...]
    out_features: int
    in_features: int

    @classmethod
    def of(cls, delta: FlexLowRankDelta) -> FlexLowRankOp:
        n = delta.num_experts
        return cls(
            tuple(delta.a_rows(e) for e in range(n)), tuple(delta.b_cols(e) for e in range(n)),
            delta.out_features, delta.in_features,
        )  # fmt: skip

    @staticmethod
    def params_of(delta: FlexLowRankDelta) -> tuple[torch.Tensor, ...]:
        return delta.lora_a.weight, delta.lora_b.weight

    def _factors(self, e: int, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return params[0][self.a_slices[e]], params[1][:, self.b_slices[e]]

    def add_product(self, e, inp, params, out) -> None:
        a, b = self._factors(e, params)
        if a.shape[0]:
            out.addmm_(inp @ a.t(), b.t())

    def grad_input(self, e, grad, params) -> torch.Tensor:
        a, b = self._factors(e, params)
        if not a.shape[0]:
            return grad.new_zeros(grad.shape[0], self.in_features)
        return (grad @ b) @ a

    def add_grad_params(self, e, grad, inp, params, grads) -> None:
        a, b = self._factors(e, params)
        if not a.shape[0]:
            return
        grads[0][self.a_slices[e]].addmm_((grad @ b).t(), inp)  # a shared A sums every expert's part
        grads[1][:, self.b_slices[e]].addmm_(grad.t(), inp @ a.t())


EXPERT_OPS[FlexLowRankDelta] = FlexLowRankOp.of
