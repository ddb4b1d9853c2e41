"""Baseline MoE compressors for comparisons with D2-MoE, in the same harness and at the same compression ratio.

The ratio is, as for D2-MoE, the share of the routed experts' parameters removed (routers and shared experts are
kept whole and not counted). Each function returns a :class:`Compressed`: a compressed copy of a transformers MoE
(the input is never modified), the routed-expert parameters it stores next to the original's, and per-layer details.

* :func:`prune_experts`: NAEE-style expert pruning (simplified: router frequency instead of NAEE's output-loss search).
* :func:`merge_experts`: MC-SMoE-style expert merging (simplified: no weight permutation alignment, no low-rank
  compression of the merged experts).
* :func:`svd_experts`: plain truncated SVD of every expert weight matrix, no shared base (with ``calibration``: an
  ablation using D2-MoE's whitened, truncation-aware SVD on the whole experts).

Pruning and merging support the softmax-routed architectures (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE); merging and
SVD keep the router, so they work for every architecture of :func:`~.moe_blocks.find_moe_blocks`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .calibration import LayerStats, collect_statistics
from .d2_experts import D2Experts
from .d2moe import DEFAULT_CALIBRATION_LENGTH, calibration_batches
from .moe_blocks import MoEBlockInfo, find_moe_blocks
from .svd import rank_for_ratio, whitened_svd

_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts")


class Compressed(NamedTuple):
    """``model``: the compressed copy; ``stored``: routed-expert parameters ``{"compressed", "original"}``;
    ``details``: per decoder-layer index, what was kept (experts, groups or rank)."""

    model: nn.Module
    stored: dict[str, int]
    details: dict[int, dict]

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.stored["compressed"] / self.stored["original"]


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or math.isnan(ratio) or not 0 <= ratio < 1:
        raise ValueError(f"`ratio` must be a number in [0, 1) (the share of expert parameters removed), got {ratio!r}")
    return float(ratio)


def _original_params(blocks: dict[int, MoEBlockInfo]) -> int:
    return sum(b.num_experts * 3 * b.intermediate_size * b.hidden_size for b in blocks.values())


def _statistics(model, calibration, tokenizer, batch_size, max_length, progress) -> dict[int, LayerStats]:
    batches = calibration_batches(calibration, tokenizer, batch_size=batch_size, max_length=max_length)
    return collect_statistics(model, batches, fisher=False, intermediate_gram=False, progress=progress)


def _write_experts(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """Replace a fused experts module's tensors by ``gate``/``up`` (n, I, H) and ``down`` (n, H, I), in its layout."""
    gate_up = torch.cat([gate, up], dim=1)
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    dtype = experts.gate_up_proj.dtype
    experts.gate_up_proj = nn.Parameter(gate_up.to(dtype).contiguous())
    experts.down_proj = nn.Parameter(down.to(dtype).contiguous())
    experts.num_experts = gate.shape[0]


