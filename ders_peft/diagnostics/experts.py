"""The experts of every MoE layer of a model, as the diagnostics read them: one :class:`ExpertSet` per layer.

Two sources: DeRS layers (experts synthesised by the layer itself, :meth:`~ders_peft.layer.DeRSLayer.expert_weights`,
base = the shared ``W_base``, deltas from each kind's ``materialize``) and the MoE blocks of a plain transformers model
(:func:`ders_peft.compression.moe_blocks.find_moe_blocks`, fused experts included; base = the mean of the experts).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .. import ffn
from ..layer import DeRSLayer


@dataclass
class ExpertSet:
    """One MoE layer: per projection the base ``(out, in)``, the experts' full weights ``(E, out, in)`` and their
    deltas ``(E, out, in)`` (``W_e - W_base``), all float32 and detached."""

    name: str
    source: str  # "ders" or "moe"
    base_kind: str  # "shared base" (DeRS) or "mean of experts" (transformers MoE)
    expert_names: list[str]
    bases: dict[str, torch.Tensor]
    experts: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (``model`` itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def ders_layers(model: nn.Module) -> dict[str, DeRSLayer]:
    """DeRS layers of ``model`` by their key in the transformers model (e.g. ``model.layers.0.mlp``)."""
    return {m.key or name: m for name, m in model.named_modules() if isinstance(m, DeRSLayer)}


def moe_blocks(model: nn.Module) -> dict[str, object]:
    """``find_moe_blocks`` of a transformers MoE model keyed by block name (``model.layers.<i>.mlp``); empty if
    the model is not one of the supported MoE architectures."""
    from ..compression.moe_blocks import find_moe_blocks

    inner = unwrap(model)
    try:
        blocks = find_moe_blocks(inner)
    except ValueError:
        return {}
    names = {id(m): n for n, m in inner.named_modules()}
    return {names.get(id(info.block), f"layers.{idx}.mlp"): info for idx, info in blocks.items()}


def active_adapter(layer: DeRSLayer, name: str) -> str:
    adapter = layer._single_active()
    if adapter is None or layer.disable_adapters:
        raise ValueError(f"DeRS layer {name!r} has no active adapter: call set_adapter(<name>) or enable the adapter.")
    return adapter


def _ders_set(name: str, layer: DeRSLayer) -> ExpertSet:
    adapter = active_adapter(layer, name)
    cfg = layer.ders_settings[adapter]
    weights = layer.expert_weights(adapter)
    bases, experts, deltas = {}, {}, {}
    for proj, w in weights.items():
        delta = layer.ders_delta[adapter][proj]
        if delta.replaces_base:  # vanilla experts: the base is the dense block they were copied from
            base = ffn.proj_weight(getattr(layer.base_layer, proj)).detach().float()
            d = w.float() - base
        else:
            base = layer.base_weight(adapter, proj).detach().float()
            with torch.no_grad():
                d = delta.materialize().detach().float()
        bases[proj], experts[proj], deltas[proj] = base, w.float(), d
    names = [f"expert_{e}" for e in range(cfg.num_experts)] + (["universal"] if cfg.shared_expert else [])
    return ExpertSet(name, "ders", "shared base", names, bases, experts, deltas)


def _moe_set(name: str, info) -> ExpertSet:
    bases, experts, deltas = {}, {}, {}
    for proj, w in (("gate_proj", info.gate), ("up_proj", info.up), ("down_proj", info.down)):
        w = w.detach().float()
        base = w.mean(dim=0)
        bases[proj], experts[proj], deltas[proj] = base, w, w - base
    names = [f"expert_{e}" for e in range(info.num_experts)]
    return ExpertSet(name, "moe", "mean of experts", names, bases, experts, deltas)


def model_kind(model: nn.Module) -> str:
    """``"ders"`` if ``model`` holds DeRS layers, ``"moe"`` for a supported transformers MoE, else ``ValueError``."""
    if ders_layers(model):
        return "ders"
    if moe_blocks(model):
        return "moe"
    from ..compression.moe_blocks import SUPPORTED_MODEL_TYPES

    raise ValueError(
        f"model of type {type(model).__name__} has neither DeRS layers nor MoE blocks of a supported transformers "
        f"architecture ({', '.join(SUPPORTED_MODEL_TYPES)}); nothing to inspect."
    )


def expert_sets(model: nn.Module) -> Iterator[ExpertSet]:
    """One :class:`ExpertSet` per MoE layer of ``model``, built one layer at a time (bounded memory)."""
    if model_kind(model) == "ders":
        for name, layer in ders_layers(model).items():
            yield _ders_set(name, layer)
    else:
        for name, info in moe_blocks(model).items():
            yield _moe_set(name, info)


def num_layers(model: nn.Module) -> int:
    return len(ders_layers(model)) if model_kind(model) == "ders" else len(moe_blocks(model))
