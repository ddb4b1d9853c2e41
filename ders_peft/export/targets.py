"""The export targets: what each standard MoE architecture can express, and which sources map onto which target."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DeRSConfig


@dataclass(frozen=True)
class TargetSpec:
    """What a target MoE architecture can express and where its MoE block's tensors live."""

    model_class: str
    block: str  # attribute of the decoder layer holding the MoE block
    router: str  # router weight, relative to the block
    dense_blocks: bool  # can keep some blocks dense (mlp_only_layers)
    shared: str  # "none", "gated" (sigmoid gate, Qwen2-MoE) or "ungated" (added with weight 1, GraniteMoeShared)
    renormalises: str  # "always" or "option" (norm_topk_prob)
    attention_bias: str  # which source attention biases it holds: "none", "qkv" or "all"


TARGETS: dict[str, TargetSpec] = {
    "mixtral": TargetSpec("MixtralForCausalLM", "mlp", "gate.weight", False, "none", "always", "none"),
    "qwen2_moe": TargetSpec("Qwen2MoeForCausalLM", "mlp", "gate.weight", True, "gated", "option", "qkv"),
    "qwen3_moe": TargetSpec("Qwen3MoeForCausalLM", "mlp", "gate.weight", True, "none", "option", "all"),
    "granitemoe": TargetSpec(
        "GraniteMoeForCausalLM", "block_sparse_moe", "router.weight", False, "none", "always", "all"
    ),
    "granitemoeshared": TargetSpec(
        "GraniteMoeSharedForCausalLM", "block_sparse_moe", "router.weight", False, "ungated", "always", "all"
    ),
}
ARCHITECTURES = tuple(TARGETS)

# source model_type -> targets it can map to exactly, in order of preference (the first that can express the
# adapter's options is the default)
SOURCE_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("mixtral", "qwen2_moe"),
    "mistral": ("mixtral", "qwen2_moe"),
    "qwen2": ("qwen2_moe",),
    "qwen3": ("qwen3_moe",),
    "granite": ("granitemoe", "granitemoeshared"),
}

_REFUSED_SOURCES = {
    "gemma": "Gemma scales embeddings and uses (1 + weight) RMSNorm; no standard MoE architecture does both",
    "gemma2": "Gemma-2 has extra post-norms and logit soft-capping; no standard MoE architecture does both",
    "olmo": "OLMo uses a non-parametric LayerNorm; OLMoE uses RMSNorm and q/k norms",
    "olmo2": "OLMo-2 normalises after attention/FFN (post-norm); OLMoE is pre-norm",
    "phi3": "PhiMoE uses LayerNorm, attention biases and sparsemixer routing; Phi-3 uses RMSNorm and no biases",
    "phi": "Phi has parallel attention/FFN blocks and GELU MLPs; no standard MoE architecture matches",
    "stablelm": "StableLM uses LayerNorm and partial rotary embeddings; no standard MoE architecture matches",
    "gpt2": "GPT-2 has learned positions, LayerNorm and GELU MLPs with biases; no standard MoE architecture matches",
    "gpt_neox": "GPT-NeoX has parallel attention/FFN, LayerNorm and biased GELU MLPs; no standard MoE matches",
}

SHARED_GATE_ZERO = 1e-20
"""The value of every weight of an exported Qwen2-MoE ``shared_expert_gate`` where DeRS mixes the universal FFN with a
fixed 0.5 (or there is no universal FFN). sigmoid(x . 1e-20) is exactly 0.5 in fp32/bf16 for any hidden state of
ordinary size, like sigmoid(0), but an engine computing sigmoid as silu(x)/x (llama.cpp) gets 0/0 = NaN from an
all-zero gate."""


def _refuse(reason: str) -> ValueError:
    return ValueError(f"No exact standard MoE target for this DeRS model: {reason}.")


def _default_target(allowed: tuple[str, ...], cfg: DeRSConfig, dense: bool) -> str:
    """The first allowed target whose MoE block can express the adapter's options (else the first, which refuses)."""
    for arch in allowed:
        spec = TARGETS[arch]
        if (
            (spec.dense_blocks or not dense)
            and (spec.shared != "none" or not cfg.shared_expert)
            and (spec.shared == "gated" or not cfg.shared_expert_gate)
            and (spec.renormalises == "option" or cfg.normalize_top_k)
        ):
            return arch
    return allowed[0]
