"""The few-token inference path (generation) gives the same outputs as the general routed layer."""

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
    ("llama", {"delta_type": "full", "top_k": 1}),
    ("phi", {"delta_type": "lowrank"}),  # per-expert biases
    ("phi", {"delta_type": "full"}),
    ("phi3", {"delta_type": "lowrank"}),  # fused gate_up_proj
    ("gpt2", {"delta_type": "lowrank"}),  # Conv1D
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.5}),
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.99, "shared_expert": True, "delta_scale": 0.5}),
    ("phi", {"delta_type": "sparse", "sparse_rate": 0.9}),
    ("phi3", {"delta_type": "sparse", "sparse_rate": 0.9}),
    ("gpt2", {"delta_type": "sparse", "sparse_rate": 0.9}),
]


def _model(family, merged=False, device="cpu", **cfg_kw):
    cfg = ders_peft.DeRSConfig(**{"num_experts": 4, "top_k": 2, "rank": 3, **cfg_kw})
    model = get_peft_model(tiny_model(family), cfg).eval()
    randomize_adapter(model, std=0.1)
    model.to(device)
    if merged:
        model.merge_adapter()
    return model


def _spy(monkeypatch) -> list[bool]:
    """Record, per layer call, whether the fast path produced the output."""
    taken: list[bool] = []
    real = decode.layer_forward

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(decode, "layer_forward", spy)
    return taken


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("family,cfg_kw", CASES)
def test_fast_path_matches_general_path(family, cfg_kw, tokens, merged, device, monkeypatch):
    layer = ders_layers(_model(family, merged=merged, device=device, **cfg_kw))[0]
    x = torch.randn(1, tokens, 32).to(device)
    cfg = layer.ders_settings["default"]
    slots = tokens * (cfg.top_k + cfg.shared_expert)
    # low-rank, sparse: always; whole expert weights (vanilla or merged): while there are at most as many slots as
    # experts
    expect_fast = (cfg.delta_type != "full" and not merged) or slots <= cfg.num_deltas
    taken = _spy(monkeypatch)
    with torch.no_grad():
        fast = layer(x)
    assert taken == [expect_fast]
    general = layer(x)  # grad enabled: the general path
    assert taken == [expect_fast, False]
    torch.testing.assert_close(fast, general.detach(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fast, reference_layer_output(layer, x), atol=1e-5, rtol=1e-5)


def test_not_used_for_long_inputs_mixed_dtypes_or_autocast(monkeypatch):
    layer = ders_layers(_model("llama"))[0]
    half = ders_layers(_model("llama", delta_type="sparse", sparse_rate=0.5))[0]
    half.ders_router["default"].to(torch.float64)  # router in another dtype than the tokens
    taken = _spy(monkeypatch)
    with torch.no_grad():
        layer(torch.randn(1, decode.MAX_DECODE_TOKENS + 1, 32))
        half(torch.randn(1, 1, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(1, 1, 32)).dtype == torch.bfloat16
        layer(torch.randn(1, 1, 32))
    assert taken == [False, False, False, True]


def test_cached_stacks_follow_parameter_updates():
    """The stacked router/A/B tensors are cached between calls and rebuilt when a parameter changes in place
    (an optimizer step between two generations)."""
    model = _model("llama")
    layer = ders_layers(model)[0]
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        first = layer(x)
        for name in ("down_proj", "gate_proj"):
            layer.ders_delta["default"][name].lora_b.weight.mul_(3.0)
        layer.ders_router["default"].weight.mul_(-1.0)
        second = layer(x)
    assert (second - first).abs().max() > 1e-4
    torch.testing.assert_close(second, layer(x).detach(), atol=1e-5, rtol=1e-5)
    # a replaced parameter (load with assign=True) and a replaced delta module are noticed too
    delta = layer.ders_delta["default"]["up_proj"]
    with torch.no_grad():
        delta.lora_b.weight = torch.nn.Parameter(delta.lora_b.weight * 2.0)
        third = layer(x)
        layer.ders_delta["default"]["up_proj"] = type(delta)(4, 48, 32, rank=3)
        fourth = layer(x)
    assert (third - second).abs().max() > 1e-4 and (fourth - third).abs().max() > 1e-4
    torch.testing.assert_close(fourth, layer(x).detach(), atol=1e-5, rtol=1e-5)


def test_greedy_generation_unchanged():
    """Whole-model greedy generation with the fast path equals the general path's token by token."""
    model = _model("qwen2", shared_expert=True)
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    steps = [ids]
    for _ in range(6):  # the general path: grad enabled, full recompute each step
        logits = model(input_ids=steps[-1]).logits[:, -1]
        steps.append(torch.cat([steps[-1], logits.argmax(-1, keepdim=True)], dim=1))
    assert torch.equal(fast, steps[-1])


def test_generation_benchmark_quick_mode(tmp_path):
    """``benchmarks/generation.py --quick`` (the CI-sized run) completes and the DeRS arms (factorised and merged)
    generate exactly the exported checkpoint's tokens."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "generation.py"
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "| DeRS, factorised |" in report and "| DeRS, merge_adapter() |" in report
    assert "| DeRS, factorised + CPU kernel |" in report
    rows = [line for line in report.splitlines() if line.startswith("| DeRS")]
    assert len(rows) == 3 and all(row.rstrip().endswith("| yes |") for row in rows)


def test_sparse_positions_follow_index_changes():
    """The cached row/column positions of sparse deltas are rebuilt when the index buffer changes (a checkpoint
    loaded into the model copies new indices in place)."""
    layer = ders_layers(_model("llama", delta_type="sparse", sparse_rate=0.9))[0]
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        before = layer(x)
        for delta in layer.ders_delta["default"].values():
            delta.indices.copy_(delta.indices.flip(0))  # every expert takes another expert's positions
        after = layer(x)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, layer(x).detach(), atol=1e-5, rtol=1e-5)
