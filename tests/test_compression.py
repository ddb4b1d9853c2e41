"""DeRS compression (``ders_peft.compress``): a trained MoE becomes a DeRS adapter over its dense model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import PeftModel, get_peft_model

import ders_peft
from ders_peft import CompressionConfig, DeRSConfig, compress
from ders_peft.compression.sparsify import dare, kept_count, magnitude
from ders_peft.deltas import QuantizedDelta, SparseDelta, UniversalFullDelta

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _vanilla(family="llama", shared=False, gate=False, std=0.05, **kw):
    """A dense model and a vanilla-upcycled (``full``) DeRS model over a copy of it, experts = dense + noise."""
    dense = tiny_model(family, **kw)
    cfg = DeRSConfig(num_experts=4, top_k=2, delta_type="full", shared_expert=shared, shared_expert_gate=gate)
    moe = get_peft_model(copy.deepcopy(dense), cfg).eval()
    randomize_adapter(moe, std=std)
    return dense, moe


def _perturb_non_experts(model):
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.add_(0.1)
        model.model.norm.weight.add_(0.1)


# ------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("method", ["dare", "magnitude"])
@pytest.mark.parametrize(
    "family,shared,compress_shared",
    [
        ("llama", False, True),
        ("llama", True, True),
        ("llama", True, False),
        ("gpt2", True, True),
        ("phi", False, True),
    ],
)
def test_drop_rate_zero_reproduces_a_ders_full_model(method, family, shared, compress_shared):
    _, moe = _vanilla(family, shared=shared)
    small = compress(moe, CompressionConfig(method=method, drop_rate=0.0, compress_shared=compress_shared))
    torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)
    cfg = small.peft_config["default"]
    assert cfg.delta_type == "sparse" and cfg.sparse_rate == 0.0 and not cfg.train_base
    assert cfg.universal_delta_type == (None if compress_shared or not shared else "full")
    assert cfg.compression["method"] == method
    kinds = {type(d) for layer in ders_layers(small) for d in layer.ders_delta["default"].values()}
    assert kinds == {UniversalFullDelta if shared and not compress_shared else SparseDelta}


@pytest.mark.parametrize("shared", [False, True])
def test_sixteen_bits_is_within_1e4(shared):
    _, moe = _vanilla("llama", shared=shared)
    small = compress(moe, CompressionConfig(method="quantize", bits=16))
    diff = (_logits(small) - _logits(moe)).abs().max()
    assert diff < 1e-4 and diff > 0  # quantized (not a copy), yet within the tolerance
    codes = ders_layers(small)[0].ders_delta["default"]["gate_proj"].codes
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 2 * 32  # 16 bits: two bytes per entry, packed


def _moe_from_export(family, arch, shared=False, gate=False):
    dense, ders = _vanilla(family, shared=shared, gate=gate)
    moe = ders_peft.convert_to_moe(ders, arch)
    _perturb_non_experts(moe)  # a MoE trained as a whole: its attention and norms moved too
    return dense, moe


@pytest.mark.parametrize(
    "family,arch,shared,gate",
    [
        ("llama", "mixtral", False, False),
        ("llama", "qwen2_moe", True, False),  # zero shared_expert_gate: DeRS's fixed average
        ("qwen2", "qwen2_moe", True, True),  # a trained (non-zero) shared_expert_gate
        ("qwen2", "qwen2_moe", False, False),  # the zero shared expert of an export without universal FFN
        ("qwen3", "qwen3_moe", False, False),
    ],
)
def test_transformers_moe_inputs_are_reproduced_and_non_expert_weights_carried(family, arch, shared, gate):
    dense, moe = _moe_from_export(family, arch, shared, gate)
    if gate:
        with torch.no_grad():
            for layer in moe.model.layers:
                assert layer.mlp.shared_expert_gate.weight.count_nonzero()
    dense_before = {k: v.clone() for k, v in dense.state_dict().items()}
    for compress_shared in ([True, False] if shared else [True]):
        cfg = CompressionConfig(method="dare", drop_rate=0.0, compress_shared=compress_shared)
        small = compress(moe, cfg, dense_model=dense)
        torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)
        saved = small.peft_config["default"]
        assert sorted(saved.modules_to_save) == ["model.layers.1.self_attn.q_proj", "model.norm"]
        assert saved.shared_expert == shared and saved.shared_expert_gate == gate
    # the dense model passed in is not modified (compress works on a copy)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in dense_before.items())


def test_a_mixtral_built_directly_from_its_config_is_read_from_its_fused_experts():
    """Independent of our export: a Mixtral whose non-expert weights are the Llama's and whose experts are the Llama
    FFN plus noise, written straight into ``experts.gate_up_proj`` / ``down_proj``."""
    dense = tiny_model("llama")
    c = dense.config
    mixtral_cfg = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        num_local_experts=3, num_experts_per_tok=2, rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters,
    )  # fmt: skip
    moe = transformers.MixtralForCausalLM(mixtral_cfg).eval()
    state = moe.state_dict()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in dense.state_dict().items():
            if ".mlp." not in key:
                state[key].copy_(value)
        for i, layer in enumerate(dense.model.layers):
            experts = moe.model.layers[i].mlp.experts
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
            for e in range(3):
                experts.gate_up_proj[e].copy_(gate_up + 0.05 * torch.randn(gate_up.shape, generator=gen))
                down = layer.mlp.down_proj.weight
                experts.down_proj[e].copy_(down + 0.05 * torch.randn(down.shape, generator=gen))
    small = compress(moe, CompressionConfig(method="magnitude", drop_rate=0.0), dense_model=dense)
    torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)
    assert small.peft_config["default"].modules_to_save is None  # nothing differs outside the experts
    assert small.peft_config["default"].num_experts == 3


def test_dense_model_from_a_directory(tmp_path):
    dense, moe = _moe_from_export("llama", "mixtral")
    dense.save_pretrained(tmp_path / "dense")
    small = compress(moe, CompressionConfig(method="dare", drop_rate=0.0), dense_model=str(tmp_path / "dense"))
    torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- the delta math
def _delta(seed=0, experts=3, out=24, inp=40):
    return torch.randn(experts, out, inp, generator=torch.Generator().manual_seed(seed))


def test_dare_keeps_the_right_count_rescales_and_is_reproducible():
    delta = _delta()
    values, idx = dare(delta, 0.75, torch.Generator().manual_seed(1))
    nnz = kept_count(24 * 40, 0.75)
    assert values.shape == idx.shape == (3, nnz) and idx.dtype == torch.int32
    flat = delta.reshape(3, -1)
    for e in range(3):
        assert idx[e].unique().numel() == nnz and bool((idx[e][1:] > idx[e][:-1]).all())
        torch.testing.assert_close(values[e], flat[e][idx[e].long()] * (24 * 40 / nnz))
    again = dare(delta, 0.75, torch.Generator().manual_seed(1))
    assert torch.equal(again[1], idx) and torch.equal(again[0], values)
    other = dare(delta, 0.75, torch.Generator().manual_seed(2))
    assert not torch.equal(other[1], idx)


def _dense_of(values, idx, shape):
    out = torch.zeros(shape[0], shape[1] * shape[2])
    out.scatter_(1, idx.long(), values)
    return out.view(shape)


def test_dare_is_unbiased():
    delta = _delta(experts=1, out=8, inp=10)
    errors = {}
    for n in (25, 400):
        mean = sum(_dense_of(*dare(delta, 0.8, torch.Generator().manual_seed(s)), delta.shape) for s in range(n)) / n
        errors[n] = float((mean - delta).norm() / delta.norm())
    # the error of the mean of n draws falls like 1/sqrt(n): 16x the draws, about a quarter of the error
    assert errors[400] < 0.45 * errors[25] and errors[400] < 0.15


def test_magnitude_keeps_the_largest_entries():
    delta = _delta()
    values, idx = magnitude(delta, 0.9)
    flat = delta.reshape(3, -1)
    nnz = kept_count(flat.shape[1], 0.9)
    for e in range(3):
        want = flat[e].abs().topk(nnz).indices.sort().values
        assert torch.equal(idx[e].long(), want)
        torch.testing.assert_close(values[e], flat[e][want])


def test_reconstruction_error_falls_as_more_is_kept():
    delta = _delta(out=32, inp=48)

    def err(dense):
        return float((dense - delta).norm() / delta.norm())

    rates = [0.99, 0.9, 0.6, 0.2, 0.0]
    mag = [err(_dense_of(*magnitude(delta, p), delta.shape)) for p in rates]
    dar = [
        sum(err(_dense_of(*dare(delta, p, torch.Generator().manual_seed(s)), delta.shape)) for s in range(5)) / 5
        for p in rates
    ]
    assert mag == sorted(mag, reverse=True) and mag[-1] == 0.0
    assert dar == sorted(dar, reverse=True) and dar[-1] < 1e-6


# ------------------------------------------------------------------------------------------------- saving, export
@pytest.mark.parametrize(
    "cfg",
    [
        CompressionConfig(method="dare", drop_rate=0.9, seed=4),
        CompressionConfig(method="magnitude", drop_rate=0.5, compress_shared=False),
        CompressionConfig(method="quantize", bits=2, group_size=16),
        CompressionConfig(method="quantize", bits=3),
    ],
)
def test_compressed_adapters_reload_bit_exactly_and_export(cfg, tmp_path):
    dense, moe = _vanilla("llama", shared=not cfg.compress_shared)
    small = compress(moe, cfg)
    small.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["compression"]["method"] == cfg.method
    reloaded = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "adapter").eval()
    want = {k: v for k, v in small.state_dict().items() if ".ders_" in k}
    got = reloaded.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    torch.testing.assert_close(_logits(reloaded), _logits(small), atol=0, rtol=0)
    if cfg.compress_shared:  # the universal FFN needs architecture qwen2_moe; Llama's default is Mixtral
        ders_peft.export_moe(small, tmp_path / "moe")
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
        torch.testing.assert_close(_logits(exported), _logits(small), atol=1e-5, rtol=0)
        merged = copy.deepcopy(small).merge_and_unload()
        torch.testing.assert_close(_logits(merged), _logits(small), atol=1e-5, rtol=0)
    else:
        exported = ders_peft.convert_to_moe(small, "qwen2_moe")
        torch.testing.assert_close(_logits(exported), _logits(small), atol=1e-5, rtol=0)


def test_fresh_process_reload(tmp_path):
    dense, moe = _moe_from_export("llama", "mixtral")
    small = compress(moe, CompressionConfig(method="quantize", bits=4, group_size=8), dense_model=dense)
    dense.save_pretrained(tmp_path / "dense")
    small.save_pretrained(tmp_path / "adapter")
    torch.save(_logits(small), tmp_path / "want.pt")
    torch.save(IDS, tmp_path / "ids.pt")
    code = textwrap.dedent(
        f"""
        import torch, ders_peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "dense")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            got = model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits
        want = torch.load({str(tmp_path / "want.pt")!r})
        assert torch.equal(got, want), (got - want).abs().max()
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_a_compressed_adapter_trains_further():
    _, moe = _vanilla("llama")
    small = compress(moe, CompressionConfig(method="dare", drop_rate=0.8))
    small.train()
    trainable = {n: p.detach().clone() for n, p in small.named_parameters() if p.requires_grad}
    indices = {n: b.clone() for n, b in small.named_buffers() if n.endswith("indices")}
    assert any(".ders_delta." in n for n in trainable) and any(".ders_router." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=1e-2)
    loss = small(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    changed = [n for n, p in small.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any(".ders_delta." in n for n in changed)
    assert indices and all(torch.equal(b, indices[n]) for n, b in small.named_buffers() if n in indices)


# ------------------------------------------------------------------------------------------------- refusals
def test_refusals_name_the_problem():
    dense, moe = _moe_from_export("llama", "mixtral")
    with pytest.raises(ValueError, match="dense_model.*method='d2moe'"):
        compress(moe, CompressionConfig())
    with pytest.raises(ValueError, match="hidden_size"):
        compress(moe, CompressionConfig(), dense_model=tiny_model("llama", hidden=16))
    lowrank = get_peft_model(tiny_model("llama"), DeRSConfig(delta_type="lowrank"))
    with pytest.raises(ValueError, match="delta_type='full'"):
        compress(lowrank, CompressionConfig())
    with pytest.raises(ValueError, match="neither a DeRS model nor"):
        compress(dense, CompressionConfig())
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(moe, CompressionConfig(method="d2moe"))
    with pytest.raises(ValueError, match="do not pass dense_model"):
        compress(moe, CompressionConfig(method="d2moe"), dense_model=dense, calibration=[[1, 2, 3]])
    with pytest.raises(ValueError, match="uses no calibration data"):
        compress(moe, CompressionConfig(method="dare"), dense_model=dense, calibration=[[1, 2, 3]])
    with pytest.raises(TypeError, match="CompressionConfig"):
        compress(moe, {"method": "dare"}, dense_model=dense)
    for field, value in (("drop_rate", 1.0), ("bits", 0), ("group_size", 0), ("seed", -1), ("compress_shared", 1)):
        with pytest.raises(ValueError, match=f"CompressionConfig.{field}="):
            CompressionConfig(**{field: value})
    with pytest.raises(ValueError, match="config.json"):
        compress(moe, CompressionConfig(), dense_model="/nonexistent/dense")


# ------------------------------------------------------------------------------------------------- accounting
def test_added_params_and_bytes_follow_the_paper_and_the_tensors(tmp_path):
    dense, moe = _vanilla("llama", hidden=32, inter=48)
    n, per_expert = 4, 3 * 32 * 48  # experts, parameters of one FFN (gate, up, down)
    router = 2 * n * 32
    for cfg, added in (
        (CompressionConfig(method="dare", drop_rate=0.9), 2 * n * 3 * kept_count(32 * 48, 0.9) + router),
        (CompressionConfig(method="quantize", bits=4), 2 * n * per_expert * 4 // 16 + router),
    ):
        small = compress(moe, cfg)
        small.save_pretrained(tmp_path / cfg.method)
        report = ders_peft.compression_report(small, uncompressed=moe, saved_dir=tmp_path / cfg.method)
        assert report.added_params == added == ders_peft.parameter_report(small).added_params
        assert ders_peft.parameter_report(small).scale_params == report.scale_params
        by_kind = report.compressed
        if cfg.method == "dare":
            assert by_kind["delta_values"] == by_kind["delta_indices"] == 2 * n * 3 * kept_count(32 * 48, 0.9) * 4
            assert report.scale_params == 0
        else:
            assert by_kind["delta_codes"] == 2 * n * per_expert // 2  # 4 bits: half a byte per entry (rows even)
            assert by_kind["delta_scales"] == 2 * n * (48 + 48 + 32) * 4 and report.scale_params == 2 * n * 128
        assert by_kind["router"] == router * 4 and by_kind["base_ffn"] == 2 * per_expert * 4
        assert report.uncompressed["experts"] == 2 * n * per_expert * 4
        on_disk = sum(p.stat().st_size for p in (tmp_path / cfg.method).iterdir())
        assert report.file_bytes == on_disk and report.files["adapter_model.safetensors"] > 0
        assert report.experts_bytes < report.uncompressed["experts"]


def test_report_of_a_large_configuration_on_the_meta_device(tmp_path):
    """A 1.6B-parameter configuration (StableLM-2-1.6B sizes, Llama layout) compressed at drop 0.9 is countable
    without memory: the model is rebuilt on the meta device from a saved compressed adapter's config alone."""
    from accelerate import init_empty_weights
    from peft import PeftConfig

    DeRSConfig(
        num_experts=4, top_k=2, delta_type="sparse", sparse_rate=0.9, train_base=False, target_modules=["mlp"],
        layers_to_transform=list(range(0, 24, 2)), compression={"method": "dare", "drop_rate": 0.9},
    ).save_pretrained(tmp_path)  # fmt: skip
    cfg = transformers.LlamaConfig(
        vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32
    )
    with init_empty_weights():
        model = get_peft_model(transformers.LlamaForCausalLM(cfg), PeftConfig.from_pretrained(tmp_path))
    assert next(model.parameters()).device.type == "meta"
    report = ders_peft.compression_report(model)
    assert report.method == {"method": "dare", "drop_rate": 0.9}
    p = 12 * 3 * 2048 * 5632  # one FFN's parameters over the 12 upcycled blocks
    assert report.added_params == 4 * 12 * 3 * kept_count(2048 * 5632, 0.9) + 12 * 4 * 2048
    assert abs(report.added_params - 0.1 * 4 * p) / (0.4 * p) < 0.01  # the paper's N P (1 - p)
    assert report.compressed["delta_indices"] == report.compressed["delta_values"]


def test_quantized_deltas_have_no_dense_expert_tensor_in_state():
    _, moe = _vanilla("llama")
    small = compress(moe, CompressionConfig(method="quantize", bits=2))
    for layer in ders_layers(small):
        for delta in layer.ders_delta["default"].values():
            assert isinstance(delta, QuantizedDelta)
            assert delta.codes.dtype == torch.uint8
            assert delta.codes.numel() == delta.num_experts * delta.out_features * -(-delta.in_features * 2 // 8)


def test_modules_the_moe_trained_as_modules_to_save_are_carried():
    dense = tiny_model("llama")
    cfg = DeRSConfig(num_experts=4, top_k=2, delta_type="full", modules_to_save=["lm_head"])
    moe = get_peft_model(copy.deepcopy(dense), cfg).eval()
    randomize_adapter(moe, std=0.05)
    with torch.no_grad():
        moe.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.2)
    small = compress(moe, CompressionConfig(method="dare", drop_rate=0.0))
    assert small.peft_config["default"].modules_to_save == ["lm_head"]
    torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)
    report = ders_peft.compression_report(small)
    assert report.compressed["carried"] == dense.lm_head.weight.numel() * 4
