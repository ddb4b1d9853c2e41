"""`DeRSModel`: the peft tuner that swaps FFN blocks for :class:`~ders_peft.layer.DeRSLayer`."""

from __future__ import annotations

import inspect
import json
import re

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn

from . import ffn
from .config import DeRSConfig, count_blocks
from .ffn import DEFAULT_TARGET_MODULES
from .integrations.deepspeed import gathered
from .layer import DeRSLayer, RouterRuntime, not_an_ffn_block
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
        self._model_config = model_config
        if peft_config.source_architecture is not None:
            _check_source(peft_config, _partial_record(model_config))
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

    def _prepare_model(self, peft_config: DeRSConfig, model: nn.Module) -> None:
        """Every check that needs the model, before any layer is built."""
        targets = _check_targets(self, peft_config, model)
        _check_modules_to_save(peft_config, model)
        record = _source_record(self._model_config, targets)
        if peft_config.source_architecture is not None:
            _check_source(peft_config, record)
        self._pending_record = record

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.source_architecture is None:  # a new adapter: record what it is made on (saved with it)
            config.source_architecture = self._pending_record

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if isinstance(target, DeRSLayer):
            with gathered(target.base_layer):
                target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"{current_key!r} already carries another PEFT method's adapter; DeRS targets plain FFN blocks."
            )
        with gathered(target):  # ZeRO-3: the block's full weights while the layer copies them
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
        """peft's key remapping, then a ``ValueError`` if the DeRS tensors do not fit the model's DeRS layers.
        Quantized deltas' scales saved by earlier versions as ``...scales`` load as ``...scale_factors.weight``."""
        state_dict = {
            (k[: -len("scales")] + "scale_factors.weight" if ".ders_delta." in k and k.endswith(".scales") else k): v
            for k, v in state_dict.items()
        }
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


