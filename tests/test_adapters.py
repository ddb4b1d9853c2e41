"""Adapter life cycle: save/reload exactness, checkpoint contents, disable, several adapters, unload, merging."""

from __future__ import annotations

import json

import pytest
import torch
from ders_testing import VOCAB, ders_layers, randomize_adapter, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import ders_peft
from ders_peft import DeRSConfig

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def upcycled(family: str = "llama", **kwargs):
    cfg = {"num_experts": 3, "top_k": 2, "rank": 2, "sparse_rate": 0.6, **kwargs}
    peft_model = get_peft_model(tiny_model(family), DeRSConfig(**cfg))
    randomize_adapter(peft_model, std=0.05)
    return peft_model


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("family", ["llama", "phi"])
def test_save_reload_exact(family, delta_type, shared, tmp_path):
    peft_model = upcycled(family, delta_type=delta_type, shared_expert=shared)
    want = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    state = load_file(tmp_path / "adapter_model.safetensors")
    model_state = {k: v for k, v in peft_model.state_dict().items() if ".ders_" in k}
    assert len(state) == len(model_state)  # every adapter tensor, nothing of the dense model
    assert not any("default" in k for k in state)
    kinds = {k.split(".ders_")[1].split(".")[0] for k in state}
    assert kinds == {"router", "delta"} | ({"base"} if delta_type != "full" else set()) | (
        {"bias"} if family == "phi" else set()
    )

    reloaded = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    assert (logits(reloaded) - want).abs().max().item() == 0.0


def test_sparse_indices_stored_int32_and_reloaded_exactly(tmp_path):
    peft_model = upcycled(delta_type="sparse", sparse_rate=0.9, seed=7)
    peft_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    index_keys = [k for k in state if k.endswith(".indices")]
    assert len(index_keys) == 2 * 3  # 2 blocks x gate/up/down
    assert all(state[k].dtype == torch.int32 for k in index_keys)

    # a model built with another seed has other indices: they must come from the checkpoint
    other = get_peft_model(
        tiny_model("llama"), DeRSConfig(num_experts=3, top_k=2, delta_type="sparse", sparse_rate=0.9)
    )
    assert not torch.equal(ders_layers(other)[0].ders_delta["default"]["gate_proj"].indices, state[index_keys[0]])
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    for layer_a, layer_b in zip(ders_layers(peft_model), ders_layers(reloaded), strict=True):
        for name, delta in layer_a.ders_delta["default"].items():
            twin = layer_b.ders_delta["default"][name]
            assert twin.indices.dtype == torch.int32
            assert torch.equal(delta.indices, twin.indices)
            assert torch.equal(delta.weight, twin.weight)


def test_trained_base_is_restored(tmp_path):
    """The checkpoint sits on top of the ORIGINAL dense checkpoint: a trained base copy must travel with it."""
    peft_model = upcycled(delta_type="lowrank", train_base=True)
    with torch.no_grad():
        for layer in ders_layers(peft_model):
            for p in layer.ders_base["default"].parameters():
                p.mul_(1.5)
    trained_bases = [layer.ders_base["default"].state_dict() for layer in ders_layers(peft_model)]
    want = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert (logits(reloaded) - want).abs().max().item() == 0.0
    for layer, trained in zip(ders_layers(reloaded), trained_bases, strict=True):
        restored = layer.ders_base["default"].state_dict()
        assert restored.keys() == trained.keys() == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
        assert all(torch.equal(restored[k], trained[k]) for k in trained)
        assert not torch.equal(restored["gate_proj.weight"], layer.base_layer.gate_proj.weight)
    # the dense weights under the adapter are untouched: disabling gives the original model
    with reloaded.disable_adapter():
        assert (logits(reloaded) - logits(tiny_model("llama"))).abs().max().item() == 0.0


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
def test_disable_adapter_is_the_dense_model(delta_type):
    dense = logits(tiny_model("gpt2"))
    peft_model = upcycled("gpt2", delta_type=delta_type, shared_expert=True)
    upcycled_logits = logits(peft_model)
    assert (upcycled_logits - dense).abs().max() > 1e-3
    with peft_model.disable_adapter():
        assert (logits(peft_model) - dense).abs().max().item() == 0.0
    assert (logits(peft_model) - upcycled_logits).abs().max().item() == 0.0


