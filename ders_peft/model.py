"""`DeRSModel`: the peft tuner that swaps FFN blocks for :class:`~ders_peft.layer.DeRSLayer`."""

from __future__ import annotations

import inspect
import re

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import DeRSConfig
from .ffn import DEFAULT_TARGET_MODULES
from .layer import DeRSLayer, RouterRuntime
from .registration import PREFIX, check_adapter_checkpoint

_ADAPTER_CONTAINERS = DeRSLayer.adapter_layer_names
_UPCAST_CONTAINERS = ("ders_router", "ders_delta", "ders_bias")


class _AttentionMaskCapture:
    """Forward pre-hook on the wrapped transformers model: keeps each call's 2-D attention mask in the runtime, so the
    router losses exclude padding tokens."""

    def __init__(self, runtime: RouterRuntime) -> None:
        self.runtime = runtime
        self._positions: dict[type, int | None] = {}

    def _position(self, module: nn.Module) -> int | None:
        cls = type(module)
        if cls not in self._positions:
            params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
            self._positions[cls] = params.index("attention_mask") if "attention_mask" in params else None
        return self._positions[cls]

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            pos = self._position(module)
            mask = args[pos] if pos is not None and pos < len(args) else None
        self.runtime.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class DeRSModel(BaseTuner):
    """Creates a DeRS-upcycled Mixture-of-Experts model from a dense transformers model.

    Use through peft: ``get_peft_model(model, DeRSConfig(...))``. Router losses are injected into the backward pass
    at every DeRS layer (so they reach the optimizer under any trainer) and scaled by ``runtime.aux_grad_scale``.
    """

    prefix: str = PREFIX
    tuner_layer_cls = DeRSLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self.runtime = RouterRuntime()
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        # A PeftModel without task_type (what SFTTrainer builds from a bare DeRSConfig) calls the transformers model
        # directly, bypassing DeRSModel.forward: capture the attention mask with a hook on that model instead.
        self._mask_hook = self.model.register_forward_pre_hook(_AttentionMaskCapture(self.runtime), with_kwargs=True)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        # the returned model must be plain: drop the attention-mask hook once no DeRS layer is left
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if not any(isinstance(m, DeRSLayer) for m in self.model.modules()):
            self._mask_hook.remove()
        return model

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: DeRSConfig, model_config: dict) -> DeRSConfig:
        peft_config.validate()  # again: fields may have been edited since the config was created
        peft_config.check_model(model_config)
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"DeRSConfig.target_modules=None needs a known architecture, but model_type={model_type!r} has no "
                    f"default. Pass target_modules (the FFN block names, e.g. ['mlp']); architectures with defaults: "
                    f"{sorted(self.target_module_mapping)}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, DeRSLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key!r} already carries another PEFT method's adapter; DeRS targets plain FFN blocks."
            )
        new_module = DeRSLayer(target, adapter_name, peft_config, self.runtime, key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Upcast router, deltas and biases of half-precision models to fp32 (as peft does for LoRA), but keep the
        trainable base copy in the model's dtype: it is as large as the dense FFN."""
        if not autocast_adapter_dtype:
            return
        for module in self.model.modules():
            if not isinstance(module, DeRSLayer):
                continue
            for container in _UPCAST_CONTAINERS:
                holder = getattr(module, container)
                if adapter_name not in holder:
                    continue
                for owner in holder[adapter_name].modules():
                    for name, param in list(owner.named_parameters(recurse=False)):
                        if param.dtype in (torch.float16, torch.bfloat16):
                            setattr(owner, name, nn.Parameter(param.data.float(), requires_grad=param.requires_grad))

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...mlp.ders_delta.<adapter>.down_proj.lora_b.weight`` -> ``...mlp.ders_delta.down_proj.lora_b.weight``."""
        pattern = r"\.(" + "|".join(_ADAPTER_CONTAINERS) + r")\." + re.escape(adapter_name) + r"(\.|$)"
        return re.sub(pattern, r".\1\2", key)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's key remapping, then a ``ValueError`` if the DeRS tensors do not fit the model's DeRS layers."""
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        check_adapter_checkpoint(model, remapped, adapter_name, config)
        return remapped

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        self.runtime.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return self.model.forward(*args, **kwargs)

    def set_router_loss_scale(self, scale: float) -> None:
        """Scale of the router losses' gradient (``1 / gradient_accumulation_steps``; set by the Trainer callback)."""
        self.runtime.aux_grad_scale = float(scale)

    def pop_router_stats(self) -> dict[str, float]:
        """Mean router losses recorded since the last call (for logging)."""
        return self.runtime.pop_means()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        """num_experts=1: the dense model with the synthesised weights folded in. A routed MoE: the equivalent standard
        transformers MoE model (Mixtral / Qwen2-MoE / Qwen3-MoE, see :func:`ders_peft.export.convert_to_moe`), or a
        ``ValueError`` naming why no exact target exists."""
        layers = list(self.ders_layers().values())
        active = {layer._single_active() for layer in layers} - {None}
        if any(not layer._is_dense_mergeable(a) for layer in layers for a in active if a in layer.ders_settings):
            from .export import convert_to_moe

            if adapter_names is not None and set(adapter_names) != active:
                raise ValueError(
                    f"adapter_names={adapter_names!r} is invalid: a routed MoE exports its active adapter "
                    f"{sorted(active)}."
                )
            moe = convert_to_moe(self)
            if safe_merge and not all(torch.isfinite(p).all() for p in moe.parameters()):
                raise ValueError("NaNs detected in the exported MoE weights; not merging.")
            return moe
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def ders_layers(self) -> dict[str, DeRSLayer]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, DeRSLayer)}
