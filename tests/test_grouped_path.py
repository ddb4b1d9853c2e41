"""The grouped training path (`ders_peft.grouped_path`: sparse deltas, biased low-rank deltas): the hand-written
backward, gather, CSR and dense modes, and what the routed layers never do (build every expert's dense matrix, run a
base projection per slot)."""

from __future__ import annotations

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model
from test_layer_reference import reference_layer_output
from torch.utils._python_dispatch import TorchDispatchMode

import ders_peft
from ders_peft import ffn, functional, grouped_path
from ders_peft.deltas import LowRankDelta, SparseDelta
from ders_peft.grouped_path import grouped_routed_ffn
from ders_peft.routing import route

SPARSE_MODES = {"gather": (1.0, 1.0), "csr": (0.0, 1.0), "dense": (0.0, 0.0)}  # (GATHER_DENSITY, DENSE_DENSITY)


def sparse_mode(monkeypatch, mode: str) -> None:
    """Force every sparse delta's products into ``mode`` (gather, csr or dense), whatever its density."""
    gather, dense = SPARSE_MODES[mode]
    monkeypatch.setattr(grouped_path, "GATHER_DENSITY", gather)
    monkeypatch.setattr(grouped_path, "DENSE_DENSITY", dense)


@pytest.mark.parametrize("mode", ["sparse-gather", "sparse-csr", "sparse-dense", "lowrank"])
@pytest.mark.parametrize(
    "gated,num_in,bias,act",
    [
        (True, 2, False, torch.nn.functional.silu),
        (True, 1, False, torch.nn.functional.silu),
        (True, 2, True, torch.nn.functional.gelu),  # gated non-SiLU (GeGLU): the backward's generic branch
        (False, 1, True, torch.nn.functional.gelu),
    ],
)
@pytest.mark.parametrize("num_slots", [1, 3])
@pytest.mark.parametrize("store_base", [True, False])
def test_slot_core_gradcheck(mode, gated, num_in, bias, act, num_slots, store_base, monkeypatch):
    """Double-precision gradcheck of the hand-written backward: x, router weights, base weights, delta tensors and
    biases; with the base products stored from forward and recomputed in backward."""
    if mode.startswith("sparse-"):
        sparse_mode(monkeypatch, mode.removeprefix("sparse-"))
    gen = torch.Generator().manual_seed(0)
    T, hidden, width, E = 7, 5, 4, 4
    outs = [width] * num_in if not (gated and num_in == 1) else [2 * width]
    if mode == "lowrank":
        deltas = [LowRankDelta(E, o, hidden, rank=2, generator=gen) for o in outs]
        deltas.append(LowRankDelta(E, hidden, width, rank=2, generator=gen))
    else:
        deltas = [SparseDelta(E, o, hidden, sparse_rate=0.6, generator=gen) for o in outs]
        deltas.append(SparseDelta(E, hidden, width, sparse_rate=0.6, generator=gen))
    logits = torch.randn(T, E, generator=gen)
    logits[:, 3] -= 100.0  # expert 3 receives no token
    plan, _ = route(logits, num_slots, normalize=False)
    order, _, counts = plan.sorted_slots()
    assert counts[3] == 0
    ops = [grouped_path.EXPERT_OPS[type(d)](d) for d in deltas]
    shapes = [p.shape for op, d in zip(ops, deltas, strict=True) for p in type(op).params_of(d)]
    num_params = tuple(len(type(op).params_of(d)) for op, d in zip(ops, deltas, strict=True))
    spec = grouped_path._Spec(
        act, gated, ffn.is_silu(act), ops, num_params, (bias,) * len(outs), order, counts, len(outs), store_base
    )

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    inputs = [rnd(T, hidden), rnd(T, num_slots), *(rnd(o, hidden) for o in outs), *(rnd(*shape) for shape in shapes)]
    inputs += [rnd(E, o) for o in outs] if bias else []
    assert torch.autograd.gradcheck(lambda *t: grouped_path._GroupedSlots.apply(spec, *t), inputs)


@pytest.mark.parametrize("family", ["llama", "phi", "phi3", "gpt2", "gemma"])
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_modes_agree_with_the_reference(family, shared, device, monkeypatch):
    """Gather, CSR and dense modes give the reference's output, input gradient and parameter gradients (plain autograd
    through the reference's explicitly synthesised experts)."""
    peft_model = get_peft_model(
        tiny_model(family),
        ders_peft.DeRSConfig(
            num_experts=4,
            top_k=2,
            delta_type="sparse",
            sparse_rate=0.9,
            shared_expert=shared,
            router_aux_loss_coef=0.0,  # its gradient would reach x too; the reference has none
        ),
    )
    randomize_adapter(peft_model, std=0.1)
    peft_model.to(device)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(3, 13, 32).to(device).requires_grad_()  # 39 tokens with gradients: the training path
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    probe = torch.randn(3, 13, 32).to(device)
    results = []
    for mode in SPARSE_MODES:
        sparse_mode(monkeypatch, mode)
        y = layer(x)
        results.append((y, torch.autograd.grad((y * probe).sum(), params)))
    (y_gather, g_gather), *others = results
    want = reference_layer_output(layer, x)
    g_want = torch.autograd.grad((want * probe).sum(), params)
    torch.testing.assert_close(y_gather, want, atol=1e-5, rtol=1e-5)
    for y_other, g_other in others:
        torch.testing.assert_close(y_other, want, atol=1e-5, rtol=1e-5)
        for a, b, c in zip(g_gather, g_other, g_want, strict=True):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-4)
    assert all(g.abs().max() > 0 for g in g_gather)  # every trainable tensor receives a gradient