def prune_experts(
    model: nn.Module,
    ratio: float,
    calibration,
    *,
    tokenizer=None,
    batch_size: int = 4,
    max_length: int = DEFAULT_CALIBRATION_LENGTH,
    progress: bool = False,
) -> Compressed:
    """NAEE-style expert pruning, simplified: per MoE block drop the ``round(ratio * E)`` experts the router picked
    least often on ``calibration`` (ties: the higher index goes first); tokens are routed among the remaining ones.

    How: the block's router module keeps its class and forward; its ``weight`` is cut to the kept experts' rows (in
    their original order) and ``num_experts`` set to the kept count. Its logits are then the original logits of the
    kept experts, so its softmax (float32), top-k and renormalisation equal those of the original router with the
    pruned experts' logits set to -inf (their softmax probability is exactly 0). The experts module keeps only the
    kept experts' tensors (the stored parameters really shrink) and the model config's expert count is updated, so
    the result saves and loads as a standard model. The kept original expert ids are the router's non-persistent
    buffer ``kept_experts`` (also in ``details``). Softmax-routed architectures only (Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE); needs ``E - round(ratio * E) >= top_k``.
    """
    ratio = _check_ratio(ratio)
    model = copy.deepcopy(model)
    blocks = find_moe_blocks(model)
    for info in blocks.values():
        if info.scoring != "softmax":
            raise ValueError(f"prune_experts supports softmax routing only, not {info.model_type!r} ({info.scoring})")
        removed = round(ratio * info.num_experts)
        if info.num_experts - removed < info.top_k:
            raise ValueError(
                f"`ratio`={ratio} removes {removed} of {info.num_experts} experts, leaving fewer than top_k="
                f"{info.top_k}; the largest ratio is {(info.num_experts - info.top_k) / info.num_experts:.3f}"
            )
    stats = _statistics(model, calibration, tokenizer, batch_size, max_length, progress)
    original = _original_params(blocks)
    details: dict[int, dict] = {}
    kept_count = None
    with torch.no_grad():
        for idx, info in blocks.items():
            e = info.num_experts
            freq = stats[idx].frequency.cpu()
            order = sorted(range(e), key=lambda j: (-int(freq[j]), j))  # most frequent first, ties: lower index
            kept = torch.tensor(sorted(order[: e - round(ratio * e)]), dtype=torch.long)
            kept_count = len(kept)
            _write_experts(info.experts, info.gate[kept], info.up[kept], info.down[kept])
            router = info.router
            router.weight = nn.Parameter(router.weight.detach()[kept.to(router.weight.device)].clone())
            router.num_experts = len(kept)
            router.register_buffer("kept_experts", kept.to(router.weight.device), persistent=False)
            pruned = sorted(set(range(e)) - set(kept.tolist()))
            details[idx] = {"kept": kept.tolist(), "pruned": pruned, "frequency": freq.tolist()}
    for name in _EXPERT_COUNT_FIELDS:
        if kept_count is not None and hasattr(model.config, name):
            setattr(model.config, name, kept_count)
    return Compressed(model.eval(), {"compressed": expert_params(model), "original": original}, details)


class GroupedExperts(nn.Module):
    """A fused experts module holding one merged expert per group, called with the original expert ids:
    ``expert_to_group`` (E,) maps each id to its group before the inner module runs. A token whose top-k experts
    share a group gets that group's expert once per slot (weights add up, as they would with separate copies)."""

    def __init__(self, experts: nn.Module, expert_to_group: torch.Tensor) -> None:
        super().__init__()
        self.experts = experts
        self.register_buffer("expert_to_group", expert_to_group.long())

    @property
    def num_experts(self) -> int:
        return self.expert_to_group.numel()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self.experts(hidden_states, self.expert_to_group[top_k_index], top_k_weights)


def logit_similarity(info: MoEBlockInfo, stats: LayerStats) -> torch.Tensor:
    """Cosine similarity (E, E) of the experts' router-logit vectors over all calibration tokens: with router rows
    w_e and the tokens' Gram X^T X (= sum_e Gram_e / top_k, every token being routed to top_k distinct experts),
    sim(e, f) = w_e^T X^T X w_f / sqrt(w_e^T X^T X w_e * w_f^T X^T X w_f)."""
    gram = stats.gram_in.sum(0) / info.top_k
    w = info.router_weight.to(gram.device, torch.float64)
    c = w @ gram @ w.T
    norms = c.diagonal().clamp_min(1e-300).sqrt()
    return c / norms[:, None] / norms[None, :]


def group_experts(frequency: torch.Tensor, similarity: torch.Tensor, num_groups: int) -> torch.Tensor:
    """MC-SMoE grouping: the ``num_groups`` most frequent experts lead a group each (ties: lower index); every other
    expert joins the leader whose router logits are most similar (ties: the more frequent leader). Returns the group
    index (E,) of each expert, groups numbered in the leaders' index order."""
    e = frequency.numel()
    order = sorted(range(e), key=lambda j: (-int(frequency[j]), j))
    leaders = sorted(order[:num_groups])
    group = torch.empty(e, dtype=torch.long)
    for g, lead in enumerate(leaders):
        group[lead] = g
    rank = {lead: order.index(lead) for lead in leaders}
    for j in range(e):
        if j in rank:
            continue
        best = max(leaders, key=lambda lead: (float(similarity[j, lead]), -rank[lead]))
        group[j] = leaders.index(best)
    return group


