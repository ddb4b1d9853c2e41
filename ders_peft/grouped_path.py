"""Training path of the routed FFN grouped by expert, for any delta kind with a per-expert product (:class:`ExpertOp`).

The slots are permuted by expert once; each expert's delta then works on its own contiguous run of slots, through
the kind's :class:`ExpertOp` (sparse: gather/``index_add`` up to :data:`GATHER_DENSITY`, torch.sparse CSR products
up to :data:`DENSE_DENSITY`, above it one expert's values scattered into a transient dense matrix at a time, never all
experts' matrices; low-rank: two thin matmuls; quantized: one expert's dequantized matrix at a time). The base
projections run once per token, the base down projection once on the router-weighted mix. As in the stacked
low-rank path, nothing of size ``(slots, intermediate)`` is stored for backward: the per-slot pre-activations are
recomputed there. A new delta kind joins by registering an op in :data:`EXPERT_OPS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import ffn, packing
from .deltas import Delta, LowRankDelta, QuantizedDelta, SparseDelta
from .joined import joined_mm, joined_mm_backward
from .routing import RoutingPlan

Activation = Callable[[torch.Tensor], torch.Tensor]


GATHER_DENSITY = 0.002
"""Up to this density a delta's products gather the input columns it reads and add into the rows it writes; denser
deltas use sparse CSR matrix products. Measured by ``benchmarks/thresholds.py`` (docs/benchmarks_thresholds.md,
2026-12-03: one expert's forward, input-gradient and value-gradient products, 1024 rows, 512 -> 1408, one thread;
gather / CSR): 0.1%: 10.9 / 31.6 ms; 0.2%: 19.0 / 26.2 ms; 0.4%: 31.3 / 29.1 ms; 1%: 137 / 37 ms; 10%: 1637 / 59 ms
(the dense matrix's three products: 41 ms). The crossover lies between 0.2% and 0.4%."""

DENSE_DENSITY = 0.03
"""Above this density a delta's products scatter one expert's values into a transient dense ``(out, in)`` matrix and
run dense matmuls (its value gradient: the dense ``grad^T inp`` read at the fixed positions). No index layout is
cached in this mode, and only one expert's matrix exists at a time. Measured by ``benchmarks/thresholds.py``
(docs/benchmarks_thresholds.md, 2026-12-03, same products and shape as above; CSR / dense mode): 1%: 28.9 / 32.8 ms;
2%: 29.5 / 34.3 ms; 5%: 38.6 / 33.5 ms; 10%: 50.5 / 34.3 ms; 20%: 82.5 / 36.7 ms. The crossover lies between 2% and
5%."""


@dataclass(frozen=True)
class _CSRLayout:
    """Per expert, the CSR structure of ``Delta_e`` ``(out, in)`` (or of its transpose) and the permutation that puts
    the values (stored in the order of the fixed indices) into the structure's row-major order."""

    crow: list[torch.Tensor]
    col: list[torch.Tensor]
    perm: list[torch.Tensor | None]  # None: the values are already in row-major order (indices sorted at creation)


def _csr_layout(delta: SparseDelta, transpose: bool = False) -> _CSRLayout:
    """Built once per index buffer and direction (the transpose only when a backward pass needs it, so inference
    holds one layout); int32 throughout (as small as the stored indices), no int64 position arrays."""
    out_f, in_f = delta.out_features, delta.in_features

    def build(flat: torch.Tensor) -> _CSRLayout:
        parts: dict[str, list] = {"crow": [], "col": [], "perm": []}
        for e in range(flat.shape[0]):
            rows, cols = flat[e] // in_f, flat[e] % in_f
            major, minor, size = (cols, rows, in_f) if transpose else (rows, cols, out_f)
            perm = torch.argsort(major * (in_f + out_f) + minor)
            crow = torch.zeros(size + 1, dtype=torch.int32, device=flat.device)
            crow[1:] = torch.bincount(major, minlength=size).cumsum(0)
            parts["crow"].append(crow)
            parts["col"].append(minor[perm].to(torch.int32))
            ordered = bool((perm == torch.arange(perm.numel(), device=perm.device)).all())
            parts["perm"].append(None if ordered else perm.to(torch.int32))
        return _CSRLayout(**parts)

    return delta._from_indices("csr_t" if transpose else "csr", build)


def _in_order(values: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return values if perm is None else values.index_select(0, perm)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are the stable core
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr_dtype(t: torch.Tensor) -> torch.Tensor:
    """torch's CPU CSR kernels (MKL) have no half-precision version: run them in fp32."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class ExpertOp:
    """Per-expert products of one delta family ``Delta_e`` ``(out, in)``; ``params`` are the family's tensors as the
    layer passes them (see :meth:`params_of`), whole (not per expert)."""

    out_features: int
    in_features: int
    dense_products = False
    """True where the per-expert products are dense matmuls (sparse deltas in dense mode, quantized deltas). When every
    op of a layer call says so, the base products ``(T, P)`` are recomputed in backward instead of stored from
    forward: the per-slot work costs several base products, so one more costs little, and the layer then holds only
    ``x`` and the router-weighted mix from forward to backward. Measured on 2026-12-07 (Intel Xeon VM, one thread):
    DeRS-SM p=0.9's training-step peak (benchmarks/train_step.py memory child, fixed glibc thresholds) 392 -> 361 MB;
    its layer's fwd+bwd (2048 tokens, 512 -> 1408, 9 interleaved rounds) 0.880 -> 0.920 s. The sparser modes keep
    storing them: there one base product is a large share of the layer's work."""

    @staticmethod
    def params_of(delta: Delta) -> tuple[torch.Tensor, ...]:
        """The delta's trainable tensors, with its output scale folded in (through autograd)."""
        raise NotImplementedError

    def add_product(self, e: int, inp: torch.Tensor, params: tuple, out: torch.Tensor) -> None:
        """``out += inp @ Delta_e^T`` for ``inp`` ``(n, in)`` and ``out`` ``(n, out)`` (a view, written in place)."""
        raise NotImplementedError

    def grad_input(self, e: int, grad: torch.Tensor, params: tuple) -> torch.Tensor:
        """``grad @ Delta_e``: gradient of the product with respect to its input."""
        raise NotImplementedError

    def add_grad_params(self, e: int, grad: torch.Tensor, inp: torch.Tensor, params: tuple, grads: list) -> None:
        """Add the gradient of the product with respect to expert e's part of ``params`` into ``grads``."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop whatever the op built for the products of one pass (called after forward and after backward)."""

    def sharing(self, scratch: dict) -> ExpertOp:
        """This op, drawing its transient work buffers from ``scratch``, one dict shared by the ops of one layer call
        (so the layer holds one such buffer, not one per projection)."""
        return self


@dataclass(frozen=True)
class SparseOp(ExpertOp):
    """Sparse deltas: values ``(E, nnz)`` at fixed positions, without a dense matrix."""

    rows: torch.Tensor | None  # gather mode: output rows and input columns (int64)
    cols: torch.Tensor | None
    out_features: int
    in_features: int
    csr: _CSRLayout | None  # CSR mode
    delta: SparseDelta | None = None  # CSR mode: where the transposed layout is built, when backward needs it
    flat: torch.Tensor | None = None  # dense mode: the delta's own int32 flat positions (E, nnz), no copy
    scratch: dict = field(default_factory=dict, compare=False)  # dense mode: the matrix and value-gradient buffers

    @classmethod
    def of(cls, delta: SparseDelta) -> SparseOp:
        if delta.density > DENSE_DENSITY:
            return cls(None, None, delta.out_features, delta.in_features, None, delta, delta.indices)
        if delta.density > GATHER_DENSITY:
            return cls(None, None, delta.out_features, delta.in_features, _csr_layout(delta), delta)
        rows, cols = delta.positions()
        return cls(rows, cols, delta.out_features, delta.in_features, None)

    @staticmethod
    def params_of(delta: SparseDelta) -> tuple[torch.Tensor, ...]:
        return (delta.weight * delta.scale if delta.scale != 1.0 else delta.weight,)

    def _matrix(self, e: int, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if transpose:
            c = _csr_layout(self.delta, transpose=True)
            return _csr(c.crow[e], c.col[e], _in_order(values, c.perm[e]), (self.in_features, self.out_features))
        c = self.csr
        return _csr(c.crow[e], c.col[e], _in_order(values, c.perm[e]), (self.out_features, self.in_features))

    def _dense(self, e: int, params: tuple) -> torch.Tensor:
        """Expert e's delta as a transient dense ``(out, in)`` matrix (dense mode). The ops of one layer call share
        one such buffer (their matrices have the same size) and it keeps the last matrix built: the products of one
        run of slots reuse it, and at most one expert matrix of the layer exists at a time (the ops use theirs one
        after another, so sharing rebuilds nothing that per-op buffers would have kept)."""
        values = params[0]
        key = (e, values.data_ptr(), values._version)
        full = self._buffer("matrix", values, self.scratch)  # one buffer per pass: a fresh one per expert page-faults
        if self.scratch.get("key") != key:
            full.zero_().view(-1).index_put_((self.flat[e],), values[e])
            self.scratch["key"] = key
        return full

    def _buffer(self, name: str, like: torch.Tensor, store: dict) -> torch.Tensor:
        """A ``(out, in)`` work buffer kept in ``store`` across one pass; ops of the same size share one flat buffer
        when their ``store`` is shared."""
        key = (name, self.out_features * self.in_features)
        buf = store.get(key)
        if buf is None or buf.dtype != like.dtype:
            buf = store[key] = like.new_empty(key[1])
        return buf.view(self.out_features, self.in_features)

    @property
    def dense_products(self) -> bool:
        return self.flat is not None

    def release(self) -> None:
        self.scratch.clear()

    def sharing(self, scratch: dict) -> SparseOp:
        return replace(self, scratch=scratch)

    def add_product(self, e, inp, params, out) -> None:
        values = params[0][e]
        if self.flat is not None:
            out.addmm_(inp, self._dense(e, params).t())
        elif self.csr is not None:
            out.add_((self._matrix(e, _csr_dtype(values)) @ _csr_dtype(inp).t()).t())
        else:
            out.index_add_(1, self.rows[e], inp.index_select(1, self.cols[e]) * values)

    def grad_input(self, e, grad, params) -> torch.Tensor:
        values = params[0][e]
        if self.flat is not None:
            return grad @ self._dense(e, params)
        if self.csr is not None:
            return (self._matrix(e, _csr_dtype(values), transpose=True) @ _csr_dtype(grad).t()).t().to(grad.dtype)
        out = grad.new_zeros(grad.shape[0], self.in_features)
        return out.index_add_(1, self.cols[e], grad.index_select(1, self.rows[e]) * values)

    def add_grad_params(self, e, grad, inp, params, grads) -> None:
        # (grad^T inp) at the expert's positions
        if self.flat is not None:
            full = torch.mm(grad.t(), inp, out=self._buffer("grad", grad, self.scratch))  # read out at once
            grads[0][e] += full.view(-1).index_select(0, self.flat[e])
            return
        if self.csr is None:
            grads[0][e] += (grad.index_select(1, self.rows[e]) * inp.index_select(1, self.cols[e])).sum(0)
            return
        grad32, inp32 = _csr_dtype(grad), _csr_dtype(inp)
        pattern = self._matrix(e, inp32.new_zeros(params[0].shape[1]))
        sampled = torch.sparse.sampled_addmm(pattern, grad32.t().contiguous(), inp32.contiguous(), beta=0.0).values()
        perm = self.csr.perm[e]
        if perm is None:
            grads[0][e] += sampled.to(grad.dtype)
        else:
            grads[0][e].index_add_(0, perm, sampled.to(grad.dtype))


@dataclass(frozen=True)
class LowRankOp(ExpertOp):
    """Low-rank deltas ``B_e A_e`` from the stacked factors ``A`` ``(E*r, in)`` and ``B`` ``(out, E*r)``."""

    rank: int
    out_features: int
    in_features: int

    @classmethod
    def of(cls, delta: LowRankDelta) -> LowRankOp:
        return cls(delta.rank, delta.out_features, delta.in_features)

    @staticmethod
    def params_of(delta: LowRankDelta) -> tuple[torch.Tensor, ...]:
        b = delta.lora_b.weight
        return delta.lora_a.weight, (b * delta.scale if delta.scale != 1.0 else b)

    def _block(self, e: int) -> slice:
        return slice(e * self.rank, (e + 1) * self.rank)

    def add_product(self, e, inp, params, out) -> None:
        a, b = params[0][self._block(e)], params[1][:, self._block(e)]
        out.addmm_(inp @ a.t(), b.t())

    def grad_input(self, e, grad, params) -> torch.Tensor:
        a, b = params[0][self._block(e)], params[1][:, self._block(e)]
        return (grad @ b) @ a

    def add_grad_params(self, e, grad, inp, params, grads) -> None:
        block = self._block(e)
        a, b = params[0][block], params[1][:, block]
        grads[0][block].addmm_((grad @ b).t(), inp)
        grads[1][:, block].addmm_(grad.t(), inp @ a.t())


@dataclass(frozen=True)
class QuantizedOp(ExpertOp):
    """Quantized deltas: expert e's ``(out, in)`` matrix ``q_e * scales_e``, dequantized from the packed codes when
    used; the last one fetched for the backward pair (``grad_input``, ``add_grad_params``) is kept, forward keeps
    none."""

    codes: torch.Tensor
    bits: int
    group_size: int | None
    out_features: int
    in_features: int
    _last: list = field(default_factory=list, compare=False, repr=False)  # [e, scales, its version, q, matrix]
    dense_products = True

    @classmethod
    def of(cls, delta: QuantizedDelta) -> QuantizedOp:
        return cls(delta.codes, delta.bits, delta.group_size, delta.out_features, delta.in_features)

    @staticmethod
    def params_of(delta: QuantizedDelta) -> tuple[torch.Tensor, ...]:
        return (delta.scales * delta.scale if delta.scale != 1.0 else delta.scales,)

    def _matrix(self, e: int, scales: torch.Tensor, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        if keep and last and last[0] == e and last[1] is scales and last[2] == scales._version:
            return last[3], last[4]
        q = packing.levels(packing.unpack(self.codes[e], self.bits, self.in_features), self.bits, scales.dtype)
        matrix = q * packing.expand_scales(scales[e], self.group_size, self.in_features)
        if keep:  # backward only (no inference tensors there)
            last[:] = (e, scales, scales._version, q, matrix)
        return q, matrix

    def add_product(self, e, inp, params, out) -> None:
        out.addmm_(inp, self._matrix(e, params[0], keep=False)[1].t())

    def grad_input(self, e, grad, params) -> torch.Tensor:
        return grad @ self._matrix(e, params[0])[1]

    def add_grad_params(self, e, grad, inp, params, grads) -> None:
        q, _ = self._matrix(e, params[0])
        grads[0][e] += packing.group_sum((grad.t() @ inp).mul_(q), self.group_size)


EXPERT_OPS: dict[type[Delta], Callable[[Delta], ExpertOp]] = {
    SparseDelta: SparseOp.of,
    LowRankDelta: LowRankOp.of,
    QuantizedDelta: QuantizedOp.of,
}
"""Delta kind -> constructor of its :class:`ExpertOp` (the kinds the grouped path can run)."""


def supports(deltas: Sequence[Delta]) -> bool:
    """True if every delta's kind has an :class:`ExpertOp` (and they are all of one kind)."""
    return len({type(d) for d in deltas}) == 1 and type(deltas[0]) in EXPERT_OPS


def grouped_routed_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    in_base: Sequence[torch.Tensor],
    out_base: torch.Tensor | None,
    in_deltas: Sequence[Delta],
    out_delta: Delta,
    in_bias: Sequence[torch.Tensor | None],
    out_bias: torch.Tensor | None,
    act: Activation,
    gated: bool,
    mixed_out: dict | None = None,
) -> torch.Tensor:
    """``routed_ffn`` grouped by expert (same result, less memory; the kinds in :data:`EXPERT_OPS`).

    ``out_base=None`` leaves the base down projection to the caller, who finds its input, the router-weighted
    intermediate mix ``(T, I)``, in ``mixed_out["mixed"]`` (D2-MoE's pruned base does that)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    in_w = [w.to(dtype) for w in in_base]
    deltas = [*in_deltas, out_delta]
    scratch: dict = {}  # the ops' shared work buffers, for this call only
    ops = [EXPERT_OPS[type(d)](d).sharing(scratch) for d in deltas]
    params = [tuple(p.to(dtype) for p in type(op).params_of(d)) for op, d in zip(ops, deltas, strict=True)]
    biases = [b.to(dtype) for b in in_bias if b is not None]
    has_bias = tuple(b is not None for b in in_bias)
    order, _, counts = plan.sorted_slots()
    store_base = not all(op.dense_products for op in ops)
    spec = _Spec(act, gated, ffn.is_silu(act), ops, tuple(len(p) for p in params), has_bias, order, counts,
                 len(in_w), store_base)  # fmt: skip
    flat = [t for group in params for t in group]
    with torch.autocast(device, enabled=False):
        mixed, y_delta = _GroupedSlots.apply(spec, x.to(dtype), plan.weights.to(dtype), *in_w, *flat, *biases)
    if mixed_out is not None:
        mixed_out["mixed"] = mixed
    y = y_delta if out_base is None else y_delta + mixed @ out_base.t()
    if out_bias is not None:
        y = y + plan.gate_matrix(y.dtype) @ out_bias.to(y.dtype)
    return y


@dataclass(frozen=True)
class _Spec:
    """Non-tensor inputs of :class:`_GroupedSlots`."""

    act: Activation
    gated: bool
    silu: bool
    ops: list[ExpertOp]  # the input projections' ops, then the output projection's
    num_params: tuple[int, ...]  # tensors per op in the flat inputs
    has_bias: tuple[bool, ...]  # per input projection
    order: torch.Tensor  # slots sorted by expert (flat token * S + slot)
    counts: list[int]  # slots per expert
    num_base: int  # input projections' base weights in the inputs
    store_base: bool  # keep the base products for backward (else recomputed there: see ExpertOp.dense_products)


class _GroupedSlots(torch.autograd.Function):
    """Per-slot core of the grouped routed FFN. Returns ``mixed = sum_s w_s h_s`` ``(T, I)`` and the routed down-side
    delta ``sum_s w_s h_s Delta_out[e_s]^T`` ``(T, hidden)``, where ``h_s = act(gate_s) * up_s`` (or ``act(pre_s)``)
    and ``pre_s = base + x Delta_in[e_s]^T + b_in[e_s]``, ``base = x W_in^T`` ``(T, P)`` (the input projections' base
    products side by side). Inputs: ``x`` ``(T, hidden)``, ``weights`` ``(T, S)``, the input projections' base
    weights, then every op's parameter tensors (input projections first), then the per-expert input biases
    ``(E, out_j)`` that exist. The sorted slots are processed in runs of :data:`GROUPED_CHUNK_ELEMENTS` / P rows, so
    no ``(slots, intermediate)`` tensor is held whole."""

    @staticmethod
    def forward(ctx, spec: _Spec, x, weights, *tensors):
        ctx.spec = spec
        base = joined_mm(x, tensors[: spec.num_base])  # (T, P): the input projections' base products
        ctx.save_for_backward(x, weights, *tensors, *([base] if spec.store_base else []))
        state = _State(spec, x, base, weights, tensors[spec.num_base :])
        out_op, out_params = spec.ops[-1], state.params[-1]
        mixed = x.new_zeros(base.shape[0], base.shape[1] // (2 if spec.gated else 1))
        y_delta = x.new_zeros(x.shape)
        for c0, c1, segments in state.chunks():
            _, h, _ = state.hidden(c0, c1, segments, state.inputs(c0, c1))
            tok = state.tok[c0:c1]
            mixed.index_add_(0, tok, h * state.w[c0:c1, None])
            for e, a, b in segments:
                out = h.new_zeros(b - a, out_op.out_features)
                out_op.add_product(e, h[a:b], out_params, out)
                y_delta.index_add_(0, tok[a:b], out.mul_(state.w[c0 + a : c0 + b, None]))
            del h  # freed before the next chunk builds its own
        for op in spec.ops:  # nothing built for this pass is held until backward
            op.release()
        return mixed, y_delta

    @staticmethod
    def backward(ctx, d_mixed, d_y):
        with torch.autocast(d_mixed.device.type, enabled=False):
            return _GroupedSlots._backward(ctx, d_mixed, d_y)

    @staticmethod
    def _backward(ctx, d_mixed, d_y):
        x, weights, *tensors = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need = ctx.needs_input_grad
        nb = spec.num_base
        in_w, need_w = tensors[:nb], need[3 : 3 + nb]
        base = tensors.pop() if spec.store_base else joined_mm(x, in_w)
        state = _State(spec, x, base, weights, tensors[nb:])
        d_mixed, d_y = d_mixed.to(x.dtype), d_y.to(x.dtype)
        d_params = [[torch.zeros_like(p) for p in group] for group in state.params]
        d_biases = [torch.zeros_like(bias) for bias in state.biases]
        d_x = x.new_zeros(x.shape) if need[1] else None
        d_base = base.new_zeros(base.shape) if need[1] or any(need_w) else None
        d_w_sorted = weights.new_empty(weights.numel())
        for c0, c1, segments in state.chunks():
            tok, w = state.tok[c0:c1], state.w[c0:c1, None]
            xs = state.inputs(c0, c1)
            pre, h, a_gate = state.hidden(c0, c1, segments, xs)
            d_h = d_mixed.index_select(0, tok)
            d_w = torch.sum(h * d_h, dim=-1, out=d_w_sorted[c0:c1])
            d_h.mul_(w)
            out_op, out_params = spec.ops[-1], state.params[-1]
            for e, a, b in segments:
                d_y_s = d_y.index_select(0, tok[a:b])
                d_out = out_op.grad_input(e, d_y_s, out_params)  # d_y Delta_e: <h Delta_e^T, d_y> = <h, d_y Delta_e>
                d_w[a:b] += (h[a:b] * d_out).sum(-1)
                d_h[a:b] += d_out.mul_(w[a:b])
                out_op.add_grad_params(e, d_y_s.mul_(w[a:b]), h[a:b], out_params, d_params[-1])
            d_pre = _activation_backward(spec, pre, a_gate, d_h)
            d_x_s = xs.new_zeros(xs.shape) if d_x is not None else None
            col, bias_at = 0, 0
            for j, op in enumerate(spec.ops[:-1]):
                cols = slice(col, col + op.out_features)
                for e, a, b in segments:
                    grad = d_pre[a:b, cols]
                    if d_x_s is not None:
                        d_x_s[a:b] += op.grad_input(e, grad, state.params[j])
                    op.add_grad_params(e, grad, xs[a:b], state.params[j], d_params[j])
                    if spec.has_bias[j]:
                        d_biases[bias_at][e] += grad.sum(0)
                bias_at += int(spec.has_bias[j])
                col = cols.stop
            if d_x is not None:
                d_x.index_add_(0, tok, d_x_s)
            if d_base is not None:
                d_base.index_add_(0, tok, d_pre)
            del xs, pre, h, a_gate, d_h, d_w, d_pre, d_x_s  # freed before the next chunk builds its own
        for op in spec.ops:
            op.release()
        del state, base
        d_in_w = [None] * nb if d_base is None else joined_mm_backward(d_base, x, in_w, d_x, need_w)
        d_weights = None
        if need[2]:
            d_weights = weights.new_zeros(weights.numel()).index_copy_(0, spec.order, d_w_sorted).view(weights.shape)
        return None, d_x, d_weights, *d_in_w, *(g for group in d_params for g in group), *d_biases


def _activation_backward(spec: _Spec, pre: torch.Tensor, a_gate: torch.Tensor | None, d_h: torch.Tensor):
    """Gradient of the pre-activations ``(n, P)`` from that of ``h`` (``d_h`` is overwritten)."""
    width = d_h.shape[1]
    d_pre = torch.empty_like(pre)
    if spec.gated:
        gate, up = pre[:, :width], pre[:, width:]
        torch.mul(d_h, a_gate, out=d_pre[:, width:])
        d_act = d_h.mul_(up)
    else:
        gate, d_act = pre, d_h
    d_gate = d_pre[:, :width]
    if spec.silu:
        torch.ops.aten.silu_backward.grad_input(d_act, gate, grad_input=d_gate)
    else:
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_()
            activated = spec.act(leaf)
        d_gate.copy_(torch.autograd.grad(activated, leaf, d_act)[0])
    return d_pre


GROUPED_CHUNK_ELEMENTS = 2**20
"""The grouped path works on runs of sorted slots whose pre-activations ``(rows, P)`` hold about this many elements
(4 MiB in fp32): its per-slot temporaries stay that size instead of growing with slots x intermediate; tunable.
Measured (benchmarks/train_step.py memory children, fixed glibc thresholds, 2026-12-03): peak of DeRS-SM p=0.9999 /
p=0.9 at 2**22: 398 / 453 MB, 2**20: 351 / 405 MB, 2**19: 337 / 394 MB, the last with p=0.9's step about 15% slower
than at 2**20 (its per-chunk overhead)."""


class _State:
    """What forward and backward share: slots sorted by expert, their runs, and the recomputation of their
    pre-activations."""

    def __init__(self, spec: _Spec, x, base, weights, tensors) -> None:
        self.spec = spec
        self.params, at = [], 0
        for n in spec.num_params:
            self.params.append(tuple(tensors[at : at + n]))
            at += n
        self.biases = tensors[at:]
        self.tok = spec.order // weights.shape[1]
        self.w = weights.reshape(-1).index_select(0, spec.order)
        self.segments, start = [], 0
        for e, n in enumerate(spec.counts):
            if n:
                self.segments.append((e, start, start + n))
            start += n
        self.x = x
        self.base = base

    def inputs(self, c0: int, c1: int) -> torch.Tensor:
        """The input rows ``(n, hidden)`` of sorted slots ``c0:c1`` (gathered per chunk, never for all slots)."""
        return self.x.index_select(0, self.tok[c0:c1])

    def chunks(self):
        """``(start, stop, segments)`` per run of sorted slots; ``segments`` are ``(expert, a, b)`` relative to
        ``start``."""
        total = self.tok.shape[0]
        rows = max(1, GROUPED_CHUNK_ELEMENTS // max(1, self.base.shape[1]))
        for c0 in range(0, total, rows):
            c1 = min(total, c0 + rows)
            clipped = [(e, max(a, c0) - c0, min(b, c1) - c0) for e, a, b in self.segments if a < c1 and b > c0]
            yield c0, c1, clipped

    def hidden(self, c0: int, c1: int, segments, xs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pre-activations ``(n, P)``, ``h`` ``(n, I)`` and ``act(gate)`` (gated only) of sorted slots ``c0:c1``,
        whose input rows are ``xs``."""
        spec = self.spec
        pre = self.base.index_select(0, self.tok[c0:c1])
        col, bias_at = 0, 0
        for j, op in enumerate(spec.ops[:-1]):
            cols = slice(col, col + op.out_features)
            for e, a, b in segments:
                view = pre[a:b, cols]
                op.add_product(e, xs[a:b], self.params[j], view)
                if spec.has_bias[j]:
                    view += self.biases[bias_at][e]
            bias_at += int(spec.has_bias[j])
            col = cols.stop
        if not spec.gated:
            return pre, spec.act(pre), None
        width = pre.shape[1] // 2
        a_gate = spec.act(pre[:, :width])
        return pre, a_gate * pre[:, width:], a_gate
