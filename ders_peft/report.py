"""`parameter_report`: parameters a DeRS model adds to its dense model, per layer and in total.

Counts follow the DeRS paper: added = router + deltas (sparse deltas: values only; indices are reported separately
as index storage) + the extra per-expert bias copies. Everything is computed from shapes, so a model built on the
meta device is countable without allocating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layer import DeRSLayer


@dataclass
class LayerReport:
    name: str
    router: int
    deltas: int
    extra_biases: int
    index_entries: int
    index_bytes: int
    trainable: int

    @property
    def added(self) -> int:
        return self.router + self.deltas + self.extra_biases


@dataclass
class ParameterReport:
    """Per-layer and whole-model counts; ``str(report)`` is a readable table."""

    adapter: str
    dense_params: int
    trainable_params: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def added_params(self) -> int:
        return sum(layer.added for layer in self.layers)

    @property
    def total_params(self) -> int:
        return self.dense_params + self.added_params

    @property
    def index_entries(self) -> int:
        return sum(layer.index_entries for layer in self.layers)

    @property
    def index_bytes(self) -> int:
        return sum(layer.index_bytes for layer in self.layers)

    def as_dict(self) -> dict:
        return {
            "adapter": self.adapter,
            "dense_params": self.dense_params,
            "added_params": self.added_params,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "index_entries": self.index_entries,
            "index_bytes": self.index_bytes,
            "layers": [{**layer.__dict__, "added": layer.added} for layer in self.layers],
        }

    def __str__(self) -> str:
        head = (
            f"{'layer':<48}{'router':>10}{'deltas':>12}{'biases+':>10}{'added':>12}{'idx bytes':>12}{'trainable':>12}"
        )
        rows = [f"DeRS parameter report (adapter {self.adapter!r})", head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name[-48:]:<48}{r.router:>10,}{r.deltas:>12,}{r.extra_biases:>10,}{r.added:>12,}"
                f"{r.index_bytes:>12,}{r.trainable:>12,}"
            )
        rows += [
            "-" * len(head),
            f"dense model parameters:      {self.dense_params:,}",
            f"added parameters:            {self.added_params:,} "
            f"({100 * self.added_params / max(1, self.dense_params):.4f}% of dense)",
            f"total parameters:            {self.total_params:,}",
            f"trainable parameters:        {self.trainable_params:,}",
            f"sparse index storage:        {self.index_entries:,} entries, {self.index_bytes:,} bytes",
        ]
        return "\n".join(rows)


def parameter_report(model: nn.Module, adapter_name: str | None = None, verbose: bool = False) -> ParameterReport:
    """Count what DeRS adds to ``model`` (a PeftModel or any module holding DeRS layers)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DeRSLayer)}
    if not layers:
        raise ValueError(
            "parameter_report: the model has no DeRS layers (call get_peft_model with a DeRSConfig first)."
        )
    if adapter_name is None:
        adapter_name = next(iter(layers.values())).active_adapters[0]
    adapter_ids = set()
    rows = []
    for name, layer in layers.items():
        if adapter_name not in layer.ders_router:
            continue
        for container in layer.adapter_layer_names:
            holder = getattr(layer, container)
            for sub in holder.values():
                adapter_ids.update(id(p) for p in sub.parameters())
        router = layer.ders_router[adapter_name].weight.numel()
        deltas = layer.ders_delta[adapter_name]
        biases = layer.ders_bias[adapter_name] if adapter_name in layer.ders_bias else {}
        extra_bias = sum((b.weight.shape[0] - 1) * b.weight.shape[1] for b in biases.values())
        index_entries = sum(d.num_index_elements() for d in deltas.values())
        index_bytes = sum(
            d.num_index_elements() * d.indices.element_size() for d in deltas.values() if d.num_index_elements()
        )
        trainable = sum(
            p.numel()
            for c in layer.adapter_layer_names
            if adapter_name in getattr(layer, c)
            for p in getattr(layer, c)[adapter_name].parameters()
            if p.requires_grad
        )
        rows.append(
            LayerReport(
                name,
                router,
                sum(d.num_added_params() for d in deltas.values()),
                extra_bias,
                index_entries,
                index_bytes,
                trainable,
            )
        )
    all_params = {id(p): p for p in model.parameters()}
    dense = sum(p.numel() for i, p in all_params.items() if i not in adapter_ids)
    trainable = sum(p.numel() for p in all_params.values() if p.requires_grad)
    report = ParameterReport(adapter_name, dense, trainable, rows)
    if verbose:
        print(report)
    return report
