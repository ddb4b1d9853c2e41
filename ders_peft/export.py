"""Export a DeRS-upcycled model as a standard transformers Mixture-of-Experts checkpoint.

Each routed expert's weights are synthesised as ``W_base + Delta_e`` (in fp32, then cast to the model's dtype), the
router is copied, and every non-FFN weight is carried over, so engines that only know standard architectures
(vLLM, SGLang, llama.cpp, TGI) can serve the trained model. A target is offered only where the mapping is exact; any
other combination is refused with a ``ValueError`` naming the reason, before anything is written.

Supported (source ``model_type``, options) -> target (the README has the full matrix with the refusals):

- llama / mistral, every block upcycled, no universal FFN, ``normalize_top_k=True`` -> ``mixtral``
- llama / mistral / qwen2, any subset of blocks, with or without the universal FFN -> ``qwen2_moe`` (dense blocks
  become ``mlp_only_layers``; the universal FFN becomes the shared expert behind a zero gate, sigmoid(0) = 0.5, and
  the routed half's 0.5 is folded into the experts' down projections; Llama/Mistral get zero q/k/v biases)
- qwen3, any subset of blocks, no universal FFN -> ``qwen3_moe``
- granite, every block upcycled, ``normalize_top_k=True`` -> ``granitemoe`` (no universal FFN) or
  ``granitemoeshared`` (the universal FFN is the ungated shared MLP; both halves' 0.5 go into the down projections)
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import atomic, ffn
from .config import DeRSConfig
from .layer import DeRSLayer
from .routing import SHARED_EXPERT_MIX


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

_BLOCK_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")


@dataclass
class ExportPlan:
    """Everything decided before any weight is built: the target, its config and the upcycled blocks."""

    architecture: str
    source_type: str
    adapter: str
    settings: DeRSConfig
    layers: dict[int, DeRSLayer]
    target_config: object
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` / ``DeRSModel`` (or ``model`` itself)."""
    from peft import PeftModel

    from .model import DeRSModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, DeRSModel):
        model = model.model
    return model


def _refuse(reason: str) -> ValueError:
    return ValueError(f"No exact standard MoE target for this DeRS model: {reason}.")


def _collect_layers(root: nn.Module) -> tuple[dict[int, DeRSLayer], str, DeRSConfig]:
    layers: dict[int, DeRSLayer] = {}
    adapters = set()
    for name, module in root.named_modules():
        if not isinstance(module, DeRSLayer):
            continue
        match = _BLOCK_KEY.search(name)
        if match is None:
            raise _refuse(
                f"the DeRS layer {name!r} is not a decoder block's FFN ('model.layers.<i>.mlp'); standard MoE "
                "architectures only route whole FFN blocks"
            )
        if module.disable_adapters:
            raise _refuse(f"the adapter of {name!r} is disabled; enable it (or export the dense model instead)")
        adapter = module._single_active()
        if adapter is None:
            raise _refuse(f"{name!r} has no active DeRS adapter")
        layers[int(match.group(1))] = module
        adapters.add(adapter)
    if not layers:
        raise ValueError("export_moe() needs a model with DeRS layers (get_peft_model(model, DeRSConfig(...))).")
    if len(adapters) > 1:
        raise _refuse(f"different blocks use different active adapters {sorted(adapters)}; activate one")
    adapter = adapters.pop()
    return layers, adapter, next(iter(layers.values())).ders_settings[adapter]


def _check_layers(layers: dict[int, DeRSLayer], adapter: str) -> None:
    for idx, layer in layers.items():
        if layer.layout.name != "swiglu":
            raise _refuse(
                f"block {idx} has an FFN of layout {layer.layout.name!r}; the MoE targets use SwiGLU experts "
                "(gate_proj/up_proj/down_proj)"
            )
        if any(b is not None for b in layer.expert_biases(adapter).values()):
            raise _refuse(f"block {idx}'s FFN has biases (mlp_bias=True); the targets' experts have no biases")


