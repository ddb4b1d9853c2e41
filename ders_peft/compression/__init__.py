"""Compression of trained Mixture-of-Experts models into one shared base plus compressed per-expert deltas.

DeRS compression (:func:`compress`, DARE / magnitude / quantize): a MoE whose experts were upcycled from a dense FFN
is split into that FFN (the base, the dense model's own) plus per-expert deltas, sparsified or quantized; the result
is a DeRS adapter. D2-MoE (``method="d2moe"``): any MoE becomes a merged base plus low-rank deltas in its own
architecture (:func:`decompress` writes the standard MoE back). One module per step: :mod:`.config`,
:mod:`.sources`, :mod:`.sparsify`, :mod:`.quantize`, :mod:`.api`, :mod:`.accounting` (DeRS);
:mod:`.moe_blocks`, :mod:`.calibration`, :mod:`.merging`, :mod:`.svd`, :mod:`.d2_experts`, :mod:`.d2moe`,
:mod:`.serialization` (D2-MoE).
"""

from .accounting import CompressionReport, compression_report
from .api import compress
from .config import CompressionConfig
from .d2moe import decompress

__all__ = ["CompressionConfig", "CompressionReport", "compress", "compression_report", "decompress"]
