"""`D2Experts`: the compressed experts of one MoE block (D2-MoE): a shared base FFN plus low-rank per-expert deltas.

It replaces a transformers MoE block's ``experts`` module and has its call signature ``(hidden_states,
top_k_index, top_k_weights)``, so the block's own router runs unchanged (routing is kept exactly, whatever the
architecture). Expert ``e`` computes ``W_base + U_e V_e`` for gate, up and down without materialising it: the routed
layer's grouped path runs the base once per token and the low-rank products per routed slot.

Semi-dynamic base pruning: the base down projection keeps only the intermediate channels ``base_keep`` chosen
offline (static), and per call zeroes the ``dynamic_prune`` kept channels with the lowest ``||W[:, j]|| * ||h_j||``
on the current batch (dynamic). The deltas are not pruned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..grouped_path import grouped_routed_ffn
from ..routing import RoutingPlan
from .d2_deltas import FlexLowRankDelta

PROJS = ("gate_proj", "up_proj", "down_proj")


class D2Experts(nn.Module):
    """Base ``gate``/``up`` ``(I, H)``, base ``down`` ``(H, I_kept)`` and low-rank deltas
    (:class:`~.d2_deltas.FlexLowRankDelta`, ``B_e A_e`` with ``B_e = U_e``, ``A_e = V_e``) of ``num_experts`` SwiGLU
    experts. ``ranks`` maps each projection to one rank or a list of per-expert ranks (0: that expert's delta is
    trimmed); ``share_v`` gives each projection one ``V`` shared by all experts (ShareV)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        ranks: dict[str, int | list[int]],
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        kept_channels: int | None = None,
        dynamic_prune: int = 0,
        share_v: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        fk = {"dtype": dtype, "device": device}
        kept = intermediate_size if kept_channels is None else kept_channels
        if not 0 < kept <= intermediate_size or not 0 <= dynamic_prune < kept:
            raise ValueError(
                f"D2Experts: kept_channels={kept} and dynamic_prune={dynamic_prune} are invalid for an intermediate "
                f"size of {intermediate_size}: need 0 < kept <= {intermediate_size} and 0 <= dynamic_prune < kept."
            )
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.act_fn = act_fn
        self.dynamic_prune = dynamic_prune
        self.base_gate = nn.Parameter(torch.zeros(intermediate_size, hidden_size, **fk))
        self.base_up = nn.Parameter(torch.zeros(intermediate_size, hidden_size, **fk))
        self.base_down = nn.Parameter(torch.zeros(hidden_size, kept, **fk))
        self.register_buffer("base_keep", torch.arange(kept, device=device))
        shapes = {"gate_proj": (intermediate_size, hidden_size), "up_proj": (intermediate_size, hidden_size)}
        shapes["down_proj"] = (hidden_size, intermediate_size)
        per_expert = {p: [r] * num_experts if isinstance(r, int) else list(r) for p, r in ranks.items()}
        self.share_v = share_v
        self.deltas = nn.ModuleDict(
            {p: FlexLowRankDelta(num_experts, *shapes[p], per_expert[p], shared_a=share_v, **fk) for p in PROJS}
        )

    @property
    def ranks(self) -> dict[str, list[int]]:
        return {p: list(d.ranks) for p, d in self.deltas.items()}

    @torch.no_grad()
    def load_(self, base: dict[str, torch.Tensor], factors: dict[str, tuple], keep: torch.Tensor | None = None):
        """Fill from ``base`` (projection -> ``(out, in)``), ``factors`` (projection -> per-expert ``U_e`` ``(out,
        r_e)`` and ``V_e`` ``(r_e, in)``, or with ``share_v`` one ``V`` ``(r, in)``) and the kept intermediate
        channels of the base down projection; returns ``self``."""
        self.base_gate.copy_(base["gate_proj"])
        self.base_up.copy_(base["up_proj"])
        keep = torch.arange(self.intermediate_size) if keep is None else keep.sort().values
        self.base_keep.copy_(keep)
        self.base_down.copy_(base["down_proj"][:, keep])
        for proj, (u, v) in factors.items():
            self.deltas[proj].load_(u, v)
        return self

    def base_down_full(self) -> torch.Tensor:
        """The base down projection ``(H, I)`` with statically pruned channels as zero columns."""
        full = self.base_down.new_zeros(self.hidden_size, self.intermediate_size)
        full[:, self.base_keep] = self.base_down
        return full

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = hidden_states
        plan = RoutingPlan(top_k_index, top_k_weights.to(x.dtype), self.num_experts)
        d = self.deltas
        mixed_out: dict[str, torch.Tensor] = {}
        y = grouped_routed_ffn(
            x, plan, [self.base_gate, self.base_up], None, [d["gate_proj"], d["up_proj"]], d["down_proj"],
            [None, None], None, self.act_fn, True, mixed_out=mixed_out,
        )  # fmt: skip
        mixed = mixed_out["mixed"].index_select(1, self.base_keep)  # (T, I_kept): what the base down projection reads
        if self.dynamic_prune:
            score = mixed.detach().norm(dim=0) * self.base_down.detach().norm(dim=0)
            drop = score.topk(self.dynamic_prune, largest=False).indices
            mixed = mixed.index_fill(1, drop, 0.0)
        return (y + mixed @ self.base_down.t()).to(hidden_states.dtype)

    @torch.no_grad()
    def expert_weights(self) -> dict[str, torch.Tensor]:
        """Every expert's ``W_base + U_e V_e`` ``(E, out, in)`` (static pruning applied, dynamic not): for references
        and for writing a standard MoE back."""
        base = {"gate_proj": self.base_gate, "up_proj": self.base_up, "down_proj": self.base_down_full()}
        return {p: base[p].unsqueeze(0) + self.deltas[p].materialize() for p in PROJS}

    def stored_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class D2SharedExpert(nn.Module):
    """A shared expert (Qwen2-MoE's ``shared_expert``, DeepSeek-V3's ``shared_experts``) compressed as one more delta
    over its block's :class:`D2Experts` base: ``W_base + U V`` for gate, up and down. It replaces the block's shared
    module (the block's sigmoid gate, where there is one, is kept). The base is read from ``experts`` (held by
    reference, not as a submodule, so it is stored once)."""

    def __init__(self, experts: D2Experts, ranks: dict[str, int], act_fn, dtype=None, device=None) -> None:
        super().__init__()
        fk = {"dtype": dtype, "device": device}
        h, i = experts.hidden_size, experts.intermediate_size
        shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        self.deltas = nn.ModuleDict({p: FlexLowRankDelta(1, *shapes[p], [ranks[p]], **fk) for p in PROJS})
        self.act_fn = act_fn
        object.__setattr__(self, "_experts", experts)

    @property
    def ranks(self) -> dict[str, int]:
        return {p: d.ranks[0] for p, d in self.deltas.items()}

    @torch.no_grad()
    def load_(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> D2SharedExpert:
        """``factors``: projection -> ``U`` ``(out, r)``, ``V`` ``(r, in)``; returns ``self``."""
        for proj, (u, v) in factors.items():
            self.deltas[proj].load_([u], [v])
        return self

    def _proj(self, x: torch.Tensor, base: torch.Tensor, proj: str) -> torch.Tensor:
        d = self.deltas[proj]
        out = x @ base.t()
        if d.ranks[0]:
            out = out + (x @ d.lora_a.weight.t()) @ d.lora_b.weight.t()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self._experts
        h = self.act_fn(self._proj(x, e.base_gate, "gate_proj")) * self._proj(x, e.base_up, "up_proj")
        return self._proj(h, e.base_down_full(), "down_proj")

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """``W_base + U V`` per projection ``(out, in)`` (static base pruning applied)."""
        e = self._experts
        base = {"gate_proj": e.base_gate, "up_proj": e.base_up, "down_proj": e.base_down_full()}
        return {p: base[p] + self.deltas[p].expert_delta(0) for p in PROJS}

    def stored_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