def _check_attention(src, arch: str, source_type: str) -> None:
    spec = TARGETS[arch]
    if getattr(src, "attention_bias", False) and spec.attention_bias != "all":
        raise _refuse(
            f"{source_type} attention_bias=True puts a bias on o_proj, which {arch} attention does not have "
            f"(allowed: attention_bias=False)"
        )
    if getattr(src, "mlp_bias", False):
        raise _refuse("mlp_bias=True: the targets' experts have no biases (allowed: mlp_bias=False)")
    if getattr(src, "pretraining_tp", 1) not in (None, 1):
        raise _refuse(f"pretraining_tp={src.pretraining_tp} (allowed: 1)")
    if getattr(src, "attention_dropout", 0.0):
        raise _refuse(f"attention_dropout={src.attention_dropout} (allowed: 0.0)")


def _check_routing(arch: str, cfg: DeRSConfig, dense_blocks: list[int]) -> None:
    """Refuse DeRS options the target's MoE block cannot express."""
    spec, name = TARGETS[arch], TARGETS[arch].model_class
    if dense_blocks and not spec.dense_blocks:
        raise _refuse(
            f"blocks {dense_blocks} are not upcycled, but every {name} block is MoE (upcycle all blocks"
            + (", or use architecture='qwen2_moe', which keeps dense blocks)" if arch == "mixtral" else ")")
        )
    if cfg.shared_expert_gate and spec.shared != "gated":
        raise _refuse(
            f"shared_expert_gate=True: {name} has no gate on a shared expert (use architecture='qwen2_moe', whose "
            "shared_expert_gate it is)"
        )
    if cfg.shared_expert and spec.shared == "none":
        alt = {"mixtral": "qwen2_moe", "granitemoe": "granitemoeshared"}.get(arch)
        raise _refuse(
            f"shared_expert=True: {name} has no shared/universal expert"
            + (f" (use architecture={alt!r})" if alt else " (train with shared_expert=False)")
        )
    if not cfg.normalize_top_k and spec.renormalises == "always":
        raise _refuse(
            f"normalize_top_k=False: {name} always renormalises the top-k router weights (train with "
            "normalize_top_k=True"
            + (", or use architecture='qwen2_moe', which has norm_topk_prob)" if arch == "mixtral" else ")")
        )


def _common_config(src, cfg: DeRSConfig, inter: int, dtype: torch.dtype) -> dict:
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    out = {
        "vocab_size": src.vocab_size,
        "hidden_size": src.hidden_size,
        "intermediate_size": inter,
        "num_hidden_layers": src.num_hidden_layers,
        "num_attention_heads": src.num_attention_heads,
        "num_key_value_heads": src.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": src.hidden_act,
        "max_position_embeddings": src.max_position_embeddings,
        "initializer_range": src.initializer_range,
        "rms_norm_eps": src.rms_norm_eps,
        "tie_word_embeddings": bool(getattr(src, "tie_word_embeddings", False)),
        "rope_parameters": copy.deepcopy(src.rope_parameters),
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.top_k,
        "bos_token_id": src.bos_token_id,
        "eos_token_id": src.eos_token_id,
        "pad_token_id": src.pad_token_id,
        "use_cache": True,
        "dtype": dtype,
    }
    return out


def _layer_types(src, source_type: str) -> list[str]:
    """Per-block attention type of the source (``full_attention`` / ``sliding_attention``)."""
    if getattr(src, "layer_types", None) is not None:
        return list(src.layer_types)
    sliding = getattr(src, "sliding_window", None) if source_type == "mistral" else None
    return ["sliding_attention" if sliding else "full_attention"] * src.num_hidden_layers


