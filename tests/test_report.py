"""parameter_report against hand formulas, and on a 1.6B-parameter model built on the meta device."""

from __future__ import annotations

import pytest
import torch
import transformers
from ders_testing import tiny_model
from peft import get_peft_model

from ders_peft import DeRSConfig, ffn, parameter_report

HIDDEN, INTER = 32, 48

# family -> FFN matrices (out, in) and whether each has a bias
MATRICES = {
    "llama": [((INTER, HIDDEN), False), ((INTER, HIDDEN), False), ((HIDDEN, INTER), False)],
    "phi3": [((2 * INTER, HIDDEN), False), ((HIDDEN, INTER), False)],
    "phi": [((INTER, HIDDEN), True), ((HIDDEN, INTER), True)],
    "gpt2": [((INTER, HIDDEN), True), ((HIDDEN, INTER), True)],
}


def expected_layer(family: str, cfg: DeRSConfig) -> dict[str, int]:
    """The paper's counting, written out by hand for one upcycled FFN."""
    n, e = cfg.num_experts, cfg.num_experts + int(cfg.shared_expert)
    router = n * HIDDEN
    deltas = extra_bias = index = trainable_bias = base = dense = 0
    for (out_f, in_f), biased in MATRICES[family]:
        dense += out_f * in_f + (out_f if biased else 0)
        if cfg.delta_type == "lowrank":
            deltas += e * cfg.rank * (out_f + in_f)
        elif cfg.delta_type == "sparse":
            nnz = round(out_f * in_f * (1 - cfg.sparse_rate))
            deltas += e * nnz
            index += e * nnz
        else:
            deltas += (e - 1) * out_f * in_f
        if biased:
            extra_bias += (e - 1) * out_f
            trainable_bias += e * out_f
        base += out_f * in_f
    stored_deltas = deltas + (base if cfg.delta_type == "full" else 0)  # full: E copies held, E - 1 counted
    trainable = router + stored_deltas + trainable_bias + (base if cfg.train_base and cfg.delta_type != "full" else 0)
    return {
        "router": router,
        "deltas": deltas,
        "extra_biases": extra_bias,
        "added": router + deltas + extra_bias,
        "index_entries": index,
        "index_bytes": 4 * index,
        "trainable": trainable,
        "dense": dense,
    }


CASES = [
    ("llama", {"delta_type": "lowrank", "rank": 3}),
    ("llama", {"delta_type": "lowrank", "rank": 3, "shared_expert": True, "train_base": False}),
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.9}),
    ("llama", {"delta_type": "sparse", "sparse_rate": 0.99, "shared_expert": True}),
    ("llama", {"delta_type": "full"}),
    ("llama", {"delta_type": "full", "shared_expert": True}),
    ("phi3", {"delta_type": "lowrank", "rank": 2}),
    ("phi", {"delta_type": "lowrank", "rank": 2}),
    ("phi", {"delta_type": "sparse", "sparse_rate": 0.7, "shared_expert": True}),
    ("phi", {"delta_type": "full", "shared_expert": True}),
    ("gpt2", {"delta_type": "full"}),
    ("gpt2", {"delta_type": "lowrank", "rank": 4, "shared_expert": True, "train_base": False}),
]


@pytest.mark.parametrize("family,kwargs", CASES)
def test_counts_match_hand_formulas(family, kwargs):
    dense_model = tiny_model(family, hidden=HIDDEN, inter=INTER, layers=2)
    dense_count = sum(p.numel() for p in dense_model.parameters())
    cfg = DeRSConfig(num_experts=4, top_k=2, **kwargs)
    peft_model = get_peft_model(dense_model, cfg)
    report = parameter_report(peft_model)

    want = expected_layer(family, cfg)
    assert len(report.layers) == 2
    for layer in report.layers:
        got = {k: getattr(layer, k) for k in want}
        assert got == want
        assert layer.total == want["dense"] + want["added"]
    assert report.dense_params == dense_count
    assert report.added_params == 2 * want["added"]
    assert report.total_params == dense_count + 2 * want["added"]
    assert report.index_entries == 2 * want["index_entries"]
    assert report.index_bytes == 2 * want["index_bytes"]
    assert report.trainable_params == 2 * want["trainable"]
    assert report.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert report.stored_params == sum(p.numel() for p in peft_model.parameters())
    assert report.as_dict()["added_params"] == report.added_params


