"""Training path of the routed FFN for sparse deltas (DeRS-SM), grouped by expert.

The slots are permuted by expert once; each expert's sparse delta then touches only its own contiguous run of slots:
up to :data:`GATHER_DENSITY` by gathering the input columns it reads and adding into the output rows it writes, above
it through sparse CSR matrix products (torch.sparse): no expert's delta is ever built as a dense matrix. As in the
low-rank path, nothing of size ``(slots, intermediate)`` is stored for backward: the per-slot pre-activations are
recomputed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .deltas import SparseDelta
from .routing import RoutingPlan

Activation = Callable[[torch.Tensor], torch.Tensor]


GATHER_DENSITY = 0.002
"""Up to this density a delta's products gather the input columns it reads and add into the rows it writes; denser
deltas use sparse CSR matrix products (measured on 1024 x 512 x 1408, one thread: at 0.1% gather 3.2 ms vs CSR
3.9 ms, at 1% gather 55 ms vs CSR 4.4 ms, at 10% CSR 19 ms vs a dense matmul 45 ms)."""


@dataclass(frozen=True)
class _CSRLayout:
    """Per expert, the CSR structure of ``Delta_e`` ``(out, in)`` and of its transpose, and the permutations that put
    the values (stored in the order of the fixed indices) into each structure's row-major order."""

    crow: list[torch.Tensor]
    col: list[torch.Tensor]
    perm: list[torch.Tensor]
    crow_t: list[torch.Tensor]
    col_t: list[torch.Tensor]
    perm_t: list[torch.Tensor]


