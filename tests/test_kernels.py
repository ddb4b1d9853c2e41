"""The optional compiled CPU decode kernel (`ders_peft.kernels`): the same outputs as the explicitly synthesised
experts and as the Python decode path, used exactly where it applies, and clear errors where it cannot be built."""

from __future__ import annotations

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model
from test_layer_reference import reference_layer_output

import ders_peft
from ders_peft import decode, kernels


@pytest.fixture
def built(built_kernels):
    return built_kernels


@pytest.fixture
def kernel_on(built, monkeypatch):
    """The kernel enabled for one test; records whether each decode call of a low-rank or sparse layer went through
    it."""
    monkeypatch.setitem(kernels._state, "enabled", True)
    used: list[bool] = []

    def spy(real):
        def wrapped(*args):
            out = real(*args)
            used.append(out is not None)
            return out

        return wrapped

    monkeypatch.setattr(decode, "_compiled", spy(decode._compiled))
    monkeypatch.setattr(decode, "_compiled_sparse", spy(decode._compiled_sparse))
    return used


def _layer(family="llama", dtype=torch.float32, **cfg_kw):
    cfg = ders_peft.DeRSConfig(**{"num_experts": 4, "top_k": 2, "delta_type": "lowrank", "rank": 3, **cfg_kw})
    model = get_peft_model(tiny_model(family), cfg).eval()
    randomize_adapter(model, std=0.1)
    return model.to(dtype), ders_layers(model.to(dtype))[0]


CASES = [
    ("llama", {}),
    ("llama", {"shared_expert": True, "delta_scale": 2.0}),  # the universal FFN at weight 0.5, scaled deltas
    ("llama", {"normalize_top_k": False, "top_k": 3}),
    ("llama", {"top_k": 1, "num_experts": 8, "rank": 1}),
    ("phi3", {}),  # fused gate_up_proj
    ("mistral", {"rank": 5}),
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.5}),
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.99, "shared_expert": True, "delta_scale": 0.5}),
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.9, "normalize_top_k": False, "top_k": 3}),
    ("phi3", {"delta_type": "sparse", "sparse_rate": 0.8}),  # fused gate_up_proj
]


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("family,cfg_kw", CASES)
def test_kernel_matches_reference_and_python_path(family, cfg_kw, tokens, kernel_on):
    _, layer = _layer(family, **cfg_kw)
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        got = layer(x)
        assert kernel_on == [True]
        want = reference_layer_output(layer, x)
        kernels.disable_cpu_kernels()
        python_path = layer(x)
    assert kernel_on == [True, False]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, python_path, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
@pytest.mark.parametrize(
    "family,dtype,why",
    [
        ("phi", torch.float32, "per-expert biases"),
        ("gpt2", torch.float32, "not a gated FFN"),
        ("gemma", torch.float32, "GeGLU, not SiLU"),
        ("llama", torch.bfloat16, "not float32"),
    ],
)
def test_kernel_not_used_where_it_does_not_apply(family, dtype, why, delta_type, kernel_on):
    _, layer = _layer(family, dtype=dtype, delta_type=delta_type, sparse_rate=0.7)
    x = torch.randn(1, 2, 32, dtype=dtype)
    with torch.no_grad():
        got = layer(x)
    assert kernel_on == [False], why
    with torch.no_grad():
        want = reference_layer_output(layer, x)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
def test_generation_gives_the_same_tokens(delta_type, kernel_on):
    model, _ = _layer("llama", delta_type=delta_type, sparse_rate=0.9)
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        with_kernel = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        assert kernel_on and all(kernel_on)  # every decode step of both layers
        kernels.disable_cpu_kernels()
        without = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(with_kernel, without)


def test_environment_variable_enables_at_first_decode_call(built, monkeypatch):
    monkeypatch.setitem(kernels._state, "enabled", None)
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    assert kernels.decode_kernel() is built and kernels.cpu_kernels_enabled()
    monkeypatch.setitem(kernels._state, "enabled", None)
    monkeypatch.setenv(kernels.ENV_VAR, "0")
    assert kernels.decode_kernel() is None and not kernels.cpu_kernels_enabled()


def test_missing_compiler_is_named_and_the_env_var_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setitem(kernels._state, "module", None)
    monkeypatch.setitem(kernels._state, "enabled", None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match=r"C\+\+ compiler: '/nonexistent/c\+\+' \(the CXX variable\)"):
        kernels.enable_cpu_kernels()
    monkeypatch.setenv(kernels.ENV_VAR, "1")
    with pytest.warns(UserWarning, match="could not be built"):
        assert kernels.decode_kernel() is None
    _, layer = _layer("llama")
    x = torch.randn(1, 1, 32)
    with torch.no_grad():  # the Python decode path still answers
        torch.testing.assert_close(layer(x), reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)


