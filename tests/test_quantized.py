"""Quantized deltas (`ders_peft.packing`, `QuantizedDelta`, `grouped_path.QuantizedOp`): bit packing, quantization
error, the routed layer against a naive MoE whose experts are decoded independently (numpy bit unpacking and the
known levels), the scales' gradients, saving and loading, merging and export, no (E, out, in) tensor in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ders_testing import ders_layers, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_grouped_path import _OpLog
from test_layer_reference import reference_layer_output
from transformers import AutoModelForCausalLM

import ders_peft
from ders_peft import ffn, functional, grouped_path, packing
from ders_peft.deltas import DELTA_CLASSES, QuantizedDelta
from ders_peft.routing import route

BITS = (1, 2, 3, 4, 8)


def reference_decode(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size, in_features: int):
    """Independent decoder (float64): numpy's little-endian bit unpacking of each row, then the known levels
    (``2c - 1`` for one bit, ``c - (2**(bits-1) - 1)`` otherwise) times each entry's row/group scale."""
    raw = np.unpackbits(codes.numpy(), axis=-1, bitorder="little")[..., : in_features * bits]
    raw = raw.reshape(*codes.shape[:-1], in_features, bits).astype(np.int64)
    ints = (raw << np.arange(bits)).sum(-1)
    q = 2 * ints - 1 if bits == 1 else ints - (2**bits - 1) / 2  # mid-rise half-integer levels
    g = in_features if group_size is None else group_size
    s = np.repeat(scales.detach().numpy().astype(np.float64), g, axis=-1)[..., :in_features]
    return torch.from_numpy(q * s)


def rel_error(w: torch.Tensor, bits: int, group_size, **kw) -> float:
    codes, scales = packing.quantize(w, bits, group_size, **kw)
    return float((packing.dequantize(codes, scales, bits, group_size, w.shape[-1]) - w).norm() / w.norm())


# ------------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_features", [1, 7, 13, 33, 48])
def test_pack_round_trip_and_layout(bits, in_features):
    """Every k-bit value survives pack/unpack; a row takes ceil(in * k / 8) bytes, laid out as numpy's little-endian
    bitstream of the codes."""
    codes = torch.randint(
        0, 2**bits, (3, 5, in_features), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, -(-in_features * bits // 8))
    assert torch.equal(packing.unpack(packed, bits, in_features), codes)
    stream = ((codes.numpy()[..., None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(3, 5, -1)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(stream, axis=-1, bitorder="little"))


# -------------------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("group_size", [None, 16, 24])
def test_error_falls_with_bits(group_size):
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))  # 200 = 12 * 16 + 8: a shorter last group
    errors = [rel_error(w, b, group_size) for b in BITS]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01, errors  # 8 bits: under 1%
    assert errors[0] < 0.61, errors  # sign quantization of a Gaussian: sqrt(1 - 2/pi) = 0.60


def test_group_scales_help_with_outliers():
    """At 2 bits, scales per 16 entries beat scales per row on a matrix with outlier rows and columns."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen)
    w[torch.randperm(64, generator=gen)[:4]] *= 20.0
    w[:, torch.randperm(256, generator=gen)[:6]] *= 20.0
    row, group = rel_error(w, 2, None), rel_error(w, 2, 16)
    assert group <= row, (group, row)
    assert group < 0.9 * row, (group, row)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_hurts_a_row(bits):
    """The clipping grid contains c = 1, so each row's error is at most the unclipped one; overall it is lower."""
    w = torch.randn(32, 300, generator=torch.Generator().manual_seed(2))

    def row_errors(clip):
        codes, scales = packing.quantize(w, bits, None, clip_search=clip)
        return (packing.dequantize(codes, scales, bits, None, 300) - w).square().sum(-1)

    searched, plain = row_errors(True), row_errors(False)
    assert (searched <= plain + 1e-6).all()
    assert searched.sum() < 0.97 * plain.sum()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 8])
def test_zero_rows_decode_to_zero(bits, group_size):
    w = torch.randn(6, 21, generator=torch.Generator().manual_seed(3))
    w[1] = 0.0
    w[4, 8:16] = 0.0  # one whole group of 8
    codes, scales = packing.quantize(w, bits, group_size)
    out = packing.dequantize(codes, scales, bits, group_size, 21)
    assert torch.isfinite(scales).all() and torch.isfinite(out).all()
    assert (scales[1] == 0).all() and (out[1] == 0).all()
    if group_size:
        assert scales[4, 1] == 0 and (out[4, 8:16] == 0).all()
    zeros = torch.zeros(3, 5)
    codes, scales = packing.quantize(zeros, bits, group_size)
    assert torch.equal(packing.dequantize(codes, scales, bits, group_size, 5), zeros)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group_size", [None, 16])