# ---------------------------------------------------------------------------------------------------------- targeting
def _check_targets(tuner: DeRSModel, config: DeRSConfig, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` targets, each a plain FFN block (or an existing DeRS layer), else ``ValueError``."""
    names = dict(model.named_modules())
    inside_tuner = [key + "." for key, m in names.items() if isinstance(m, BaseTunerLayer)]
    targets = []
    for key, module in names.items():
        if not key or any(key.startswith(p) for p in inside_tuner):
            continue
        found = tuner._check_target_module_exists(config, key)
        if found and not isinstance(found, _ExcludedModule):
            targets.append((key, module))
    if not targets:
        raise ValueError(_no_target_message(config, names))
    keys = [k for k, _ in targets]
    nested = next(((outer, k) for outer in keys for k in keys if k.startswith(outer + ".")), None)
    if nested:
        raise ValueError(
            f"DeRSConfig.target_modules={_show(config.target_modules)} is invalid: it matches both the block "
            f"{nested[0]!r} and {nested[1]!r} inside it. DeRS upcycles whole FFN blocks (not projections as LoRA "
            "does): list only the blocks, e.g. target_modules=['mlp']."
        )
    for key, module in targets:
        if isinstance(module, DeRSLayer):
            continue
        if isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"{key!r} already carries another PEFT method's adapter ({type(module).__name__}); DeRS targets plain "
                "FFN blocks: merge that adapter first (merge_and_unload()) or target other modules."
            )
        inner = next(((n, m) for n, m in module.named_modules() if n and isinstance(m, BaseTunerLayer)), None)
        if inner:
            kind = f"{type(inner[1]).__module__}.{type(inner[1]).__name__}"
            raise ValueError(
                f"DeRSConfig.target_modules matched {key!r}, whose {inner[0]!r} already carries another PEFT method's "
                f"adapter ({kind}); DeRS needs the block's plain projections: merge that adapter into the model first "
                "(merge_and_unload()), then upcycle."
            )
        with gathered(module):  # ZeRO-3: shapes and the probe need the full weights
            layout, reason = ffn.inspect_block(module)
            reason = reason or ffn.probe_block(module, layout)
        if reason:
            raise ValueError(not_an_ffn_block(key, module, reason))
    return targets


def _show(value) -> object:
    return sorted(value) if isinstance(value, set) else value


def _no_target_message(config: DeRSConfig, names: dict[str, nn.Module]) -> str:
    if config.layers_to_transform is not None and config.layers_pattern is not None:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else list(config.layers_pattern)
        lists = sorted({m.group(1) for k in names if (m := re.match(r"(.*?)\.\d+(?:\.|$)", k))})
        if not any(re.search(rf"(^|\.){re.escape(p)}$", lst) for p in patterns for lst in lists):
            hint = ", ".join(repr(lst.rpartition(".")[2]) for lst in lists[:3]) or "none"
            return (
                f"DeRSConfig.layers_pattern={config.layers_pattern!r} is invalid: no module list of that name holds "
                f"numbered blocks in this model; its block lists are {lists[:3]} (layers_pattern {hint}, or None to "
                "let peft find them)."
            )
    blocks = sorted({k.rpartition(".")[2] for k, m in names.items() if k and ffn.detect_layout(m) is not None})
    selection = f" with layers_to_transform={config.layers_to_transform!r}" if config.layers_to_transform else ""
    return (
        f"DeRSConfig.target_modules={_show(config.target_modules)} is invalid: it matches no module of this model"
        f"{selection}. Its FFN blocks are named {blocks[:5] or 'nothing DeRS supports'} "
        f"(supported layouts: {ffn.describe_layouts()})."
    )


# names peft adds to modules_to_save by itself for classification / QA task types (one of them exists)
_PEFT_TASK_MODULES = {"classifier", "score", "qa_outputs"}


def _check_modules_to_save(config: DeRSConfig, model: nn.Module) -> None:
    """Every ``modules_to_save`` name must match a module (peft itself skips unknown names silently)."""
    keys = [k for k, _ in model.named_modules(remove_duplicate=False)]
    for name in config.modules_to_save or ():
        if name not in _PEFT_TASK_MODULES and not any(k.endswith(name) for k in keys):
            top = sorted({k for k in keys if k and k.count(".") <= 1 and not re.search(r"\.\d+", k)})
            raise ValueError(
                f"DeRSConfig.modules_to_save={list(config.modules_to_save)!r} is invalid: {name!r} names no module of "
                f"this model (a module is matched by the end of its name, e.g. 'lm_head'); its top-level modules are "
                f"{top[:8]}."
            )


# ---------------------------------------------------------------------------------------------------------- the record
def _partial_record(model_config: dict) -> dict:
    return {"model_type": model_config.get("model_type"), "num_blocks": count_blocks(model_config)}


def _source_record(model_config: dict, targets: list[tuple[str, nn.Module]]) -> dict:
    """What ``DeRSConfig.source_architecture`` records: model_type, block count, upcycled modules, FFN shapes."""
    shapes = {}
    for key, module in targets:
        block = module.base_layer if isinstance(module, DeRSLayer) else module
        with gathered(block):
            layout = ffn.detect_layout(block)
            shapes[key] = {p: list(ffn.proj_shape(getattr(block, p))) for p in layout.projs}
    uniform = len({json.dumps(v, sort_keys=True) for v in shapes.values()}) == 1
    return {
        **_partial_record(model_config),
        "modules": list(shapes),
        "ffn_shapes": next(iter(shapes.values())) if uniform else shapes,
    }


def _check_source(config: DeRSConfig, record: dict) -> None:
    """``ValueError`` naming both sides if ``record`` (this model) differs from what the adapter was made on."""
    src = config.source_architecture
    wrong = [k for k in record if k != "model_type" and src.get(k) != record[k]]
    other_type = src.get("model_type") != record["model_type"] and not config.allow_other_model_type
    if not wrong and not other_type:
        return
    sides = []
    for key in (["model_type"] if other_type else []) + wrong:
        mine, theirs = src.get(key), record[key]
        if key == "modules":
            only_adapter = [m for m in mine if m not in theirs][:4]
            only_here = [m for m in theirs if m not in mine][:4]
            sides.append(
                f"upcycled modules: {len(mine)} in the adapter, {len(theirs)} selected here (only in the adapter: "
                f"{only_adapter}, only here: {only_here}; were target_modules or layers_to_transform edited?)"
            )
        else:
            sides.append(f"{key}: adapter {mine!r}, this model {theirs!r}")
    fix = (
        "If the two architectures compute the same blocks, set DeRSConfig.allow_other_model_type=True (in "
        "adapter_config.json or on the config passed to PeftModel.from_pretrained)."
        if not wrong
        else "Load it on the model it was made on, with the adapter_config.json it was saved with (block counts, FFN "
        "shapes and the block selection cannot be overridden)."
    )
    raise ValueError(
        "This DeRS adapter was made on another model (DeRSConfig.source_architecture, saved in adapter_config.json): "
        + "; ".join(sides)
        + f". {fix} (A DeRSConfig records the first model it is injected into: use a new one per model.)"
    )