def test_sparse_kernel_arguments_follow_replaced_and_updated_tensors(kernel_on):
    """The sparse kernel's cached arguments: values changed in place are read as they are now; a replaced value
    parameter, index buffer, delta module or base weight is noticed (each output against the explicitly synthesised
    experts)."""
    _, layer = _layer("llama", delta_type="sparse", sparse_rate=0.8)
    deltas = layer.ders_delta["default"]
    x = torch.randn(1, 1, 32)

    def check():
        with torch.no_grad():
            got = layer(x)
            want = reference_layer_output(layer, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return got

    outs = [check()]
    with torch.no_grad():
        deltas["gate_proj"].weight.mul_(-2.0)  # an optimizer step between generations
    outs.append(check())
    deltas["up_proj"].weight = torch.nn.Parameter(deltas["up_proj"].weight.detach() * 3.0)  # load with assign=True
    outs.append(check())
    deltas["down_proj"].indices = deltas["down_proj"].indices.flip(0).clone()
    outs.append(check())
    deltas["up_proj"] = type(deltas["up_proj"])(4, 48, 32, sparse_rate=0.5, init="small", init_std=0.2)
    outs.append(check())
    base = layer.ders_base["default"].gate_proj
    base.weight = torch.nn.Parameter(base.weight.detach() * 0.5)
    outs.append(check())
    assert kernel_on and all(kernel_on)
    assert all((b - a).abs().max() > 1e-4 for a, b in zip(outs, outs[1:]))


def test_sparse_prefill_takes_the_kernel_up_to_its_limit(kernel_on, monkeypatch):
    """Sparse layers use the kernel for prefill-sized inputs too (more than ``MAX_DECODE_TOKENS`` tokens, up to
    ``MAX_SPARSE_KERNEL_TOKENS``), with the reference's outputs; longer inputs, and low-rank layers above
    ``MAX_DECODE_TOKENS``, keep the general path."""
    monkeypatch.setattr(decode, "MAX_SPARSE_KERNEL_TOKENS", 40)
    _, sparse = _layer("llama", delta_type="sparse", sparse_rate=0.8)
    _, lowrank = _layer("llama")
    for layer, tokens in ((sparse, 40), (sparse, 41), (lowrank, 17)):
        x = torch.randn(1, tokens, 32)
        with torch.no_grad():
            got, want = layer(x), reference_layer_output(layer, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert kernel_on == [True]


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse"])
def test_remembered_kernel_call_serves_repeated_steps_and_notices_every_change(delta_type, kernel_on, monkeypatch):
    """After the kernel served a decode call, the next ones replay it (``decode_fast``: the layer's full path is not
    entered); each change that would alter the output or the path is noticed, and the output is then the
    reference's (or the base model's, adapters disabled)."""
    model, layer = _layer("llama", delta_type=delta_type, sparse_rate=0.8)
    full_path = []
    real = decode.layer_forward
    monkeypatch.setattr(decode, "layer_forward", lambda *a: full_path.append(1) or real(*a))
    x = torch.randn(1, 2, 32)

    def step(want_full: bool):
        before = len(full_path)
        with torch.no_grad():
            got = layer(x)
            want = reference_layer_output(layer, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (len(full_path) > before) == want_full
        return got

    outs = [step(True)]
    torch.testing.assert_close(step(False), outs[0], atol=0, rtol=0)  # a replay gives the very same output
    deltas = layer.ders_delta["default"]
    with torch.no_grad():  # an optimizer step between generations
        next(deltas["gate_proj"].parameters()).mul_(-3.0)
    outs.append(step(delta_type == "lowrank"))  # the low-rank pack holds derived copies; sparse reads live values
    layer.ders_settings["default"].top_k = 1
    outs.append(step(True))
    layer.ders_settings["default"].top_k = 2
    outs.append(step(True))
    kernels.disable_cpu_kernels()
    step(True)
    assert kernel_on[-1] is False
    monkeypatch.setitem(kernels._state, "enabled", True)
    step(False)  # the same kernel again: the remembered call still holds
    with model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    step(False)
    limits = decode.MAX_DECODE_TOKENS, decode.MAX_SPARSE_KERNEL_TOKENS
    monkeypatch.setattr(decode, "MAX_DECODE_TOKENS", 1)  # more tokens than the kernel takes: the full path
    monkeypatch.setattr(decode, "MAX_SPARSE_KERNEL_TOKENS", 1)
    step(True)
    monkeypatch.setattr(decode, "MAX_DECODE_TOKENS", limits[0])
    monkeypatch.setattr(decode, "MAX_SPARSE_KERNEL_TOKENS", limits[1])
    step(False)
    y = layer(x)  # gradient enabled: the general (training) path
    assert y.requires_grad
    assert all((b - a).abs().max() > 1e-4 for a, b in zip(outs, outs[1:])), "every change moved the output"


def test_remembered_kernel_call_follows_the_active_adapter(kernel_on):
    """Switching adapters (``set_adapter``) leaves the remembered call unused: each step gives the active adapter's
    reference output."""
    model, layer = _layer("llama")
    model.add_adapter("other", ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="lowrank", rank=2))
    randomize_adapter(model, std=0.1)
    x = torch.randn(1, 1, 32)
    outs = {}
    for name in ("default", "other", "default"):
        model.set_adapter(name)
        for _ in range(2):
            with torch.no_grad():
                got, want = layer(x), reference_layer_output(layer, x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        outs.setdefault(name, got)
    assert (outs["default"] - outs["other"]).abs().max() > 1e-4
    assert all(kernel_on)
