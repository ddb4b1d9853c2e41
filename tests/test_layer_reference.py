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


CASES = [(dt, shared, k) for dt in ("lowrank", "sparse", "full") for shared in (False, True) for k in (1, 2, 4)]


@pytest.mark.parametrize("path", ["decode", "train"])
@pytest.mark.parametrize("delta_type,shared,top_k", CASES)
def test_layer_matches_naive_reference(delta_type, shared, top_k, path):
    """decode: few tokens without autograd (``decode.layer_forward``); train: 39 tokens with gradients (the routed
    training path), the input gradient compared too."""
    model = tiny_model("llama")
    cfg = ders_peft.DeRSConfig(
        num_experts=4,
        top_k=top_k,
        delta_type=delta_type,
        rank=3,
        sparse_rate=0.5,
        shared_expert=shared,
        router_aux_loss_coef=0.0,  # its gradient would reach x too; the reference has none
    )
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    layer = ders_layers(peft_model)[0]
    if path == "decode":
        x = torch.randn(3, 5, 32)
        with torch.no_grad():
            got = layer(x)
    else:
        x = torch.randn(3, 13, 32, requires_grad=True)
        got = layer(x)
    want = reference_layer_output(layer, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - layer.base_layer(x)).abs().max() > 1e-3  # the deltas really changed the output
    if path == "train":
        probe = torch.randn_like(got)
        (g_got,) = torch.autograd.grad((got * probe).sum(), x)
        (g_want,) = torch.autograd.grad((want * probe).sum(), x)
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_without_tokens_and_padding(delta_type, shared, top_k):
    """Experts that get no token (the router sends every token to experts 1 and 2), in the training path and with
    left padding: the layer matches the reference, and a padded training step gives finite logits and gradients."""
    model = tiny_model("llama")
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=top_k, delta_type=delta_type, rank=2, shared_expert=shared)
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    for layer in ders_layers(peft_model):
        with torch.no_grad():
            layer.ders_router["default"].weight.zero_()
            layer.ders_router["default"].weight[2] = 5.0  # positive inputs: expert 2 first, then expert 1
            layer.ders_router["default"].weight[1] = 2.0
    layer = ders_layers(peft_model)[0]
    x = torch.abs(torch.randn(2, 12, 32)).requires_grad_()
    idx = torch.topk(x.reshape(-1, 32) @ layer.ders_router["default"].weight.t(), top_k).indices
    assert set(idx.unique().tolist()) <= {1, 2}  # experts 0 and 3 receive nothing
    got = layer(x)
    torch.testing.assert_close(got, reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()

    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    peft_model.train()
    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_padded_batch_matches_reference_modules():
    """With left padding and gradients on (the training path), every DeRS layer's output equals its naive reference:
    the padded model's logits are unchanged when each layer is replaced by the reference."""
    model = tiny_model("llama", layers=2)
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="sparse", sparse_rate=0.6, shared_expert=True)
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    got = peft_model(input_ids=ids, attention_mask=mask).logits
    handles = [
        layer.register_forward_hook(lambda mod, args, out: reference_layer_output(mod, args[0]))
        for layer in ders_layers(peft_model)
    ]
    want = peft_model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


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


def _init_state(seed: int, delta_type: str) -> dict[str, torch.Tensor]:
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type=delta_type, sparse_rate=0.9, seed=seed)
    peft_model = get_peft_model(tiny_model("llama"), cfg)
    return {k: v.clone() for k, v in peft_model.state_dict().items() if ".ders_" in k}


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
def test_initialisation_is_reproducible_from_the_seed(delta_type):
    """Router, low-rank A and sparse indices follow ``seed`` (same seed: identical; other seed: different), differ
    between experts and layers; B and sparse values start at zero; sparse indices are unique within each expert."""
    first, again, other = _init_state(0, delta_type), _init_state(0, delta_type), _init_state(1, delta_type)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    random_keys = [k for k in first if "ders_router" in k or "lora_a" in k or k.endswith("indices")]
    assert random_keys and all(not torch.equal(first[k], other[k]) for k in random_keys)
    layer0 = [k for k in random_keys if ".layers.0." in k]
    assert all(not torch.equal(first[k], first[k.replace(".layers.0.", ".layers.1.")]) for k in layer0)
    for key, value in first.items():
        if "lora_b" in key or (delta_type == "sparse" and ".ders_delta." in key and key.endswith(".weight")):
            assert value.abs().max() == 0, key
        if key.endswith("indices"):
            assert value.dtype == torch.int32
            assert all(row.unique().numel() == row.numel() for row in value), key
            assert not torch.equal(value[0], value[1])  # each expert has its own positions
        if "lora_a" in key:
            assert not torch.equal(value[:4], value[4:8])  # experts 0 and 1 (rank 4: 4 rows each) differ