def _target_config(src, arch: str, source_type: str, cfg: DeRSConfig, layers: dict[int, DeRSLayer], dtype):
    import transformers

    first = next(iter(layers.values()))
    inter = ffn.intermediate_size(first.base_layer, first.layout)
    kw = _common_config(src, cfg, inter, dtype)
    dense_blocks = sorted(set(range(src.num_hidden_layers)) - set(layers))
    _check_routing(arch, cfg, dense_blocks)
    types = _layer_types(src, source_type)
    sliding = getattr(src, "sliding_window", None)
    if arch == "mixtral":
        if len(set(types)) > 1:
            raise _refuse("the source mixes sliding and full attention blocks; Mixtral applies one window to all")
        kw.update(num_local_experts=cfg.num_experts, sliding_window=sliding if "sliding_attention" in types else None)
        return transformers.MixtralConfig(**kw)
    if arch == "qwen2_moe":
        kw.update(
            num_experts=cfg.num_experts,
            norm_topk_prob=cfg.normalize_top_k,
            moe_intermediate_size=inter,
            # without a universal FFN the (mandatory) shared expert is one zero unit: it adds exactly 0
            shared_expert_intermediate_size=inter if cfg.shared_expert else 1,
            decoder_sparse_step=1,
            mlp_only_layers=dense_blocks,
            qkv_bias=True,
            layer_types=types,
            use_sliding_window="sliding_attention" in types,
            sliding_window=sliding if "sliding_attention" in types else None,
            max_window_layers=getattr(src, "max_window_layers", src.num_hidden_layers),
        )
        return transformers.Qwen2MoeConfig(**kw)
    if arch == "qwen3_moe":
        if len(set(types)) > 1:
            raise _refuse(
                f"the source mixes attention types {sorted(set(types))}; Qwen3-MoE applies one sliding window to "
                "every block"
            )
        use_sw = types[0] == "sliding_attention"
        kw.update(
            num_experts=cfg.num_experts,
            norm_topk_prob=cfg.normalize_top_k,
            moe_intermediate_size=inter,
            decoder_sparse_step=1,
            mlp_only_layers=dense_blocks,
            attention_bias=bool(getattr(src, "attention_bias", False)),
            use_sliding_window=use_sw,
            sliding_window=sliding if use_sw else None,
        )
        return transformers.Qwen3MoeConfig(**kw)
    # granitemoe / granitemoeshared: same multipliers as Granite
    kw.update(
        num_local_experts=cfg.num_experts,
        attention_bias=bool(getattr(src, "attention_bias", False)),
        **{k: getattr(src, k) for k in _GRANITE_MULTIPLIERS},
    )
    if arch == "granitemoe":
        return transformers.GraniteMoeConfig(**kw)
    return transformers.GraniteMoeSharedConfig(**kw, shared_intermediate_size=inter if cfg.shared_expert else 0)


_GRANITE_MULTIPLIERS = ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier")


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


def plan_export(model: nn.Module, architecture: str | None = None) -> ExportPlan:
    """Check that ``model`` maps exactly onto ``architecture`` (or pick the default target) and build its config.

    Raises ``ValueError`` naming the reason when no exact mapping exists.
    """
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is invalid: allowed values are {ARCHITECTURES} or None.")
    root = _unwrap(model)
    src = getattr(root, "config", None)
    source_type = getattr(src, "model_type", None)
    if source_type in _REFUSED_SOURCES:
        raise _refuse(f"source model_type={source_type!r}: {_REFUSED_SOURCES[source_type]}")
    if source_type not in SOURCE_TARGETS:
        raise _refuse(
            f"source model_type={source_type!r} has no exact MoE target; supported: {sorted(SOURCE_TARGETS)}"
        )
    if not type(root).__name__.endswith("ForCausalLM"):
        raise _refuse(f"the model is a {type(root).__name__}; export needs a *ForCausalLM model")
    allowed = SOURCE_TARGETS[source_type]
    layers, adapter, cfg = _collect_layers(root)
    if architecture is None:
        architecture = _default_target(allowed, cfg, dense=len(layers) != src.num_hidden_layers)
    if architecture not in allowed:
        raise _refuse(
            f"a {source_type!r} model cannot become {architecture!r} exactly (attention/normalisation differ); "
            f"allowed targets for {source_type!r}: {allowed}"
        )
    _check_layers(layers, adapter)
    _check_attention(src, architecture, source_type)
    dtype = root.get_input_embeddings().weight.dtype
    target_config = _target_config(src, architecture, source_type, cfg, layers, dtype)
    return ExportPlan(architecture, source_type, adapter, cfg, dict(sorted(layers.items())), target_config, dtype)


