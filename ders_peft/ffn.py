"""FFN block layouts: which projections a feed-forward block has and how to read their weights.

Every supported FFN is described by an :class:`FFNLayout`: the input projections (their outputs concatenated give
the pre-activation; for gated FFNs the first half is the gate, the second the up projection), one output projection,
the attribute holding the activation and an optional dropout. Weights are always handled in ``nn.Linear`` orientation
``(out_features, in_features)``; GPT-2's ``Conv1D`` stores the transpose and is converted here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FFNLayout:
    """Structure of one family of FFN blocks."""

    name: str
    in_projs: tuple[str, ...]
    out_proj: str
    gated: bool
    act_attr: str
    dropout_attr: str | None = None

    @property
    def projs(self) -> tuple[str, ...]:
        return (*self.in_projs, self.out_proj)


LAYOUTS: tuple[FFNLayout, ...] = (
    FFNLayout("swiglu", ("gate_proj", "up_proj"), "down_proj", gated=True, act_attr="act_fn"),
    FFNLayout("fused_swiglu", ("gate_up_proj",), "down_proj", gated=True, act_attr="activation_fn"),
    FFNLayout("fc1_fc2", ("fc1",), "fc2", gated=False, act_attr="activation_fn"),
    FFNLayout("gpt2_conv1d", ("c_fc",), "c_proj", gated=False, act_attr="act", dropout_attr="dropout"),
    FFNLayout("neox", ("dense_h_to_4h",), "dense_4h_to_h", gated=False, act_attr="act"),
)

# model_type -> default target modules (the whole FFN block of every decoder layer)
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    model_type: ["mlp"]
    for model_type in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi",
        "phi3",
        "stablelm",
        "gpt2",
        "gpt_neox",
        "olmo",
        "olmo2",
        "granite",
    )
}


def describe_layouts() -> str:
    """Human-readable list of the supported layouts (used in error messages)."""
    return "; ".join(f"{lay.name}: {'/'.join(lay.projs)}" for lay in LAYOUTS)


def detect_layout(module: nn.Module) -> FFNLayout | None:
    """Return the layout ``module`` follows, or ``None`` if it is not a supported FFN block."""
    for layout in LAYOUTS:
        children = [getattr(module, name, None) for name in layout.projs]
        if all(_is_projection(c) for c in children) and callable(getattr(module, layout.act_attr, None)):
            return layout
    return None


def _is_projection(module: object) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's ``Conv1D`` (weight stored as ``(in, out)``)."""
    return type(module).__name__ == "Conv1D"


def proj_weight(module: nn.Module) -> torch.Tensor:
    """The projection's weight in ``(out_features, in_features)`` orientation (a view, no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def proj_shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = proj_weight(module).shape
    return int(out_f), int(in_f)


def set_proj_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` given in ``(out, in)`` orientation into the projection, in place."""
    with torch.no_grad():
        module.weight.copy_(weight.t() if is_conv1d(module) else weight)


def activation(module: nn.Module, layout: FFNLayout) -> Callable[[torch.Tensor], torch.Tensor]:
    return getattr(module, layout.act_attr)


def is_silu(act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """True for SiLU in any of its forms (``F.silu``, ``nn.SiLU``, transformers' ``SiLUActivation``): the fast paths
    then use the fused SiLU backward kernel."""
    from transformers.activations import SiLUActivation

    return act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU | SiLUActivation)


def intermediate_size(module: nn.Module, layout: FFNLayout) -> int:
    """Width of the hidden activation fed to the output projection."""
    return proj_shape(getattr(module, layout.out_proj))[1]
