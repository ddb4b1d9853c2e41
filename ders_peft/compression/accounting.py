"""`compression_report`: what a compressed DeRS model stores, in bytes by kind, beside the uncompressed MoE.

Counted from shapes and dtypes only, so a model built on the meta device (e.g. from a saved adapter's config) is
countable without memory. The paper's "Added Params" (sparse: kept values; quantized: values x k / 16) come from
:func:`ders_peft.parameter_report`; this report adds the real storage: kept values, int32 indices, packed codes,
scales, dense universal deltas, routers, per-expert biases, carried non-expert modules, the shared base (the dense
FFN) and the rest of the dense model, and optionally the adapter's file sizes on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..deltas import QuantizedDelta, SparseDelta, UniversalFullDelta
from ..layer import DeRSLayer
from ..report import parameter_report

ADAPTER_KINDS = ("delta_values", "delta_indices", "delta_codes", "delta_scales", "universal_dense", "router", "biases")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CompressionReport:
    """Bytes of a compressed DeRS model by kind (``compressed``) and of the MoE it came from (``uncompressed``).

    ``compressed`` keys: the adapter's tensors (:data:`ADAPTER_KINDS`, plus ``carried``: non-expert modules the
    adapter carries because the MoE's differ from the dense model's), ``base_ffn`` (the dense FFN blocks that serve as
    the shared base) and ``rest`` (every other dense-model tensor). ``uncompressed`` keys: ``experts`` (routed and
    shared experts), ``router`` and ``rest``. ``files``: file name -> bytes of a saved adapter directory.
    """

    added_params: int
    scale_params: int
    compressed: dict[str, int]
    uncompressed: dict[str, int] | None = None
    files: dict[str, int] = field(default_factory=dict)
    method: dict | None = None

    @property
    def adapter_bytes(self) -> int:
        return sum(v for k, v in self.compressed.items() if k in (*ADAPTER_KINDS, "carried"))

    @property
    def total_bytes(self) -> int:
        """The whole compressed model: adapter + dense model (carried modules replace their dense originals)."""
        return self.adapter_bytes + self.compressed["base_ffn"] + self.compressed["rest"]

    @property
    def experts_bytes(self) -> int:
        """What stands in for the MoE's experts: the shared base plus the adapter's deltas and biases."""
        kinds = ("delta_values", "delta_indices", "delta_codes", "delta_scales", "universal_dense", "biases")
        return self.compressed["base_ffn"] + sum(self.compressed[k] for k in kinds)

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    def as_dict(self) -> dict:
        out = {
            "method": self.method,
            "added_params": self.added_params,
            "scale_params": self.scale_params,
            "compressed_bytes": dict(self.compressed),
            "adapter_bytes": self.adapter_bytes,
            "experts_bytes": self.experts_bytes,
            "total_bytes": self.total_bytes,
            "files": dict(self.files),
            "file_bytes": self.file_bytes,
        }
        if self.uncompressed is not None:
            out["uncompressed_bytes"] = dict(self.uncompressed)
            out["uncompressed_total_bytes"] = sum(self.uncompressed.values())
            out["experts_ratio"] = self.experts_bytes / max(1, self.uncompressed["experts"])
            out["total_ratio"] = self.total_bytes / max(1, sum(self.uncompressed.values()))
        return out

    def __str__(self) -> str:
        rows = [f"DeRS compression report ({self.method or 'not made by compress'})"]
        rows.append(f"added parameters (DeRS counting): {self.added_params:,}  (+ {self.scale_params:,} scales)")
        rows.append(f"{'stored':<18}{'compressed':>16}" + (f"{'uncompressed':>16}" if self.uncompressed else ""))
        for kind, value in self.compressed.items():
            rows.append(f"{kind:<18}{value:>16,}")
        if self.uncompressed:
            for kind, value in self.uncompressed.items():
                rows.append(f"{kind:<18}{'':>16}{value:>16,}")
        rows.append(f"{'experts (base+deltas)':<18}{self.experts_bytes:>16,}" + (
            f"{self.uncompressed['experts']:>16,}" if self.uncompressed else ""
        ))
        rows.append(f"{'whole model':<18}{self.total_bytes:>16,}" + (
            f"{sum(self.uncompressed.values()):>16,}" if self.uncompressed else ""
        ))
        if self.files:
            rows.append(f"adapter files on disk: {self.file_bytes:,} bytes ({len(self.files)} files)")
        return "\n".join(rows)


def _layer_bytes(layer: DeRSLayer, adapter: str, out: dict[str, int]) -> None:
    out["router"] += _nbytes(layer.ders_router[adapter].parameters())
    if adapter in layer.ders_bias:
        out["biases"] += _nbytes(layer.ders_bias[adapter].parameters())
    if adapter in layer.ders_base:  # a trainable base copy (not made by compress) replaces the dense FFN's role
        out["base_ffn"] += _nbytes(layer.ders_base[adapter].parameters())
    else:
        out["base_ffn"] += _nbytes(layer.base_layer.parameters())
    for delta in layer.ders_delta[adapter].values():
        if isinstance(delta, UniversalFullDelta):
            out["universal_dense"] += _nbytes(delta.universal.parameters())
            delta = delta.routed
        if isinstance(delta, SparseDelta):
            out["delta_values"] += _nbytes([delta.weight])
            out["delta_indices"] += _nbytes([delta.indices])
        elif isinstance(delta, QuantizedDelta):
            out["delta_codes"] += _nbytes([delta.codes])
            out["delta_scales"] += _nbytes([delta.scales])
        else:  # low-rank or full deltas
            out["delta_values"] += _nbytes(delta.parameters())


def compression_report(
    model: nn.Module, uncompressed: nn.Module | None = None, saved_dir: str | os.PathLike | None = None
) -> CompressionReport:
    """Storage of the DeRS ``model`` by kind; with ``uncompressed`` (the MoE it was compressed from) that MoE's
    storage beside it; with ``saved_dir`` (``model.save_pretrained`` output) the files' sizes."""
    params = parameter_report(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DeRSLayer)}
    out = dict.fromkeys((*ADAPTER_KINDS, "carried", "base_ffn", "rest"), 0)
    counted: set[int] = set()
    adapter = params.adapter
    for layer in layers.values():
        _layer_bytes(layer, adapter, out)
        counted |= {id(t) for t in layer.parameters()} | {id(t) for t in layer.buffers()}
    for module in model.modules():
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and adapter in copies:
            out["carried"] += _nbytes(copies[adapter].parameters())
            counted |= {id(p) for p in module.parameters()}  # the copy replaces its original
    seen = {id(p): p for p in model.parameters()}
    out["rest"] = _nbytes(t for i, t in seen.items() if i not in counted)
    files = {}
    if saved_dir is not None:
        files = {p.name: p.stat().st_size for p in sorted(Path(saved_dir).iterdir()) if p.is_file()}
    configs = [layer.ders_settings[adapter] for layer in layers.values()]
    scales = sum(d.num_scale_params() for layer in layers.values() for d in layer.ders_delta[adapter].values())
    return CompressionReport(
        added_params=params.added_params,
        scale_params=scales,
        compressed=out,
        uncompressed=moe_bytes(uncompressed) if uncompressed is not None else None,
        files=files,
        method=configs[0].compression if configs else None,
    )


