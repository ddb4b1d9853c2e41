"""Baseline MoE compressors (expert pruning, expert merging, plain SVD) against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moe_testing import VOCAB, E, K, _batches, tiny_model
from transformers import AutoModelForCausalLM

from ders_peft.compression.baselines import (
    GroupedExperts,
    LowRankExperts,
    expert_params,
    merge_experts,
    prune_experts,
    svd_experts,
)
from ders_peft.compression.moe_blocks import expert_intermediate, find_moe_blocks
from ders_peft.compression.svd import rank_for_ratio

SOFTMAX_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _block_inputs(model, ids) -> dict[int, torch.Tensor]:
    """The hidden states entering each MoE block of ``model`` (flattened to (T, H))."""
    seen, handles = {}, []
    for idx, layer in enumerate(model.model.layers):
        handles.append(
            layer.mlp.register_forward_pre_hook(lambda m, a, i=idx: seen.__setitem__(i, a[0].flatten(0, 1)))
        )
    _logits(model, ids)
    for h in handles:
        h.remove()
    return seen


def _direct_frequency(model, batches) -> dict[int, torch.Tensor]:
    """Router top-k picks per expert over the non-padding tokens, counted from the router's own outputs."""
    counts = {idx: torch.zeros(E, dtype=torch.long) for idx in find_moe_blocks(model)}
    current, handles = {}, []
    for idx, info in find_moe_blocks(model).items():
        handles.append(info.router.register_forward_hook(lambda m, a, out, i=idx: current.__setitem__(i, out[2])))
    for batch in batches:
        with torch.no_grad():
            model(**batch)
        keep = batch["attention_mask"].reshape(-1).bool()
        for idx, top in current.items():
            counts[idx] += torch.bincount(top[keep].reshape(-1), minlength=E)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("arch", SOFTMAX_ARCHS)
@pytest.mark.parametrize("method", ["prune", "merge"])
def test_ratio_zero_reproduces_the_logits(arch, method):
    model = tiny_model(arch)
    fn = prune_experts if method == "prune" else merge_experts
    out = fn(model, 0.0, _batches())
    assert torch.allclose(_logits(out.model, _ids()), _logits(model, _ids()), atol=1e-5)
    assert out.stored["compressed"] == out.stored["original"] and out.achieved_ratio == 0.0


