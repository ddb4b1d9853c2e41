"""k-bit quantization of per-expert deltas into a :class:`~ders_peft.deltas.QuantizedDelta` (the quantizer itself,
symmetric levels with MSE-chosen clipping and bit packing, is :mod:`ders_peft.packing`)."""

from __future__ import annotations

import torch

from ..deltas import Delta, QuantizedDelta


def quantize_into(target: Delta, delta: torch.Tensor, config, generator: torch.Generator | None = None) -> None:
    """Quantize ``delta`` ``(E, out, in)`` to ``target.bits`` bits with its scale layout, in place (one expert at a
    time). ``generator`` is unused (the quantizer is deterministic); it keeps the compressors' signature."""
    if not isinstance(target, QuantizedDelta):
        raise TypeError(f"quantization writes a QuantizedDelta, got {type(target).__name__}")
    if (target.bits, target.group_size) != (config.bits, config.group_size):
        raise RuntimeError(f"the layer holds {target.bits}-bit deltas (group_size {target.group_size}), not {config}")
    target.load_dense_(delta / target.scale)  # stored unscaled: the layer multiplies by its delta_scale
