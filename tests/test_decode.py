"""The small-batch inference paths (generation) give the same outputs as the general routed layer."""

from __future__ import annotations

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from peft import get_peft_model
from test_layer_reference import reference_layer_output

import ders_peft
from ders_peft import decode

CASES = [
    ("llama", {"delta_type": "lowrank"}),
    ("llama", {"delta_type": "lowrank", "shared_expert": True, "delta_scale": 2.0}),
    ("llama", {"delta_type": "lowrank", "normalize_top_k": False, "top_k": 3}),
    ("llama", {"delta_type": "full", "shared_expert": True}),
    ("phi", {"delta_type": "lowrank"}),  # per-expert biases
    ("phi", {"delta_type": "full"}),
    ("phi3", {"delta_type": "lowrank"}),  # fused gate_up_proj
    ("gpt2", {"delta_type": "lowrank"}),  # Conv1D
]


def _layer(family, merged=False, **cfg_kw):
    cfg = ders_peft.DeRSConfig(**{"num_experts": 4, "top_k": 2, "rank": 3, **cfg_kw})
    model = get_peft_model(tiny_model(family), cfg)
    randomize_adapter(model, std=0.1)
    if merged:
        model.merge_adapter()
    return ders_layers(model)[0]


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("family,cfg_kw", CASES)
def test_small_batch_path_matches_general_path(family, cfg_kw, tokens, merged, monkeypatch):
    layer = _layer(family, merged=merged, **cfg_kw)
    x = torch.randn(2, tokens, 32)
    calls = []
    real = decode.small_batch_ffn

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("ders_peft.layer.small_batch_ffn", spy)
    with torch.no_grad():
        fast = layer(x)
    assert calls == [True]  # the small-batch path really ran
    general = layer(x)  # grad enabled: the general path
    torch.testing.assert_close(fast, general.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast, reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)


def test_not_used_with_grad_or_many_tokens_or_sparse(monkeypatch):
    """Training (grad enabled), prompts longer than MAX_DECODE_TOKENS and sparse deltas take the general path."""
    layer, sparse = _layer("llama"), _layer("llama", delta_type="sparse", sparse_rate=0.5)
    results = []
    real = decode.small_batch_ffn

    def spy(*args):
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr("ders_peft.layer.small_batch_ffn", spy)
    layer(torch.randn(1, 1, 32))
    with torch.no_grad():
        layer(torch.randn(1, decode.MAX_DECODE_TOKENS + 1, 32))
        sparse(torch.randn(1, 1, 32))
        layer(torch.randn(1, 1, 32))
    assert [r is None for r in results] == [True, True, True, False]
