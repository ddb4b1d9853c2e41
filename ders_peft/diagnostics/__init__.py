"""Diagnostics of DeRS models and transformers MoEs, one module per step: expert weight similarity
(:mod:`.similarity`), router load (:mod:`.router_load`), singular-value spectrum of the deltas (:mod:`.spectrum`),
PNG plots (:mod:`.plots`), the whole report (:mod:`.api`) and a Trainer callback logging router statistics
(:mod:`.callback`). See docs/diagnostics.md."""

from .api import inspect_model, inspect_path
from .callback import RouterStatsCallback
from .router_load import RouterRecorder, router_load
from .similarity import expert_similarity
from .spectrum import delta_spectrum

__all__ = [
    "RouterRecorder",
    "RouterStatsCallback",
    "delta_spectrum",
    "expert_similarity",
    "inspect_model",
    "inspect_path",
    "router_load",
]
