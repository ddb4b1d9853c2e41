"""The D2-MoE benchmark's quick mode runs end to end and its numbers are sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "d2moe.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("d2moe")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "d2moe.json").read_text()), out


def _all_entries(result: dict) -> list[dict]:
    return result["d2"] + result["baselines"] + result["matched"] + result["calibration_sensitivity"]


def test_outputs_written(quick):
    result, out = quick
    assert (out / "d2moe.md").read_text().startswith("# D2-MoE vs expert pruning, merging and plain SVD")
    assert (out / "d2moe.png").stat().st_size > 10_000
    assert result["command"] == "python benchmarks/d2moe.py --quick"
    goals = {g["goal"] for g in result["goals"]}
    assert any(g.startswith("40 % compression") for g in goals) and any("whitened < plain" in g for g in goals)


def test_perplexities_finite(quick):
    result, _ = quick
    ppls = [result["uncompressed"]["test_ppl"], result["uncompressed"]["val_ppl"]]
    ppls += [e[k] for e in _all_entries(result) for k in ("test_ppl", "val_ppl")]
    ppls += [h[when]["test_ppl"] for h in result["healing"]["runs"] for when in ("before", "after")]
    assert all(math.isfinite(p) and p > 1 for p in ppls), ppls
    s = result["settings"]
    assert len(result["d2"]) == len(s["ratios"]) * len(s["merges"]) * len(s["svds"]) * len(s["base_prunes"])


def test_achieved_ratios(quick):
    result, _ = quick
    m = result["settings"]["moe"]
    original = m["num_layers"] * m["num_experts"] * 3 * m["intermediate_size"] * m["hidden_size"]
    for e in _all_entries(result):
        assert e["stored"]["original"] == original, e["id"]
        assert math.isclose(e["achieved_ratio"], 1 - e["stored"]["compressed"] / original), e["id"]
        if e["family"] in ("d2moe", "svd", "svd_whitened"):  # the largest rank removing at least the requested share
            assert e["ratio"] - 1e-9 <= e["achieved_ratio"] <= e["ratio"] + 0.05, (e["id"], e["achieved_ratio"])
        else:  # whole experts: round(ratio * E) of E per layer
            removed = round(e["ratio"] * m["num_experts"])
            assert math.isclose(e["achieved_ratio"], removed / m["num_experts"]), (e["id"], e["achieved_ratio"])


def test_lossless_settings_reproduce_the_uncompressed_moe(quick):
    result, _ = quick
    ref = result["uncompressed"]["test_ppl"]
    full = result["sanity"]["d2_full_rank"]
    assert abs(full["test_ppl"] / ref - 1) < 1e-4, (full["test_ppl"], ref)
    by_id = {e["id"]: e for e in result["baselines"]}
    for sid in ("prune_0", "merge_0"):
        assert by_id[sid]["achieved_ratio"] == 0
        assert abs(by_id[sid]["test_ppl"] / ref - 1) < 1e-5, (sid, by_id[sid]["test_ppl"], ref)
    # a real compression changes the model
    lossy = [e for e in result["d2"] if e["ratio"] >= 0.4]
    assert all(e["test_ppl"] != ref for e in lossy)


def test_healing_trains_only_the_stored_experts(quick):
    result, _ = quick
    m = result["settings"]["moe"]
    runs = {h["label"]: h for h in result["healing"]["runs"]}
    expert = m["num_layers"] * 3 * m["intermediate_size"] * m["hidden_size"]
    assert runs["control: uncompressed MoE"]["trainable_params"] == m["num_experts"] * expert
    pruned = next(h for label, h in runs.items() if label.startswith("expert pruning"))
    assert pruned["trainable_params"] == (m["num_experts"] - round(0.4 * m["num_experts"])) * expert
    chosen = result["chosen_variant"]
    d2 = next(h for label, h in runs.items() if label.startswith("D2-MoE") and "40" in label)
    stored = next(e for e in result["d2"] if e["variant"] == chosen and e["ratio"] == 0.4)["stored"]["compressed"]
    assert d2["trainable_params"] == stored


def test_generation_arms(quick):
    result, _ = quick
    arms = result["generation"]["arms"]
    assert set(arms) == {"moe"} | {f"d2moe_{r:g}" for r in result["settings"]["gen_ratios"]}
    for name, a in arms.items():
        assert a["tokens_per_s"] > 0 and a["new_tokens"] == result["settings"]["gen_new_tokens"], name
        assert a["same_tokens_as_in_memory"] is True, name
    assert arms["d2moe_0.4"]["parameters"] < arms["moe"]["parameters"]


def test_d2moe_extras(quick):
    """ShareV, adaptive ranks and expert trimming on the chosen variant: every row exists and is sane."""
    result, out = quick
    s, chosen = result["settings"], result["chosen_variant"]
    m = s["moe"]
    original = m["num_layers"] * m["num_experts"] * 3 * m["intermediate_size"] * m["hidden_size"]
    extras = {e["id"]: e for e in result["extras"]}
    grid = {e["id"]: e for e in result["d2"]}
    assert "### D2-MoE extras" in (out / "d2moe.md").read_text()
    for e in extras.values():
        assert e["stored"]["original"] == original and e["variant"] == chosen, e["id"]
        assert math.isclose(e["achieved_ratio"], 1 - e["stored"]["compressed"] / original), e["id"]
        assert all(math.isfinite(e[k]) and e[k] > 1 for k in ("test_ppl", "val_ppl")), e["id"]
    for r in s["extras_ratios"]:
        plain = grid[f"d2_{chosen}_{r:g}"]
        share_v = extras[f"d2x_share_v_{r:g}"]
        assert share_v["settings"]["share_v"] is True
        assert share_v["achieved_ratio"] >= r - 0.02, share_v["achieved_ratio"]
        adaptive = extras[f"d2x_adaptive_{r:g}"]
        assert adaptive["stored"] == plain["stored"]  # the same rank total, moved between layers
        previous = plain["achieved_ratio"]
        for k in s["trims"]:
            trim = extras[f"d2x_trim{k}_{r:g}"]
            assert trim["achieved_ratio"] > previous + 1e-9, (k, r, trim["achieved_ratio"], previous)
            previous = trim["achieved_ratio"]
            for layer, per_proj in trim["details"]["ranks"].items():  # k experts per layer keep no delta
                for proj, ranks in per_proj.items():
                    assert isinstance(ranks, list) and sum(x == 0 for x in ranks) == k, (layer, proj, ranks)
            untrimmed = [e for e in extras.values() if e["extra"].startswith(f"untrimmed{k}_") and e["column"] == r]
            got = [u["achieved_ratio"] for u in untrimmed]
            assert untrimmed and min(got) - 1e-9 <= trim["achieved_ratio"] <= max(got) + 1e-9, (k, r, got)