def test_representable_matrix_is_exact(bits, group_size):
    """Levels times a power-of-two scale per row/group (each row/group reaching the top level) quantize exactly."""
    gen = torch.Generator().manual_seed(4)
    out_f, in_f = 5, 40
    m = packing.qmax(bits)
    if bits == 1:
        q = torch.randint(0, 2, (out_f, in_f), generator=gen) * 2 - 1
    else:
        q = torch.randint(0, 2**bits, (out_f, in_f), generator=gen) - m  # every mid-rise level
    groups = packing.num_groups(in_f, group_size)
    g = group_size or in_f
    for j in range(groups):
        q[:, j * g] = m  # every row/group reaches the top level
    s = 2.0 ** torch.randint(-8, 2, (out_f, groups), generator=gen).float()
    w = q.float() * s.repeat_interleave(g, dim=1)[:, :in_f]
    codes, scales = packing.quantize(w, bits, group_size)
    assert torch.equal(scales, s)
    assert torch.equal(packing.levels(codes, bits), q.float())
    assert torch.equal(packing.dequantize(codes, scales, bits, group_size, in_f), w)


def test_one_bit_scale_is_mean_abs():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(5))
    w[0, 3] = 0.0  # zero is "+"
    codes, scales = packing.quantize(w, 1, 16)
    assert torch.equal(codes, (w >= 0).to(torch.uint8))
    torch.testing.assert_close(scales[:, 0], w[:, :16].abs().mean(-1))
    torch.testing.assert_close(scales[:, 2], w[:, 32:].abs().mean(-1))  # the shorter last group: its own count


# --------------------------------------------------------------------------------------------------------- delta
def test_delta_basics():
    """Construction on the meta device, exact zero at creation, storage (2 bits: a quarter byte per entry), parameter
    counts, load_dense_ / materialize / expert_delta against the independent decoder."""
    assert DELTA_CLASSES["quantized"] is QuantizedDelta
    meta = QuantizedDelta(4, 10, 37, bits=3, group_size=8, device="meta")
    assert meta.codes.device.type == "meta" and meta.codes.shape == (4, 10, 14) and meta.scales.shape == (4, 10, 5)
    d = QuantizedDelta(3, 6, 44, bits=2, group_size=None, scale=2.0)
    assert torch.equal(d.materialize(), torch.zeros(3, 6, 44))
    assert d.codes.dtype == torch.uint8 and d.codes.numel() == 3 * 6 * 44 // 4
    assert d.scales.dtype == d.param_dtype == torch.float32 and d.scales.requires_grad
    assert d.num_added_params() == round(3 * 6 * 44 * 2 / 16) and d.num_scale_params() == 3 * 6
    assert QuantizedDelta(1, 2, 3, bits=2, group_size=None).codes.numel() == 2  # rounded up per row
    dense = torch.randn(3, 6, 44, generator=torch.Generator().manual_seed(6)) * 0.1
    assert d.load_dense_(dense) is d
    want = reference_decode(d.codes, d.scales, 2, None, 44).float() * 2.0
    torch.testing.assert_close(d.materialize(), want, atol=1e-7, rtol=1e-6)
    err_unscaled, err_scaled = ((m - dense).norm() / dense.norm() for m in (d.materialize() / 2.0, d.materialize()))
    assert err_unscaled < min(0.5, err_scaled)  # load_dense_ takes unscaled values
    for e in range(3):
        torch.testing.assert_close(d.expert_delta(e), want[e], atol=1e-7, rtol=1e-6)
    (g,) = torch.autograd.grad(d.expert_delta(1).sum(), d.scales)
    assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0