# ---------------------------------------------------------------------------------------------------------- weights
def _plain_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Persistent tensors of ``module`` as a plain transformers model would name them, skipping DeRS layers and
    resolving peft ``modules_to_save`` wrappers to their active copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    if isinstance(module, DeRSLayer):
        return {}
    if isinstance(module, ModulesToSaveWrapper):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        chosen = module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
        return _plain_state(chosen, prefix)
    if isinstance(module, AuxiliaryTrainingWrapper | BaseTunerLayer):
        raise _refuse(f"{prefix.rstrip('.') or 'the model'} carries another PEFT module ({type(module).__name__})")
    out = {prefix + n: p for n, p in module.named_parameters(recurse=False)}
    skip = getattr(module, "_non_persistent_buffers_set", set())
    out.update({prefix + n: b for n, b in module.named_buffers(recurse=False) if n not in skip})
    for name, child in module.named_children():
        out.update(_plain_state(child, f"{prefix}{name}."))
    return out


def expert_tensors(layer: DeRSLayer, adapter: str, shared: str) -> dict[str, torch.Tensor]:
    """The fp32 tensors of one MoE block in transformers' in-memory layout.

    ``router`` (N, H); ``gate_up_proj`` (N, 2I, H) with the gate rows first; ``down_proj`` (N, H, I). With a universal
    FFN the DeRS layer averages the routed mixture and the universal expert (0.5 each), so the routed down projections
    carry 0.5, and the universal expert comes back as ``shared_gate_up_proj`` (2I, H) / ``shared_down_proj`` (H, I):
    behind a zero sigmoid gate (``shared="gated"``, sigmoid(0) = 0.5) unscaled, added with weight 1
    (``shared="ungated"``) with its down projection halved.
    """
    cfg = layer.ders_settings[adapter]
    n = cfg.num_experts
    with torch.no_grad():
        weights = {name: w.float() for name, w in layer.expert_weights(adapter).items()}
        gate, up, down = weights["gate_proj"], weights["up_proj"], weights["down_proj"]
        router = layer.ders_router[adapter].weight.detach().float().clone()
        out = {"router": router[:n]}
        if cfg.shared_expert_gate:  # the learned sigmoid gate of the universal FFN: Qwen2-MoE's shared_expert_gate
            out["shared_gate"] = router[n:]
        out["gate_up_proj"] = torch.cat([gate[:n], up[:n]], dim=1)
        routed_down = down[:n]
        if cfg.shared_expert:
            if shared == "none":
                raise _refuse("the target has no shared expert for the universal FFN")
            mix = 1.0 if cfg.shared_expert_gate else SHARED_EXPERT_MIX
            routed_down = routed_down * mix
            out["shared_gate_up_proj"] = torch.cat([gate[n], up[n]], dim=0)
            out["shared_down_proj"] = down[n] * (mix if shared == "ungated" else 1.0)
        out["down_proj"] = routed_down.contiguous()
    return out


