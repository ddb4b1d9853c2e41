"""Inference path of a DeRS layer for a few tokens at a time (generation: one new token per sequence per step).

At that size the layer's cost is not FLOPs but the number of tensor operations and Python steps, so
:func:`layer_forward` computes the same result as the general path (router, :func:`ders_peft.routing.route`,
:func:`ders_peft.functional.routed_ffn`) with as few of them as possible, and without autograd (it runs only when no
gradient is needed):

- low-rank deltas: one matmul gives the router logits and ``z = x A^T`` of every expert for every input projection
  (their weights stacked once and cached until a parameter changes); the base projections run once on ``x``; a block
  mask keeps each slot's ``r`` columns and one ``addmm`` per projection adds the slot's delta; the down side mixes the
  slots by router weight before the base down projection;
- sparse deltas: each slot gathers the input entries its expert's delta reads and scatter-adds the products into the
  base projection's output (row/column positions of the fixed indices cached);
- whole expert weights (vanilla experts, or experts materialised by ``merge_adapter``), while there are at most as
  many slots as experts: one plain FFN per slot on the selected expert's matrices, with no sorting or permutation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import decode_fast, ffn, kernels
from .deltas import FullDelta, LowRankDelta, SparseDelta
from .routing import SHARED_EXPERT_MIX

Activation = Callable[[torch.Tensor], torch.Tensor]

MAX_DECODE_TOKENS = 16
"""Up to this many tokens per layer call the fast path is used (when no gradient is needed)."""

MAX_SPARSE_KERNEL_TOKENS = 512
"""Sparse layers take the compiled CPU kernel (where it applies) up to this many tokens, prefill included. In a
one-off timing loop (300 calls after 20 of warm-up, not a committed benchmark; hidden 512, intermediate 1408, N=4,
top-2, p=0.999, one thread, 2026-12-06) one layer took 2.8 / 8.5 / 32 ms through it against 4.6 / 18.6 / 45 ms
through the grouped path at 32 / 128 / 512 tokens (the dense FFN: 2.3 / 7.5 / 26 ms). Its per-slot loops run on one
thread, so longer inputs keep the grouped path."""

_BLOCK_MASKS: dict[tuple, torch.Tensor] = {}
_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNSET = object()


def block_mask(num_experts: int, rank: int, copies: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(E, copies * E * rank)`` 0/1 matrix whose row e keeps, in each of ``copies`` stacked factors, the ``rank``
    columns of expert e (cached)."""
    key = (num_experts, rank, copies, dtype, str(device))
    if key not in _BLOCK_MASKS:
        one = torch.eye(num_experts, dtype=dtype, device=device).repeat_interleave(rank, dim=1)
        _BLOCK_MASKS[key] = one.repeat(1, copies)
    return _BLOCK_MASKS[key]


