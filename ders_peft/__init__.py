"""ders_peft: DeRS Mixture-of-Experts upcycling and compression as a peft method.

``import ders_peft`` registers ``PeftType.DERS`` with peft, so ``get_peft_model(model, DeRSConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work, and adds a Trainer callback that logs the router
losses and scales them under gradient accumulation.
"""

from .compression import CompressionConfig, CompressionReport, compress, compression_report, decompress
from .compression.serialization import register as register_d2moe
from .config import DeRSConfig
from .deltas import DELTA_CLASSES, Delta, FullDelta, LowRankDelta, QuantizedDelta, SparseDelta, UniversalFullDelta
from .diagnostics import RouterStatsCallback, inspect_model, inspect_path
from .export import convert_to_moe, export_moe
from .kernels import disable_cpu_kernels, enable_cpu_kernels
from .layer import DeRSLayer
from .model import DeRSModel
from .registration import PEFT_TYPE_DERS, register
from .report import ParameterReport, parameter_report
from .trainer_callback import DeRSTrainerCallback, install_default_callback
from .training import create_optimizer, init_routers_kmeans, param_groups

register(DeRSConfig, DeRSModel)
register_d2moe()
install_default_callback()

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "DELTA_CLASSES",
    "PEFT_TYPE_DERS",
    "DeRSConfig",
    "DeRSLayer",
    "DeRSModel",
    "DeRSTrainerCallback",
    "Delta",
    "FullDelta",
    "LowRankDelta",
    "ParameterReport",
    "QuantizedDelta",
    "RouterStatsCallback",
    "SparseDelta",
    "UniversalFullDelta",
    "compress",
    "compression_report",
    "convert_to_moe",
    "create_optimizer",
    "decompress",
    "disable_cpu_kernels",
    "enable_cpu_kernels",
    "export_moe",
    "init_routers_kmeans",
    "inspect_model",
    "inspect_path",
    "param_groups",
    "parameter_report",
]