def _moe_block_state(plan: ExportPlan, idx: int) -> dict[str, torch.Tensor]:
    spec = TARGETS[plan.architecture]
    t = expert_tensors(plan.layers[idx], plan.adapter, spec.shared)
    prefix = f"model.layers.{idx}.{spec.block}."
    out = {
        prefix + spec.router: t["router"],
        f"{prefix}experts.gate_up_proj": t["gate_up_proj"],
        f"{prefix}experts.down_proj": t["down_proj"],
    }
    hidden = t["router"].shape[1]
    if (
        spec.shared == "gated"
    ):  # Qwen2-MoE: the shared expert always exists; without a universal FFN it is one zero unit
        out[f"{prefix}shared_expert_gate.weight"] = t.get("shared_gate", torch.zeros(1, hidden))  # sigmoid(0) = 0.5
        if plan.settings.shared_expert:
            inter = t["shared_down_proj"].shape[1]
            gate_w, up_w = t["shared_gate_up_proj"].split(inter)
            out[f"{prefix}shared_expert.gate_proj.weight"] = gate_w
            out[f"{prefix}shared_expert.up_proj.weight"] = up_w
            out[f"{prefix}shared_expert.down_proj.weight"] = t["shared_down_proj"]
        else:
            out[f"{prefix}shared_expert.gate_proj.weight"] = torch.zeros(1, hidden)
            out[f"{prefix}shared_expert.up_proj.weight"] = torch.zeros(1, hidden)
            out[f"{prefix}shared_expert.down_proj.weight"] = torch.zeros(hidden, 1)
    elif spec.shared == "ungated" and plan.settings.shared_expert:  # GraniteMoeShared: a sibling of the MoE block
        out[f"model.layers.{idx}.shared_mlp.input_linear.weight"] = t["shared_gate_up_proj"]
        out[f"model.layers.{idx}.shared_mlp.output_linear.weight"] = t["shared_down_proj"]
    return out