def test_two_adapters_add_set_save_delete(tmp_path):
    dense = logits(tiny_model("phi"))
    peft_model = get_peft_model(tiny_model("phi"), DeRSConfig(num_experts=3, top_k=2, delta_type="sparse"))
    peft_model.add_adapter("other", DeRSConfig(num_experts=2, top_k=1, rank=2, seed=5, shared_expert=True))
    randomize_adapter(peft_model, std=0.05)
    assert peft_model.active_adapters == ["default"]
    first = logits(peft_model)
    peft_model.set_adapter("other")
    second = logits(peft_model)
    assert (first - second).abs().max() > 1e-3
    # only the active adapter is trainable
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)

    peft_model.save_pretrained(tmp_path, selected_adapters=["other"])
    state = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert state and not any("other" in k or "default" in k for k in state)
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["num_experts"] == 2

    peft_model.set_adapter("default")
    assert (logits(peft_model) - first).abs().max().item() == 0.0
    peft_model.save_pretrained(tmp_path / "first")

    # reload both into one model under their names
    loaded = PeftModel.from_pretrained(tiny_model("phi"), tmp_path / "first")
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert (logits(loaded) - first).abs().max().item() == 0.0
    loaded.set_adapter("other")
    assert (logits(loaded) - second).abs().max().item() == 0.0

    loaded.delete_adapter("other")
    assert list(loaded.peft_config) == ["default"]
    assert all(list(layer.ders_router) == ["default"] for layer in ders_layers(loaded))
    assert not any(".other." in n for n, _ in loaded.named_parameters())
    assert (logits(loaded) - first).abs().max().item() == 0.0

    dense_again = loaded.unload()
    assert type(dense_again).__name__ == "PhiForCausalLM"
    assert not ders_layers(dense_again)
    assert type(dense_again.model.layers[0].mlp).__name__ == "PhiMLP"
    assert (logits(dense_again) - dense).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["llama", "phi", "gpt2", "phi3"])
def test_merge_and_unload_single_expert_is_plain_dense(family):
    dense_model = tiny_model(family)
    dense = logits(dense_model)
    mlp_type = type(dense_model.get_submodule(next(n for n, _ in dense_model.named_modules() if n.endswith("0.mlp"))))
    peft_model = upcycled(family, num_experts=1, top_k=1, delta_type="lowrank")
    want = logits(peft_model)
    assert (want - dense).abs().max() > 1e-3
    merged = peft_model.merge_and_unload()
    assert type(merged) is type(dense_model)
    assert not ders_layers(merged)
    mlps = [m for m in merged.modules() if type(m) is mlp_type]
    assert len(mlps) == 2
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)


