"""The routed layer against a naive MoE whose expert weights are synthesised explicitly (W_base + Delta_e)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close_bf16
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model

import ders_peft
from ders_peft import decode, ffn, functional
from ders_peft.deltas import FullDelta, LowRankDelta, SparseDelta
from ders_peft.functional import reference_moe_ffn


def raw_expert_weights(layer, adapter: str) -> dict[str, torch.Tensor] | None:
    """Every expert's weight ``(E, out, in)`` synthesised here from the raw trainable tensors, independently of
    ``Delta.materialize``/``synthesize``: ``W_base + s * B_e A_e`` (low-rank), ``W_base + s * scatter(I_e, V_e)``
    (sparse), ``W_e`` (full), ``s`` the config's ``delta_scale``; connected to autograd. ``None`` for other kinds."""
    s = layer.ders_settings[adapter].delta_scale
    out = {}
    for name, delta in layer.ders_delta[adapter].items():
        E, o, i = delta.num_experts, delta.out_features, delta.in_features
        if type(delta) is FullDelta:
            out[name] = delta.weight
            continue
        if type(delta) is LowRankDelta:
            a = delta.lora_a.weight.view(E, delta.rank, i)
            b = delta.lora_b.weight.view(o, E, delta.rank)
            d = torch.einsum("oer,eri->eoi", b, a)
        elif type(delta) is SparseDelta:
            d = torch.zeros(E, o * i, dtype=delta.weight.dtype, device=delta.weight.device)
            d = d.scatter(1, delta.indices.long(), delta.weight).view(E, o, i)
        else:
            return None
        out[name] = layer.base_weight(adapter, name).unsqueeze(0) + s * d
    return out


