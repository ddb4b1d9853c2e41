"""Planning an export: check that a DeRS model maps exactly onto a target and build the target's config.

Nothing here builds weights; a refusal is a ``ValueError`` naming the reason, raised before anything is written.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from .. import ffn
from ..config import DeRSConfig
from ..layer import DeRSLayer
from .targets import _REFUSED_SOURCES, ARCHITECTURES, SOURCE_TARGETS, TARGETS, _default_target, _refuse

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
    """The transformers model inside a ``PeftModel`` / ``DeRSModel`` (or ``model`` itself).

    Checked against peft's ``BaseTuner`` (which ``DeRSModel`` subclasses), so this package never imports
    ``ders_peft.model`` (which imports the export lazily for ``DeRSModel.export``)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


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
