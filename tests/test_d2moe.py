"""D2-MoE compression end to end: exactness at full rank, the bases, SVD kinds, ratio accounting, saving, healing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from moe_testing import ARCHS, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from ders_peft import CompressionConfig, compress
from ders_peft.compression.d2_experts import D2Experts
from ders_peft.compression.d2moe import calibration_batches, decompress, stored_expert_params
from ders_peft.compression.moe_blocks import find_moe_blocks

GEN = torch.Generator().manual_seed(5)
CALIB = [torch.randint(0, VOCAB, (20,), generator=GEN).tolist() for _ in range(6)]
IDS = torch.randint(0, VOCAB, (2, 9), generator=GEN)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_reproduces_every_architecture(arch):
    moe = tiny_model(arch)
    for cfg in (
        CompressionConfig(method="d2moe", rank=10_000),  # Fisher base, whitened SVD
        CompressionConfig(method="d2moe", rank=10_000, base_merge="mean", svd="plain"),
    ):
        small = compress(moe, cfg, calibration=CALIB, progress=False)
        torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)
        blocks = [m for m in small.modules() if isinstance(m, D2Experts)]
        assert len(blocks) == len(find_moe_blocks(moe))
        # the MoE's own router module is kept, weights untouched
        for (_, a), (_, b) in zip(find_moe_blocks(moe).items(), find_moe_blocks_router(small), strict=True):
            assert type(a.router) is type(b) and torch.equal(a.router.weight, b.weight)
    assert not any(isinstance(m, D2Experts) for m in moe.modules())  # the input is not modified


def find_moe_blocks_router(model):
    layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers)]
    return [(i, mlp.gate if hasattr(mlp, "gate") else mlp.router) for i, mlp in layers if _compressed(mlp)]


def _compressed(mlp) -> bool:
    return isinstance(getattr(mlp, "experts", None), D2Experts)


def _router_choices(moe, batches):
    """Expert ids each block's router picked on the calibration batches (padding excluded), by forward hooks."""
    counts, hooks = {}, []
    blocks = find_moe_blocks(moe)
    for idx, info in blocks.items():
        counts[idx] = torch.zeros(info.num_experts)

        def hook(module, args, output, idx=idx):
            hook.mask_store[idx] = output[-1]

        hook.mask_store = {}
        hooks.append((info.router.register_forward_hook(hook), hook))
    with torch.no_grad():
        for batch in batches:
            moe(**batch)
            keep = batch["attention_mask"].reshape(-1).bool()
            for _handle, hook in hooks:
                for idx, picked in hook.mask_store.items():
                    counts[idx] += torch.bincount(picked[keep].reshape(-1), minlength=len(counts[idx])).float()
                hook.mask_store.clear()
    for handle, _ in hooks:
        handle.remove()
    return counts


def test_mean_and_frequency_bases_equal_a_direct_computation():
    moe = tiny_model("mixtral")
    batches = calibration_batches(CALIB)
    counts = _router_choices(moe, batches)
    for merge in ("mean", "frequency"):
        small = compress(moe, CompressionConfig(method="d2moe", rank=2, base_merge=merge), calibration=CALIB)
        for idx, info in find_moe_blocks(moe).items():
            got = small.model.layers[idx].mlp.experts
            w = info.gate.double()
            if merge == "mean":
                want = w.mean(0)
            else:
                f = counts[idx].double()
                want = (f[:, None, None] * w).sum(0) / f.sum()
            torch.testing.assert_close(got.base_gate.double(), want, atol=1e-6, rtol=0)


def test_fisher_base_differs_and_whitened_svd_fits_the_calibration_data_better():
    moe = tiny_model("qwen3_moe")
    batches = calibration_batches(CALIB)
    want = torch.cat([_logits(moe, b["input_ids"]) for b in batches])
    errors = {}
    for svd in ("whitened", "plain"):
        small = compress(moe, CompressionConfig(method="d2moe", rank=2, svd=svd), calibration=CALIB)
        got = torch.cat([_logits(small, b["input_ids"]) for b in batches])
        errors[svd] = float((got - want).pow(2).mean())
    assert errors["whitened"] < errors["plain"]
    fisher = compress(moe, CompressionConfig(method="d2moe", rank=2), calibration=CALIB)
    mean = compress(moe, CompressionConfig(method="d2moe", rank=2, base_merge="mean"), calibration=CALIB)
    assert not torch.equal(fisher.model.layers[0].mlp.experts.base_up, mean.model.layers[0].mlp.experts.base_up)


