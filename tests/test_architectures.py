"""Every supported architecture: default targets, exact dense start, per-expert biases, exact save/reload."""

from __future__ import annotations

import pytest
import torch
import transformers
from ders_testing import FAMILIES, VOCAB, ders_layers, randomize_adapter, tiny_model
from peft import PeftModel, get_peft_model

import ders_peft
from ders_peft import ffn

# family -> (layout name, whether the FFN projections carry biases)
EXPECTED = {
    "llama": ("swiglu", False),
    "mistral": ("swiglu", False),
    "qwen2": ("swiglu", False),
    "qwen3": ("swiglu", False),
    "gemma": ("swiglu", False),
    "phi": ("fc1_fc2", True),
    "phi3": ("fused_swiglu", False),
    "stablelm": ("swiglu", False),
    "gpt2": ("gpt2_conv1d", True),
    "gpt_neox": ("neox", True),
    "olmo": ("swiglu", False),
}

# further model types with a default in ffn.DEFAULT_TARGET_MODULES, built here from their configs
EXTRA = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"eos_token_id": 2}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
}

CONFIG = {"num_experts": 3, "top_k": 2, "rank": 2, "shared_expert": True}


def build(family: str, seed: int = 0):
    if family in FAMILIES:
        return tiny_model(family, seed=seed)
    cfg_name, model_name, extra = EXTRA[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )
    return getattr(transformers, model_name)(cfg).eval()


def num_blocks(model) -> int:
    cfg = model.config
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layer


def test_families_cover_every_family_in_ders_testing():
    assert set(EXPECTED) == set(FAMILIES)
    for family in [*EXPECTED, *EXTRA]:
        assert ffn.DEFAULT_TARGET_MODULES[build(family).config.model_type] == ["mlp"]


@pytest.mark.parametrize("family", [*EXPECTED, *EXTRA])
def test_default_targets_exact_start_and_exact_reload(family, tmp_path):
    model = build(family)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    dense_mlp_type = type(model.get_submodule(_first_mlp_path(model)))

    peft_model = get_peft_model(model, ders_peft.DeRSConfig(target_modules=None, **CONFIG))
    layers = ders_layers(peft_model)
    # every block's FFN is upcycled, nothing else
    assert len(layers) == num_blocks(model)
    assert all(type(layer.base_layer) is dense_mlp_type for layer in layers)
    assert sorted(peft_model.peft_config["default"].target_modules) == ["mlp"]
    if family in EXPECTED:
        assert {layer.layout.name for layer in layers} == {EXPECTED[family][0]}

    with torch.no_grad():
        start = peft_model(ids).logits
    torch.testing.assert_close(start, dense, atol=1e-5, rtol=0)

    randomize_adapter(peft_model, std=0.05)
    with torch.no_grad():
        trained = peft_model(ids).logits
    assert (trained - dense).abs().max() > 1e-3

    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(build(family), tmp_path)
    with torch.no_grad():
        again = reloaded(ids).logits
    assert (again - trained).abs().max().item() == 0.0


def _first_mlp_path(model) -> str:
    return next(name for name, _ in model.named_modules() if name.endswith(".0.mlp"))


@pytest.mark.parametrize("family", list(EXPECTED))
def test_per_expert_biases(family):
    """A biased FFN keeps one trainable bias per expert (routed experts + universal), initialised to the dense bias."""
    model = tiny_model(family)
    dense_biases = {}
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            for proj in ffn.detect_layout(module).projs:
                bias = getattr(module, proj).bias
                if bias is not None:
                    dense_biases[(name, proj)] = bias.detach().clone()
    has_bias = EXPECTED[family][1]
    assert bool(dense_biases) == has_bias

    peft_model = get_peft_model(model, ders_peft.DeRSConfig(**CONFIG))
    experts = CONFIG["num_experts"] + 1
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, ders_peft.DeRSLayer):
            short = name.removeprefix("base_model.model.")
            for proj, holder in module.ders_bias["default"].items() if "default" in module.ders_bias else []:
                found[(short, proj)] = holder.weight
    assert set(found) == set(dense_biases)
    for key, weight in found.items():
        assert weight.shape == (experts, dense_biases[key].numel())
        assert weight.requires_grad
        assert torch.equal(weight, dense_biases[key].expand_as(weight))

    if has_bias:
        peft_model.train()
        randomize_adapter(peft_model, std=0.05)
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
        peft_model(input_ids=ids, labels=ids).loss.backward()
        for weight in found.values():
            assert weight.grad is not None and weight.grad.abs().sum() > 0