@pytest.mark.parametrize("shape", ["shared", "per-slot"])
def test_delta_forward_matches_decoded_experts(shape):
    """The interface's forward (grouped_apply, one expert at a time) against ``x W_e^T`` with decoded experts."""
    gen = torch.Generator().manual_seed(7)
    d = QuantizedDelta(3, 5, 11, bits=3, group_size=4, scale=0.5).load_dense_(torch.randn(3, 5, 11, generator=gen))
    T, S = 9, 2
    plan, _ = route(torch.randn(T, 3, generator=gen), S, normalize=False)
    x = torch.randn(T, 11, generator=gen) if shape == "shared" else torch.randn(T, S, 11, generator=gen)
    w = reference_decode(d.codes, d.scales, 3, 4, 11).float() * 0.5
    xs = x.unsqueeze(1).expand(T, S, 11) if shape == "shared" else x
    want = torch.einsum("tsi,tsoi->tso", xs, w[plan.expert_idx])
    torch.testing.assert_close(d(x, plan), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        d(x, plan, weighted=True), (want * plan.weights.unsqueeze(-1)).sum(1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("bits,group_size,gated", [(1, None, True), (3, 2, True), (5, 3, False)])
def test_slot_core_gradcheck(bits, group_size, gated):
    """Double-precision gradcheck of the grouped path's hand-written backward with quantized ops (scales included)."""
    gen = torch.Generator().manual_seed(8)
    T, hidden, width, E = 7, 5, 4, 4
    outs = [width, width] if gated else [width]
    deltas = [QuantizedDelta(E, o, hidden, bits=bits, group_size=group_size) for o in outs]
    deltas.append(QuantizedDelta(E, hidden, width, bits=bits, group_size=group_size))
    for d in deltas:
        d.load_dense_(torch.randn(E, d.out_features, d.in_features, generator=gen))
    logits = torch.randn(T, E, generator=gen)
    logits[:, 3] -= 100.0  # expert 3 receives no token
    plan, _ = route(logits, 2, normalize=False)
    order, _, counts = plan.sorted_slots()
    act = torch.nn.functional.silu if gated else torch.nn.functional.gelu
    ops = [grouped_path.EXPERT_OPS[type(d)](d) for d in deltas]
    spec = grouped_path._Spec(act, gated, gated, ops, (1,) * len(ops), (False,) * len(outs), order, counts, len(outs),
                              store_base=False)  # fmt: skip
    assert all(op.dense_products for op in ops)  # so the layer recomputes the base products in backward

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    inputs = [rnd(T, hidden), rnd(T, 2), *(rnd(o, hidden) for o in outs), *(rnd(*d.scales.shape) for d in deltas)]
    assert torch.autograd.gradcheck(lambda *t: grouped_path._GroupedSlots.apply(spec, *t), inputs)


# --------------------------------------------------------------------------------------------------------- model
def quantized_model(bits: int, group_size, delta_scale: float = 1.0, shared: bool = False, layers: int = 2):
    """A tiny Llama DeRS model with quantized deltas loaded from random dense deltas and a random router."""
    cfg = ders_peft.DeRSConfig(
        num_experts=4,
        top_k=2,
        delta_type="quantized",
        bits=bits,
        group_size=group_size,
        delta_scale=delta_scale,
        shared_expert=shared,
        train_base=False,
        router_aux_loss_coef=0.0,  # its gradient would reach x too; the reference has none
    )
    model = get_peft_model(tiny_model("llama", layers=layers), cfg)
    gen = torch.Generator().manual_seed(bits)
    for layer in ders_layers(model):
        with torch.no_grad():
            layer.ders_router["default"].weight.normal_(generator=gen)
        for d in layer.ders_delta["default"].values():
            d.load_dense_(torch.randn(d.num_experts, d.out_features, d.in_features, generator=gen) * 0.05)
    return model


def decoded_weights(layer) -> dict[str, torch.Tensor]:
    """``W_base + Delta_e`` of every expert, decoded by :func:`reference_decode` (not the code under test)."""
    out = {}
    for name, d in layer.ders_delta["default"].items():
        base = ffn.proj_weight(getattr(layer.base_layer, name)).detach()
        out[name] = base + reference_decode(d.codes, d.scales, d.bits, d.group_size, d.in_features).float() * d.scale
    return out


@pytest.mark.parametrize(
    "bits,group_size,delta_scale", [(1, None, 1.0), (2, 20, 1.0), (3, 20, 1.0), (5, None, 1.0), (8, 16, 2.0)]
)
def test_layer_matches_decoded_reference(bits, group_size, delta_scale, device, monkeypatch):
    """Training-sized call with gradients (the grouped path) and a 3-token call without: the output (and input
    gradient) of the naive MoE on independently decoded experts; the scales' gradients those of plain autograd through
    ``expert_delta``."""
    calls = []
    monkeypatch.setattr(
        functional, "grouped_routed_ffn", lambda *a: calls.append(1) or grouped_path.grouped_routed_ffn(*a)
    )
    layer = ders_layers(quantized_model(bits, group_size, delta_scale).to(device))[0]
    deltas = list(layer.ders_delta["default"].values())
    decoded = decoded_weights(layer)
    monkeypatch.setattr(layer, "expert_weights", lambda adapter: decoded)

    x = torch.randn(3, 13, 32).to(device).requires_grad_()
    got = layer(x)
    assert calls
    want = reference_layer_output(layer, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - layer.base_layer(x)).abs().max() > 1e-3  # the deltas really changed the output
    probe = torch.randn_like(got)
    scales = [d.scales for d in deltas]
    g_got = torch.autograd.grad((got * probe).sum(), [x, *scales])
    g_x_want = torch.autograd.grad((want * probe).sum(), x)[0]
    torch.testing.assert_close(g_got[0], g_x_want, atol=1e-5, rtol=1e-5)

    def through_expert_delta(adapter):
        return {
            name: ffn.proj_weight(getattr(layer.base_layer, name)).detach()
            + torch.stack([d.expert_delta(e) for e in range(d.num_experts)])
            for name, d in layer.ders_delta[adapter].items()
        }

    monkeypatch.setattr(layer, "expert_weights", through_expert_delta)
    g_want = torch.autograd.grad((reference_layer_output(layer, x) * probe).sum(), scales)
    for a, b in zip(g_got[1:], g_want, strict=True):
        assert b.abs().max() > 0  # fp32 sums of up to 48 products with levels up to 127: tolerance relative to the max
        torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=1e-5)

    monkeypatch.setattr(layer, "expert_weights", lambda adapter: decoded)
    small = torch.randn(1, 3, 32).to(device)
    with torch.no_grad():
        torch.testing.assert_close(layer(small), reference_layer_output(layer, small), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(2, None), (3, 20)])
