"""Saving and loading D2-MoE models through transformers' own quantization hooks.

A D2-MoE model is the MoE's own transformers class with compressed ``experts`` modules. Its config carries a
``quantization_config`` with ``quant_method="ders_d2moe"`` (per layer: delta ranks, kept base channels, dynamic
pruning). ``import ders_peft`` registers that method with transformers (``register_quantization_config`` /
``register_quantizer``), so ``AutoModelForCausalLM.from_pretrained(dir)`` builds the model, swaps each listed
block's ``experts`` for an empty :class:`~.d2_experts.D2Experts` of the recorded shapes before the weights load,
and loads them.

transformers skips an unknown quantization method with a warning (it would load random experts), so the saved config
also names its own ``model_type`` (``ders_d2moe_<model_type>``, a subclass of the MoE's config registered with
``AutoConfig``/``AutoModelForCausalLM`` at ``import ders_peft``): without ``import ders_peft`` loading stops with
transformers' "does not recognize this architecture" error naming that type, never a silently wrong model.
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .d2_experts import D2Experts, D2SharedExpert

QUANT_METHOD = "ders_d2moe"


class D2MoEQuantizationConfig(QuantizationConfigMixin):
    """What a D2-MoE checkpoint needs to rebuild its compressed experts: ``layers`` maps a decoder-layer index (as a
    string) to ``{"ranks": {proj: [r_e]}, "kept_channels": int, "dynamic_prune": int, "share_v": bool}``;
    ``settings`` records how it was compressed (informational); ``starved_experts`` the experts that got too few
    calibration tokens."""

    def __init__(self, layers: dict | None = None, settings: dict | None = None, starved_experts=None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        self.settings = settings or {}
        self.starved_experts = starved_experts or {}

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "layers": self.layers,
            "settings": self.settings,
            "starved_experts": self.starved_experts,
        }


def _decoder_layers(model):
    from .moe_blocks import _decoder_layers

    return _decoder_layers(model)


def _shared_attr(model) -> str:
    from .moe_blocks import _ARCHS

    source = model.config.model_type.removeprefix(MODEL_TYPE_PREFIX)
    attr = _ARCHS.get(source, (None, None, None))[2]
    if attr is None:
        raise ValueError(f"quantization_config (ders_d2moe) lists a shared expert, but {source!r} blocks have none")
    return attr


class D2MoEQuantizer(HfQuantizer):
    """Rebuilds the compressed experts before the checkpoint's weights are loaded."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        layers = _decoder_layers(model)
        for key, spec in self.quantization_config.layers.items():
            idx = int(key)
            if idx >= len(layers) or not hasattr(getattr(layers[idx], "mlp", None), "experts"):
                raise ValueError(
                    f"quantization_config (ders_d2moe) lists layer {idx}, which is not a MoE block of this "
                    f"{type(model).__name__} ({len(layers)} layers); the checkpoint's config.json was edited?"
                )
            block = layers[idx].mlp
            old = block.experts
            gate_up = old.gate_up_proj
            block.experts = D2Experts(
                gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2, spec["ranks"], old.act_fn,
                kept_channels=spec["kept_channels"], dynamic_prune=spec["dynamic_prune"],
                share_v=spec.get("share_v", False), dtype=gate_up.dtype, device=gate_up.device,
            )  # fmt: skip
            if "shared" in spec:
                attr = _shared_attr(model)
                shared = D2SharedExpert(
                    block.experts, spec["shared"]["ranks"], getattr(block, attr).act_fn, dtype=gate_up.dtype,
                    device=gate_up.device,
                )  # fmt: skip
                setattr(block, attr, shared)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


MODEL_TYPE_PREFIX = "ders_d2moe_"


def model_card(model) -> str:
    """README.md of a saved D2-MoE model: how it was made, what it stores, how to load it."""
    from .d2moe import stored_expert_params

    q = model.config.quantization_config
    counts = stored_expert_params(model)
    removed = 1 - counts["compressed"] / max(1, counts["original"])
    source = getattr(type(model), "_d2moe_source", type(model)).__name__
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(q.settings.items()))
    return (
        "---\nlibrary_name: transformers\ntags:\n- mixture-of-experts\n- ders\n- d2-moe\n- compression\n---\n\n"
        f"# D2-MoE-compressed {source}\n\n"
        "Made with `ders_peft` (D2-MoE: a base merged from each block's experts plus low-rank per-expert deltas; "
        "the MoE's own routers, shared experts and other weights are unchanged).\n\n"
        "## Loading\n\n```python\nimport ders_peft  # registers the ders_d2moe model types with transformers\n"
        "from transformers import AutoModelForCausalLM\n\n"
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")\n```\n\n'
        "Without `import ders_peft` transformers stops with an unknown model type. "
        "`ders_peft.decompress(model)` gives back a standard "
        f"`{source}` (experts synthesised) for engines that know only standard checkpoints.\n\n"
        f"## Compression\n\n| setting | value |\n|---|---|\n{rows}\n"
        f"| routed-expert parameters stored | {counts['compressed']:,} of {counts['original']:,} "
        f"({removed:.1%} removed) |\n"
    )


class _SavesCard:
    """Mixin of the D2-MoE model classes: ``save_pretrained`` also writes the model card."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        import os

        from ..atomic import atomic_write_text

        if kwargs.get("save_original_format"):
            raise ValueError(
                "save_original_format=True is invalid for a D2-MoE model: its compressed experts have no legacy "
                "checkpoint names (use ders_peft.decompress(model) for a standard checkpoint)."
            )
        # transformers would rename the tensors of a model loaded from a legacy checkpoint back to the legacy names
        # (e.g. Mixtral's block_sparse_moe), which the ders_d2moe model type does not map back on load
        kwargs["save_original_format"] = False
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            atomic_write_text(os.path.join(save_directory, "README.md"), model_card(self))
        return out
_CLASSES: dict[str, tuple[type, type]] = {}  # source model_type -> (config subclass, model subclass)


def _classes(model_type: str) -> tuple[type, type]:
    """The registered config / causal-LM subclasses for a D2-MoE model of ``model_type`` (built once)."""
    if model_type not in _CLASSES:
        from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        base_config = CONFIG_MAPPING[model_type]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
        name = MODEL_TYPE_PREFIX + model_type
        config_cls = type(f"DeRSD2{base_config.__name__}", (base_config,), {"model_type": name})
        model_cls = type(f"DeRSD2{base_model.__name__}", (_SavesCard, base_model), {"config_class": config_cls})
        model_cls._d2moe_source = base_model
        AutoConfig.register(name, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        _CLASSES[model_type] = (config_cls, model_cls)
    return _CLASSES[model_type]


def mark_compressed(model) -> None:
    """Give a freshly compressed model its D2-MoE config and model classes (same state, own ``model_type``)."""
    source_type = model.config.model_type
    config_cls, model_cls = _classes(source_type)
    model.config.__class__ = config_cls
    model.__class__ = model_cls
    model.config.architectures = [model_cls.__name__]


def source_class(model) -> type:
    """The plain transformers class a D2-MoE model was made from."""
    return getattr(type(model), "_d2moe_source", type(model))


def register() -> None:
    """Register ``ders_d2moe`` (quantization method and model types) with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from .moe_blocks import SUPPORTED_MODEL_TYPES

    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = D2MoEQuantizationConfig
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = D2MoEQuantizer
    for model_type in SUPPORTED_MODEL_TYPES:
        _classes(model_type)


__all__ = ["QUANT_METHOD", "D2MoEQuantizationConfig", "D2MoEQuantizer", "register"]
