"""``benchmarks/quality_shift_spectrum.py``'s truncation of vanilla experts, against a direct per-expert SVD."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from ders_testing import ders_layers, tiny_model
from peft import get_peft_model

import ders_peft

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import quality_shift_spectrum as spectrum  # noqa: E402


def vanilla_model():
    cfg = ders_peft.DeRSConfig(num_experts=3, top_k=2, delta_type="full")
    model = get_peft_model(tiny_model("llama", seed=0), cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in ders_layers(model):
            for delta in layer.ders_delta["default"].values():
                delta.weight.add_(torch.randn(delta.weight.shape, generator=gen) * 0.1)  # experts apart
    return model


def expert_weights(model):
    return [d.weight.detach().clone() for layer in ders_layers(model) for d in layer.ders_delta["default"].values()]


def test_truncation_is_the_mean_plus_each_experts_best_rank_r_deviation():
    model = vanilla_model()
    before = expert_weights(model)
    kept = spectrum.truncate_experts_(model, 2)
    after = expert_weights(model)
    num = den = 0.0
    for w, got in zip(before, after, strict=True):
        mean = w.mean(0)
        for e in range(w.shape[0]):
            u, s, vh = torch.linalg.svd(w[e] - mean)
            want = mean + u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
            torch.testing.assert_close(got[e], want, atol=1e-5, rtol=1e-5)
            assert torch.linalg.matrix_rank(got[e] - mean, atol=1e-4) == 2
            num, den = num + float((s[:2] ** 2).sum()), den + float((s**2).sum())
    assert abs(kept - num / den) < 1e-6 and 0 < kept < 1


def test_rank_zero_is_the_mean_and_full_rank_changes_nothing():
    model = vanilla_model()
    before = expert_weights(model)
    assert spectrum.truncate_experts_(model, 10_000) > 0.999999
    for w, got in zip(before, expert_weights(model), strict=True):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)
    assert spectrum.truncate_experts_(model, 0) == 0.0
    for w, got in zip(before, expert_weights(model), strict=True):
        torch.testing.assert_close(got, w.mean(0, keepdim=True).expand_as(w), atol=1e-5, rtol=1e-5)
