"""Compression of trained Mixture-of-Experts models into one shared base plus compressed per-expert deltas.

DeRS compression (:func:`compress`): a MoE whose experts were upcycled from a dense FFN is split into that FFN
(the base, the dense model's own) plus per-expert deltas, sparsified (DARE, magnitude) or quantized. One module per
step: :mod:`.config`, :mod:`.sources` (reading the MoE), :mod:`.sparsify`, :mod:`.api`, :mod:`.accounting`.
"""

from .accounting import CompressionReport, compression_report
from .api import compress
from .config import CompressionConfig

__all__ = ["CompressionConfig", "CompressionReport", "compress", "compression_report"]