@pytest.mark.parametrize("ratio,prune", [(0.2, 0.0), (0.4, 0.0), (0.4, 0.3), (0.6, 0.0)])
def test_the_ratio_reported_is_the_parameters_stored(ratio, prune):
    moe = tiny_model("mixtral")
    small = compress(moe, CompressionConfig(method="d2moe", ratio=ratio, base_prune=prune), calibration=CALIB)
    counts = stored_expert_params(small)
    direct = sum(p.numel() for m in small.modules() if isinstance(m, D2Experts) for p in m.parameters())
    original = sum(info.gate_up_param.numel() + info.down_param.numel() for info in find_moe_blocks(moe).values())
    assert counts == {"compressed": direct, "original": original}
    achieved = 1 - direct / original
    assert achieved >= ratio - 1e-9  # at least the requested share removed
    layers = json.loads(json.dumps(small.config.quantization_config.to_dict()))["layers"]
    for spec in layers.values():
        assert spec["kept_channels"] == 16 - round(16 * prune / 2)
        assert spec["dynamic_prune"] == round(16 * prune) - round(16 * prune / 2)


def test_semi_dynamic_pruning_zeroes_the_lowest_channels_per_batch():
    moe = tiny_model("mixtral")
    small = compress(moe, CompressionConfig(method="d2moe", rank=10_000, base_prune=0.5), calibration=CALIB)
    experts = small.model.layers[0].mlp.experts
    assert experts.base_down.shape[1] == 12 and experts.dynamic_prune == 4
    captured = {}
    handle = small.model.layers[0].mlp.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
    _logits(small)
    handle.remove()
    x = captured["x"].reshape(-1, 32)
    idx, w = small.model.layers[0].mlp.gate(x)[2], small.model.layers[0].mlp.gate(x)[1]
    # direct: every expert's full weights, the base down columns not kept are removed, and per batch the 4 kept
    # channels with the lowest ||W[:, j]|| * ||mix_j|| are zeroed in the base down projection's input
    weights = experts.expert_weights()
    mix = torch.zeros(x.shape[0], 16)
    y_delta = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            g = x[t] @ weights["gate_proj"][e].t()
            u = x[t] @ weights["up_proj"][e].t()
            h = torch.nn.functional.silu(g) * u
            mix[t] += w[t, s] * h
            y_delta[t] += w[t, s] * (h @ experts.deltas["down_proj"].materialize()[e].t())
    kept_mix = mix[:, experts.base_keep]
    score = kept_mix.norm(dim=0) * experts.base_down.norm(dim=0)
    kept_mix[:, score.topk(4, largest=False).indices] = 0
    want = y_delta + kept_mix @ experts.base_down.t()
    torch.testing.assert_close(experts(x, idx, w), want, atol=1e-5, rtol=0)


def test_expert_without_calibration_tokens_is_finite_and_reported():
    moe = tiny_model("mixtral")
    info = find_moe_blocks(moe)[0]

    def never_three(module, args, output):
        logits, weights, idx = output
        masked = logits.clone()
        masked[:, 3] = -torch.inf
        probs = torch.softmax(masked.float(), -1)
        top, top_idx = probs.topk(idx.shape[1], -1)
        return logits, top / top.sum(-1, keepdim=True), top_idx

    handle = info.router.register_forward_hook(never_three)
    try:
        small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4), calibration=CALIB, progress=False)
    finally:
        handle.remove()
    assert 3 in small.config.quantization_config.starved_experts["0"]
    assert all(torch.isfinite(p).all() for p in small.parameters())
    assert torch.isfinite(_logits(small)).all()