@pytest.mark.parametrize("arch", SOFTMAX_ARCHS)
def test_pruned_experts_get_no_tokens_and_routing_is_the_masked_softmax(arch):
    model = tiny_model(arch)
    batches = _batches()
    out = prune_experts(model, 0.5, batches)
    freq = _direct_frequency(model, batches)
    ids = _ids()
    inputs = _block_inputs(out.model, ids)
    seen, handles = {}, []
    for idx, info in find_moe_blocks(out.model).items():
        handles.append(info.router.register_forward_hook(lambda m, a, o, i=idx: seen.__setitem__(i, o)))
    _logits(out.model, ids)
    for h in handles:
        h.remove()
    for idx, info in find_moe_blocks(model).items():
        kept = out.details[idx]["kept"]
        pruned = sorted(set(range(E)) - set(kept))
        assert len(pruned) == 2 and out.details[idx]["pruned"] == pruned
        assert min(freq[idx][kept].tolist()) >= max(freq[idx][pruned].tolist())  # the least-frequent ones go
        router = find_moe_blocks(out.model)[idx].router
        assert router.kept_experts.tolist() == kept
        _, weights, chosen = seen[idx]
        original_ids = router.kept_experts[chosen]
        assert not torch.isin(original_ids, torch.tensor(pruned)).any()
        # direct: the original router's logits with the pruned experts at -inf, softmax, top-k, renormalisation
        logits = F.linear(inputs[idx], info.router_weight).float()
        logits[:, pruned] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = probs.topk(K, dim=-1)
        if info.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        assert torch.equal(original_ids, top_i)
        torch.testing.assert_close(weights.float(), top_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_pruned_block_equals_direct_sum_over_kept_experts(arch):
    model = tiny_model(arch)
    out = prune_experts(model, 0.25, _batches())
    ids = _ids(3)
    x = _block_inputs(out.model, ids)[1]
    block = find_moe_blocks(out.model)[1]
    orig = find_moe_blocks(model)[1]
    kept = out.details[1]["kept"]
    logits = F.linear(x, orig.router_weight).float()
    logits[:, sorted(set(range(E)) - set(kept))] = float("-inf")
    top_w, top_i = torch.softmax(logits, -1).topk(K, dim=-1)
    if orig.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(top_w[t], top_i[t].tolist()):
            expected[t] += w * F.linear(expert_intermediate(orig, x[t : t + 1], e), orig.down[e])[0]
    with torch.no_grad():
        got = block.block(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_pruned_model_saves_and_reloads(tmp_path):
    out = prune_experts(tiny_model("mixtral"), 0.5, _batches())
    out.model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_local_experts == E - 2
    assert torch.allclose(_logits(again, _ids()), _logits(out.model, _ids()), atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_merged_experts_are_the_frequency_weighted_mean(arch):
    model = tiny_model(arch)
    batches = _batches()
    out = merge_experts(model, 0.5, batches)
    freq = _direct_frequency(model, batches)
    for idx, info in find_moe_blocks(model).items():
        groups = out.details[idx]["groups"]
        assert len(groups) == E - 2 and sorted(sum(groups, [])) == list(range(E))
        leaders = sorted(sorted(range(E), key=lambda j: (-int(freq[idx][j]), j))[: E - 2])
        assert all(any(lead in g for g in groups) for lead in leaders)  # the most frequent lead the groups
        grouped = out.model.model.layers[idx].mlp.experts
        assert isinstance(grouped, GroupedExperts)
        inner = grouped.experts
        for g, members in enumerate(groups):
            f = freq[idx][members].double()
            inter = info.intermediate_size
            pairs = ((info.gate, inner.gate_up_proj[g, :inter]), (info.up, inner.gate_up_proj[g, inter:]))
            for w, got in (*pairs, (info.down, inner.down_proj[g])):
                direct = (f[:, None, None] * w[members].double()).sum(0) / f.sum()
                torch.testing.assert_close(got.double(), direct, atol=1e-6, rtol=1e-6)
            for e in members:
                assert grouped.expert_to_group[e] == g


def test_merged_block_runs_each_experts_group_weights():
    model = tiny_model("mixtral")
    out = merge_experts(model, 0.5, _batches())
    ids = _ids(4)
    x = _block_inputs(out.model, ids)[1]
    orig = find_moe_blocks(model)[1]
    inner = out.model.model.layers[1].mlp.experts.experts
    group = out.model.model.layers[1].mlp.experts.expert_to_group
    top_w, top_i = torch.softmax(F.linear(x, orig.router_weight).float(), -1).topk(K, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)  # Mixtral renormalises
    inter = inner.down_proj.shape[2]
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(top_w[t], top_i[t].tolist()):
            g = int(group[e])
            gate, up = inner.gate_up_proj[g, :inter], inner.gate_up_proj[g, inter:]
            h = F.silu(x[t] @ gate.T) * (x[t] @ up.T)
            expected[t] += w * (h @ inner.down_proj[g].T)
    with torch.no_grad():
        got = out.model.model.layers[1].mlp(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_svd_at_full_rank_reproduces(arch):
    model = tiny_model(arch)
    out = svd_experts(model, rank=10**6)
    assert all(d["rank"] == 16 for d in out.details.values())  # min(I, H) = min(16, 32)
    assert torch.allclose(_logits(out.model, _ids()), _logits(model, _ids()), atol=1e-5)


def test_svd_from_ratio_is_the_best_rank_r_approximation():
    model = tiny_model("qwen3_moe")
    out = svd_experts(model, 0.5)
    info = find_moe_blocks(model)[0]
    r = rank_for_ratio(E, 16, 32, 0.5, base_fraction=0.0)
    assert r == math.floor(0.5 * 16 * 32 / 48) == out.details[0]["rank"]
    experts = out.model.model.layers[0].mlp.experts
    assert isinstance(experts, LowRankExperts)
    approx = experts.expert_weights()
    for proj, w in (("gate", info.gate), ("up", info.up), ("down", info.down)):
        s = torch.linalg.svdvals(w.double())
        err = (approx[proj].double() - w.double()).norm(dim=(1, 2))
        torch.testing.assert_close(err, s[:, r:].square().sum(-1).sqrt(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_stored_params_equal_the_direct_count(arch):
    model = tiny_model(arch)
    layers, inter, hidden = 2, 16, 32
    original = layers * E * 3 * inter * hidden
    assert expert_params(model) == original
    pruned = prune_experts(model, 0.25, _batches())  # round(0.25 * 4) = 1 expert removed per layer
    assert pruned.stored == {"compressed": layers * 3 * 3 * inter * hidden, "original": original}
    merged = merge_experts(model, 0.5, _batches())
    assert merged.stored == {"compressed": layers * 2 * 3 * inter * hidden, "original": original}
    assert merged.achieved_ratio == 0.5
    low = svd_experts(model, 0.4)
    r = rank_for_ratio(E, inter, hidden, 0.4, base_fraction=0.0)
    assert low.stored == {"compressed": layers * E * 3 * r * (inter + hidden), "original": original}
    assert low.achieved_ratio >= 0.4
    own = sum(p.numel() for layer in low.model.model.layers for p in layer.mlp.experts.parameters())
    assert own == low.stored["compressed"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.4", None])
def test_bad_ratio_is_refused_by_name(bad):
    model = tiny_model("mixtral")
    for call in (
        lambda: prune_experts(model, bad, _batches()),
        lambda: merge_experts(model, bad, _batches()),
        lambda: svd_experts(model, bad),
    ):
        with pytest.raises(ValueError, match="ratio"):
            call()


def test_unreachable_settings_are_refused_by_name():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="`ratio`.*top_k"):
        prune_experts(model, 0.75, _batches())  # 1 expert left for top-2
    with pytest.raises(ValueError, match="`ratio`"):
        merge_experts(model, 0.9, _batches())  # round(3.6) = 4: no group left
    with pytest.raises(ValueError, match="`rank`"):
        svd_experts(model, rank=-1)
    with pytest.raises(ValueError, match="softmax"):
        prune_experts(tiny_model("deepseek_v3"), 0.25, _batches())


def test_input_model_is_not_modified():
    model = tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_experts(model, 0.5, _batches())
    merge_experts(model, 0.5, _batches())
    svd_experts(model, 0.5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_experts == E


def test_whitened_svd_ablation_lowers_the_output_error():
    """With calibration, svd_experts uses the truncation-aware SVD: lower error on the experts' own inputs."""
    from ders_peft.compression.calibration import collect_statistics

    model = tiny_model("mixtral")
    batches = _batches(n=4)
    plain = svd_experts(model, 0.6)
    white = svd_experts(model, 0.6, calibration=batches)
    assert white.stored == plain.stored and white.details[0] == {"rank": plain.details[0]["rank"], "whitened": True}
    stats = collect_statistics(model, batches, fisher=False, progress=False)
    info = find_moe_blocks(model)[0]
    wp = plain.model.model.layers[0].mlp.experts.expert_weights()
    ww = white.model.model.layers[0].mlp.experts.expert_weights()
    for proj, w, gram in (("gate", info.gate, stats[0].gram_in), ("down", info.down, stats[0].gram_mid)):
        for e in range(E):
            err = {k: ((v[proj][e].double() - w[e].double()) @ gram[e] * (v[proj][e].double() - w[e].double())).sum()
                   for k, v in (("plain", wp), ("white", ww))}  # fmt: skip
            assert err["white"] <= err["plain"] * 1.001, (proj, e, err)
    full = svd_experts(model, rank=10**6, calibration=batches)
    assert torch.allclose(_logits(full.model, _ids()), _logits(model, _ids()), atol=1e-5)
