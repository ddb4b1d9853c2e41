"""Find the Mixture-of-Experts blocks of a transformers causal LM and read their routers and expert weights.

Supported (transformers 5.x, fused 3-D expert tensors ``gate_up_proj`` (E, 2I, H) with the gate rows first and
``down_proj`` (E, H, I)): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE and DeepSeek-V3.

Routing differs per architecture and :func:`route` reproduces each one bit for bit:

* ``softmax`` (Mixtral, Qwen2/3-MoE, OLMoE): softmax of the logits in float32, top-k, renormalised over the k
  choices (Mixtral always, the others when ``norm_topk_prob``). Mixtral keeps the weights in float32, the others
  cast them back to the logits' dtype.
* ``sparsemixer`` (PhiMoE, eval mode): top-2 only; each choice gets the softmax over the logits within a relative
  ``2 * router_jitter_noise`` band of its maximum, computed in the logits' dtype. Never renormalised.
* ``sigmoid`` (DeepSeek-V3): float32 sigmoid scores, a selection bias ``e_score_correction_bias`` used for the
  choice only, group-limited top-k (``n_group`` / ``topk_group``), optional renormalisation and a final
  ``routed_scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "deepseek_v3")

# model_type -> (router attribute, scoring, shared expert attribute, shared expert gate attribute)
_ARCHS: dict[str, tuple[str, str, str | None, str | None]] = {
    "mixtral": ("gate", "softmax", None, None),
    "qwen2_moe": ("gate", "softmax", "shared_expert", "shared_expert_gate"),
    "qwen3_moe": ("gate", "softmax", None, None),
    "olmoe": ("gate", "softmax", None, None),
    "phimoe": ("router", "sparsemixer", None, None),
    "deepseek_v3": ("gate", "sigmoid", "shared_experts", None),
}


@dataclass
class MoEBlockInfo:
    """One MoE block. Tensors are detached views sharing storage with the model's parameters.

    ``gate``/``up``: (E, I, H); ``down``: (E, H, I); ``router_weight``: (E, H). Shared expert (where present):
    ``shared_gate``/``shared_up`` (I_s, H), ``shared_down`` (H, I_s), and its sigmoid gate ``shared_expert_gate``
    (1, H) (Qwen2-MoE only; DeepSeek-V3's shared experts are ungated).
    """

    layer_idx: int
    model_type: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    router_weight: torch.Tensor
    top_k: int
    norm_topk_prob: bool
    scoring: str
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    gate_up_param: nn.Parameter
    down_param: nn.Parameter
    weights_in_float32: bool = False
    shared_gate: torch.Tensor | None = None
    shared_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None
    shared_act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    shared_expert_gate: torch.Tensor | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    e_score_correction_bias: torch.Tensor | None = None
    jitter_eps: float = 0.0

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[1]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    if hasattr(model, "get_base_model"):  # peft wrapper
        model = model.get_base_model()
    for candidate in (getattr(model, "model", None), model):
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected `.model.layers`)")


def _split_experts(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return gate (E, I, H), up (E, I, H), down (E, H, I) views of a fused experts module."""
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise ValueError(f"{type(experts).__name__}: experts with biases or without a gate are not supported")
    if not getattr(experts, "is_concatenated", True):
        raise ValueError(f"{type(experts).__name__}: interleaved gate/up layout is not supported")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if getattr(experts, "is_transposed", False):  # stored (E, H, 2I) and (E, I, H)
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    inter = gate_up.shape[1] // 2
    return gate_up[:, :inter], gate_up[:, inter:], down


def find_moe_blocks(model: nn.Module) -> dict[int, MoEBlockInfo]:
    """Map decoder-layer index -> :class:`MoEBlockInfo` for every MoE block (dense layers are skipped)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHS:
        raise ValueError(f"unsupported MoE model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    router_attr, scoring, shared_attr, shared_gate_attr = _ARCHS[model_type]
    blocks: dict[int, MoEBlockInfo] = {}
    for idx, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue  # dense MLP layer (Qwen decoder_sparse_step / mlp_only_layers, DeepSeek first_k_dense)
        router = getattr(block, router_attr)
        gate, up, down = _split_experts(experts)
        info = MoEBlockInfo(
            layer_idx=idx,
            model_type=model_type,
            block=block,
            router=router,
            experts=experts,
            router_weight=router.weight.detach(),
            top_k=int(router.top_k),
            norm_topk_prob=bool(getattr(router, "norm_topk_prob", model_type == "mixtral")),
            scoring=scoring,
            gate=gate,
            up=up,
            down=down,
            act_fn=experts.act_fn,
            gate_up_param=experts.gate_up_proj,
            down_param=experts.down_proj,
            weights_in_float32=model_type == "mixtral",
        )
        if shared_attr is not None:
            shared = getattr(block, shared_attr)
            info.shared_gate = shared.gate_proj.weight.detach()
            info.shared_up = shared.up_proj.weight.detach()
            info.shared_down = shared.down_proj.weight.detach()
            info.shared_act_fn = shared.act_fn
        if shared_gate_attr is not None:
            info.shared_expert_gate = getattr(block, shared_gate_attr).weight.detach()
        if scoring == "sigmoid":
            info.routed_scaling_factor = float(router.routed_scaling_factor)
            info.n_group, info.topk_group = int(router.num_group), int(router.topk_group)
            info.e_score_correction_bias = router.e_score_correction_bias
        if scoring == "sparsemixer":
            if info.top_k != 2:
                raise ValueError(f"PhiMoE sparsemixer routing is top-2 only, got num_experts_per_tok={info.top_k}")
            info.jitter_eps = float(router.router_jitter_noise)
        blocks[idx] = info
    if not blocks:
        raise ValueError(f"no MoE blocks with fused experts found in {type(model).__name__}")
    return blocks


def _sparsemixer_choice(scores: torch.Tensor, masked: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    threshold, idx = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    drop = ((threshold - scores) / factor) > (2 * eps)
    probs = torch.softmax(masked.masked_fill(drop, float("-inf")), dim=-1)
    return idx, probs.gather(-1, idx)


def route(info: MoEBlockInfo, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of tokens ``x`` (T, H) (or (..., H)) as the block does it in eval mode.

    Returns ``top_idx`` (T, k) int64 and ``top_w`` (T, k) (float32 for Mixtral and DeepSeek-V3, else ``x``'s dtype).
    """
    x = x.reshape(-1, info.hidden_size)
    if info.scoring == "softmax":
        logits = F.linear(x, info.router_weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_idx = torch.topk(probs, info.top_k, dim=-1)
        if info.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_idx, top_w if info.weights_in_float32 else top_w.to(logits.dtype)
    if info.scoring == "sparsemixer":
        logits = F.linear(x, info.router_weight)
        idx1, w1 = _sparsemixer_choice(logits, logits, info.jitter_eps)
        idx2, w2 = _sparsemixer_choice(logits, torch.scatter(logits, -1, idx1, float("-inf")), info.jitter_eps)
        return torch.cat((idx1, idx2), dim=-1), torch.cat((w1, w2), dim=-1)
    if info.scoring == "sigmoid":
        scores = F.linear(x.float(), info.router_weight.float()).sigmoid()
        choice = scores + info.e_score_correction_bias
        num_experts, groups = info.num_experts, info.n_group
        group_scores = choice.view(-1, groups, num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=info.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, num_experts // groups).reshape(-1, num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        top_idx = torch.topk(choice, k=info.top_k, dim=-1, sorted=False)[1]
        top_w = scores.gather(1, top_idx)
        if info.norm_topk_prob:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return top_idx, top_w * info.routed_scaling_factor
    raise ValueError(f"unknown scoring {info.scoring!r}")


def expert_intermediate(info: MoEBlockInfo, x: torch.Tensor, expert: int) -> torch.Tensor:
    """act(x gate_e^T) * (x up_e^T): the input of expert ``expert``'s down projection, (T, I)."""
    return info.act_fn(F.linear(x, info.gate[expert])) * F.linear(x, info.up[expert])


def shared_expert_output(info: MoEBlockInfo, x: torch.Tensor) -> torch.Tensor | None:
    """The (gated) shared-expert contribution for tokens ``x`` (T, H), or None when the block has none."""
    if info.shared_gate is None:
        return None
    hidden = info.shared_act_fn(F.linear(x, info.shared_gate)) * F.linear(x, info.shared_up)
    out = F.linear(hidden, info.shared_down)
    if info.shared_expert_gate is not None:
        out = torch.sigmoid(F.linear(x, info.shared_expert_gate)) * out
    return out


def moe_forward(info: MoEBlockInfo, x: torch.Tensor) -> torch.Tensor:
    """Plain reference recomputation of the block's output from the extracted weights, same shape as ``x``."""
    shape = x.shape
    flat = x.reshape(-1, info.hidden_size)
    top_idx, top_w = route(info, flat)
    out = torch.zeros_like(flat)
    for e in range(info.num_experts):
        tok, slot = torch.where(top_idx == e)
        if tok.numel() == 0:
            continue
        y = F.linear(expert_intermediate(info, flat[tok], e), info.down[e]) * top_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    shared = shared_expert_output(info, flat)
    if shared is not None:
        out = out + shared
    return out.reshape(shape)
