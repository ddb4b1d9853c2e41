"""FFN block layouts: which projections a feed-forward block has and how to read their weights.

Every supported FFN is described by an :class:`FFNLayout`: the input projections (their outputs concatenated give
the pre-activation; for gated FFNs the first half is the gate, the second the up projection), one output projection,
the attribute holding the activation and an optional dropout. Weights are always handled in ``nn.Linear`` orientation
``(out_features, in_features)``; GPT-2's ``Conv1D`` stores the transpose and is converted here.
"""

from __future__ import annotations

import dataclasses
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
    FFNLayout("gpt2_conv1d", ("c_fc",), "c_proj", gated=False, act_attr="act"),
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


# attributes a c_fc/c_proj MLP holds its output dropout in: a module (GPT-2) or a probability (Starcoder2)
_DROPOUT_ATTRS = ("dropout", "residual_dropout")


def detect_layout(module: nn.Module) -> FFNLayout | None:
    """Return the layout ``module`` follows, or ``None`` if it is not a supported FFN block (see :func:`inspect_block`
    for the reason)."""
    return inspect_block(module)[0]


def inspect_block(module: nn.Module) -> tuple[FFNLayout | None, str]:
    """``(layout, "")`` if ``module`` is an FFN block of a supported layout, else ``(None, reason)``.

    A block is recognised by its structure, not by the presence of two names: it holds the layout's projections and
    activation, at most an output dropout (two-layer MLPs) or dropouts of probability 0, and nothing else (no norm,
    attention or parameter of its own: a whole decoder layer holding ``fc1``/``fc2`` is not an FFN block)."""
    for layout in LAYOUTS:
        children = [getattr(module, name, None) for name in layout.projs]
        if not (all(_is_projection(c) for c in children) and callable(getattr(module, layout.act_attr, None))):
            continue
        if layout.name == "gpt2_conv1d":  # GPT-2 and Starcoder2 apply it after c_proj
            drop = next((a for a in _DROPOUT_ATTRS if hasattr(module, a)), None)
            layout = dataclasses.replace(layout, dropout_attr=drop)
        known = {*layout.projs, layout.act_attr, layout.dropout_attr}
        extra = [
            f"{name} ({type(child).__name__})"
            for name, child in module.named_children()
            if name not in known and not (isinstance(child, nn.Dropout) and child.p == 0)
        ]
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        if extra or own:
            what = ", ".join(extra + [f"{n} (its own tensor)" for n in own])
            return None, (
                f"it has the {layout.name} projections {'/'.join(layout.projs)} but also holds {what}, which a DeRS "
                "layer would not run (a whole decoder layer, or an FFN with extra parts)"
            )
        return layout, ""
    return None, f"it has none of the supported projection sets ({describe_layouts()})"


def reference_forward(module: nn.Module, layout: FFNLayout, x: torch.Tensor) -> torch.Tensor:
    """What a DeRS layer computes for one expert equal to the dense block (eval mode): ``out(act(in(x)))``, gated
    ``out(act(gate(x)) * up(x))``, through the block's own projection modules."""
    h = torch.cat([getattr(module, name)(x) for name in layout.in_projs], dim=-1)
    act = activation(module, layout)
    if layout.gated:
        gate, up = h.chunk(2, dim=-1)
        h = act(gate) * up
    else:
        h = act(h)
    return getattr(module, layout.out_proj)(h)


def probe_block(module: nn.Module, layout: FFNLayout) -> str | None:
    """Run ``module`` and :func:`reference_forward` on a few random tokens (eval mode, no grad); the reason if the
    block does not compute its layout's FFN (``None`` if it does, or if its weights are on the meta device)."""
    first = getattr(module, layout.in_projs[0])
    weight = proj_weight(first)
    if weight.device.type == "meta" or not weight.is_floating_point():
        return None
    hidden = proj_shape(first)[1]
    x = torch.randn(1, 3, hidden, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = module(x)
            got = reference_forward(module, layout, x)
    except Exception as err:  # noqa: BLE001 - any failure means the block is not a plain FFN
        return f"calling it on hidden states of shape (1, 3, {hidden}) failed ({type(err).__name__}: {err})"
    finally:
        module.train(was_training)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        kind = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
        return f"it returns {kind}, not one tensor of shape {tuple(got.shape)}"
    if not (torch.isfinite(want).all() and torch.isfinite(got).all()):
        return None  # non-finite weights: nothing to compare (the user's model is broken, not the layout)
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    diff = float((want.float() - got.float()).abs().max())
    if diff > tol * max(float(got.float().abs().max()), 1e-6):
        return f"its forward is not {layout.name}'s out(act(in(x))) of its projections (max difference {diff:.3g})"
    return None


def output_dropout(module: nn.Module, layout: FFNLayout, y: torch.Tensor) -> torch.Tensor:
    """The block's output dropout (a module, or a probability applied in training mode), if its layout has one."""
    if layout.dropout_attr is None:
        return y
    drop = getattr(module, layout.dropout_attr, None)
    if isinstance(drop, nn.Module):
        return drop(y)
    if isinstance(drop, int | float) and drop > 0:
        return torch.nn.functional.dropout(y, p=float(drop), training=module.training)
    return y


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
