"""The chunked low-rank fast path of ``routed_ffn`` against the generic autograd path: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model

import ders_peft
from ders_peft import functional
from ders_peft.functional import _LowRankSlots


def _outputs_and_grads(peft_model, x):
    layer = ders_layers(peft_model)[0]
    params = [p for p in layer.parameters() if p.requires_grad]
    xx = x.clone().requires_grad_()
    y = layer(xx)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum(), [xx, *params])
    return y.detach(), grads


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])  # gemma: GeGLU, a gated non-SiLU activation
@pytest.mark.parametrize("shared,top_k,train_base", [(False, 2, True), (True, 1, False), (False, 3, True)])
def test_fast_path_matches_generic_path(monkeypatch, family, shared, top_k, train_base, device):
    model = tiny_model(family)
    cfg = ders_peft.DeRSConfig(
        num_experts=4, top_k=top_k, rank=3, shared_expert=shared, train_base=train_base, delta_scale=0.7
    )
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    peft_model.to(device).train()
    x = torch.randn(3, 7, 32).to(device)
    calls = []
    real = functional.lowrank_routed_ffn
    monkeypatch.setattr(functional, "lowrank_routed_ffn", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(functional, "SLOT_CHUNK_ELEMENTS", 300)  # several chunks and a ragged last one
    y_fast, g_fast = _outputs_and_grads(peft_model, x)
    assert calls, "the fast path was not used"
    monkeypatch.setattr(functional, "_lowrank_fast_path", lambda *a: False)
    y_ref, g_ref = _outputs_and_grads(peft_model, x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    assert len(g_fast) == len(g_ref)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_biased_mlp_does_not_take_the_fast_path(monkeypatch):
    """GPT-NeoX's MLP has biases: the low-rank fast path (which has none) must not be used."""
    peft_model = get_peft_model(tiny_model("gpt_neox"), ders_peft.DeRSConfig(num_experts=4, top_k=2, rank=3))
    randomize_adapter(peft_model, std=0.1)
    peft_model.train()
    calls = []
    real = functional.lowrank_routed_ffn
    monkeypatch.setattr(functional, "lowrank_routed_ffn", lambda *a: calls.append(1) or real(*a))
    _outputs_and_grads(peft_model, torch.randn(3, 7, 32))
    assert not calls


@pytest.mark.parametrize(
    "gated,num_in,act",
    [
        (True, 2, torch.nn.functional.silu),
        (True, 1, torch.nn.SiLU()),
        (False, 1, torch.nn.functional.silu),
        (True, 2, torch.nn.functional.gelu),  # not SiLU: the backward differentiates the activation by autograd
        (False, 1, torch.tanh),
    ],
)
@pytest.mark.parametrize("num_slots", [1, 3])
def test_slot_core_gradcheck(monkeypatch, gated, num_in, act, num_slots):
    """Double-precision gradcheck of the hand-written backward, with chunking (several chunks, a ragged last one)."""
    monkeypatch.setattr(functional, "SLOT_CHUNK_ELEMENTS", 40)
    gen = torch.Generator().manual_seed(0)
    S, T, E, r, inter = num_slots, 5, 3, 2, 4
    out_w = inter * (2 if gated and num_in == 1 else 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    idx = torch.randint(0, E, (T, S), generator=gen)
    mask = torch.nn.functional.one_hot(idx, E).double().repeat_interleave(r, dim=-1)  # (T, S, E*r)
    bs = [rnd(out_w, E * r) for _ in range(num_in)]

    def fn(weights, a_out, z, base, *bs):
        return _LowRankSlots.apply((act, gated), weights, mask, a_out, z, base, *bs)

    inputs = (rnd(T, S), rnd(E * r, inter), rnd(T, num_in * E * r), rnd(T, num_in * out_w), *bs)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backward_inside", [False, True])
def test_fast_path_under_bf16_autocast(monkeypatch, backward_inside, device):
    """TRL's SFTTrainer enables bf16 autocast (on CPU too): the fast path must run (and backpropagate, also inside
    the autocast region) and agree with the generic path to bf16 precision."""
    peft_model = get_peft_model(tiny_model("llama"), ders_peft.DeRSConfig(num_experts=4, top_k=2, rank=3))
    randomize_adapter(peft_model, std=0.1)
    peft_model.to(device).train()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def loss_and_grads():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
            if backward_inside:
                grads = torch.autograd.grad(loss, params)
        if not backward_inside:
            grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    calls = []
    real = functional.lowrank_routed_ffn
    monkeypatch.setattr(functional, "lowrank_routed_ffn", lambda *a: calls.append(1) or real(*a))
    loss_fast, g_fast = loss_and_grads()
    assert calls
    monkeypatch.setattr(functional, "_lowrank_fast_path", lambda *a: False)
    loss_ref, g_ref = loss_and_grads()
    torch.testing.assert_close(loss_fast, loss_ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert float((a - b).abs().max()) <= 0.05 * float(b.abs().max()) + 1e-6
