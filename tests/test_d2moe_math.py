"""D2-MoE math steps: MoE block discovery and routing, calibration statistics, base merging, (whitened) SVD, ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moe_testing import ARCHS, COMMON, FF, VOCAB, E, H, K, _batches, _config, tiny_model  # noqa: F401
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
)

from ders_peft.compression.calibration import collect_statistics
from ders_peft.compression.merging import merge_base
from ders_peft.compression.moe_blocks import find_moe_blocks, moe_forward, route
from ders_peft.compression.svd import (
    achieved_ratio,
    adaptive_ranks,
    rank_for_ratio,
    truncated_svd,
    whitened_svd,
)

# --------------------------------------------------------------------------------------------- moe_blocks


def test_unknown_architecture_names_model_type_and_supported():
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=1, num_attention_heads=4
    )
    with pytest.raises(ValueError, match=r"llama.*mixtral.*qwen2_moe"):
        find_moe_blocks(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_extracted_weights_and_routing_match_the_block(arch):
    model = tiny_model(arch)
    blocks = find_moe_blocks(model)
    assert sorted(blocks) == [0, 1]
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(3))
    for info in blocks.values():
        gate_up = info.experts.gate_up_proj
        assert info.gate.shape == (E, FF, H) and info.up.shape == (E, FF, H) and info.down.shape == (E, H, FF)
        assert torch.equal(info.gate, gate_up[:, :FF]) and torch.equal(info.up, gate_up[:, FF:])
        assert info.top_k == K and info.router_weight.shape == (E, H)
        with torch.no_grad():
            _, ref_w, ref_idx = info.router(x)
        top_idx, top_w = route(info, x)
        assert torch.equal(top_idx, ref_idx)
        assert top_w.dtype == ref_w.dtype and torch.equal(top_w, ref_w)
        assert len(top_idx.unique()) > 1  # routing is not degenerate
    if arch == "qwen2_moe":
        assert blocks[0].shared_gate.shape == (24, H) and blocks[0].shared_expert_gate.shape == (1, H)
        assert blocks[0].norm_topk_prob is False
    if arch == "mixtral":
        assert blocks[0].norm_topk_prob is True and blocks[0].weights_in_float32


@pytest.mark.parametrize("arch", ARCHS)
def test_block_output_recomputed_from_extracted_weights(arch):
    model = tiny_model(arch)
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(4))
    for info in find_moe_blocks(model).values():
        with torch.no_grad():
            ref = info.block(x.clone())
            got = moe_forward(info, x)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_dense_layers_are_skipped():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("qwen2_moe", decoder_sparse_step=2))
    assert sorted(find_moe_blocks(model)) == [1]


# --------------------------------------------------------------------------------------------- calibration


def _direct_statistics(model, batches):
    """Per layer: (frequency, gram_in, gram_mid) from block inputs captured with a plain hook."""
    blocks = find_moe_blocks(model)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    handles = [
        b.block.register_forward_hook(lambda m, a, o, i=i: captured[i].append(a[0].detach().reshape(-1, H)))
        for i, b in blocks.items()
    ]
    masks = []
    with torch.no_grad():
        for batch in batches:
            model(**batch)
            masks.append(batch["attention_mask"].reshape(-1).bool())
    for h in handles:
        h.remove()
    out = {}
    for i, info in blocks.items():
        x_all = torch.cat([x[m] for x, m in zip(captured[i], masks)])
        gate_up = info.experts.gate_up_proj.detach()
        freq = torch.zeros(E, dtype=torch.int64)
        g_in, g_mid = torch.zeros(E, H, H, dtype=torch.float64), torch.zeros(E, FF, FF, dtype=torch.float64)
        for x, m in zip(captured[i], masks):
            with torch.no_grad():
                _, _, idx = info.router(x)
            x, idx = x[m], idx[m]
            for e in range(E):
                xe = x[(idx == e).any(-1)]
                freq[e] += len(xe)
                g_in[e] += xe.double().T @ xe.double()
                act = F.silu(xe @ gate_up[e, :FF].T) * (xe @ gate_up[e, FF:].T)
                g_mid[e] += act.double().T @ act.double()
        out[i] = freq, g_in, g_mid, len(x_all)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_frequencies_and_grams_equal_direct_computation(arch):
    model = tiny_model(arch)
    batches = _batches()
    stats = collect_statistics(model, batches, fisher=False, progress=False)
    direct = _direct_statistics(model, batches)
    assert sorted(stats) == sorted(direct)
    for i, (freq, g_in, g_mid, n_tok) in direct.items():
        s = stats[i]
        assert s.num_tokens == n_tok == sum(int(b["attention_mask"].sum()) for b in batches)
        assert torch.equal(s.frequency, freq) and int(s.frequency.sum()) == K * n_tok
        torch.testing.assert_close(s.gram_in, g_in, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(s.gram_mid, g_mid, rtol=1e-5, atol=1e-9)
        assert s.fisher_gate is None and s.num_batches == 2
        torch.testing.assert_close(s.router_frequency.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fisher_equals_squared_autograd_gradients(arch):
    model = tiny_model(arch)
    batch = _batches(seed=5, n=1)[0]
    flags = [p.requires_grad for p in model.parameters()]
    stats = collect_statistics(model, [batch], fisher=True, progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    try:
        for i, info in find_moe_blocks(model).items():
            g_gate_up, g_down = info.experts.gate_up_proj.grad, info.experts.down_proj.grad
            for got, ref in (
                (stats[i].fisher_gate, g_gate_up[:, :FF] ** 2),
                (stats[i].fisher_up, g_gate_up[:, FF:] ** 2),
                (stats[i].fisher_down, g_down**2),
            ):
                assert ref.abs().max() > 0
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    finally:
        model.zero_grad(set_to_none=True)
    plain = collect_statistics(model, [batch], fisher=False, progress=False)
    for i in stats:
        assert torch.equal(stats[i].frequency, plain[i].frequency)
        torch.testing.assert_close(stats[i].gram_in, plain[i].gram_in)


def test_expert_without_tokens_gives_finite_results():
    model = tiny_model("mixtral")
    never = 3

    def mask_router(module, args, output):  # a router that never picks expert 3
        logits = output[0].masked_fill(torch.arange(E) == never, float("-inf"))
        w, idx = torch.topk(torch.softmax(logits.float(), dim=-1), K, dim=-1)
        return output[0], w / w.sum(-1, keepdim=True), idx

    blocks = find_moe_blocks(model)
    handles = [b.router.register_forward_hook(mask_router) for b in blocks.values()]
    try:
        stats = collect_statistics(model, _batches(seed=6), fisher=True, progress=False)
    finally:
        for h in handles:
            h.remove()
    for i, s in stats.items():
        info = blocks[i]
        assert never in s.starved and int(s.frequency[never]) == 0
        assert not s.gram_in[never].any() and not s.fisher_gate[never].any() and not s.fisher_down[never].any()
        for weights, fisher, gram in ((info.gate, s.fisher_gate, s.gram_in), (info.down, s.fisher_down, s.gram_mid)):
            for method in ("mean", "frequency", "fisher"):
                base = merge_base(weights, method, frequency=s.frequency, fisher=fisher)
                assert torch.isfinite(base).all()
            delta = weights[never] - base
            u, v = whitened_svd(delta, gram[never], rank=4)
            assert torch.isfinite(u).all() and torch.isfinite(v).all()
            ref_u, ref_v = truncated_svd(delta, 4)
            torch.testing.assert_close(u @ v, ref_u @ ref_v)  # zero Gram -> plain SVD
            u, v = whitened_svd(weights[0] - base, gram[0], rank=4)
            assert torch.isfinite(u @ v).all()


# --------------------------------------------------------------------------------------------- merging


def test_merge_base_formulas():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(4, 6, 5, generator=gen)
    torch.testing.assert_close(merge_base(w, "mean"), w.mean(0))
    f = torch.tensor([1.0, 2.0, 3.0, 0.0])
    expected = (1 * w[0] + 2 * w[1] + 3 * w[2]) / 6
    torch.testing.assert_close(merge_base(w, "frequency", frequency=f), expected)
    torch.testing.assert_close(merge_base(w, "frequency", frequency=torch.tensor([2, 4, 6, 0])), expected)
    torch.testing.assert_close(merge_base(w, "frequency", frequency=torch.zeros(4)), w.mean(0))

    fisher = torch.rand(4, 6, 5, generator=gen)
    fisher[:, 0, 0] = 0.0  # no expert has Fisher mass here -> mean
    fisher[1:, 2, 3] = 0.0  # only expert 0 counts here
    base = merge_base(w, "fisher", fisher=fisher)
    ref = (fisher * w).sum(0) / fisher.sum(0)
    ref[0, 0] = w[:, 0, 0].mean()
    torch.testing.assert_close(base, ref)
    torch.testing.assert_close(base[2, 3], w[0, 2, 3])
    # constant per-expert Fisher is the frequency merge
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(
        merge_base(w, "fisher", fisher=c[:, None, None].expand_as(w)), merge_base(w, "frequency", frequency=c)
    )
    assert merge_base(w.double(), "mean").dtype == torch.float64


def test_merge_base_errors_name_the_argument():
    w = torch.randn(4, 6, 5)
    with pytest.raises(ValueError, match="method"):
        merge_base(w, "median")
    with pytest.raises(ValueError, match="weights"):
        merge_base(w[0], "mean")
    with pytest.raises(ValueError, match="fisher"):
        merge_base(w, "fisher", fisher=torch.rand(4, 5, 6))
    with pytest.raises(ValueError, match="fisher"):
        merge_base(w, "fisher")
    with pytest.raises(ValueError, match="frequency"):
        merge_base(w, "frequency", frequency=torch.ones(3))
    with pytest.raises(ValueError, match="frequency"):
        merge_base(w, "frequency", frequency=torch.tensor([1.0, -1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------------------------- svd


def test_truncated_svd_is_the_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(8)
    delta = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    u, v = truncated_svd(delta, 12)
    assert u.shape == (12, 12) and v.shape == (12, 20)
    torch.testing.assert_close(u @ v, delta, atol=1e-10, rtol=0)
    uu, s, vh = torch.linalg.svd(delta, full_matrices=False)
    for r in (1, 3, 7):
        u, v = truncated_svd(delta, r)
        torch.testing.assert_close(u @ v, uu[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-10, rtol=0)
        assert math.isclose(torch.linalg.norm(delta - u @ v), float(s[r:].square().sum().sqrt()), rel_tol=1e-9)
        torch.testing.assert_close(u.T @ u, v @ v.T)  # sqrt(Sigma) split evenly
    u, v = truncated_svd(delta.float(), 0)
    assert u.shape == (12, 0) and v.shape == (0, 20) and u.dtype == torch.float32
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(delta, 13)


def _correlated_inputs(n_tokens: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    scales = torch.logspace(1, -2, dim, dtype=torch.float64)  # condition number 1e3 per axis
    return torch.randn(n_tokens, dim, generator=gen, dtype=torch.float64) @ (q * scales) @ q.T + 0.5


def test_whitened_svd_lowers_output_error_on_correlated_inputs():
    x = _correlated_inputs(400, 32, seed=9)
    gram = x.T @ x
    delta = torch.randn(16, 32, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    for r in (2, 4, 8):
        uw, vw = whitened_svd(delta, gram, r, damping=1e-12)
        up, vp = truncated_svd(delta, r)
        err_w = torch.linalg.norm((delta - uw @ vw) @ x.T)
        err_p = torch.linalg.norm((delta - up @ vp) @ x.T)
        assert err_w < 0.9 * err_p  # measured ratios 0.81, 0.57, 0.28
        # optimal: the residual is the tail of the singular values of delta @ chol(gram)
        s = torch.linalg.svdvals(delta @ torch.linalg.cholesky(gram))
        assert math.isclose(float(err_w), float(s[r:].square().sum().sqrt()), rel_tol=1e-6)
    uw, vw = whitened_svd(delta, gram, 16)  # full rank with the default damping is exact
    torch.testing.assert_close(uw @ vw, delta, atol=1e-9, rtol=0)
    assert whitened_svd(delta.float(), gram, 3)[0].dtype == torch.float32


def test_whitened_svd_degenerate_grams_are_finite():
    delta = torch.randn(8, 10, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    u0, v0 = truncated_svd(delta, 3)
    u, v = whitened_svd(delta, torch.zeros(10, 10), 3)  # expert with no token
    torch.testing.assert_close(u @ v, u0 @ v0)
    one = torch.randn(1, 10, dtype=torch.float64)
    u, v = whitened_svd(delta, one.T @ one, 3, damping=0.0)  # rank-1 Gram, Cholesky fails, retried
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="gram"):
        whitened_svd(delta, torch.eye(8), 3)


# --------------------------------------------------------------------------------------------- ranks


def test_rank_for_ratio_hand_computed():
    # E=4, 16x32: m=512, per-rank cost E*(16+32)=192, original 2048, base 512
    assert rank_for_ratio(4, 16, 32, 0.5) == 2  # (1024 - 512) / 192 = 2.67
    assert rank_for_ratio(4, 16, 32, 0.0) == 8  # (2048 - 512) / 192 = 8
    assert rank_for_ratio(4, 16, 32, 0.75) == 0  # base alone is exactly 25 %
    assert rank_for_ratio(4, 16, 32, 0.5, base_fraction=0.5) == 4  # (1024 - 256) / 192 = 4
    assert math.isclose(achieved_ratio(4, 16, 32, 2), 1 - (512 + 2 * 192) / 2048)
    with pytest.raises(ValueError, match="unreachable"):
        rank_for_ratio(4, 16, 32, 0.8)
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(4, 16, 32, 1.0)
    # Mixtral-8x7B sized matrices, 40 %: (0.6 * 8 - 1) * 14336 * 4096 / (8 * 18432) = 1513.2
    r = rank_for_ratio(8, 14336, 4096, 0.4)
    assert r == 1513
    assert achieved_ratio(8, 14336, 4096, r) >= 0.4 > achieved_ratio(8, 14336, 4096, r + 1)


def test_adaptive_ranks_keep_the_budget():
    assert adaptive_ranks([1, 2, 1], 4, 100) == [3, 6, 3]
    assert adaptive_ranks([1, 10, 1], 4, 6) == [3, 6, 3]  # capped layer's excess goes to the others
    assert adaptive_ranks([0, 0, 0], 5, 8) == [5, 5, 5]
    ranks = adaptive_ranks([0.3, 0.1, 0.9, 0.2, 0.5], 7, 12)
    assert sum(ranks) == 35 and max(ranks) <= 12 and ranks[2] == max(ranks) and ranks[1] == min(ranks)
