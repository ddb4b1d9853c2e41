"""`parameter_report`: parameters a DeRS model adds to its dense model, per layer and in total.

Counts follow the DeRS paper: added = router + deltas (sparse deltas: values only; indices are reported separately
as index storage; k-bit quantized deltas: 16-bit equivalents, values x k / 16, their scales listed apart) + the
extra per-expert bias copies (E - 1 per biased matrix, E = experts incl. the universal one).
A vanilla (``delta_type="full"``) layer adds E - 1 full copies: the first copy stands in for the dense matrix. The
trainable base copy (``train_base``) replaces the dense FFN, so it is not "added"; it is counted in ``stored``, what
the training-time model holds in memory (dense model + every adapter tensor). Everything is computed from shapes, so
a model built on the meta device is countable without allocating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layer import DeRSLayer


@dataclass
class LayerReport:
    """Counts for one DeRS layer and one adapter. ``dense`` is the dense FFN block's own parameter count."""

    name: str
    router: int
    deltas: int
    extra_biases: int
    index_entries: int
    index_bytes: int
    trainable: int
    dense: int = 0
    scales: int = 0  # quantized deltas' scales: stored, listed apart from the added parameters (paper counting)

    @property
    def added(self) -> int:
        return self.router + self.deltas + self.extra_biases

    @property
    def total(self) -> int:
        """Parameters of the upcycled FFN: the dense block plus what DeRS adds."""
        return self.dense + self.added


@dataclass
class ParameterReport:
    """Per-layer and whole-model counts; ``str(report)`` is a readable table.

    ``dense_params``: the dense model (without any adapter tensor or ``modules_to_save`` copy);
    ``total_params = dense_params + added_params``: the upcycled model as the paper counts it;
    ``trainable_params``: parameters with ``requires_grad``; ``stored_params``: every parameter held in memory.
    """

    adapter: str
    dense_params: int
    trainable_params: int
    layers: list[LayerReport] = field(default_factory=list)
    stored_params: int = 0

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
    def scale_params(self) -> int:
        """Scales of quantized deltas (not in ``added_params``, as the DeRS appendix counts k-bit deltas)."""
        return sum(layer.scales for layer in self.layers)

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
            "stored_params": self.stored_params,
            "index_entries": self.index_entries,
            "index_bytes": self.index_bytes,
            "scale_params": self.scale_params,
            "layers": [{**layer.__dict__, "added": layer.added, "total": layer.total} for layer in self.layers],
        }

    def __str__(self) -> str:
        cols = ("router", "deltas", "biases+", "added", "total", "idx bytes", "trainable")
        head = f"{'layer':<40}" + "".join(f"{c:>14}" for c in cols)
        rows = [f"DeRS parameter report (adapter {self.adapter!r})", head, "-" * len(head)]
        for r in self.layers:
            values = (r.router, r.deltas, r.extra_biases, r.added, r.total, r.index_bytes, r.trainable)
            name = r.name.removeprefix("base_model.model.")
            rows.append(f"{name[-40:]:<40}" + "".join(f"{v:>14,}" for v in values))
        rows += [
            "-" * len(head),
            f"dense model parameters:      {self.dense_params:,}",
            f"added parameters:            {self.added_params:,} "
            f"({100 * self.added_params / max(1, self.dense_params):.4f}% of dense)",
            f"total parameters:            {self.total_params:,}",
            f"trainable parameters:        {self.trainable_params:,}",
            f"parameters held in memory:   {self.stored_params:,}",
            f"sparse index storage:        {self.index_entries:,} entries, {self.index_bytes:,} bytes",
        ]
        if self.scale_params:
            rows.append(f"quantization scales:         {self.scale_params:,} (stored, not in the added parameters)")
        return "\n".join(rows)


def _adapter_param_ids(layer: DeRSLayer) -> set[int]:
    """Ids of every adapter tensor of a DeRS layer (all adapters)."""
    return {id(p) for c in layer.adapter_layer_names for sub in getattr(layer, c).values() for p in sub.parameters()}


def _layer_report(name: str, layer: DeRSLayer, adapter: str) -> LayerReport:
    deltas = layer.ders_delta[adapter]
    biases = layer.ders_bias[adapter] if adapter in layer.ders_bias else {}
    index_entries = sum(d.num_index_elements() for d in deltas.values())
    index_bytes = sum(
        d.num_index_elements() * d.indices.element_size() for d in deltas.values() if d.num_index_elements()
    )
    trainable = sum(
        p.numel()
        for c in layer.adapter_layer_names
        if adapter in getattr(layer, c)
        for p in getattr(layer, c)[adapter].parameters()
        if p.requires_grad
    )
    return LayerReport(
        name=name,
        router=layer.ders_router[adapter].weight.numel(),
        deltas=sum(d.num_added_params() for d in deltas.values()),
        extra_biases=sum((b.weight.shape[0] - 1) * b.weight.shape[1] for b in biases.values()),
        index_entries=index_entries,
        index_bytes=index_bytes,
        trainable=trainable,
        dense=sum(p.numel() for p in layer.base_layer.parameters()),
        scales=sum(d.num_scale_params() for d in deltas.values()),
    )


def parameter_report(model: nn.Module, adapter_name: str | None = None, verbose: bool = False) -> ParameterReport:
    """Count what DeRS adds to ``model`` (a PeftModel or any module holding DeRS layers); ``verbose`` prints it."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DeRSLayer)}
    if not layers:
        raise ValueError(
            "parameter_report: the model has no DeRS layers (call get_peft_model with a DeRSConfig first)."
        )
    known = sorted({a for layer in layers.values() for a in layer.ders_router})
    if adapter_name is None:
        adapter_name = next(iter(layers.values())).active_adapters[0]
    if adapter_name not in known:
        raise ValueError(
            f"parameter_report: adapter_name={adapter_name!r} is invalid: the model's DeRS adapters are {known}."
        )
    not_dense = set()
    rows = []
    for name, layer in layers.items():
        not_dense |= _adapter_param_ids(layer)
        if adapter_name in layer.ders_router:
            rows.append(_layer_report(name, layer, adapter_name))
    for module in model.modules():  # peft's trainable copies of modules_to_save replace, not add to, the originals
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict):
            not_dense |= {id(p) for p in copies.parameters()}
    all_params = {id(p): p for p in model.parameters()}
    report = ParameterReport(
        adapter=adapter_name,
        dense_params=sum(p.numel() for i, p in all_params.items() if i not in not_dense),
        trainable_params=sum(p.numel() for p in all_params.values() if p.requires_grad),
        layers=rows,
        stored_params=sum(p.numel() for p in all_params.values()),
    )
    if verbose:
        print(report)
    return report