def _with_layers_unmerged(layers: dict[int, DeRSLayer]):
    """Context manager: temporarily unmerge merged layers (a dense merge overwrites the frozen base weights)."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        merged = {i: list(layer.merged_adapters) for i, layer in layers.items() if layer.merged}
        for i in merged:
            layers[i].unmerge()
        try:
            yield
        finally:
            for i, names in merged.items():
                layers[i].merge(adapter_names=names)

    return ctx()


def convert_to_moe(model: nn.Module, architecture: str | None = None) -> nn.Module:
    """Build the standard transformers MoE model equivalent to the DeRS ``model`` (in memory, eval mode).

    ``model`` is a ``PeftModel``/``DeRSModel`` or a transformers model carrying DeRS layers; it is not modified.
    The result needs no ``ders_peft`` to run or to load after ``save_pretrained``.
    """
    return _convert(model, plan_export(model, architecture))


def _convert(model: nn.Module, plan: ExportPlan) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    root = _unwrap(model)
    state = {k: v.detach() for k, v in _plain_state(root).items()}
    with _with_layers_unmerged(plan.layers):
        for idx in plan.layers:
            state.update(_moe_block_state(plan, idx))

    cls = getattr(transformers, TARGETS[plan.architecture].model_class)
    with init_empty_weights(include_buffers=False):
        target = cls(plan.target_config)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    for key in missing:
        if re.search(r"self_attn\.[qkv]_proj\.bias$", key) and plan.architecture == "qwen2_moe":
            state[key] = torch.zeros(expected[key].shape)  # Llama/Mistral have no q/k/v biases: zero is exact
        else:
            raise _refuse(f"the target's {key!r} has no source tensor")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise _refuse(f"source tensors {unexpected[:5]} have no place in {plan.architecture}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise _refuse(f"{key!r} has shape {tuple(state[key].shape)}, the target expects {tuple(ref.shape)}")
    state = {k: v.to(plan.dtype).clone().contiguous() for k, v in state.items()}
    target.load_state_dict(state, strict=True, assign=True)
    if plan.target_config.tie_word_embeddings:
        target.tie_weights()
    gen_cfg = getattr(root, "generation_config", None)
    if gen_cfg is not None:
        target.generation_config = copy.deepcopy(gen_cfg)
    target.config.ders_export = {"source_model_type": plan.source_type, "num_experts": plan.settings.num_experts}
    return target.eval()


# ---------------------------------------------------------------------------------------------------------- writing
def model_card(plan: ExportPlan, base_model: str | None, max_abs_logit_diff: float | None = None) -> str:
    """README.md for an exported checkpoint: base model, method and DeRS settings."""
    cfg = plan.settings
    upcycled = list(plan.layers)
    lines = ["---", "library_name: transformers"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["tags:", "- mixture-of-experts", "- ders", "- upcycling", f"- {plan.architecture}", "---", ""]
    lines += [
        f"# {plan.architecture} export of a DeRS-upcycled model",
        "",
        "Mixture-of-Experts model upcycled from a dense model with DeRS (arXiv 2503.01359) using `ders_peft`, then "
        f"exported as a standard `{TARGETS[plan.architecture].model_class}`: each expert's weights"
        " are the synthesised `W_base + Delta_i`, the router and every non-FFN weight are carried over. "
        "Loading it needs only `transformers` (no `ders_peft`).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {base_model or 'unknown'} |",
        f"| source architecture | {plan.source_type} |",
        "| method | DeRS (shared base + per-expert deltas) |",
        f"| delta type | {cfg.delta_type} |",
        f"| num_experts (N) | {cfg.num_experts} |",
        f"| top_k | {cfg.top_k} |",
        f"| renormalised top-k weights | {cfg.normalize_top_k} |",
        f"| universal (shared) FFN | {cfg.shared_expert} |",
        f"| upcycled blocks | {upcycled} |",
        f"| dense blocks | {sorted(set(range(plan.target_config.num_hidden_layers)) - set(upcycled))} |",
    ]
    if cfg.delta_type == "lowrank":
        lines.append(f"| rank | {cfg.rank} |")
    if cfg.delta_type == "sparse":
        lines.append(f"| sparse_rate | {cfg.sparse_rate} |")
    lines.append(f"| dtype | {str(plan.dtype).replace('torch.', '')} |")
    if max_abs_logit_diff is not None:
        lines.append(f"| max abs logit difference vs the DeRS model (check at export) | {max_abs_logit_diff:.2e} |")
    notes = []
    if TARGETS[plan.architecture].dense_blocks:
        notes.append("Blocks that were not upcycled are dense `mlp_only_layers`.")
    if plan.architecture == "qwen2_moe" and cfg.shared_expert_gate:
        notes.append("The universal FFN is the shared expert behind its learned `shared_expert_gate`.")
    elif plan.architecture == "qwen2_moe":
        notes.append(
            "The universal FFN is the shared expert behind a zero `shared_expert_gate` (sigmoid(0) = 0.5); the routed "
            "experts' down projections carry the other 0.5."
            if cfg.shared_expert
            else "There was no universal FFN: the shared expert is a single zero unit and adds exactly 0."
        )
    if plan.architecture == "granitemoeshared" and cfg.shared_expert:
        notes.append(
            "The universal FFN is the shared MLP; its down projection and the routed experts' carry the 0.5 weights "
            "with which DeRS averages the two."
        )
    if notes:
        lines += ["", "Mapping notes: " + " ".join(notes)]
    return "\n".join(lines) + "\n"


_NOTHING = "Nothing was written."


def _verify(model: nn.Module, target: nn.Module, plan: ExportPlan) -> float:
    """Max |logit difference| between the DeRS model and the export on a few random tokens; ``ExportCheckError`` if an
    exported tensor or a logit is not finite, or (fp32) the difference exceeds ``VERIFY_TOLERANCE``."""
    for name, tensor in target.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportCheckError(f"export check failed: the exported tensor {name!r} holds NaN or inf. {_NOTHING}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, plan.target_config.vocab_size, (2, 8), generator=gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids).logits.float()
            got = target(input_ids=ids).logits.float()
    finally:
        model.train(was_training)
    diff = float((want - got).abs().max())
    if not math.isfinite(diff):  # NaN compares False with any tolerance: non-finite is a failure in every dtype
        raise ExportCheckError(f"export check failed: the logits are not finite (max difference {diff}). {_NOTHING}")
    if plan.dtype == torch.float32 and diff > VERIFY_TOLERANCE:
        raise ExportCheckError(f"export check failed: logits differ by {diff:.3e} from the DeRS model. {_NOTHING}")
    return diff


def export_moe(
    model: nn.Module,
    out_dir: str | os.PathLike,
    architecture: str | None = None,
    *,
    tokenizer=None,
    base_model: str | None = None,
    verify: bool = True,
) -> Path:
    """Write the DeRS ``model`` as a standard transformers MoE checkpoint (safetensors) plus a model card.

    ``architecture``: one of ``ARCHITECTURES`` or ``None`` to pick the first exact target for the source. The
    destination is checked first (:func:`check_export_dir`), refused configurations raise ``ValueError`` before
    anything is written, and the checkpoint is written with :func:`ders_peft.atomic.write_dir` (a temporary sibling
    swapped into place, with a manifest of its files), so a failed or interrupted export never leaves a half-written
    or lost checkpoint. With ``verify`` every exported tensor must be finite and the export's logits must match the
    DeRS model's on random tokens (within ``VERIFY_TOLERANCE`` for fp32 models; finite for every dtype). Returns the
    output path.
    """
    out, _ = check_export_dir(out_dir)
    try:
        plan = plan_export(model, architecture)
        target = _convert(model, plan)
    except ValueError as err:
        raise ValueError(f"{err} Nothing was written to {str(out)!r}.") from err
    diff = _verify(model, target, plan) if verify else None
    if base_model is None:
        root = _unwrap(model)
        base_model = getattr(root.config, "_name_or_path", None) or getattr(root, "name_or_path", None) or None

    def fill(tmp: Path) -> None:
        target.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(plan, base_model, diff), encoding="utf-8")

    # the entries to keep are listed again just before the swap: files added during the export are kept too
    return atomic.write_dir(out, fill, owner=EXPORT_OWNER, keep=lambda: check_export_dir(out)[1])


class ExportCheckError(RuntimeError):
    """``export_moe(verify=True)`` found non-finite weights or logits, or logits that differ from the DeRS model's."""