def route_small(logits: torch.Tensor, top_k: int, normalize: bool, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Same expert indices and weights as :func:`ders_peft.routing.route` (``(T, S)`` each), no plan object."""
    logits = logits.float()
    if normalize:  # softmax is monotonic: the top-k logits' softmax is the renormalised top-k probabilities
        top, idx = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        weights, idx = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    if shared:
        idx = torch.cat([idx, torch.full_like(idx[:, :1], logits.shape[-1])], dim=1)
        weights = torch.cat([weights, torch.ones_like(weights[:, :1])], dim=1) * SHARED_EXPERT_MIX
    return idx, weights


def layer_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
    """The output of DeRS ``layer`` for ``x`` ``(T, hidden)``, or ``None`` when the fast path does not apply
    (gradient enabled, autocast, more than ``MAX_DECODE_TOKENS`` tokens (sparse layers through the compiled kernel:
    ``MAX_SPARSE_KERNEL_TOKENS``), mixed dtypes, many slots for whole experts)."""
    if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return None  # autocast would change the dtypes of single operations: leave it to the general path
    config = layer.ders_settings[adapter]
    if config.shared_expert_gate:
        return None  # the universal FFN's sigmoid gate: the general path
    merged = layer._merged_experts.get(adapter)
    deltas = merged if merged is not None else layer.ders_delta[adapter]
    lay = layer.layout
    if x.shape[0] > MAX_DECODE_TOKENS:  # prefill: only the compiled sparse kernel beats the general path there
        if x.shape[0] <= MAX_SPARSE_KERNEL_TOKENS and all(type(deltas[n]) is SparseDelta for n in lay.projs):
            return _compiled_sparse(layer, adapter, config, deltas, x)
        return None
    if all(type(deltas[n]) is LowRankDelta for n in lay.projs):
        pack = _lowrank_pack(layer, adapter, deltas, x.dtype)
        if pack is None:
            return None
        return _lowrank(layer, adapter, config, pack, x)
    if all(type(deltas[n]) is SparseDelta for n in lay.projs):
        y = _compiled_sparse(layer, adapter, config, deltas, x)
        if y is not None:
            return y
        weights = [layer.base_weight(adapter, n) for n in lay.projs]
        router = layer.ders_router[adapter].weight
        if any(t.dtype != x.dtype for t in (router, *weights, *(deltas[n].weight for n in lay.projs))):
            return None
        idx, w = route_small(F.linear(x, router), config.top_k, config.normalize_top_k, config.shared_expert)
        return _sparse(layer, adapter, deltas, weights, idx, w.to(x.dtype), x)
    if all(isinstance(deltas[n], FullDelta) for n in lay.projs):
        slots = x.shape[0] * (config.top_k + int(config.shared_expert))
        if slots > config.num_deltas or any(deltas[n].weight.dtype != x.dtype for n in lay.projs):
            return None  # many slots: grouping them by expert (the general path) is cheaper
        router = layer.ders_router[adapter].weight
        idx, w = route_small(
            F.linear(x.to(router.dtype), router), config.top_k, config.normalize_top_k, config.shared_expert
        )
        return _per_slot_experts(layer, adapter, deltas, idx, w.to(x.dtype), x)
    return None


def _sources(layer, adapter: str, ins, out) -> list[tuple[dict, str]]:
    """(parameter dict, name) of every tensor the pack is built from or holds: router, factors, base weights."""
    pairs = [(layer.ders_router[adapter]._parameters, "weight")]
    for d in (*ins, out):
        pairs += [(d.lora_a._parameters, "weight"), (d.lora_b._parameters, "weight")]
    return pairs + _base_sources(layer, adapter)


def _base_sources(layer, adapter: str) -> list[tuple[dict, str]]:
    """(parameter dict, name) of the base weights that are plain ``weight`` parameters (not Conv1D's transposes)."""
    holder = layer.ders_base[adapter] if adapter in layer.ders_base else layer.base_layer
    pairs = []
    for name in layer.layout.projs:
        params = getattr(holder, name)._parameters
        if params.get("weight") is layer.base_weight(adapter, name):
            pairs.append((params, "weight"))
    return pairs


def _checks(layer, adapter: str, modules, sources, versioned: bool = True) -> tuple | None:
    """What a cached pack depends on, as ``(container, key, object, version)`` entries: the router, delta, bias and
    activation modules and ``modules`` (the deltas in ``layout.projs`` order) by identity (``version`` None), and every
    ``(parameter dict, name)`` of ``sources`` by identity and, if ``versioned`` (the pack holds values computed from
    them), in-place version. ``None`` for inference tensors, which have no version counter (then the pack is rebuilt
    every call)."""
    lay = layer.layout
    deltas = layer.ders_delta[adapter]
    base = layer.base_layer
    act_holder = base._modules if lay.act_attr in base._modules else base.__dict__
    checks = [
        (layer.ders_router._modules, adapter, layer.ders_router[adapter], None),
        (layer.ders_delta._modules, adapter, deltas, None),
        (layer.ders_bias._modules, adapter, layer.ders_bias._modules.get(adapter), None),
        (act_holder, lay.act_attr, ffn.activation(base, lay), None),
    ]
    checks += [(deltas._modules, name, d, None) for name, d in zip(lay.projs, modules, strict=True)]
    try:
        checks += [(ps, name, ps[name], ps[name]._version if versioned else None) for ps, name in sources]
    except RuntimeError:
        return None
    return tuple(checks)


def _still_valid(checks: tuple) -> bool:
    """None of the pack's modules or tensors was replaced, and no tensor was modified in place since it was built."""
    for holder, key, obj, version in checks:
        current = holder.get(key)
        if current is not obj or (version is not None and current._version != version):
            return False
    return True


def _lowrank_pack(layer, adapter: str, deltas, dtype: torch.dtype) -> dict | None:
    """Small stacked tensors of the low-rank path, cached until one of their source modules or tensors is replaced or
    a tensor is modified in place (``_version``)."""
    entry = _PACKS.get(layer, {}).get(adapter)
    if entry is not None and entry[1] is dtype and _still_valid(entry[0]):
        return entry[2]
    lay = layer.layout
    ins = [deltas[n] for n in lay.in_projs]
    out = deltas[lay.out_proj]
    router = layer.ders_router[adapter].weight
    if router.dtype != dtype or any(d.lora_a.weight.dtype != dtype for d in (*ins, out)):
        return None
    if len({(d.num_experts, d.rank) for d in (*ins, out)}) != 1:
        return None
    with torch.no_grad():
        pack = {
            "stacked": torch.cat([router, *(d.lora_a.weight for d in ins)]),  # (N + n_in * E*r, hidden)
            "b": [d.lora_b.weight * d.scale for d in ins],  # (out, E*r) each
            "a_out_t": out.lora_a.weight.t().contiguous(),  # (I, E*r)
            "b_out_t": (out.lora_b.weight * out.scale).t().contiguous(),  # (E*r, hidden)
            "mask": block_mask(out.num_experts, out.rank, len(ins), dtype, router.device),
            "num_experts": router.shape[0],
            "rank": out.rank,
            "width": out.num_experts * out.rank,
            "kernel": _UNSET,  # the compiled kernel's arguments, built at its first use
        }
    checks = _checks(layer, adapter, (*ins, out), _sources(layer, adapter, ins, out))
    if checks is not None:
        _PACKS.setdefault(layer, {})[adapter] = (checks, dtype, pack)
    return pack


def _plain(act: Activation) -> Activation:
    """``F.silu`` for SiLU modules (saves a module call per use), else ``act``."""
    return F.silu if ffn.is_silu(act) else act


def _activate(pres: list[torch.Tensor], act: Activation, gated: bool) -> torch.Tensor:
    if not gated:
        return act(pres[0])
    if len(pres) == 2:
        return act(pres[0]) * pres[1]
    gate, up = pres[0].chunk(2, dim=-1)
    return act(gate) * up


def _biases(layer, adapter: str) -> dict[str, torch.Tensor]:
    holder = layer.ders_bias[adapter] if adapter in layer.ders_bias else {}
    return {n: holder[n].weight for n in holder}


def _kernel_layout_ok(layer, adapter: str) -> bool:
    """The compiled kernel's structural conditions: a gated SiLU FFN without per-expert biases."""
    lay = layer.layout
    return lay.gated and not _biases(layer, adapter) and ffn.is_silu(ffn.activation(layer.base_layer, lay))


def _kernel_args(layer, adapter: str, pack: dict) -> tuple | None:
    """The compiled kernel's tensor and size arguments (expert-major copies of the small factors, so that a slot reads
    only its own expert's rows), or ``None`` where the kernel does not apply: not a gated SiLU FFN, biases, not
    float32, a base weight that is not a plain ``weight`` parameter."""
    lay = layer.layout
    if not _kernel_layout_ok(layer, adapter):
        return None
    weights = [layer.base_weight(adapter, n) for n in lay.projs]
    if pack["stacked"].dtype != torch.float32 or any(w.dtype != torch.float32 for w in weights):
        return None
    if len(_base_sources(layer, adapter)) != len(lay.projs):  # the pack's validity check tracks every base weight
        return None
    r = pack["rank"]
    E = pack["width"] // r
    with torch.no_grad():
        b_experts = [b.view(b.shape[0], E, r).permute(1, 2, 0).contiguous() for b in pack["b"]]  # (E, r, out)
        a_out_experts = pack["a_out_t"].view(-1, E, r).permute(1, 2, 0).contiguous()  # (E, r, I)
    small = (pack["stacked"], b_experts, a_out_experts, pack["b_out_t"])
    return (weights[:-1], weights[-1], *small, pack["num_experts"], r)


def _compiled(layer, adapter: str, config, pack: dict, x: torch.Tensor) -> torch.Tensor | None:
    """The layer through the compiled CPU kernel (:mod:`ders_peft.kernels`), or ``None`` where it does not apply."""
    if x.device.type != "cpu":
        return None
    kernel = kernels.decode_kernel()
    if kernel is None:
        return None
    args = pack["kernel"]
    if args is _UNSET:
        args = pack["kernel"] = _kernel_args(layer, adapter, pack)
    if args is None:
        return None
    top_k, normalize, shared = config.top_k, config.normalize_top_k, config.shared_expert
    y = kernel.lowrank_decode(x.contiguous(), *args, top_k, normalize, shared, SHARED_EXPERT_MIX)
    cached = _PACKS.get(layer, {}).get(adapter)
    if cached is not None and cached[2] is pack:
        call = lambda xf: kernel.lowrank_decode(xf, *args, top_k, normalize, shared, SHARED_EXPERT_MIX)  # noqa: E731
        decode_fast.remember(layer, adapter, call, cached[0], lambda: MAX_DECODE_TOKENS, _still_valid)
    return y


def _compiled_sparse(layer, adapter, config, deltas, x: torch.Tensor) -> torch.Tensor | None:
    """A sparse layer through the compiled CPU kernel, or ``None`` where it does not apply (as for low-rank)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    kernel = kernels.decode_kernel()
    if kernel is None:
        return None
    args = _sparse_kernel_args(layer, adapter, deltas)
    if args is None:
        return None
    top_k, normalize, shared = config.top_k, config.normalize_top_k, config.shared_expert
    y = kernel.sparse_decode(x.contiguous(), *args, top_k, normalize, shared, SHARED_EXPERT_MIX)
    cached = _PACKS.get(layer, {}).get((adapter, "sparse"))
    if cached is not None and cached[1] is args:
        call = lambda xf: kernel.sparse_decode(xf, *args, top_k, normalize, shared, SHARED_EXPERT_MIX)  # noqa: E731
        decode_fast.remember(layer, adapter, call, cached[0], lambda: MAX_SPARSE_KERNEL_TOKENS, _still_valid)
    return y


def _sparse_kernel_args(layer, adapter: str, deltas) -> tuple | None:
    """The sparse kernel's tensor arguments (base weights, router, values, indices, scales), or ``None`` where it does
    not apply (not a gated SiLU FFN, biases, not float32, not int32 indices); cached per layer until one of the modules
    or tensors it holds is replaced (the kernel reads their current values, so in-place updates need no rebuild)."""
    entry = _PACKS.get(layer, {}).get((adapter, "sparse"))
    if entry is not None and _still_valid(entry[0]):
        return entry[1]
    lay = layer.layout
    ins, out = [deltas[n] for n in lay.in_projs], deltas[lay.out_proj]
    weights = [layer.base_weight(adapter, n) for n in lay.projs]
    router = layer.ders_router[adapter].weight
    ok = (
        _kernel_layout_ok(layer, adapter)
        and all(t.dtype == torch.float32 for t in (router, *weights, *(d.weight for d in (*ins, out))))
        and all(d.indices.dtype == torch.int32 for d in (*ins, out))
    )
    args = None
    if ok:
        scales = [float(d.scale) for d in ins]
        ins_w, ins_i = [d.weight for d in ins], [d.indices for d in ins]
        args = (weights[:-1], weights[-1], router, ins_w, ins_i, scales, out.weight, out.indices, float(out.scale))
    sources = _base_sources(layer, adapter)
    if deltas is layer.ders_delta[adapter] and len(sources) == len(lay.projs):  # else: rebuilt every call
        sources += [(layer.ders_router[adapter]._parameters, "weight")]
        sources += [pair for d in (*ins, out) for pair in ((d._parameters, "weight"), (d._buffers, "indices"))]
        checks = _checks(layer, adapter, (*ins, out), sources, versioned=False)
        if checks is not None:
            _PACKS.setdefault(layer, {})[(adapter, "sparse")] = (checks, args)
    return args


def _lowrank(layer, adapter: str, config, pack: dict, x: torch.Tensor) -> torch.Tensor:
    y = _compiled(layer, adapter, config, pack, x)
    if y is not None:
        return y
    lay = layer.layout
    T = x.shape[0]
    n = pack["num_experts"]
    small = x @ pack["stacked"].t()  # (T, N + n_in * E*r): router logits, then z of every input projection
    idx, w = route_small(small[:, :n], config.top_k, config.normalize_top_k, config.shared_expert)
    S = idx.shape[1]
    w = w.to(x.dtype)
    flat_idx = idx.view(-1)
    mask = pack["mask"].index_select(0, flat_idx)  # (T*S, n_in * E*r): each slot keeps its expert's columns
    zm = (small[:, n:].repeat_interleave(S, dim=0) if T > 1 else small[:, n:]) * mask
    biases = _biases(layer, adapter)
    width = pack["width"]
    pres = []
    for j, name in enumerate(lay.in_projs):
        base = x @ layer.base_weight(adapter, name).t()  # (T, out)
        delta = zm[:, j * width : (j + 1) * width]
        if T == 1:
            pre = F.linear(delta, pack["b"][j], base[0])  # (S, out)
        else:
            pre = torch.addmm(base.repeat_interleave(S, dim=0), delta, pack["b"][j].t())  # (T*S, out)
        if name in biases:
            pre = pre + biases[name].index_select(0, flat_idx)
        pres.append(pre)
    h = _activate(pres, _plain(ffn.activation(layer.base_layer, lay)), lay.gated)  # (T*S, I)
    zd = (h @ pack["a_out_t"]) * mask[:, :width]  # (T*S, E*r)
    if T == 1:
        mixed, zd = w @ h, w @ zd  # (1, I), (1, E*r)
    else:
        mixed = torch.bmm(w.unsqueeze(1), h.view(T, S, -1)).squeeze(1)
        zd = torch.bmm(w.unsqueeze(1), zd.view(T, S, -1)).squeeze(1)
    y = torch.addmm(mixed @ layer.base_weight(adapter, lay.out_proj).t(), zd, pack["b_out_t"])
    if lay.out_proj in biases:
        y = y + (w.unsqueeze(-1) * biases[lay.out_proj][idx]).sum(dim=1)
    return y


def _per_slot_experts(layer, adapter: str, experts, idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor):
    lay = layer.layout
    act = _plain(ffn.activation(layer.base_layer, lay))
    biases = _biases(layer, adapter)
    rows = []
    for t, slots in enumerate(idx.tolist()):
        xt, yt = x[t : t + 1], None
        for s, e in enumerate(slots):
            pres = []
            for name in lay.in_projs:
                bias = biases[name][e] if name in biases else None
                pres.append(F.linear(xt, experts[name].weight[e], bias))
            h = _activate(pres, act, lay.gated)
            bias = biases[lay.out_proj][e] if lay.out_proj in biases else None
            out = F.linear(h, experts[lay.out_proj].weight[e], bias) * w[t, s]
            yt = out if yt is None else yt.add_(out)
        rows.append(yt)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _slot_positions(delta, flat_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output rows and input columns (int64) of each slot's expert, from the stored int32 indices: computed per call
    (a few slots) rather than cached for every expert, which would hold 16 bytes per kept entry for the model's
    life."""
    flat = delta.indices.index_select(0, flat_idx).long()
    return flat // delta.in_features, flat % delta.in_features


def _sparse(layer, adapter, deltas, weights, idx: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lay = layer.layout
    T, S = idx.shape
    flat_idx = idx.view(-1)
    biases = _biases(layer, adapter)
    xs = x.repeat_interleave(S, dim=0) if T > 1 else x.expand(S, -1)  # (T*S, hidden): each slot's input
    pres = []
    for name, weight in zip(lay.in_projs, weights[:-1], strict=True):
        delta = deltas[name]
        rows, cols = _slot_positions(delta, flat_idx)  # (T*S, nnz)
        values = delta.weight.index_select(0, flat_idx)
        if delta.scale != 1.0:
            values = values * delta.scale
        base = x @ weight.t()
        base = base.repeat_interleave(S, dim=0) if T > 1 else base.expand(S, -1)
        pre = base.scatter_add(1, rows, xs.gather(1, cols) * values)  # (T*S, out)
        if name in biases:
            pre = pre + biases[name].index_select(0, flat_idx)
        pres.append(pre)
    h = _activate(pres, _plain(ffn.activation(layer.base_layer, lay)), lay.gated)  # (T*S, I)
    delta = deltas[lay.out_proj]
    rows, cols = _slot_positions(delta, flat_idx)
    values = delta.weight.index_select(0, flat_idx) * w.reshape(-1, 1)  # router weight folded into the values
    if delta.scale != 1.0:
        values = values * delta.scale
    mixed = w @ h if T == 1 else torch.bmm(w.unsqueeze(1), h.view(T, S, -1)).squeeze(1)
    y = (mixed @ weights[-1].t()).scatter_add(1, rows.view(T, -1), (h.gather(1, cols) * values).view(T, -1))
    if lay.out_proj in biases:
        y = y + (w.unsqueeze(-1) * biases[lay.out_proj][idx]).sum(dim=1)
    return y