def frequency_merge(weights: torch.Tensor, frequency: torch.Tensor, group: torch.Tensor, num_groups: int):
    """(G, out, in): per group, sum_e f_e W_e / sum_e f_e over its experts (the plain mean when all f_e are 0)."""
    w = weights.double()
    f = frequency.to(w.device, torch.float64)
    out = []
    for g in range(num_groups):
        members = (group == g).nonzero().squeeze(-1).to(w.device)
        fg = f[members]
        coef = fg / fg.sum() if fg.sum() > 0 else torch.full_like(fg, 1.0 / len(members))
        out.append(torch.einsum("e,eoi->oi", coef, w[members]))
    return torch.stack(out).to(weights.dtype)


def merge_experts(
    model: nn.Module,
    ratio: float,
    calibration,
    *,
    tokenizer=None,
    batch_size: int = 4,
    max_length: int = DEFAULT_CALIBRATION_LENGTH,
    progress: bool = False,
) -> Compressed:
    """MC-SMoE-style expert merging, simplified: per MoE block ``G = E - round(ratio * E)`` groups; the G most
    frequent experts (router frequency on ``calibration``) lead the groups, every other expert joins the leader whose
    router-logit vector over the calibration tokens is most similar (cosine, :func:`logit_similarity`); each group's
    gate, up and down weights are merged by router-frequency-weighted averaging (:func:`frequency_merge`). The router
    is unchanged: every expert of a group then runs its group's merged weights. Only the G merged experts are stored
    (a :class:`GroupedExperts` maps the router's expert ids to groups). Needs G >= 1.
    """
    ratio = _check_ratio(ratio)
    model = copy.deepcopy(model)
    blocks = find_moe_blocks(model)
    for info in blocks.values():
        if info.num_experts - round(ratio * info.num_experts) < 1:
            raise ValueError(f"`ratio`={ratio} leaves no group of {info.num_experts} experts; it must be smaller")
    stats = _statistics(model, calibration, tokenizer, batch_size, max_length, progress)
    original = _original_params(blocks)
    details: dict[int, dict] = {}
    with torch.no_grad():
        for idx, info in blocks.items():
            e = info.num_experts
            num_groups = e - round(ratio * e)
            freq = stats[idx].frequency.cpu()
            group = group_experts(freq, logit_similarity(info, stats[idx]).cpu(), num_groups)
            merged = [frequency_merge(w, freq, group, num_groups) for w in (info.gate, info.up, info.down)]
            inner = info.experts
            _write_experts(inner, *merged)
            info.block.experts = GroupedExperts(inner, group.to(info.router_weight.device))
            groups = [(group == g).nonzero().squeeze(-1).tolist() for g in range(num_groups)]
            details[idx] = {"groups": groups, "frequency": freq.tolist()}
    return Compressed(model.eval(), {"compressed": expert_params(model), "original": original}, details)


class LowRankExperts(nn.Module):
    """SwiGLU experts with every weight matrix stored as ``U_e V_e`` (rank ``rank``; no shared base); same call
    signature as a transformers experts module ``(hidden_states, top_k_index, top_k_weights)``.

    ``gate_u``/``up_u`` (E, I, r), ``gate_v``/``up_v`` (E, r, H), ``down_u`` (E, H, r), ``down_v`` (E, r, I)."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], act_fn: Callable) -> None:
        super().__init__()
        for proj, (u, v) in factors.items():
            setattr(self, f"{proj}_u", nn.Parameter(u.contiguous()))
            setattr(self, f"{proj}_v", nn.Parameter(v.contiguous()))
        self.act_fn = act_fn
        self.num_experts = self.gate_u.shape[0]
        self.rank = self.gate_u.shape[2]

    def _apply(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return (x @ getattr(self, f"{proj}_v")[e].T) @ getattr(self, f"{proj}_u")[e].T

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            tok, slot = torch.where(top_k_index == e)
            x = hidden_states[tok]
            h = self.act_fn(self._apply("gate", e, x)) * self._apply("up", e, x)
            y = self._apply("down", e, h) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    @torch.no_grad()
    def expert_weights(self) -> dict[str, torch.Tensor]:
        """Every expert's ``U_e V_e`` per projection, (E, out, in)."""
        return {p: torch.bmm(getattr(self, f"{p}_u"), getattr(self, f"{p}_v")) for p in ("gate", "up", "down")}