def reference_routing(layer, adapter: str, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert indices and weights ``(T, S)`` of tokens ``xf``, computed independently of ``ders_peft.routing``:
    softmax, top-k, optional renormalisation, the universal expert at weight 0.5 (differentiable in the router)."""
    cfg = layer.ders_settings[adapter]
    probs = torch.softmax(xf @ layer.ders_router[adapter].weight.t(), dim=-1)
    w, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.normalize_top_k:
        w = w / w.sum(-1, keepdim=True)
    if cfg.shared_expert:
        idx = torch.cat([idx, torch.full_like(idx[:, :1], cfg.num_experts)], 1)
        w = torch.cat([w, torch.ones_like(w[:, :1])], 1) * 0.5
    return idx, w


def reference_layer_output(layer, x: torch.Tensor) -> torch.Tensor:
    """Naive output of a DeRS layer: route independently, then loop over explicitly synthesised experts."""
    adapter = layer.active_adapters[0]
    xf = x.reshape(-1, x.shape[-1])
    idx, w = reference_routing(layer, adapter, xf)
    weights = raw_expert_weights(layer, adapter) or layer.expert_weights(adapter)
    own = layer.ders_bias[adapter] if adapter in layer.ders_bias else {}
    biases = {n: own[n].weight if n in own else None for n in layer.layout.projs}
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
def test_layer_matches_naive_reference(delta_type, shared, top_k, path, device, monkeypatch):
    """decode: few tokens without autograd (``decode.layer_forward`` really answers: one token for full deltas, whose
    decode path needs no more slots than experts); train: 39 tokens with gradients (the routed training path), the
    input gradient compared too. On every device of ``conftest.DEVICES``."""
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
    peft_model.to(device)
    layer = ders_layers(peft_model)[0]
    if path == "decode":
        answered = []
        real = decode.layer_forward
        monkeypatch.setattr(decode, "layer_forward", lambda *a: answered.append(real(*a)) or answered[-1])
        x = (torch.randn(1, 1, 32) if delta_type == "full" else torch.randn(3, 5, 32)).to(device)
        with torch.no_grad():
            got = layer(x)
        assert len(answered) == 1 and answered[0] is not None, "the decode path was not taken"
    else:
        x = torch.randn(3, 13, 32).to(device).requires_grad_()
        got = layer(x)
    assert got.device.type == device.type
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
@pytest.mark.parametrize("family", ["phi", "gpt2", "phi3", "llama_mlp_bias", "gemma"])
def test_layer_reference_other_layouts(family, delta_type, device):
    """Biased (Phi, GPT-2 Conv1D, Llama ``mlp_bias=True``: one bias per expert), fused gate_up (Phi-3) and gated
    non-SiLU (Gemma's GeGLU) layouts, gradients included: the input gradient against the reference's, and every
    parameter gradient against plain autograd through the reference."""
    model = tiny_model("llama", mlp_bias=True) if family == "llama_mlp_bias" else tiny_model(family)
    cfg = ders_peft.DeRSConfig(
        num_experts=3, top_k=2, delta_type=delta_type, rank=2, sparse_rate=0.7, router_aux_loss_coef=0.0
    )
    peft_model = get_peft_model(model, cfg)
    randomize_adapter(peft_model, std=0.1)
    peft_model.to(device)
    layer = ders_layers(peft_model)[0]
    x = torch.randn(2, 6, 32).to(device).requires_grad_()
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    probe = torch.randn(2, 6, 32).to(device)
    got = layer(x)
    want = reference_layer_output(layer, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad((got * probe).sum(), params)
    g_want = torch.autograd.grad((want * probe).sum(), params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_want, strict=True):
        assert b is not None and a.abs().max() > 0, p.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if family == "llama_mlp_bias":
        assert {n for n in layer.layout.projs if n in layer.ders_bias["default"]} == set(layer.layout.projs)
        assert all(b.weight.shape[0] == 3 for b in layer.ders_bias["default"].values())  # one bias per expert


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


def test_sparse_indices_are_the_generators_permutation_prefix():
    """Each expert's indices are the first ``nnz`` entries of one ``randperm(numel)`` draw, sorted (the int64 draw,
    computed directly here), so saved adapters and seeds keep their positions; too large a matrix is refused."""
    delta = SparseDelta(3, 24, 40, sparse_rate=0.9, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    expected = torch.stack([torch.randperm(24 * 40, generator=gen)[: delta.nnz].sort().values for _ in range(3)])
    assert delta.indices.dtype == torch.int32 and delta.nnz == 96
    assert torch.equal(delta.indices.long(), expected)
    with pytest.raises(ValueError, match=r"\(65536, 32768\) matrix .* int32"):
        SparseDelta(1, 65536, 32768, sparse_rate=0.9, device="meta")


@pytest.mark.parametrize("path", ["decode", "train"])
@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_delta_scale_scales_the_deltas(delta_type, scale, path):
    """``delta_scale=s`` computes the experts ``W_base + s * B_e A_e`` / ``W_base + s * scatter(I_e, V_e)``: the
    reference synthesises them from the raw tensors (not through ``Delta.materialize``), and a layer with scale 1
    whose B (or values) is multiplied by ``s`` gives the same output."""
    outputs = []
    for s in (scale, 1.0):
        cfg = ders_peft.DeRSConfig(
            num_experts=4, top_k=2, delta_type=delta_type, rank=3, sparse_rate=0.5, delta_scale=s,
            router_aux_loss_coef=0.0,
        )  # fmt: skip
        peft_model = get_peft_model(tiny_model("llama"), cfg)
        randomize_adapter(peft_model, std=0.1)
        layer = ders_layers(peft_model)[0]
        if s == 1.0:  # fold the scale into the raw tensors instead
            with torch.no_grad():
                for delta in layer.ders_delta["default"].values():
                    (delta.lora_b.weight if delta_type == "lowrank" else delta.weight).mul_(scale)
        x = torch.randn(3, 5 if path == "decode" else 13, 32, generator=torch.Generator().manual_seed(2))
        with torch.set_grad_enabled(path == "train"):
            got = layer(x)
            want = reference_layer_output(layer, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        outputs.append(got.detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    assert (outputs[0] - layer.base_layer(x)).abs().max() > 1e-3  # the scaled deltas really changed the output


# (delta_type, path, autocast_adapter_dtype): a bf16 model's adapters upcast to fp32 (peft's default: the grouped
# path, whole experts in fp32) or kept in bf16 (the low-rank fast path, and the decode paths)
BF16_CASES = [
    ("lowrank", "train", True),
    ("sparse", "train", True),
    ("full", "train", True),
    ("lowrank", "train", False),
    ("lowrank", "decode", False),
    ("sparse", "decode", False),
]


@pytest.mark.parametrize("delta_type,path,upcast", BF16_CASES)
def test_layer_bf16_matches_fp32_reference(delta_type, path, upcast, device, monkeypatch):
    """A bf16 model's DeRS layer against the naive reference run in fp32 on the same (bf16-rounded) weights: output,
    input gradient and every parameter gradient within ``conftest.BF16_REL_TOL`` of the reference's scale."""
    cfg = ders_peft.DeRSConfig(
        num_experts=4, top_k=2, delta_type=delta_type, rank=3, sparse_rate=0.5, router_aux_loss_coef=0.0
    )
    peft_model = get_peft_model(tiny_model("llama").to(torch.bfloat16), cfg, autocast_adapter_dtype=upcast)
    randomize_adapter(peft_model, std=0.1)
    peft_model.to(device)
    layer = ders_layers(peft_model)[0]
    ref = copy.deepcopy(layer).float()
    answered, fast = [], []
    real = decode.layer_forward
    monkeypatch.setattr(decode, "layer_forward", lambda *a: answered.append(real(*a)) or answered[-1])
    real_fast = functional.lowrank_routed_ffn
    monkeypatch.setattr(functional, "lowrank_routed_ffn", lambda *a: fast.append(1) or real_fast(*a))
    x32 = torch.randn(3, 5 if path == "decode" else 13, 32).to(device).bfloat16().float()
    x = x32.bfloat16().requires_grad_(path == "train")
    with torch.set_grad_enabled(path == "train"):
        got = layer(x)
        want = reference_layer_output(ref, x32.requires_grad_(path == "train"))
    assert got.dtype == torch.bfloat16
    assert (answered[0] is not None) == (path == "decode")
    assert bool(fast) == (delta_type == "lowrank" and path == "train")  # fp32 or bf16 adapters: the fast path
    errors = [assert_close_bf16(got, want)]
    assert (want - ref.base_layer(x32)).abs().max() > 1e-2  # the deltas matter at this tolerance
    if path == "train":
        probe = torch.randn(got.shape).to(device)
        params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        ref_params = dict(ref.named_parameters())
        g_got = torch.autograd.grad((got.float() * probe).sum(), [x, *(p for _, p in params)])
        g_want = torch.autograd.grad((want * probe).sum(), [x32, *(ref_params[n] for n, _ in params)])
        for name, a, b in zip(["x", *(n for n, _ in params)], g_got, g_want, strict=True):
            errors.append(assert_close_bf16(a, b, name))
    grads = max(errors[1:], default=0.0)
    print(f"bf16 {delta_type}/{path}/upcast={upcast}: output {errors[0]:.4f}, gradients {grads:.4f}")  # -s shows it
