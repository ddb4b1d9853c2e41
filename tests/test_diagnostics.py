"""Diagnostics: every number against a direct computation from explicitly synthesised weights / router logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ders_testing import ders_layers, randomize_adapter, tiny_model
from moe_testing import tiny_model as tiny_moe
from peft import get_peft_model
from trainer_testing import COMMON_ARGS, SENTENCE, InputCapture, padded_lm_dataset, single_thread, word_tokenizer
from transformers import Trainer, TrainingArguments

import ders_peft
from ders_peft import diagnostics
from ders_peft.diagnostics.router_load import RouterRecorder


def _ders(delta_type: str = "lowrank", **kw):
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type=delta_type, rank=2, sparse_rate=0.5, **kw)
    model = get_peft_model(tiny_model("llama", hidden=16, inter=24), cfg)
    randomize_adapter(model, std=0.3)
    return model.eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _direct_weights(layer):
    """Per projection: base and W_base + Delta_e built by hand from the delta's own factors."""
    adapter = layer.active_adapters[0]
    out = {}
    for proj, delta in layer.ders_delta[adapter].items():
        base = layer.ders_base[adapter].get_submodule(proj).weight.detach()
        a = delta.lora_a.weight.detach().view(4, 2, -1)
        b = delta.lora_b.weight.detach().view(-1, 4, 2)
        out[proj] = (base, [base + b[:, e] @ a[e] for e in range(4)])
    return out


def test_similarity_matches_direct_cosines():
    model = _ders()
    sim = diagnostics.expert_similarity(model)
    layers = ders_layers(model)
    assert list(sim) == [layer.key for layer in layers]
    for layer in layers:
        direct = _direct_weights(layer)
        got = sim[layer.key]["projections"]
        for proj, (base, experts) in direct.items():
            for e, w in enumerate(experts):
                assert got[proj]["to_base"][e] == pytest.approx(_cos(w, base), abs=1e-6)
                for f, v in enumerate(experts):
                    assert got[proj]["pairwise"][e][f] == pytest.approx(_cos(w, v), abs=1e-6)
        whole_base = torch.cat([b.flatten() for b, _ in direct.values()])
        whole = [torch.cat([ex[e].flatten() for _, ex in direct.values()]) for e in range(4)]
        assert got["ffn"]["to_base"] == pytest.approx([_cos(w, whole_base) for w in whole], abs=1e-6)
        assert min(got["ffn"]["to_base"]) < 0.9999  # randomised deltas: the experts differ from the base


def test_spectrum_matches_svdvals_and_lowrank_bound():
    model = _ders()
    spec = diagnostics.delta_spectrum(model)
    for layer in ders_layers(model):
        for proj, (base, experts) in _direct_weights(layer).items():
            entry = spec[layer.key]["projections"][proj]
            for e, w in enumerate(experts):
                s = torch.linalg.svdvals((w - base).double())
                energy = (s**2).cumsum(0) / (s**2).sum()
                want99 = int((energy >= 0.99 - 1e-12).nonzero()[0]) + 1
                assert entry["rank99"][e] == want99
                assert entry["rank99"][e] <= 2  # rank-2 deltas
                assert entry["top_singular_value"][e] == pytest.approx(float(s[0]), rel=1e-4)
            curve = dict(zip(entry["energy_curve"]["rank"], entry["energy_curve"]["energy"], strict=True))
            s_all = [torch.linalg.svdvals((w - base).double()) for w in experts]
            mean1 = sum(float(s[0] ** 2 / (s**2).sum()) for s in s_all) / 4
            assert curve[1] == pytest.approx(mean1, abs=1e-5)


def _direct_load(logits: torch.Tensor, top_k: int, mask=None) -> dict:
    if mask is not None:
        logits = logits[mask.reshape(-1).bool()]
    probs = torch.softmax(logits.double(), -1)
    n = probs.shape[1]
    counts = torch.zeros(n, dtype=torch.float64)
    for row in probs.topk(top_k, -1).indices:
        for e in row.tolist():
            counts[e] += 1
    share = counts / counts.sum()
    entropy = float((-(probs * probs.log()).sum(-1)).mean())
    return {"share": share.tolist(), "balance": float(n * (share**2).sum()), "entropy": entropy}


def _layer_inputs(model, layers, run):
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: seen.setdefault(i, []).append(a[0])) for i, m in
             enumerate(layers)]  # fmt: skip
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for i, xs in seen.items()}


def test_router_load_matches_topk_counts():
    model = _ders()
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0))
    layers = ders_layers(model)
    with torch.no_grad():
        inputs = _layer_inputs(model, layers, lambda: model(input_ids=ids.unsqueeze(0)))
    load = diagnostics.router_load(model, ids)
    for i, layer in enumerate(layers):
        logits = inputs[i] @ layer.ders_router["default"].weight.detach().t()
        want = _direct_load(logits, 2)
        got = load[layer.key]
        assert got["tokens"] == 40
        assert got["share"] == pytest.approx(want["share"], abs=1e-6)
        assert got["balance"] == pytest.approx(want["balance"], abs=1e-6)
        assert got["max_over_mean"] == pytest.approx(4 * max(want["share"]), abs=1e-6)
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-5)
        assert got["normalized_entropy"] == pytest.approx(want["entropy"] / math.log(4), abs=1e-5)