def test_save_and_reload(bits, group_size, tmp_path):
    """Codes and scales come back bit for bit (2 bits: a quarter byte per entry on disk too), and so do the logits."""
    model = quantized_model(bits, group_size)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    codes = {k: v for k, v in stored.items() if k.endswith(".codes")}
    assert len(codes) == 2 * 3 and all(v.dtype == torch.uint8 for v in codes.values())
    for key, value in codes.items():
        in_f = 48 if "down_proj" in key else 32
        assert value.shape == (4, value.shape[1], -(-in_f * bits // 8))
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert reloaded.peft_config["default"].bits == bits and reloaded.peft_config["default"].group_size == group_size
    pairs = list(zip(ders_layers(model), ders_layers(reloaded), strict=True))
    assert pairs
    for a, b in pairs:
        for name, da in a.ders_delta["default"].items():
            db = b.ders_delta["default"][name]
            assert isinstance(db, QuantizedDelta)
            assert torch.equal(da.codes, db.codes) and torch.equal(da.scales, db.scales)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=0, rtol=0)


def test_adapter_saved_with_the_old_scales_key_reloads(tmp_path):
    """The scales are a leaf's ``.weight`` now (``scale_factors.weight``, for peft's FSDP policy); an adapter written
    before that, with ``...scales`` keys, loads to the same scales and logits."""
    from safetensors.torch import save_file

    model = quantized_model(2, None)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    stored = load_file(str(path))
    new_keys = [k for k in stored if k.endswith(".scale_factors.weight")]
    assert len(new_keys) == 2 * 3 and not any(k.endswith(".scales") for k in stored)
    save_file({k.replace(".scale_factors.weight", ".scales"): v for k, v in stored.items()}, str(path))
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    for a, b in zip(ders_layers(model), ders_layers(reloaded), strict=True):
        for name, da in a.ders_delta["default"].items():
            assert torch.equal(da.scales, b.ders_delta["default"][name].scales)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=0, rtol=0)


def test_merge_and_export_give_the_same_logits(tmp_path):
    model = quantized_model(3, 16)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    out = ders_peft.export_moe(model, tmp_path / "moe")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged = model.merge_and_unload()
    assert not any("ders" in name for name, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_training_step_builds_no_expert_stack(shared):
    """Forward and backward of a training step never create an (E, out, in) tensor (one expert's (out, in) matrix at
    a time only)."""
    hidden, inter, tokens = 32, 48, 21
    layer = ders_layers(quantized_model(2, 16, shared=shared, layers=1))[0]
    layer.train()
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    log = _OpLog({p.untyped_storage().data_ptr() for p in layer.parameters()})
    with log:
        layer(x).square().sum().backward()
    assert all(d.scales.grad.abs().max() > 0 for d in layer.ders_delta["default"].values())
    assert (inter, hidden) in log.shapes  # the log sees the per-expert matrices
    num = 5 if shared else 4
    forbidden = {(num, inter, hidden), (num, hidden, inter), (num, 2 * inter, hidden)}
    assert not log.shapes & forbidden, sorted(log.shapes & forbidden)