VERIFY_TOLERANCE = 1e-4
"""Largest max |logit difference| ``export_moe(verify=True)`` accepts for an fp32 model (the mappings are exact up to
float rounding: the tests see <= 1e-6 on tiny models; rounding grows with depth and width)."""

EXPORT_OWNER = "ders_peft.export_moe"
# what exports made before the manifest wrote (exact names): such a directory is recognised by ``ders_export`` in
# its config.json, and only these entries of it are replaced
_LEGACY_FILES = re.compile(
    r"config\.json|generation_config\.json|README\.md|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index"
    r"\.json|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.json|vocab\.txt|merges\.txt|chat_template\.(jinja|json)"
)


def _legacy_export(out: Path) -> set[str] | None:
    try:
        previous = "ders_export" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        previous = False
    return {p.name for p in out.iterdir() if _LEGACY_FILES.fullmatch(p.name)} if previous else None


def check_export_dir(out_dir: str | os.PathLike, what: str = "out_dir") -> tuple[Path, list[str]]:
    """Check an export destination before any work; returns it and the entries of it to carry over.

    ``out_dir`` may be missing, empty, or a previous ``export_moe`` output: then exactly the files its manifest lists
    are replaced and every other file (the user's notes, a tokenizer model of their own) is kept. Anything else (the
    dense base model's folder, an adapter) is refused with a ``ValueError``, as are destinations that cannot be
    swapped into place (:func:`ders_peft.atomic.check_destination`)."""
    out = atomic.check_destination(out_dir, what)
    for action in atomic.recover(out):
        warnings.warn(action, stacklevel=3)
    if not out.exists() or not any(out.iterdir()):
        return out, []
    owned = atomic.owned_entries(out, EXPORT_OWNER, _legacy_export)
    if owned is None:
        raise ValueError(
            f"{what}={str(out)!r} is invalid: it is not empty and holds no previous ders_peft export (no "
            f"{atomic.MANIFEST}); only an empty directory or a previous export_moe output is replaced. Choose a new "
            "or empty directory. Nothing was written."
        )
    return out, sorted(p.name for p in out.iterdir() if p.name not in owned)
