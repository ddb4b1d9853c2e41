"""Delta representations: one small class per kind behind the :class:`Delta` interface.

A delta holds, for one weight matrix of shape ``(out, in)``, the E per-expert changes ``Delta_e`` and applies them to
routed tokens without building ``W_base + Delta_e``. Kinds: low-rank (DeRS-LM), sparse (DeRS-SM), full expert copies
(vanilla upcycling) and k-bit quantized (DeRS compression, :mod:`ders_peft.packing`). New kinds (SVD, ...) subclass
:class:`Delta` and add themselves to :data:`DELTA_CLASSES` (and, for the training path, an op to
``ders_peft.grouped_path.EXPERT_OPS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from . import packing
from .routing import RoutingPlan


def grouped_apply(
    x: torch.Tensor,
    plan: RoutingPlan,
    fn: Callable[[int, torch.Tensor], torch.Tensor],
    out_features: int,
) -> torch.Tensor:
    """Apply ``fn(expert, rows)`` to the slots of each expert, permuting slots by expert once.

    ``x`` is ``(T, in)`` (shared by all slots of a token) or ``(T, S, in)``; ``fn`` maps the ``(n_e, in)`` rows routed
    to expert e to ``(n_e, out)``. Returns ``(T, S, out)``. No per-expert zero-filled buffer of all tokens is built.
    """
    T, S = plan.expert_idx.shape
    order, inverse, counts = plan.sorted_slots()
    rows = x.index_select(0, order // S) if x.dim() == 2 else x.reshape(T * S, -1).index_select(0, order)
    outs = [fn(e, chunk) for e, chunk in enumerate(rows.split(counts)) if counts[e]]
    if not outs:
        return x.new_zeros(T, S, out_features)
    return torch.cat(outs).index_select(0, inverse).view(T, S, out_features)


def _weighted_sum(per_slot: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    return torch.einsum("tso,ts->to", per_slot, plan.weights.to(per_slot.dtype))


class Delta(nn.Module):
    """Interface of a per-expert weight change for one ``(out, in)`` matrix.

    ``forward(x, plan, weighted)`` returns ``(T, S, out)`` per-slot outputs ``x Delta_e^T`` (``x`` of shape ``(T, in)``
    shared by a token's slots, or ``(T, S, in)``), or with ``weighted=True`` the router-weighted sum over slots
    ``(T, out)``. Kinds with ``replaces_base`` hold whole expert weights (vanilla upcycling) instead of changes. A new
    kind implements ``_apply_slots`` and ``materialize`` (and the parameter counts where the paper counts otherwise).
    """

    kind: ClassVar[str] = ""
    replaces_base: ClassVar[bool] = False

    def __init__(self, num_experts: int, out_features: int, in_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.out_features = out_features
        self.in_features = in_features
        self.scale = scale

    def forward(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool = False) -> torch.Tensor:
        dtype = x.dtype
        out = self._apply_slots(x.to(self.param_dtype), plan, weighted)
        if self.scale != 1.0:
            out = out * self.scale
        return out.to(dtype)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _apply_slots(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool) -> torch.Tensor:
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:
        """Dense ``(E, out, in)`` tensor of every expert's (scaled) delta: for references, merging and export."""
        raise NotImplementedError

    def synthesize(self, base_weight: torch.Tensor | None) -> torch.Tensor:
        """Every expert's full weight ``W_base + Delta_e`` as ``(E, out, in)``."""
        dense = self.materialize()
        if self.replaces_base or base_weight is None:
            return dense
        return base_weight.unsqueeze(0).to(dense.dtype) + dense

    def num_added_params(self) -> int:
        """Parameters counted as "added" by the paper (sparse: values only)."""
        return sum(p.numel() for p in self.parameters())

    def num_index_elements(self) -> int:
        """Stored integer index entries (not counted as parameters)."""
        return 0

    def num_scale_params(self) -> int:
        """Quantization scales (not counted in :meth:`num_added_params`)."""
        return 0


def _init_values(param: torch.Tensor, init: str, init_std: float, generator) -> None:
    """Fill the zero-created trainable values in place: ``"zero"`` leaves them (no random draw), ``"small"`` draws
    normal values of std ``init_std`` from ``generator`` (after the kind's other draws)."""
    if init not in ("zero", "small"):
        raise ValueError(f"delta init={init!r} is invalid: allowed values are 'zero' and 'small'")
    if init == "zero" or param.device.type == "meta":
        return
    values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * init_std
    with torch.no_grad():
        param.copy_(values)


class LowRankDelta(Delta):
    """``Delta_e = B_e A_e`` (DeRS-LM): A random, B zero (``init="small"``: normal of std ``init_std``). All experts'
    factors are stacked so one matmul with ``A_all`` serves every expert and a block mask selects each slot's expert
    before one matmul with ``B_all``."""

    kind = "lowrank"

    def __init__(
        self,
        num_experts,
        out_features,
        in_features,
        rank: int,
        scale: float = 1.0,
        generator=None,
        init: str = "zero",
        init_std: float = 0.0,
        **fk,
    ):
        super().__init__(num_experts, out_features, in_features, scale)
        self.rank = rank
        self.lora_a = _Factor(torch.empty(num_experts * rank, in_features, **fk))
        self.lora_b = _Factor(torch.zeros(out_features, num_experts * rank, **fk))
        if self.lora_a.weight.device.type != "meta":
            bound = 1.0 / math.sqrt(in_features)
            a = torch.rand(self.lora_a.weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
            with torch.no_grad():
                self.lora_a.weight.copy_(a)
        _init_values(self.lora_b.weight, init, init_std, generator)

    def _apply_slots(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool) -> torch.Tensor:
        E, r = self.num_experts, self.rank
        z = x @ self.lora_a.weight.t()  # (T, E*r) or (T, S, E*r)
        T, S = plan.expert_idx.shape
        if x.dim() == 2:
            z = z.view(T, 1, E, r)
        else:
            z = z.view(T, S, E, r)
        if weighted:
            mask = plan.one_hot(z.dtype) * plan.weights.to(z.dtype).unsqueeze(-1)  # (T, S, E)
            mixed = (z * mask.unsqueeze(-1)).sum(dim=1) if x.dim() == 3 else z[:, 0] * mask.sum(1).unsqueeze(-1)
            return mixed.reshape(T, E * r) @ self.lora_b.weight.t()
        masked = z * plan.one_hot(z.dtype).unsqueeze(-1)  # (T, S, E, r)
        return masked.reshape(T, S, E * r) @ self.lora_b.weight.t()

    def materialize(self) -> torch.Tensor:
        E, r = self.num_experts, self.rank
        b = self.lora_b.weight.view(self.out_features, E, r).permute(1, 0, 2)
        a = self.lora_a.weight.view(E, r, self.in_features)
        return torch.bmm(b, a) * self.scale


class SparseDelta(Delta):
    """``Delta_e = scatter(I_e, V_e)`` (DeRS-SM): per expert, fixed unique random flat indices (int32 buffer, saved
    with the adapter) and trainable values (zero at creation; ``init="small"``: normal of std ``init_std``).

    ``forward`` (the interface, used by tests and as the generic reference) gathers the input columns each expert's
    delta reads and adds into the rows it writes; the routed layer runs :mod:`ders_peft.grouped_path` instead (CSR
    products for denser deltas, one expert's transient dense matrix at a time above ``DENSE_DENSITY``, recomputation
    in backward). Neither builds every expert's dense matrix.
    """

    kind = "sparse"

    def __init__(
        self,
        num_experts,
        out_features,
        in_features,
        sparse_rate: float,
        scale: float = 1.0,
        generator=None,
        init: str = "zero",
        init_std: float = 0.0,
        **fk,
    ):
        super().__init__(num_experts, out_features, in_features, scale)
        numel = out_features * in_features
        if numel >= 2**31:
            raise ValueError(
                f"SparseDelta: a ({out_features}, {in_features}) matrix has {numel} entries; its flat indices are "
                "int32, so DeRS-SM supports matrices of fewer than 2**31 entries"
            )
        self.nnz = max(1, round(numel * (1.0 - sparse_rate)))
        device = fk.get("device")
        self.weight = nn.Parameter(torch.zeros(num_experts, self.nnz, **fk))
        idx = torch.empty(num_experts, self.nnz, dtype=torch.int32, device=device)
        if idx.device.type != "meta":
            for e in range(num_experts):
                # int32 draws the same permutation as int64 for a given generator, with half the temporary: a
                # (numel,) int64 block per expert fragmented glibc's heap while a model loaded
                pick = torch.randperm(numel, generator=generator, dtype=torch.int32)[: self.nnz]
                idx[e] = pick.sort().values
        self.register_buffer("indices", idx)
        _init_values(self.weight, init, init_std, generator)

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Output rows and input columns ``(E, nnz)`` (int64) of the fixed indices (cached)."""

        def build(flat):
            return flat // self.in_features, flat % self.in_features

        return self._from_indices("positions", build)

    def _from_indices(self, name: str, build):
        """``build(indices as int64)``, cached until the index buffer is replaced or modified in place."""
        indices = self._buffers["indices"]
        try:
            version = indices._version
        except RuntimeError:  # inference tensor: no version counter, do not cache
            version = None
        cache = self.__dict__.setdefault("_index_cache", {})
        cached = cache.get(name)
        if cached is not None and version is not None and cached[0] is indices and cached[1] == version:
            return cached[2]
        found = build(indices.long())
        if version is not None:
            cache[name] = (indices, version, found)
        return found

    def _apply_slots(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool) -> torch.Tensor:
        out = grouped_apply(x, plan, self._gather_one, self.out_features)
        return _weighted_sum(out, plan) if weighted else out

    def _gather_one(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        idx = self.indices[e].long()
        out_rows, in_cols = idx // self.in_features, idx % self.in_features
        contrib = rows.index_select(1, in_cols) * self.weight[e]
        return rows.new_zeros(rows.shape[0], self.out_features).index_add(1, out_rows, contrib)

    def _dense(self) -> torch.Tensor:
        flat = self.weight.new_zeros(self.num_experts, self.out_features * self.in_features)
        flat = flat.scatter(1, self.indices.long(), self.weight)
        return flat.view(self.num_experts, self.out_features, self.in_features)

    def materialize(self) -> torch.Tensor:
        return self._dense() * self.scale

    def num_index_elements(self) -> int:
        return self.indices.numel()


class FullDelta(Delta):
    """Whole expert weights ``W_e`` (vanilla upcycling): every expert starts as a copy of the dense matrix."""

    kind = "full"
    replaces_base = True

    def __init__(self, num_experts, out_features, in_features, init_weight: torch.Tensor | None = None, **fk):
        super().__init__(num_experts, out_features, in_features, 1.0)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **fk))
        if init_weight is not None and self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.copy_(init_weight.unsqueeze(0).expand_as(self.weight))

    def _apply_slots(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool) -> torch.Tensor:
        out = grouped_apply(x, plan, lambda e, rows: rows @ self.weight[e].t(), self.out_features)
        return _weighted_sum(out, plan) if weighted else out

    def materialize(self) -> torch.Tensor:
        return self.weight

    def num_added_params(self) -> int:
        # the first copy stands in for the dense matrix; the others are added (paper's counting)
        return (self.num_experts - 1) * self.out_features * self.in_features


class UniversalFullDelta(Delta):
    """Deltas of N routed experts of any kind plus the universal FFN's delta kept whole, as a dense ``(out, in)``
    matrix (extended DeRS compression with ``compress_shared=False``).

    The universal expert is the plan's last slot (index N, every token): it is one dense product for all tokens;
    the routed slots go to ``routed`` with the plan restricted to them.
    """

    kind = "universal_full"

    def __init__(self, routed: Delta, **fk) -> None:
        super().__init__(routed.num_experts + 1, routed.out_features, routed.in_features, 1.0)
        self.routed = routed
        self.universal = _Factor(torch.zeros(routed.out_features, routed.in_features, **fk))

    @property
    def param_dtype(self) -> torch.dtype:
        return self.universal.weight.dtype

    def forward(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool = False) -> torch.Tensor:
        routed_plan = RoutingPlan(plan.expert_idx[:, :-1], plan.weights[:, :-1], self.routed.num_experts)
        routed = self.routed(x if x.dim() == 2 else x[:, :-1], routed_plan, weighted)
        xu = x if x.dim() == 2 else x[:, -1]
        u = (xu.to(self.param_dtype) @ self.universal.weight.t()).to(routed.dtype)
        if weighted:
            return routed + plan.weights[:, -1:].to(u.dtype) * u
        return torch.cat([routed, u.unsqueeze(1)], dim=1)

    def materialize(self) -> torch.Tensor:
        routed = self.routed.materialize()
        return torch.cat([routed, self.universal.weight.unsqueeze(0).to(routed.dtype)])

    def num_added_params(self) -> int:
        return self.routed.num_added_params() + self.universal.weight.numel()

    def num_index_elements(self) -> int:
        return self.routed.num_index_elements()

    @property
    def indices(self) -> torch.Tensor | None:
        return getattr(self.routed, "indices", None)


class QuantizedDelta(Delta):
    """``Delta_e = scale * q_e``: k-bit levels per entry packed into bytes (``codes`` ``(E, out, ceil(in * bits / 8))``
    uint8 buffer, saved with the adapter) times trainable float32 ``scales`` ``(E, out, groups)``, one per output row
    or per ``group_size`` entries of a row (:mod:`ders_peft.packing`). Zero at creation (scales zero); filled from
    dense deltas by :meth:`load_dense_`. Products dequantize one expert's ``(out, in)`` matrix at a time."""

    kind = "quantized"

    def __init__(
        self, num_experts, out_features, in_features, bits: int, group_size: int | None, scale: float = 1.0, **fk
    ):
        super().__init__(num_experts, out_features, in_features, scale)
        packing.qmax(bits)  # validates bits
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size={group_size!r} is invalid: must be None or an integer >= 1")
        self.bits, self.group_size = bits, group_size
        device = fk.get("device")
        shape = (num_experts, out_features)
        codes = torch.zeros(*shape, packing.packed_bytes(in_features, bits), dtype=torch.uint8, device=device)
        self.register_buffer("codes", codes)
        groups = packing.num_groups(in_features, group_size)
        # a leaf module's ``.weight`` (as every trainable DeRS tensor), so peft's FSDP wrap policy wraps it
        self.scale_factors = _Factor(torch.zeros(*shape, groups, dtype=torch.float32, device=device))

    @property
    def scales(self) -> nn.Parameter:
        """The trainable float32 scales ``(E, out, groups)`` (``scale_factors.weight``)."""
        return self.scale_factors.weight

    @property
    def param_dtype(self) -> torch.dtype:
        return self.scales.dtype

    @torch.no_grad()
    def load_dense_(self, delta: torch.Tensor) -> QuantizedDelta:
        """Quantize ``delta`` ``(E, out, in)`` into the codes and scales in place, one expert at a time; returns
        ``self``. ``delta`` is unscaled, as the other kinds store their values: :meth:`materialize` gives it (up to
        quantization) times ``scale``."""
        want = (self.num_experts, self.out_features, self.in_features)
        if tuple(delta.shape) != want:
            raise ValueError(f"load_dense_ needs a delta of shape {want}, got {tuple(delta.shape)}")
        for e in range(self.num_experts):
            w = delta[e].to(self.codes.device, torch.float32)
            codes, scales = packing.quantize(w, self.bits, self.group_size)
            self.codes[e].copy_(packing.pack(codes, self.bits))
            self.scales[e].copy_(scales)
        return self

    def _dequantized(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        unpacked = packing.unpack(codes, self.bits, self.in_features)
        return packing.dequantize(unpacked, scales, self.bits, self.group_size, self.in_features)

    def expert_delta(self, e: int) -> torch.Tensor:
        """Expert e's (scaled) delta ``(out, in)``, differentiable with respect to ``scales``."""
        dense = self._dequantized(self.codes[e], self.scales[e])
        return dense * self.scale if self.scale != 1.0 else dense

    def _apply_slots(self, x: torch.Tensor, plan: RoutingPlan, weighted: bool) -> torch.Tensor:
        def one(e: int, rows: torch.Tensor) -> torch.Tensor:
            return rows @ self._dequantized(self.codes[e], self.scales[e]).to(rows.dtype).t()

        out = grouped_apply(x, plan, one, self.out_features)
        return _weighted_sum(out, plan) if weighted else out

    def materialize(self) -> torch.Tensor:
        return self._dequantized(self.codes, self.scales) * self.scale

    def num_added_params(self) -> int:
        # the paper's 16-bit equivalents of the codes
        return round(self.num_experts * self.out_features * self.in_features * self.bits / 16)

    def num_scale_params(self) -> int:
        return self.scales.numel()


class _Factor(nn.Module):
    """Leaf module holding one trainable factor as ``.weight`` (FSDP-friendly)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


DELTA_CLASSES: dict[str, type[Delta]] = {
    cls.kind: cls for cls in (LowRankDelta, SparseDelta, FullDelta, QuantizedDelta)
}
