"""The routed layer against a naive MoE whose expert weights are synthesised explicitly (W_base + Delta_e)."""

from __future__ import annotations

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model

import ders_peft
from ders_peft import ffn
from ders_peft.functional import reference_moe_ffn


def reference_layer_output(layer, x: torch.Tensor) -> torch.Tensor:
    """Naive output of a DeRS layer: route independently, then loop over explicitly synthesised experts."""
    adapter = layer.active_adapters[0]
    cfg = layer.ders_settings[adapter]
    xf = x.reshape(-1, x.shape[-1])
    logits = xf @ layer.ders_router[adapter].weight.t()
    probs = torch.softmax(logits, dim=-1)
    w, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.normalize_top_k:
        w = w / w.sum(-1, keepdim=True)
    if cfg.shared_expert:
        idx = torch.cat([idx, torch.full_like(idx[:, :1], cfg.num_experts)], 1)
        w = torch.cat([w, torch.ones_like(w[:, :1])], 1) * 0.5
    weights = layer.expert_weights(adapter)
    biases = layer.expert_biases(adapter)
    lay = layer.layout
    y = reference_moe_ffn(
        xf,
        idx,
        w,
        [weights[n] for n in lay.in_projs],
        weights[lay.out_proj],
        [biases[n] for n in lay.in_projs],
        biases[lay.out_proj],
        ffn.activation(layer.base_layer, lay),
        lay.gated,
    )
    return y.view(*x.shape[:-1], -1)


CASES = [
    (dt, shared, k)
    for dt in ("lowrank", "sparse", "full")
    for shared in (False, True)
    for k in (1, 2, 4)
]


@pytest.mark.parametrize("delta_type,shared,top_k", CASES)
def test_layer_matches_naive_reference(delta_type, shared, top_k):
    model = tiny_model("llama")
    cfg = ders_peft.DeRSConfig(
        num_experts=4, top_k=top_k, delta_type=delta_type, rank=3, sparse_rate=0.5, shared_expert=shared
    )
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        got = layer(x)
        want = reference_layer_output(layer, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - layer.base_layer(x)).abs().max() > 1e-3  # the deltas really changed the output


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
@pytest.mark.parametrize("family", ["phi", "gpt2", "phi3"])
def test_layer_reference_other_layouts(family, delta_type):
    """Biased (Phi, GPT-2 Conv1D) and fused gate_up (Phi-3) layouts, gradients included."""
    model = tiny_model(family)
    cfg = ders_peft.DeRSConfig(num_experts=3, top_k=2, delta_type=delta_type, rank=2, sparse_rate=0.7)
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(2, 6, 32)
    got = layer(x)
    want = reference_layer_output(layer, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sparse_gather_and_dense_paths_agree(monkeypatch):
    """Both SparseDelta forward paths (gather for very sparse, dense scatter for denser) give the same numbers."""
    model = tiny_model("llama")
    peft_model = get_peft_model(
        model, ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="sparse", sparse_rate=0.9)
    )
    randomize_adapter(peft_model, std=0.1)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(4, 8, 32, requires_grad=True)
    monkeypatch.setattr(ders_peft.SparseDelta, "gather_density", 1.0)  # force gather
    y_gather = layer(x)
    (g_gather,) = torch.autograd.grad(y_gather.square().sum(), x)
    monkeypatch.setattr(ders_peft.SparseDelta, "gather_density", 0.0)  # force dense
    y_dense = layer(x)
    (g_dense,) = torch.autograd.grad(y_dense.square().sum(), x)
    torch.testing.assert_close(y_gather, y_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_gather, g_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_dense, reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)


def test_expert_without_tokens_and_padding():
    """A batch in which some experts get no token (router biased to one expert), with left padding: no NaN."""
    model = tiny_model("llama")
    peft_model = get_peft_model(model, ders_peft.DeRSConfig(num_experts=4, top_k=1, delta_type="sparse"))
    randomize_adapter(peft_model, std=0.1)
    for layer in ders_layers(peft_model):
        with torch.no_grad():
            layer.ders_router["default"].weight.zero_()
            layer.ders_router["default"].weight[2] = 5.0  # every token positive-sum -> expert 2 mostly
    x = torch.abs(torch.randn(1, 4, 32))
    layer = ders_layers(peft_model)[0]
    torch.testing.assert_close(layer(x), reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    peft_model.train()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
@pytest.mark.parametrize("shared", [False, True])
def test_initial_model_equals_dense(delta_type, shared):
    """At creation the upcycled model computes the dense model (full: identical experts, random router)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        dense = model(ids).logits
    peft_model = get_peft_model(
        model, ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type=delta_type, shared_expert=shared)
    )
    with torch.no_grad():
        up = peft_model(ids).logits
    torch.testing.assert_close(up, dense, atol=1e-5, rtol=1e-5)


def test_whole_model_matches_reference_modules():
    """Replacing every DeRS layer by its naive reference gives the same logits."""
    model = tiny_model("qwen2", layers=3)
    peft_model = get_peft_model(model, ders_peft.DeRSConfig(num_experts=4, top_k=2, rank=2, shared_expert=True))
    randomize_adapter(peft_model, std=0.1)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        got = peft_model(ids).logits
        handles = [
            layer.register_forward_hook(lambda mod, args, out: reference_layer_output(mod, args[0]))
            for layer in ders_layers(peft_model)
        ]
        want = peft_model(ids).logits
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