def _csr_layout(delta: SparseDelta) -> _CSRLayout:
    out_f, in_f = delta.out_features, delta.in_features

    def build(flat: torch.Tensor) -> _CSRLayout:
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("crow", "col", "perm", "crow_t", "col_t", "perm_t")}
        for e in range(flat.shape[0]):
            rows, cols = flat[e] // in_f, flat[e] % in_f
            for suffix, major, minor, size in (("", rows, cols, out_f), ("_t", cols, rows, in_f)):
                perm = torch.argsort(major * (in_f + out_f) + minor)
                crow = torch.zeros(size + 1, dtype=torch.long, device=flat.device)
                crow[1:] = torch.bincount(major, minlength=size).cumsum(0)
                parts["crow" + suffix].append(crow)
                parts["col" + suffix].append(minor[perm].contiguous())
                parts["perm" + suffix].append(perm)
        return _CSRLayout(**parts)

    return delta._from_indices("csr", build)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are the stable core
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr_dtype(t: torch.Tensor) -> torch.Tensor:
    """torch's CPU CSR kernels (MKL) have no half-precision version: run them in fp32."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@dataclass(frozen=True)
class _SparseOp:
    """Products with the sparse deltas ``Delta_e`` ``(out, in)`` of one delta family, without a dense matrix."""

    rows: torch.Tensor
    cols: torch.Tensor
    out_features: int
    in_features: int
    csr: _CSRLayout | None

    @classmethod
    def of(cls, delta: SparseDelta) -> _SparseOp:
        rows, cols, _ = delta.positions()
        csr = _csr_layout(delta) if delta.density > GATHER_DENSITY else None
        return cls(rows, cols, delta.out_features, delta.in_features, csr)

    def _matrix(self, e: int, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        c = self.csr
        if transpose:
            return _csr(c.crow_t[e], c.col_t[e], values[c.perm_t[e]], (self.in_features, self.out_features))
        return _csr(c.crow[e], c.col[e], values[c.perm[e]], (self.out_features, self.in_features))

    def add_product(self, e: int, inp: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
        """``out += inp @ Delta_e^T`` for ``inp`` ``(n, in)`` and ``out`` ``(n, out)`` (a view, written in place)."""
        if self.csr is not None:
            out.add_((self._matrix(e, _csr_dtype(values)) @ _csr_dtype(inp).t()).t())
        else:
            out.index_add_(1, self.rows[e], inp.index_select(1, self.cols[e]) * values)

    def grad_input(self, e: int, grad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``grad @ Delta_e``: gradient of the product with respect to its input."""
        if self.csr is not None:
            return (self._matrix(e, _csr_dtype(values), transpose=True) @ _csr_dtype(grad).t()).t().to(grad.dtype)
        out = grad.new_zeros(grad.shape[0], self.in_features)
        return out.index_add_(1, self.cols[e], grad.index_select(1, self.rows[e]) * values)

    def grad_values(self, e: int, grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Gradient of the product with respect to expert e's ``nnz`` values: ``(grad^T inp)`` at its positions."""
        if self.csr is None:
            return (grad.index_select(1, self.rows[e]) * inp.index_select(1, self.cols[e])).sum(0)
        grad32, inp32 = _csr_dtype(grad), _csr_dtype(inp)
        pattern = self._matrix(e, inp32.new_zeros(self.rows.shape[1]))
        sampled = torch.sparse.sampled_addmm(pattern, grad32.t().contiguous(), inp32.contiguous(), beta=0.0).values()
        return sampled.new_empty(sampled.shape).index_copy_(0, self.csr.perm[e], sampled).to(grad.dtype)


def sparse_routed_ffn(
    x: torch.Tensor,
    plan: RoutingPlan,
    in_base: Sequence[torch.Tensor],
    out_base: torch.Tensor,
    in_deltas: Sequence[SparseDelta],
    out_delta: SparseDelta,
    in_bias: Sequence[torch.Tensor | None],
    out_bias: torch.Tensor | None,
    act: Activation,
    gated: bool,
) -> torch.Tensor:
    """``routed_ffn`` for sparse deltas (same result, less memory, no expert delta kept dense)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    w_in = torch.cat(list(in_base)) if len(in_base) > 1 else in_base[0]
    base = x @ w_in.t()  # (T, sum of out_j): every input projection's base product in one matmul
    deltas = [*in_deltas, out_delta]
    values = [(d.weight * d.scale if d.scale != 1.0 else d.weight).to(dtype) for d in deltas]
    biases = [b.to(dtype) for b in in_bias if b is not None]
    has_bias = tuple(b is not None for b in in_bias)
    order, _, counts = plan.sorted_slots()
    spec = (act, gated, _is_silu(act), [_SparseOp.of(d) for d in deltas], has_bias, order, counts)
    with torch.autocast(device, enabled=False):
        mixed, y_delta = _SparseSlots.apply(
            spec, x.to(dtype), base.to(dtype), plan.weights.to(dtype), *values, *biases
        )
    y = y_delta + mixed @ out_base.t()
    if out_bias is not None:
        y = y + plan.gate_matrix(y.dtype) @ out_bias.to(y.dtype)
    return y


def _is_silu(act: Activation) -> bool:
    from .functional import _is_silu as is_silu

    return is_silu(act)


class _SparseSlots(torch.autograd.Function):
    """Per-slot core of the sparse routed FFN. Returns ``mixed = sum_s w_s h_s`` ``(T, I)`` and the routed down-side
    delta ``sum_s w_s h_s Delta_out[e_s]^T`` ``(T, hidden)``, where ``h_s = act(gate_s) * up_s`` (or ``act(pre_s)``)
    and ``pre_s = base + x Delta_in[e_s]^T + b_in[e_s]``. Inputs: ``x`` ``(T, hidden)``, ``base`` ``(T, P)`` (the
    input projections' base products side by side), ``weights`` ``(T, S)``, then the values ``(E, nnz)`` of every
    input delta and of the output delta, then the per-expert input biases ``(E, out_j)`` that exist."""

    @staticmethod
    def forward(ctx, spec, x, base, weights, *tensors):
        ctx.spec = spec
        ctx.save_for_backward(x, base, weights, *tensors)
        _, _, _, ops, _, order, counts = spec
        state = _State(spec, x, base, weights, tensors)
        pre, h, _ = state.hidden()
        mixed = x.new_zeros(base.shape[0], h.shape[1]).index_add_(0, state.tok, h * state.w[:, None])
        y_delta = x.new_zeros(x.shape)
        for e, a, b in state.segments:
            out = h.new_zeros(b - a, ops[-1].out_features)
            ops[-1].add_product(e, h[a:b], state.out_values[e], out)
            y_delta.index_add_(0, state.tok[a:b], out * state.w[a:b, None])
        return mixed, y_delta

    @staticmethod
    def backward(ctx, d_mixed, d_y):
        with torch.autocast(d_mixed.device.type, enabled=False):
            return _SparseSlots._backward(ctx, d_mixed, d_y)

    @staticmethod
    def _backward(ctx, d_mixed, d_y):
        x, base, weights, *tensors = ctx.saved_tensors
        act, gated, silu, ops, has_bias, order, counts = ctx.spec
        need = ctx.needs_input_grad
        state = _State(ctx.spec, x, base, weights, tensors)
        d_mixed, d_y = d_mixed.to(x.dtype), d_y.to(x.dtype)
        pre, h, a_gate = state.hidden()
        tok = state.tok
        d_mixed_s = d_mixed.index_select(0, tok)
        d_w = (h * d_mixed_s).sum(-1)
        d_h = d_mixed_s.mul_(state.w[:, None])
        out_op, d_out_values = ops[-1], torch.zeros_like(state.out_values)
        for e, a, b in state.segments:
            d_y_s = d_y.index_select(0, tok[a:b])
            out = h.new_zeros(b - a, out_op.out_features)
            out_op.add_product(e, h[a:b], state.out_values[e], out)
            d_w[a:b] += (out * d_y_s).sum(-1)
            grad = d_y_s.mul_(state.w[a:b, None])
            d_h[a:b] += out_op.grad_input(e, grad, state.out_values[e])
            d_out_values[e] = out_op.grad_values(e, grad, h[a:b])
        width = h.shape[1]
        if gated:
            gate, up = pre[:, :width], pre[:, width:]
            d_pre = torch.empty_like(pre)
            torch.mul(d_h, a_gate, out=d_pre[:, width:])
            d_act = d_h.mul_(up)
        else:
            gate, d_pre, d_act = pre, torch.empty_like(pre), d_h
        d_gate = d_pre[:, :width]
        if silu:
            torch.ops.aten.silu_backward.grad_input(d_act, gate, grad_input=d_gate)
        else:
            with torch.enable_grad():
                leaf = gate.detach().requires_grad_()
                activated = act(leaf)
            d_gate.copy_(torch.autograd.grad(activated, leaf, d_act)[0])
        d_x_s = state.xs.new_zeros(state.xs.shape) if need[1] else None
        d_in_values = [torch.zeros_like(v) for v in state.in_values]
        d_biases = [torch.zeros_like(bias) for bias in state.biases]
        col, bias_at = 0, 0
        for j, op in enumerate(ops[:-1]):
            cols = slice(col, col + op.out_features)
            for e, a, b in state.segments:
                grad = d_pre[a:b, cols]
                if d_x_s is not None:
                    d_x_s[a:b] += op.grad_input(e, grad, state.in_values[j][e])
                d_in_values[j][e] = op.grad_values(e, grad, state.xs[a:b])
                if has_bias[j]:
                    d_biases[bias_at][e] = grad.sum(0)
            bias_at += int(has_bias[j])
            col = cols.stop
        T = base.shape[0]
        d_x = x.new_zeros(x.shape).index_add_(0, tok, d_x_s) if d_x_s is not None else None
        d_base = base.new_zeros(base.shape).index_add_(0, tok, d_pre) if need[2] else None
        d_weights = None
        if need[3]:
            d_weights = weights.new_zeros(weights.numel()).index_copy_(0, order, d_w).view(T, -1)
        return None, d_x, d_base, d_weights, *d_in_values, d_out_values, *d_biases


class _State:
    """What forward and backward share: slots sorted by expert and the recomputation of their pre-activations."""

    def __init__(self, spec, x, base, weights, tensors) -> None:
        self.act, self.gated, self.silu, self.ops, self.has_bias, order, counts = spec
        n_in = len(self.ops) - 1
        self.in_values, self.out_values = tensors[:n_in], tensors[n_in]
        self.biases = tensors[n_in + 1 :]
        S = weights.shape[1]
        self.tok = order // S
        self.w = weights.reshape(-1).index_select(0, order)
        self.segments = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                self.segments.append((e, start, start + n))
            start += n
        self.xs = x.index_select(0, self.tok)
        self.base = base

    def hidden(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-slot (sorted order) pre-activations ``(TS, P)``, ``h`` ``(TS, I)`` and ``act(gate)`` (gated only)."""
        pre = self.base.index_select(0, self.tok)
        col, bias_at = 0, 0
        for j, op in enumerate(self.ops[:-1]):
            cols = slice(col, col + op.out_features)
            for e, a, b in self.segments:
                view = pre[a:b, cols]
                op.add_product(e, self.xs[a:b], self.in_values[j][e], view)
                if self.has_bias[j]:
                    view += self.biases[bias_at][e]
            bias_at += int(self.has_bias[j])
            col = cols.stop
        if not self.gated:
            return pre, self.act(pre), None
        width = pre.shape[1] // 2
        a_gate = self.act(pre[:, :width])
        return pre, a_gate * pre[:, width:], a_gate