def _factorize(weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` ``U V`` of each (out, in) matrix of ``weights`` (E, out, in), ``U = U_r sqrt(S_r)``."""
    u, s, vh = torch.linalg.svd(weights.detach().double(), full_matrices=False)
    root = s[:, :rank].sqrt()
    return (u[:, :, :rank] * root[:, None, :]).to(weights.dtype), (root[:, :, None] * vh[:, :rank]).to(weights.dtype)


def svd_experts(
    model: nn.Module,
    ratio: float | None = None,
    *,
    rank: int | None = None,
    calibration=None,
    tokenizer=None,
    batch_size: int = 4,
    max_length: int = DEFAULT_CALIBRATION_LENGTH,
    progress: bool = False,
) -> Compressed:
    """Truncated SVD of each expert's gate, up and down weights with no shared base, stored as ``U_e V_e``
    (:class:`LowRankExperts`). Without ``calibration``: plain SVD, the best rank-r approximation in Frobenius norm.
    With ``calibration`` (an ablation, not a published baseline): the truncation-aware whitened SVD D2-MoE uses for
    its deltas (:func:`~.svd.whitened_svd`, with each expert's own input Gram), applied to the whole weights.

    The rank comes from ``ratio`` by the D2-MoE accounting with no base (``rank_for_ratio(..., base_fraction=0)``:
    the largest r with ``E r (I + H) <= (1 - ratio) E I H``), or is ``rank`` (clamped to ``min(I, H)``, so a large
    value reproduces the experts). Note that ratio 0 gives ``r = floor(I H / (I + H)) < min(I, H)``: not lossless.
    """
    if rank is None:
        if ratio is None:
            raise ValueError("svd_experts needs `ratio` or `rank`")
        ratio = _check_ratio(ratio)
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"`rank` must be None (use ratio) or an integer >= 0, got {rank!r}")
    model = copy.deepcopy(model)
    blocks = find_moe_blocks(model)
    stats = None
    if calibration is not None:
        batches = calibration_batches(calibration, tokenizer, batch_size=batch_size, max_length=max_length)
        stats = collect_statistics(model, batches, fisher=False, intermediate_gram=True, progress=progress)
    original = _original_params(blocks)
    details: dict[int, dict] = {}
    with torch.no_grad():
        for idx, info in blocks.items():
            e, i, h = info.num_experts, info.intermediate_size, info.hidden_size
            r = min(rank, i, h) if rank is not None else rank_for_ratio(e, i, h, ratio, base_fraction=0.0)
            dtype = info.gate_up_param.dtype
            factors = {}
            for proj, w in (("gate", info.gate), ("up", info.up), ("down", info.down)):
                if stats is None:
                    u, v = _factorize(w.float(), r)
                else:
                    gram = stats[idx].gram_mid if proj == "down" else stats[idx].gram_in
                    pairs = [whitened_svd(w[j].float(), gram[j], r) for j in range(e)]
                    u, v = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
                factors[proj] = (u.to(dtype), v.to(dtype))
            info.block.experts = LowRankExperts(factors, info.act_fn)
            details[idx] = {"rank": r, "whitened": stats is not None}
    return Compressed(model.eval(), {"compressed": expert_params(model), "original": original}, details)


def _is_fused_experts(module: nn.Module) -> bool:
    tensors = (getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None))
    return all(isinstance(t, nn.Parameter) and t.ndim == 3 for t in tensors)


def expert_params(model: nn.Module) -> int:
    """Routed-expert parameters a (compressed) MoE stores: the fused experts tensors of each MoE block, the merged
    experts of a :class:`GroupedExperts`, the factors of :class:`LowRankExperts`, everything a :class:`D2Experts`
    holds. Routers and shared experts are not counted."""
    total = 0
    for module in model.modules():
        if isinstance(module, D2Experts | LowRankExperts):
            total += sum(p.numel() for p in module.parameters())
        elif isinstance(module, GroupedExperts):
            continue  # its inner fused module is counted below
        elif _is_fused_experts(module):
            total += module.gate_up_proj.numel() + module.down_proj.numel()
    return total


__all__ = [
    "Compressed",
    "GroupedExperts",
    "LowRankExperts",
    "expert_params",
    "frequency_merge",
    "group_experts",
    "logit_similarity",
    "merge_experts",
    "prune_experts",
    "svd_experts",
]