def test_merge_and_unload_single_expert_equals_explicit_w_plus_delta():
    peft_model = upcycled("phi", num_experts=1, top_k=1, delta_type="sparse", sparse_rate=0.5)
    layer = ders_layers(peft_model)[0]
    want_w = layer.ders_base["default"].fc1.weight + layer.ders_delta["default"]["fc1"].materialize()[0]
    want_b = layer.ders_bias["default"]["fc1"].weight[0]
    merged = peft_model.merge_and_unload()
    fc1 = merged.model.layers[0].mlp.fc1
    torch.testing.assert_close(fc1.weight, want_w.detach(), atol=0, rtol=0)
    torch.testing.assert_close(fc1.bias, want_b.detach(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "family,shared,moe_class", [("llama", False, "MixtralForCausalLM"), ("qwen2", True, "Qwen2MoeForCausalLM")]
)
def test_merge_and_unload_routed_moe_is_the_equivalent_moe(family, shared, moe_class):
    """N > 1 cannot fold into one dense FFN: an exportable family gives its standard MoE model, computing the DeRS
    model."""
    dense_model = tiny_model(family)
    dense_mlp_type = type(dense_model.model.layers[0].mlp)
    peft_model = upcycled(family, num_experts=3, top_k=2, shared_expert=shared)
    want = logits(peft_model)
    result = peft_model.merge_and_unload()
    assert type(result).__name__ == moe_class
    assert not any(type(m) is dense_mlp_type for m in result.modules())
    torch.testing.assert_close(logits(result), want, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_routed_moe_without_target_refuses():
    """Phi (parallel blocks, GELU MLP) has no standard MoE target: merge_and_unload refuses and names why."""
    peft_model = upcycled("phi", num_experts=3, top_k=2)
    with pytest.raises(ValueError, match="No exact standard MoE target.*model_type='phi'.*no standard MoE"):
        peft_model.merge_and_unload()
    assert ders_layers(peft_model)  # the model is left as it was


def test_merge_adapter_round_trip():
    peft_model = upcycled("qwen2", num_experts=4, top_k=2, delta_type="sparse", shared_expert=True)
    want = logits(peft_model)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model), want, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    assert (logits(peft_model) - want).abs().max().item() == 0.0


def test_reexported_names():
    """Every name in ``ders_peft.__all__`` resolves, and peft maps the DERS type to this package's classes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from ders_peft.config import DeRSConfig as config_class
    from ders_peft.model import DeRSModel

    assert all(getattr(ders_peft, name, None) is not None for name in ders_peft.__all__)
    assert DeRSConfig is config_class
    assert PEFT_TYPE_TO_CONFIG_MAPPING["DERS"] is config_class
    assert PEFT_TYPE_TO_TUNER_MAPPING["DERS"] is DeRSModel


@pytest.mark.parametrize("delta_type", ["lowrank", "sparse", "full"])
def test_low_cpu_mem_usage_load_is_exact(delta_type, tmp_path):
    """peft builds the adapter on the meta device and assigns the checkpoint's tensors."""
    peft_model = upcycled("phi", delta_type=delta_type, shared_expert=True)
    want = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("phi"), tmp_path, low_cpu_mem_usage=True)
    assert {t.device.type for t in [*reloaded.parameters(), *reloaded.buffers()]} == {"cpu"}
    assert (logits(reloaded) - want).abs().max().item() == 0.0


def test_unload_leaves_no_ders_hook():
    """unload() returns a plain model: no DeRS layer and no attention-mask capture hook left behind."""
    peft_model = get_peft_model(tiny_model("llama"), ders_peft.DeRSConfig(num_experts=2, top_k=1))
    assert len(peft_model.base_model.model._forward_pre_hooks) == 1
    plain = peft_model.unload()
    assert not plain._forward_pre_hooks
    assert not any(isinstance(m, ders_peft.DeRSLayer) for m in plain.modules())


def test_transformers_load_adapter_second_adapter_by_name(tmp_path):
    """transformers' ``model.load_adapter(dir)`` loads a DeRS adapter, and a second one by name (README claim):
    each computes what the saved PeftModel computed."""
    first = upcycled("llama", delta_type="sparse")
    second = get_peft_model(tiny_model("llama"), DeRSConfig(num_experts=2, top_k=1, rank=2, seed=5))
    randomize_adapter(second, std=0.05, seed=7)
    want_first, want_second = logits(first), logits(second)
    assert (want_first - want_second).abs().max() > 1e-3
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")

    model = tiny_model("llama")
    model.load_adapter(str(tmp_path / "first"))
    torch.testing.assert_close(logits(model), want_first, atol=1e-6, rtol=0)
    model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert set(model.peft_config) == {"default", "second"}
    for layer in ders_layers(model):  # transformers' set_adapter needs peft >= 0.22: switch the layers directly
        layer.set_adapter("second")
    torch.testing.assert_close(logits(model), want_second, atol=1e-6, rtol=0)