def moe_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a MoE by kind: ``experts`` (routed + shared), ``router`` (+ shared-expert gates) and ``rest``.

    ``model``: a DeRS model (its expert weights are ``W_base + Delta_e``: a vanilla ``full`` model holds N copies;
    other kinds are counted as the N dense experts they stand for) or a transformers MoE with fused experts.
    """
    from ..export import _unwrap

    root = _unwrap(model)
    out = {"experts": 0, "router": 0, "rest": 0}
    done: set[int] = set()
    for module in root.modules():
        if isinstance(module, DeRSLayer):
            adapter = module._single_active()
            out["router"] += _nbytes(module.ders_router[adapter].parameters())
            itemsize = next(module.base_layer.parameters()).element_size()
            for delta in module.ders_delta[adapter].values():  # the N (+1) dense experts the layer computes
                out["experts"] += delta.num_experts * delta.out_features * delta.in_features * itemsize
            if adapter in module.ders_bias:
                out["experts"] += _nbytes(module.ders_bias[adapter].parameters())
            done |= {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    for name, param in root.named_parameters():
        if id(param) in done:
            continue
        done.add(id(param))
        size = param.numel() * param.element_size()
        if ".experts." in name or ".shared_expert." in name:
            out["experts"] += size
        elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "router.weight")):
            out["router"] += size
        else:
            out["rest"] += size
    return out