def test_save_and_fresh_process_load(tmp_path):
    moe = tiny_model("qwen2_moe")
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4, base_prune=0.25), calibration=CALIB)
    small.save_pretrained(tmp_path / "d2")
    saved = json.loads((tmp_path / "d2" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "ders_d2moe"
    assert saved["model_type"] == "ders_d2moe_qwen2_moe"
    card = (tmp_path / "d2" / "README.md").read_text()
    assert "import ders_peft" in card and "removed" in card and "base_prune" in card
    torch.save({"ids": IDS, "want": _logits(small)}, tmp_path / "check.pt")
    code = textwrap.dedent(
        f"""
        import torch, ders_peft
        from transformers import AutoModelForCausalLM
        from ders_peft.compression.d2_experts import D2Experts
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "d2")!r}).eval()
        assert any(isinstance(m, D2Experts) for m in model.modules())
        check = torch.load({str(tmp_path / "check.pt")!r})
        with torch.no_grad():
            got = model(input_ids=check["ids"]).logits
        assert torch.equal(got, check["want"]), (got - check["want"]).abs().max()
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]
    # without import ders_peft, transformers does not know the method: a clear failure, not a silent load
    bare = "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(" + repr(
        str(tmp_path / "d2")
    ) + ")"
    run = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "ders_d2moe_qwen2_moe" in run.stderr


def test_decompress_writes_a_standard_moe(tmp_path):
    moe = tiny_model("mixtral")
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4, base_prune=0.0), calibration=CALIB)
    plain = decompress(small)
    assert type(plain) is type(moe) and not hasattr(plain.config, "quantization_config")
    assert plain.config.model_type == "mixtral" and type(plain.config) is type(moe.config)
    torch.testing.assert_close(_logits(plain), _logits(small), atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(_logits(again), _logits(small), atol=1e-5, rtol=0)


def test_healing_trains_the_low_rank_factors():
    moe = tiny_model("mixtral")
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.6), calibration=CALIB, progress=False)
    small.train()
    params = [p for n, p in small.named_parameters() if ".deltas." in n]
    assert params
    for p in small.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.tensor(CALIB)
    losses = []
    for _ in range(8):
        loss = small(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_calibration_inputs_and_errors():
    class Tok:
        def __call__(self, text, truncation=True, max_length=8):
            return {"input_ids": [ord(c) % VOCAB for c in text][:max_length]}

    batches = calibration_batches(["abc", "de"], Tok(), batch_size=2)
    assert batches[0]["input_ids"].tolist() == [[97 % VOCAB, 98 % VOCAB, 99 % VOCAB], [100 % VOCAB, 101 % VOCAB, 0]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_batches(["abc"])
    with pytest.raises(ValueError, match="empty"):
        calibration_batches([])
    for field, value in (("ratio", 1.0), ("rank", -1), ("base_merge", "median"), ("svd", "qr"), ("base_prune", 2)):
        with pytest.raises(ValueError, match=f"CompressionConfig.{field}="):
            CompressionConfig(method="d2moe", **{field: value})


def test_share_v_shares_one_v_and_reproduces_at_full_rank():
    moe = tiny_model("olmoe")
    small = compress(moe, CompressionConfig(method="d2moe", rank=10_000, share_v=True), calibration=CALIB)
    torch.testing.assert_close(_logits(small), _logits(moe), atol=1e-5, rtol=0)
    experts = small.model.layers[0].mlp.experts
    for delta in experts.deltas.values():
        assert delta.shared_a and delta.lora_a.weight.shape[0] == delta.ranks[0]
    at_40 = compress(moe, CompressionConfig(method="d2moe", ratio=0.4, share_v=True), calibration=CALIB)
    counts = stored_expert_params(at_40)
    assert 1 - counts["compressed"] / counts["original"] >= 0.4
    plain_40 = compress(moe, CompressionConfig(method="d2moe", ratio=0.4), calibration=CALIB)
    ranks = (at_40.model.layers[0].mlp.experts.ranks, plain_40.model.layers[0].mlp.experts.ranks)
    assert ranks[0]["gate_proj"][0] > ranks[1]["gate_proj"][0]  # one V for all: the budget buys a higher rank


def test_trimmed_experts_compute_the_base_alone():
    moe = tiny_model("mixtral")
    counts = _router_choices(moe, calibration_batches(CALIB))
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.2, trim_experts=2), calibration=CALIB)
    for idx, layer in enumerate(small.model.layers):
        experts = layer.mlp.experts
        least = set(counts[idx].argsort()[:2].tolist())
        for proj, ranks in experts.ranks.items():
            assert {e for e, r in enumerate(ranks) if r == 0} == least, proj
        weights = experts.expert_weights()
        for e in least:
            torch.testing.assert_close(weights["gate_proj"][e], experts.base_gate)
    full = compress(moe, CompressionConfig(method="d2moe", ratio=0.2), calibration=CALIB)
    assert stored_expert_params(small)["compressed"] < stored_expert_params(full)["compressed"]
    with pytest.raises(ValueError, match="trim_experts=4 is invalid"):
        compress(moe, CompressionConfig(method="d2moe", trim_experts=4), calibration=CALIB)


def test_adaptive_ranks_keep_the_budget_and_reload(tmp_path):
    moe = tiny_model("mixtral")
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4, adaptive_ranks=True), calibration=CALIB)
    fixed = compress(moe, CompressionConfig(method="d2moe", ratio=0.4), calibration=CALIB)
    a, b = stored_expert_params(small), stored_expert_params(fixed)
    assert abs(a["compressed"] - b["compressed"]) <= 0.02 * b["compressed"]
    small.save_pretrained(tmp_path / "ad")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ad").eval()
    torch.testing.assert_close(_logits(again), _logits(small), atol=0, rtol=0)


@pytest.mark.parametrize("shared_a,ranks", [(False, [2, 0, 3, 1]), (True, [2, 2, 2, 2])])
def test_flex_lowrank_grouped_path_gradcheck_and_reference(shared_a, ranks):
    """The grouped path's FlexLowRankOp: double-precision gradcheck of every input, and the forward equals plain
    per-expert SwiGLU FFNs built from ``W_base + B_e A_e`` computed here from the raw factors."""
    from ders_peft import grouped_path
    from ders_peft.compression.d2_deltas import FlexLowRankDelta
    from ders_peft.functional import reference_moe_ffn
    from ders_peft.routing import route

    gen = torch.Generator().manual_seed(0)
    T, hidden, width, E = 7, 5, 4, 4
    deltas = [FlexLowRankDelta(E, width, hidden, ranks, shared_a, dtype=torch.float64) for _ in range(2)]
    deltas.append(FlexLowRankDelta(E, hidden, width, ranks, shared_a, dtype=torch.float64))
    for d in deltas:
        with torch.no_grad():
            d.lora_a.weight.normal_(generator=gen)
            d.lora_b.weight.normal_(generator=gen)
    plan, _ = route(torch.randn(T, E, generator=gen, dtype=torch.float64), 2, normalize=True)
    order, _, counts = plan.sorted_slots()
    ops = [grouped_path.EXPERT_OPS[type(d)](d) for d in deltas]
    shapes = [p.shape for op, d in zip(ops, deltas, strict=True) for p in type(op).params_of(d)]
    spec = grouped_path._Spec(
        torch.nn.functional.silu, True, True, ops, (2, 2, 2), (False, False), order, counts, 2, store_base=True
    )

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    weights = plan.weights.double().requires_grad_()
    inputs = [rnd(T, hidden), weights, rnd(width, hidden), rnd(width, hidden), *(rnd(*s) for s in shapes)]
    assert torch.autograd.gradcheck(lambda *t: grouped_path._GroupedSlots.apply(spec, *t), inputs)

    x = torch.randn(T, hidden, generator=gen, dtype=torch.float64)
    base = [torch.randn(width, hidden, generator=gen, dtype=torch.float64) for _ in range(2)]
    base_down = torch.randn(hidden, width, generator=gen, dtype=torch.float64)
    got = grouped_path.grouped_routed_ffn(
        x, plan, base, base_down, deltas[:2], deltas[2], [None, None], None, torch.nn.functional.silu, True
    )

    def synth(d, b):
        experts = []
        for e in range(E):
            rows = slice(0, ranks[0]) if shared_a else slice(sum(ranks[:e]), sum(ranks[: e + 1]))
            cols = slice(sum(ranks[:e]), sum(ranks[: e + 1]))
            experts.append(b + d.lora_b.weight[:, cols] @ d.lora_a.weight[rows])
        return torch.stack(experts).detach()

    want = reference_moe_ffn(
        x, plan.expert_idx, plan.weights, [synth(deltas[0], base[0]), synth(deltas[1], base[1])],
        synth(deltas[2], base_down), [None, None], None, torch.nn.functional.silu, True,
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_a_moe_loaded_from_a_legacy_checkpoint_round_trips(tmp_path):
    """transformers loads Mixtral checkpoints with per-expert legacy names and would save them back under those
    names; a D2-MoE model must save its compressed experts under their own names, so reloading is exact."""
    tiny_model("mixtral").save_pretrained(tmp_path / "moe")  # written with the legacy block_sparse_moe names
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4, base_prune=0.25), calibration=CALIB)
    small.save_pretrained(tmp_path / "d2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "d2").eval()
    torch.testing.assert_close(_logits(again), _logits(small), atol=0, rtol=0)
    with pytest.raises(ValueError, match="save_original_format=True is invalid"):
        small.save_pretrained(tmp_path / "legacy", save_original_format=True)


def _qwen2_moe_with_an_expert_sized_shared_expert():
    from moe_testing import _config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("qwen2_moe", shared_expert_intermediate_size=16)).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # a trained (non-zero) shared-expert gate
            layer.mlp.shared_expert_gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def test_a_shared_expert_of_the_experts_shape_becomes_one_more_delta(tmp_path):
    from ders_peft.compression.d2_experts import D2SharedExpert

    moe = _qwen2_moe_with_an_expert_sized_shared_expert()
    full = compress(moe, CompressionConfig(method="d2moe", rank=10_000), calibration=CALIB)
    assert all(isinstance(layer.mlp.shared_expert, D2SharedExpert) for layer in full.model.layers)
    torch.testing.assert_close(_logits(full), _logits(moe), atol=1e-5, rtol=0)
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4), calibration=CALIB)
    counts = stored_expert_params(small)
    direct = sum(p.numel() for layer in small.model.layers for p in layer.mlp.shared_expert.parameters())
    assert counts["shared_compressed"] == direct < counts["shared_original"] == 2 * 3 * 16 * 32
    small.save_pretrained(tmp_path / "d2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "d2").eval()
    assert isinstance(again.model.layers[0].mlp.shared_expert, D2SharedExpert)
    torch.testing.assert_close(_logits(again), _logits(small), atol=0, rtol=0)
    torch.testing.assert_close(_logits(decompress(small)), _logits(small), atol=1e-5, rtol=0)
    kept = compress(moe, CompressionConfig(method="d2moe", ratio=0.4, compress_shared=False), calibration=CALIB)
    assert not isinstance(kept.model.layers[0].mlp.shared_expert, D2SharedExpert)
    kept_up, moe_up = (m.model.layers[0].mlp.shared_expert.up_proj.weight for m in (kept, moe))
    assert torch.equal(kept_up, moe_up)


def test_a_shared_expert_of_another_width_is_kept_whole_or_refused():
    moe = tiny_model("qwen2_moe")  # shared expert 24 wide, routed experts 16
    small = compress(moe, CompressionConfig(method="d2moe", ratio=0.4), calibration=CALIB)
    assert type(small.model.layers[0].mlp.shared_expert) is type(moe.model.layers[0].mlp.shared_expert)
    with pytest.raises(ValueError, match="compress_shared=True is invalid.*intermediate size 24"):
        compress(moe, CompressionConfig(method="d2moe", ratio=0.4, compress_shared=True), calibration=CALIB)


def test_share_v_rank_uses_the_budget_up_to_the_stacked_rank():
    from ders_peft.compression.svd import shared_v_rank

    # 8 experts of (128 x 344) down projections at 20 %: the budget allows rank 174 > min(out, in) = 128
    assert shared_v_rank(8, 128, 344, 0.2, 1.0) == (int((0.8 * 8 - 1) * 128 * 344 // (8 * 128 + 344)))
    assert shared_v_rank(8, 128, 344, 0.2, 1.0) > 128
