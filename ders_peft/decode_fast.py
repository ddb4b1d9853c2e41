"""The compiled decode kernel's call, remembered per layer, so that the next generation step skips the dispatch.

A generation step calls every DeRS layer once with a token or two, and the kernel then costs about what the dense
MLP costs. What :func:`ders_peft.decode.layer_forward` and the layer's ``forward`` do before calling it (which path
applies, which adapter is active, whether the settings and cached tensors still hold) runs between bandwidth-bound
kernels whose weight traffic has evicted the interpreter's data from the caches, and cost 50-80 us per call there
(against about 6 us in a warm Python-only loop). When the kernel served a call, :func:`remember` keeps the call
with everything it depends on, and :func:`run` replays it after re-checking only that: no gradient, no autocast,
float32 CPU input of an allowed size, the same active adapter with no merge and adapters enabled, unchanged
settings, kernels still on, and the validity checks of the cached tensors (:func:`ders_peft.decode._still_valid`).
Anything else returns ``None`` and the layer takes its full path, which remembers again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from . import kernels

_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Entry:
    __slots__ = ("active", "adapter", "call", "checks", "config", "kernel", "max_tokens", "snapshot", "valid")

    def __init__(self, layer, adapter: str, call: Callable, checks: tuple, max_tokens: Callable[[], int], valid):
        config = layer.ders_settings[adapter]
        self.active, self.adapter, self.config = layer._active_adapter, adapter, config
        self.snapshot = dict(config.__dict__)
        self.call, self.checks, self.max_tokens, self.valid = call, checks, max_tokens, valid
        self.kernel = kernels.decode_kernel()


def remember(layer, adapter: str, call: Callable, checks: tuple | None, max_tokens: Callable[[], int], valid) -> None:
    """Keep ``call`` (the kernel with its arguments bound; it takes the ``(T, hidden)`` input) for ``layer``; its
    cached tensors hold while ``valid(checks)``. Not kept without checks, or where the block has an output dropout."""
    if checks is not None and layer.layout.dropout_attr is None:
        _ENTRIES[layer] = _Entry(layer, adapter, call, checks, max_tokens, valid)


def run(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output for ``x`` through the remembered kernel call, or ``None`` where it does not apply."""
    if torch.is_grad_enabled():  # training (and torch.compile of it) never reaches the lookup
        return None
    entry = _ENTRIES.get(layer)
    if entry is None or x.dtype is not torch.float32 or x.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu") or layer._disable_adapters or layer._active_adapter is not entry.active:
        return None
    if layer.merged_adapters or layer._merged_experts or kernels.decode_kernel() is not entry.kernel:
        return None
    config = layer.ders_settings.get(entry.adapter)
    if config is not entry.config or config.__dict__ != entry.snapshot:
        return None
    hidden = x.shape[-1]
    tokens = x.numel() // hidden if hidden else 0
    if not 0 < tokens <= entry.max_tokens() or not entry.valid(entry.checks):
        return None
    y = entry.call(x.reshape(tokens, hidden).contiguous())
    return y.view(*x.shape[:-1], y.shape[-1])
