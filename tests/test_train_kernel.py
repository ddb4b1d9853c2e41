"""The compiled CPU training kernel of the low-rank layer (``ders_peft/kernels/train_cpu.cpp``): outputs and every
gradient against explicitly synthesised experts ``W_base + s B_e A_e``, against the Python path, and the kernel's own
per-slot math against a direct computation; used exactly where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model
from test_layer_reference import raw_expert_weights, reference_routing

import ders_peft
from ders_peft import ffn, kernels
from ders_peft.functional import reference_moe_ffn
from ders_peft.kernels import lowrank_train


@pytest.fixture
def kernel_on(built_kernels, monkeypatch):
    """Kernels enabled for one test; records every call of the training kernel's autograd Function."""
    monkeypatch.setitem(kernels._state, "enabled", True)
    calls: list[int] = []
    real = lowrank_train._Slots.apply
    monkeypatch.setattr(lowrank_train._Slots, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _layer(family="llama", dtype=torch.float32, **cfg_kw):
    cfg = ders_peft.DeRSConfig(
        **{"num_experts": 4, "top_k": 2, "rank": 4, "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0, **cfg_kw}
    )
    model = get_peft_model(tiny_model(family), cfg)
    randomize_adapter(model, std=0.1)
    model.to(dtype).train()
    return ders_layers(model)[0]


def _synthesised(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer as a naive MoE over explicitly synthesised experts, differentiable in every trainable tensor."""
    adapter = layer.active_adapters[0]
    idx, w = reference_routing(layer, adapter, x)
    weights, lay = raw_expert_weights(layer, adapter), layer.layout
    ins = [weights[n] for n in lay.in_projs]
    act = ffn.activation(layer.base_layer, lay)
    return reference_moe_ffn(x, idx, w, ins, weights[lay.out_proj], [None] * len(ins), None, act, lay.gated)


def _output_and_grads(fn, layer, x):
    params = [p for p in layer.parameters() if p.requires_grad]
    xx = x.clone().requires_grad_()
    y = fn(xx)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    return [y.detach(), *torch.autograd.grad((y * probe).sum(), [xx, *params])]


CASES = [
    ("llama", {}),
    ("llama", {"rank": 1, "num_experts": 8, "top_k": 1}),
    ("llama", {"shared_expert": True, "delta_scale": 2.0}),
    ("llama", {"normalize_top_k": False, "top_k": 3}),
    ("llama", {"rank": 8, "num_experts": 16}),  # 128 stacked columns: wider than the Python stacked path takes
    ("llama", {"rank": 16, "train_base": False}),
    ("phi3", {}),  # one fused gate_up_proj
    ("mistral", {"rank": 2, "delta_scale": 0.5}),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("family,cfg_kw", CASES)
def test_kernel_matches_synthesised_experts_and_python_path(family, cfg_kw, threads, kernel_on):
    layer = _layer(family, **cfg_kw)
    x = torch.randn(45, 32, generator=torch.Generator().manual_seed(4))  # 45 tokens: ragged per-thread blocks
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _output_and_grads(layer, layer, x)
    finally:
        torch.set_num_threads(before)
    assert kernel_on == [1]
    want = _output_and_grads(lambda t: _synthesised(layer, t), layer, x)
    kernels.disable_cpu_kernels()
    python_path = _output_and_grads(layer, layer, x)
    assert kernel_on == [1]
    assert len(got) == len(want) == len(python_path)
    for a, b, c in zip(got, want, python_path, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "family,dtype,cfg_kw,why",
    [
        ("gpt_neox", torch.float32, {}, "per-expert biases"),
        ("gpt2", torch.float32, {}, "not a gated FFN"),
        ("gemma", torch.float32, {}, "GeGLU, not SiLU"),
        ("llama", torch.bfloat16, {}, "not float32"),
        ("llama", torch.float32, {"rank": 3}, "a rank the kernel is not compiled for"),
    ],
)
def test_kernel_not_used_where_it_does_not_apply(family, dtype, cfg_kw, why, kernel_on):
    layer = _layer(family, dtype=dtype, **cfg_kw)
    x = torch.randn(6, 32, dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()
    assert kernel_on == [], why
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_not_used_under_bf16_autocast(kernel_on):
    layer = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(6, 32, requires_grad=True)).float().sum().backward()
    assert kernel_on == []


def _direct(base, z, og, ou, idx, w, bg, bu, a):
    """The kernel's per-slot math written out with plain tensor operations (autograd for the backward)."""
    T, S = idx.shape
    E, R, inter = bg.shape
    mixed, z_out = torch.zeros(T, inter), torch.zeros(T, E * R)
    for s in range(S):
        e = idx[:, s]
        cols = e.unsqueeze(1) * R + torch.arange(R)
        g = base[:, :inter] + torch.einsum("tk,tki->ti", z.gather(1, og + cols), bg[e])
        u = base[:, inter:] + torch.einsum("tk,tki->ti", z.gather(1, ou + cols), bu[e])
        h = F.silu(g) * u
        mixed = mixed + w[:, s : s + 1] * h
        zd = torch.einsum("ti,tki->tk", h, a[e])
        z_out = z_out.scatter_add(1, cols, w[:, s : s + 1] * zd)
    return mixed, z_out


@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_kernel_math_against_a_direct_computation(fused_gate_up, built_kernels):
    """Pre-activations from -120 to 120 (SiLU's exponential saturates and clamps there), rank 4, a repeated expert."""
    gen = torch.Generator().manual_seed(0)
    T, S, E, R, inter = 23, 3, 5, 4, 37
    Z = E * R if fused_gate_up else 2 * E * R
    og, ou = 0, (0 if fused_gate_up else E * R)
    base = (torch.rand(T, 2 * inter, generator=gen) - 0.5) * 240
    z = torch.randn(T, Z, generator=gen)
    idx = torch.randint(0, E, (T, S), generator=gen)
    idx[0] = 2  # the same expert in every slot of one token
    w = torch.rand(T, S, generator=gen)
    bg, bu, a = (torch.randn(E, R, inter, generator=gen) * 0.3 for _ in range(3))
    inputs = [t.requires_grad_() for t in (base, z, w, bg, bu, a)]
    mixed, z_out = _direct(base, z, og, ou, idx, w, bg, bu, a)
    d_mixed, d_z_out = torch.randn(T, inter, generator=gen), torch.randn(T, E * R, generator=gen)
    want = torch.autograd.grad((mixed * d_mixed).sum() + (z_out * d_z_out).sum(), inputs)
    with torch.no_grad():
        k_mixed, k_z_out, z_slots = built_kernels.lowrank_slots_forward(base, z, og, ou, idx, w, bg, bu, a, R)
        d_w, d_z, d_base, d_bg, d_bu, d_a = built_kernels.lowrank_slots_backward(
            d_mixed, d_z_out, base, z, og, ou, idx, w, bg, bu, a, z_slots, R
        )
    # values reach 1e4 here (pre-activations of 120): fp32 sums in another order differ by ~1e-6 of that scale
    pairs = [(k_mixed, mixed), (k_z_out, z_out), *zip((d_base, d_z, d_w, d_bg, d_bu, d_a), want, strict=True)]
    for got, ref in pairs:
        ref = ref.detach()
        torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)


def test_kernel_refuses_an_uncompiled_rank(built_kernels):
    t = torch.zeros(2, 6)
    factors = torch.zeros(1, 3, 3)
    with pytest.raises(RuntimeError, match="rank must be 1, 2, 4, 8 or 16, got 3"):
        built_kernels.lowrank_slots_forward(t, t, 0, 0, torch.zeros(2, 1, dtype=torch.long), t[:, :1].clone(),
                                            factors, factors, factors, 3)
