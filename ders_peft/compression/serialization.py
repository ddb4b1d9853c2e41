"""Saving and loading D2-MoE models through transformers' own quantization hooks.

A D2-MoE model is the MoE's own transformers class with compressed ``experts`` modules. Its config carries a
``quantization_config`` with ``quant_method="ders_d2moe"`` (per layer: delta ranks, kept base channels, dynamic
pruning). ``import ders_peft`` registers that method with transformers (``register_quantization_config`` /
``register_quantizer``), so ``AutoModelForCausalLM.from_pretrained(dir)`` builds the model, swaps each listed
block's ``experts`` for an empty :class:`~.d2_experts.D2Experts` of the recorded shapes before the weights load,
and loads them. Without ``import ders_peft`` transformers stops with an unknown quantization method.
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .d2_experts import D2Experts

QUANT_METHOD = "ders_d2moe"


class D2MoEQuantizationConfig(QuantizationConfigMixin):
    """What a D2-MoE checkpoint needs to rebuild its compressed experts: ``layers`` maps a decoder-layer index (as a
    string) to ``{"ranks": {proj: r}, "kept_channels": int, "dynamic_prune": int}``; ``settings`` records how it was
    compressed (informational); ``starved_experts`` the experts that got too few calibration tokens."""

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
                kept_channels=spec["kept_channels"], dynamic_prune=spec["dynamic_prune"], dtype=gate_up.dtype,
                device=gate_up.device,
            )  # fmt: skip
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register ``ders_d2moe`` with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = D2MoEQuantizationConfig
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = D2MoEQuantizer


__all__ = ["QUANT_METHOD", "D2MoEQuantizationConfig", "D2MoEQuantizer", "register"]
