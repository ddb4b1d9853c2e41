"""merge_adapter() / unmerge_adapter() / merge_and_unload(): materialised experts give the same outputs, and the
factorised form comes back bit for bit."""

from __future__ import annotations

import pytest
import torch
from ders_testing import VOCAB, ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model

import ders_peft


def make(family: str = "llama", **cfg_kw):
    cfg = ders_peft.DeRSConfig(**{"num_experts": 4, "top_k": 2, "rank": 3, "sparse_rate": 0.5, **cfg_kw})
    model = get_peft_model(tiny_model(family, layers=2), cfg)
    randomize_adapter(model, std=0.1)
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
ONE_TOKEN = torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(1))

MERGE_CASES = [
    ("llama", {"delta_type": "lowrank"}),
    ("llama", {"delta_type": "sparse", "shared_expert": True}),
    ("llama", {"delta_type": "full", "top_k": 1}),
    ("llama", {"delta_type": "lowrank", "train_base": False, "normalize_top_k": False}),
    ("phi", {"delta_type": "lowrank"}),  # biased fc1/fc2 layout
    ("phi3", {"delta_type": "sparse"}),  # fused gate_up_proj layout
]


@pytest.mark.parametrize("family,cfg_kw", MERGE_CASES)
def test_merge_unmerge_routed(family, cfg_kw):
    model = make(family, **cfg_kw)
    before = snapshot(model)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        want_one = model(input_ids=ONE_TOKEN).logits
    model.merge_adapter()
    assert all(layer.merged for layer in ders_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(input_ids=ONE_TOKEN).logits, want_one, atol=1e-5, rtol=1e-5)
    assert_bit_identical(snapshot(model), before)  # merging added no state and touched no parameter
    model.unmerge_adapter()
    assert not any(layer.merged for layer in ders_layers(model))
    assert_bit_identical(snapshot(model), before)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=0, rtol=0)


def test_merged_forward_uses_materialised_experts():
    """While merged, the layers run the synthesised weights: changing a factorised parameter has no effect until
    unmerge (which then reflects it)."""
    model = make("llama")
    model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=IDS).logits
        b = ders_layers(model)[0].ders_delta["default"]["down_proj"].lora_b.weight
        b.add_(1.0)
        torch.testing.assert_close(model(input_ids=IDS).logits, merged, atol=0, rtol=0)
        model.unmerge_adapter()
        assert (model(input_ids=IDS).logits - merged).abs().max() > 1e-3


@pytest.mark.parametrize("train_base", [True, False])
@pytest.mark.parametrize("family", ["llama", "phi"])
def test_single_expert_merges_into_dense_ffn(family, train_base):
    model = make(family, num_experts=1, top_k=1, train_base=train_base)
    layer = ders_layers(model)[0]
    before = snapshot(model)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    synthesised = layer.expert_weights("default")
    model.merge_adapter()
    first = layer.layout.in_projs[0]
    torch.testing.assert_close(getattr(layer.base_layer, first).weight, synthesised[first][0], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert_bit_identical(snapshot(model), before)


def test_single_expert_merge_and_unload_is_plain_dense_model():
    model = make("llama", num_experts=1, top_k=1)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    dense = model.merge_and_unload()
    assert type(dense).__name__ == "LlamaForCausalLM"
    assert not ders_layers(dense)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_export_of_a_merged_model_is_unchanged():
    """Exporting while merged (num_experts=1 with a frozen base, whose dense weights a merge overwrites) gives the same
    model as exporting unmerged, and leaves the model merged."""
    model = make("llama", num_experts=1, top_k=1, train_base=False)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    model.merge_adapter()
    moe = ders_peft.convert_to_moe(model, "qwen2_moe")
    assert all(layer.merged for layer in ders_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_is_idempotent_and_one_adapter_at_a_time():
    model = make("llama")
    model.add_adapter("other", ders_peft.DeRSConfig(num_experts=2, top_k=1))
    model.set_adapter("default")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    model.merge_adapter()
    model.merge_adapter()  # already merged: nothing to do
    assert [layer.merged_adapters for layer in ders_layers(model)] == [["default"], ["default"]]
    with pytest.raises(ValueError, match="one merged adapter at a time"):
        ders_layers(model)[0].merge(adapter_names=["other"])
    model.unmerge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=0, rtol=0)


def test_disable_adapter_while_merged_gives_dense_outputs():
    model = make("llama")
    with torch.no_grad():
        want = tiny_model("llama", layers=2)(input_ids=IDS).logits
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)