def test_only_the_requested_adapter_is_counted_and_modules_to_save_are_not_dense():
    model = tiny_model("llama")
    dense_count = sum(p.numel() for p in model.parameters())
    cfg = DeRSConfig(num_experts=2, top_k=1, rank=1, modules_to_save=["lm_head"])
    peft_model = get_peft_model(model, cfg)
    peft_model.add_adapter("big", DeRSConfig(num_experts=4, top_k=2, delta_type="full"))
    small = parameter_report(peft_model, "default")
    big = parameter_report(peft_model, "big")
    assert small.dense_params == big.dense_params == dense_count
    assert small.layers[0].added == expected_layer("llama", cfg)["added"]
    assert (
        big.layers[0].added == expected_layer("llama", DeRSConfig(num_experts=4, top_k=2, delta_type="full"))["added"]
    )
    with pytest.raises(ValueError, match="adapter_name='nope'"):
        parameter_report(peft_model, "nope")
    with pytest.raises(ValueError, match="no DeRS layers"):
        parameter_report(tiny_model("llama"))


def test_report_prints(capsys):
    peft_model = get_peft_model(tiny_model("phi"), DeRSConfig(delta_type="sparse", sparse_rate=0.9, num_experts=3))
    report = parameter_report(peft_model, verbose=True)
    printed = capsys.readouterr().out
    assert printed.strip() == str(report).strip()
    assert "model.layers.0.mlp" in printed and "model.layers.1.mlp" in printed
    assert f"added parameters:            {report.added_params:,}" in printed
    assert f"trainable parameters:        {report.trainable_params:,}" in printed
    assert f"{report.index_entries:,} entries, {report.index_bytes:,} bytes" in printed


def stablelm_2_1_6b_on_meta():
    """StableLM-2-1.6B's shape (hidden 2048, intermediate 5632, 24 blocks, vocab 100352), never allocated."""
    cfg = transformers.StableLmConfig(
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    with torch.device("meta"):
        return transformers.StableLmForCausalLM(cfg)


def test_paper_example_stablelm_2_1_6b_vanilla_on_meta():
    """Vanilla upcycling of every other block with N=4 adds 1.24B parameters (method notes); the count includes the
    routers (12 x 4 x 2048 = 98,304, too few to move the figure)."""
    model = stablelm_2_1_6b_on_meta()
    dense = sum(p.numel() for p in model.parameters())
    cfg = DeRSConfig(
        num_experts=4, top_k=2, delta_type="full", layers_to_transform=list(range(0, 24, 2)), layers_pattern="layers"
    )
    peft_model = get_peft_model(model, cfg)
    assert {p.device.type for p in peft_model.parameters()} == {"meta"}
    assert {b.device.type for b in peft_model.buffers()} <= {"meta"}

    report = parameter_report(peft_model)
    ffn_params = 3 * 2048 * 5632
    assert len(report.layers) == 12
    assert report.added_params == 12 * (3 * ffn_params + 4 * 2048) == 1_245_806_592
    assert 1.24e9 <= report.added_params < 1.25e9  # "1.24B" (1.2458B; the figure is truncated, not rounded)
    assert report.dense_params == dense
    assert 1.6e9 < dense < 1.7e9


@pytest.mark.parametrize("kwargs", [{"delta_type": "lowrank", "rank": 4}, {"delta_type": "sparse"}])
def test_deltas_on_meta_are_countable(kwargs):
    model = stablelm_2_1_6b_on_meta()
    cfg = DeRSConfig(num_experts=8, top_k=2, shared_expert=True, **kwargs)
    peft_model = get_peft_model(model, cfg)
    assert {p.device.type for p in peft_model.parameters()} == {"meta"}
    assert {b.device.type for b in peft_model.buffers()} <= {"meta"}
    report = parameter_report(peft_model)
    mats = [(5632, 2048), (5632, 2048), (2048, 5632)]
    if cfg.delta_type == "lowrank":
        per_layer = 9 * 4 * sum(o + i for o, i in mats)
        index = 0
    else:
        per_layer = 9 * sum(round(o * i * (1 - cfg.sparse_rate)) for o, i in mats)
        index = per_layer
    assert report.added_params == 24 * (8 * 2048 + per_layer)
    assert report.index_entries == 24 * index
    assert str(report).count("mlp") == 24
    layer = next(iter(peft_model.base_model.ders_layers().values()))
    assert ffn.intermediate_size(layer.base_layer, layer.layout) == 5632