class _OpLog(TorchDispatchMode):
    """Records the shapes of every op's new dense outputs (views of ``owned`` storages left out) and the (M, K, N) of
    every dense matmul."""

    def __init__(self, owned: set[int]) -> None:
        super().__init__()
        self.owned = owned
        self.shapes: set[tuple[int, ...]] = set()
        self.matmuls: list[tuple[int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                if t.untyped_storage().data_ptr() not in self.owned:
                    self.shapes.add(tuple(t.shape))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            if a.layout == torch.strided and b.layout == torch.strided:
                self.matmuls.append((a.shape[0], a.shape[1], b.shape[1]))
        return out


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
@pytest.mark.parametrize("family", ["llama", "phi"])
@pytest.mark.parametrize("shared", [False, True])
def test_no_expert_matrix_and_base_once_per_token(delta_type, family, shared, monkeypatch):
    """In a training step no dense per-expert weight matrix is built (sparse deltas up to ``DENSE_DENSITY``), and the
    base projections run on T rows (once per token; the down projection once, on the router-weighted mix), never on
    the T * top_k routed slots."""
    sparse_mode(monkeypatch, "csr")
    hidden, inter, num_experts, tokens = 32, 48, 4, 21
    cfg = ders_peft.DeRSConfig(
        num_experts=num_experts,
        top_k=2,
        delta_type=delta_type,
        rank=2,
        sparse_rate=0.5,
        shared_expert=shared,
        train_base=False,  # no base-weight gradients: every (inter, hidden) tensor would be an expert matrix
    )
    peft_model = get_peft_model(tiny_model(family), cfg)
    randomize_adapter(peft_model, std=0.1)
    layer = ders_layers(peft_model)[0]
    layer.train()
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    log = _OpLog({p.untyped_storage().data_ptr() for p in layer.parameters()})
    with log:
        layer(x).square().sum().backward()
    width = ffn.intermediate_size(layer.base_layer, layer.layout)
    assert width == inter
    matrices = {(inter, hidden), (hidden, inter)}
    forbidden = matrices | {(e, *m) for e in (num_experts, num_experts + 1) for m in matrices}
    assert not log.shapes & forbidden, sorted(log.shapes & forbidden)
    base_products = [
        mm for mm in log.matmuls if (mm[1], mm[2]) in {(hidden, inter), (hidden, 2 * inter), (inter, hidden)}
    ]
    assert base_products and all(m == tokens for m, _, _ in base_products), base_products


@pytest.mark.parametrize("family,num_experts,rank", [("llama", 20, 4), ("phi", 4, 2), ("gpt2", 3, 2)])
def test_grouped_low_rank_matches_the_reference(family, num_experts, rank, device, monkeypatch):
    """Low-rank deltas go grouped when the stacked factors are wide (experts x rank > 64) or the experts have input
    biases: output and input gradient equal the reference; parameter gradients equal the generic path's."""
    calls = []
    monkeypatch.setattr(functional, "grouped_routed_ffn", lambda *a: calls.append(1) or grouped_routed_ffn(*a))
    cfg = ders_peft.DeRSConfig(
        num_experts=num_experts, top_k=2, rank=rank, shared_expert=True, router_aux_loss_coef=0.0
    )
    peft_model = get_peft_model(tiny_model(family), cfg)
    randomize_adapter(peft_model, std=0.1)
    peft_model.to(device)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(3, 13, 32).to(device).requires_grad_()
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    probe = torch.randn(3, 13, 32).to(device)
    got = layer(x)
    assert calls
    grads = torch.autograd.grad((got * probe).sum(), params)
    want = reference_layer_output(layer, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (gx_want,) = torch.autograd.grad((want * probe).sum(), x)
    torch.testing.assert_close(grads[0], gx_want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(functional, "grouped_supports", lambda deltas: False)  # the generic path
    monkeypatch.setattr(functional, "STACKED_MAX_COLUMNS", 0)
    generic = torch.autograd.grad((layer(x) * probe).sum(), params)
    for a, b in zip(grads, generic, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", list(SPARSE_MODES))
def test_indices_in_any_order(mode, monkeypatch):
    """Sparse indices need not be sorted (a checkpoint may list them in any order): shuffling each expert's
    (index, value) pairs together changes neither the output nor the gradients (mapped back through the shuffle)."""
    sparse_mode(monkeypatch, mode)
    cfg = ders_peft.DeRSConfig(num_experts=3, top_k=2, delta_type="sparse", sparse_rate=0.7, router_aux_loss_coef=0.0)
    peft_model = get_peft_model(tiny_model("llama"), cfg)
    randomize_adapter(peft_model, std=0.1)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(2, 11, 32)
    deltas = list(layer.ders_delta["default"].values())

    def run():
        y = layer(x)
        return y.detach(), torch.autograd.grad(y.square().sum(), [d.weight for d in deltas])

    y_sorted, g_sorted = run()
    gen = torch.Generator().manual_seed(0)
    perms = []
    with torch.no_grad():
        for d in deltas:
            perm = torch.stack([torch.randperm(d.nnz, generator=gen) for _ in range(d.num_experts)])
            d.indices.copy_(d.indices.gather(1, perm))
            d.weight.copy_(d.weight.gather(1, perm))
            perms.append(perm)
    y_shuffled, g_shuffled = run()
    torch.testing.assert_close(y_shuffled, y_sorted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_shuffled, reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)
    for a, b, perm in zip(g_shuffled, g_sorted, perms, strict=True):
        torch.testing.assert_close(a, b.gather(1, perm), atol=1e-5, rtol=1e-5)


def test_inference_builds_no_transposed_layout_and_decode_caches_no_positions(monkeypatch):
    """Memory of a sparse model in generation (CSR mode): a no-grad call (prefill) builds only the forward CSR layout,
    decode caches no int64 positions; the transposed layout appears with the first backward."""
    monkeypatch.setattr(grouped_path, "DENSE_DENSITY", 1.0)
    model = get_peft_model(
        tiny_model("llama"), ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="sparse", sparse_rate=0.9)
    )
    randomize_adapter(model, std=0.1)
    delta = ders_layers(model)[1].ders_delta["default"]["up_proj"]  # block 1: its input needs a gradient
    assert delta.density > grouped_path.GATHER_DENSITY  # CSR mode
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        model(input_ids=ids)  # 40 tokens: the grouped path
        model(input_ids=ids[:, :3])  # 6 tokens: the decode path
    cache = delta.__dict__.get("_index_cache", {})
    assert "csr" in cache and "csr_t" not in cache and "positions" not in cache
    model(input_ids=ids, labels=ids).loss.backward()
    assert "csr_t" in delta.__dict__["_index_cache"]


def test_dense_mode_caches_no_layout_and_builds_one_expert_matrix_at_a_time():
    """Above ``DENSE_DENSITY`` (the default mode at 10% density) a training step caches no index layout and never
    builds a stacked ``(E, out, in)`` matrix: only one expert's ``(out * in,)`` scatter at a time."""
    assert grouped_path.GATHER_DENSITY < grouped_path.DENSE_DENSITY < 0.1
    hidden, inter, num_experts = 32, 48, 4
    cfg = ders_peft.DeRSConfig(
        num_experts=num_experts, top_k=2, delta_type="sparse", sparse_rate=0.9, train_base=False
    )
    model = get_peft_model(tiny_model("llama"), cfg)
    randomize_adapter(model, std=0.1)
    layer = ders_layers(model)[0]
    x = torch.randn(1, 21, hidden, requires_grad=True)
    log = _OpLog({p.untyped_storage().data_ptr() for p in layer.parameters()})
    with log:
        layer(x).square().sum().backward()
    assert (inter * hidden,) in log.shapes  # the scatter of one expert
    stacked = {(e, *m) for e in (num_experts, num_experts + 1) for m in ((inter, hidden), (hidden, inter))}
    stacked |= {(e, inter * hidden) for e in (num_experts, num_experts + 1)}
    assert not log.shapes & stacked, sorted(log.shapes & stacked)
    for delta in layer.ders_delta["default"].values():
        assert not delta.__dict__.get("_index_cache"), delta.__dict__.get("_index_cache")


@pytest.mark.parametrize("mode", ["csr", "dense"])
def test_dense_mode_recomputes_the_base_products_instead_of_saving_them(mode, monkeypatch):
    """From forward to backward the layer keeps its input, the router's tensors and the ``(T, I)`` mix, never a
    joined copy of the base weights; the ``(T, 2I)`` base products only where the deltas are sparse enough for them
    to matter (CSR mode), not in dense mode (recomputed in backward: see ``ExpertOp.dense_products``)."""
    sparse_mode(monkeypatch, mode)
    hidden, inter = 32, 48
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="sparse", sparse_rate=0.9)
    model = get_peft_model(tiny_model("llama"), cfg)
    randomize_adapter(model, std=0.1)
    layer = ders_layers(model)[0]
    x = torch.randn(1, 21, hidden, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: list[tuple[int, ...]] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (2 * inter, hidden) not in saved and (hidden, 2 * inter) not in saved  # no joined weight copy
    assert ((21, 2 * inter) in saved) == (mode == "csr"), saved
    want = reference_layer_output(layer, x.detach().requires_grad_())
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