def test_mixtral_base_is_mean_and_router_hook_reads_its_choices(tmp_path):
    model = tiny_moe("mixtral")
    ids = torch.randint(0, 100, (30,), generator=torch.Generator().manual_seed(1))
    result = diagnostics.inspect_model(model, ids, out_dir=tmp_path / "out")
    from ders_peft.compression.moe_blocks import find_moe_blocks

    blocks = find_moe_blocks(model)
    assert result["model"]["kind"] == "moe" and len(result["similarity"]) == len(blocks)
    seen = {}
    hooks = [info.block.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i, info in
             blocks.items()]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids.unsqueeze(0))
    for h in hooks:
        h.remove()
    for (idx, info), name in zip(blocks.items(), result["similarity"], strict=True):
        mean = info.gate.double().mean(0)
        got = result["similarity"][name]["projections"]["gate_proj"]["to_base"]
        assert got == pytest.approx([_cos(info.gate[e], mean) for e in range(4)], abs=1e-6)
        logits = seen[idx].reshape(-1, 32) @ info.router_weight.t()
        want = _direct_load(logits, 2)
        assert result["router_load"][name]["share"] == pytest.approx(want["share"], abs=1e-6)
        assert result["router_load"][name]["entropy"] == pytest.approx(want["entropy"], abs=1e-5)
    data = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert data["similarity"] == json.loads(json.dumps(result["similarity"]))
    assert data["router_load"] == json.loads(json.dumps(result["router_load"]))
    assert set(result["files"]) == set(diagnostics.api.FILES)


def test_inspect_path_adapter_and_moe_dirs(tmp_path):
    model = _ders()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    dense = tiny_model("llama", hidden=16, inter=24)
    dense.save_pretrained(base_dir)
    word_tokenizer().save_pretrained(adapter_dir)
    model.save_pretrained(adapter_dir)
    text = tmp_path / "t.txt"
    text.write_text(SENTENCE * 3)
    result = diagnostics.inspect_path(
        str(adapter_dir), base=str(base_dir), text_file=str(text), out_dir=str(tmp_path / "o")
    )
    assert result["router_load"] is not None
    first = next(iter(result["router_load"].values()))
    assert first["tokens"] == len(word_tokenizer()(SENTENCE * 3)["input_ids"])
    summary = (tmp_path / "o" / "summary.txt").read_text()
    for name, row in result["summary"].items():
        assert name in summary and f"{row['mean_expert_base_cosine']:.4f}" in summary
    want_sim = diagnostics.expert_similarity(model)
    for name in want_sim:
        got = result["similarity"][name]["projections"]["ffn"]["to_base"]
        assert got == pytest.approx(want_sim[name]["projections"]["ffn"]["to_base"], abs=1e-5)
    # without text: router load skipped with a note; a transformers MoE directory works too
    moe_dir = tmp_path / "moe"
    tiny_moe("mixtral").save_pretrained(moe_dir)
    plain = diagnostics.inspect_path(str(moe_dir), out_dir=str(tmp_path / "o2"))
    assert plain["router_load"] is None and any("router load skipped" in n for n in plain["notes"])
    assert "router_load.png" not in plain["files"] and (tmp_path / "o2" / "similarity.png").stat().st_size > 0


def test_bad_inputs_name_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        diagnostics.inspect_path(missing, out_dir=str(tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*neither adapter_config.json"):
        diagnostics.inspect_path(str(empty), out_dir=str(tmp_path / "o"))
    dense_dir = tmp_path / "dense"
    tiny_model("llama", hidden=16, inter=24).save_pretrained(dense_dir)
    with pytest.raises(ValueError, match="neither DeRS layers nor MoE blocks"):
        diagnostics.inspect_path(str(dense_dir), out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="input_ids is invalid"):
        diagnostics.router_load(tiny_moe("mixtral"), torch.zeros(0, dtype=torch.long))


def test_router_stats_callback_logs_direct_values():
    tok = word_tokenizer()
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, rank=2, router_init_std=0.5)
    model = get_peft_model(tiny_model("llama", hidden=16, inter=24), cfg)
    data = padded_lm_dataset(tok, [SENTENCE, "the cat sat", "a dog ran to the tree"])
    args = TrainingArguments(
        output_dir="/tmp/ders_diag_cb", max_steps=1, per_device_train_batch_size=3, learning_rate=0.0, **COMMON_ARGS
    )
    callback = diagnostics.RouterStatsCallback()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    layers = ders_layers(model)
    capture = InputCapture(model)
    with single_thread():
        inputs = _layer_inputs(model, layers, trainer.train)
    capture.remove()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    (batch,) = capture.calls  # one step, the whole dataset in one batch
    assert callback.recorder is None  # hooks removed at the end
    for i, layer in enumerate(layers):
        logits = inputs[i] @ layer.ders_router["default"].weight.detach().t()
        want = _direct_load(logits, 2, batch["attention_mask"])
        assert logged[f"router/{layer.key}/balance"] == pytest.approx(want["balance"], abs=1e-5)
        assert logged[f"router/{layer.key}/entropy"] == pytest.approx(want["entropy"], abs=1e-5)


def test_recorder_training_only_skips_eval():
    model = _ders()
    with RouterRecorder(model, training_only=True) as rec, torch.no_grad():
        model(input_ids=torch.zeros(1, 5, dtype=torch.long))
    assert rec.stats() == {}
