"""Optimizer parameter groups with one learning rate per kind of DeRS tensor (base, low-rank A, B / values, router).

With the base trainable and the deltas starting at zero, one learning rate for everything leaves the deltas nearly
unused in short runs (``../shared`` notes, quality benchmark): these groups let the deltas and the router move faster
than the shared base, as LoRA+ does for B. The optimizer works with ``Trainer`` / ``SFTTrainer`` through
``optimizers=(optimizer, None)`` (the trainer's scheduler then scales every group's learning rate alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..deltas import FullDelta

#: Group names, in the order the groups are built.
GROUPS = ("base", "delta_a", "delta_b", "router", "other")
GROUP_HELP = {
    "base": "the shared base FFN copy, vanilla (full) expert weights and per-expert biases",
    "delta_a": "low-rank A factors (lora_a)",
    "delta_b": "low-rank B factors (lora_b), sparse values, quantized scales and the universal FFN's dense delta",
    "router": "router weights (and the universal FFN's gate row)",
    "other": "every other trainable parameter (modules_to_save, non-DeRS adapters, whole-model training)",
}


def group_of_params(model: nn.Module) -> dict[str, str]:
    """The group (:data:`GROUPS`) of every trainable parameter of ``model``, by parameter name."""
    whole_experts = {id(p) for m in model.modules() if isinstance(m, FullDelta) for p in m.parameters(recurse=False)}
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if id(param) in whole_experts or "ders_base" in parts or "ders_bias" in parts:
            out[name] = "base"
        elif "ders_router" in parts:
            out[name] = "router"
        elif "ders_delta" in parts:
            out[name] = "delta_a" if "lora_a" in parts else "delta_b"
        else:
            out[name] = "other"
    return out


def _check_lr(name: str, value: float | None) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if value is not None and not ok:
        raise ValueError(f"{name}={value!r} is invalid: must be None or a finite number >= 0")


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    base_lr: float | None = None,
    delta_a_lr: float | None = None,
    delta_b_lr: float | None = None,
    router_lr: float | None = None,
    loraplus_ratio: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Named optimizer parameter groups of ``model``'s trainable parameters (see :data:`GROUP_HELP`).

    Each ``*_lr`` left ``None`` is ``lr``, except ``delta_b_lr`` with ``loraplus_ratio`` (LoRA+): then it is
    ``loraplus_ratio * delta_a_lr`` (``delta_a_lr`` itself defaulting to ``lr``). With ``weight_decay > 0``, biases
    and 1-D tensors go to ``"<group>.no_decay"`` groups without decay. Empty groups are left out.
    """
    if lr is None:
        raise ValueError("lr=None is invalid: must be a finite number >= 0")
    rates = {"lr": lr, "base_lr": base_lr, "delta_a_lr": delta_a_lr, "delta_b_lr": delta_b_lr, "router_lr": router_lr}
    for arg, value in (rates | {"weight_decay": weight_decay}).items():
        _check_lr(arg, value)
    if loraplus_ratio is not None:
        if delta_b_lr is not None:
            raise ValueError("give delta_b_lr or loraplus_ratio, not both (loraplus_ratio sets delta_b_lr)")
        _check_lr("loraplus_ratio", loraplus_ratio)
        delta_b_lr = loraplus_ratio * (lr if delta_a_lr is None else delta_a_lr)
    rates = {"base": base_lr, "delta_a": delta_a_lr, "delta_b": delta_b_lr, "router": router_lr, "other": None}
    params = dict(model.named_parameters())
    members: dict[str, list[str]] = {}
    for name, group in group_of_params(model).items():
        no_decay = weight_decay > 0 and (params[name].ndim < 2 or "bias" in name)
        members.setdefault(f"{group}.no_decay" if no_decay else group, []).append(name)
    out = []
    for group in GROUPS:
        for key in (group, f"{group}.no_decay"):
            if key in members:
                out.append(
                    {
                        "name": key,
                        "params": [params[n] for n in members[key]],
                        "lr": lr if rates[group] is None else rates[group],
                        "weight_decay": 0.0 if key.endswith(".no_decay") else weight_decay,
                    }
                )
    check_param_groups(model, out)
    return out


def check_param_groups(model: nn.Module, groups: Iterable[dict]) -> None:
    """Raise ``ValueError`` unless every trainable parameter of ``model`` is in exactly one group and every grouped
    tensor is a trainable parameter of ``model`` (the message names the offending parameters and groups)."""
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen: dict[int, str] = {}
    problems = []
    for i, group in enumerate(groups):
        label = group.get("name", f"#{i}")
        for p in group["params"]:
            if id(p) not in trainable:
                what = f"{names[id(p)]!r} is frozen" if id(p) in names else "a tensor that is not in the model"
                problems.append(f"group {label!r} holds {what}")
            elif id(p) in seen:
                problems.append(f"{names[id(p)]!r} is in two groups ({seen[id(p)]!r} and {label!r})")
            else:
                seen[id(p)] = label
    missing = [names[i] for i in trainable if i not in seen]
    if missing:
        problems.append(f"{len(missing)} trainable parameter(s) in no group: {sorted(missing)[:5]}")
    if problems:
        raise ValueError("invalid optimizer parameter groups: " + "; ".join(problems))


def create_optimizer(
    model: nn.Module,
    lr: float,
    *,
    base_lr: float | None = None,
    delta_a_lr: float | None = None,
    delta_b_lr: float | None = None,
    router_lr: float | None = None,
    loraplus_ratio: float | None = None,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`param_groups` (each group keeps its ``name``); extra keyword arguments go to the
    optimizer. Pass it to a trainer as ``optimizers=(create_optimizer(model, ...), None)``."""
    groups = param_groups(
        model,
        lr,
        base_lr=base_lr,
        delta_a_lr=delta_a_lr,
        delta_b_lr=delta_b_lr,
        router_lr=router_lr,
        loraplus_ratio=loraplus_ratio,
        weight_decay=weight_decay,
    )
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
