"""The compression benchmark's quick mode runs end to end and its numbers are sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compression.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("compression")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "compression.json").read_text()), out


def _by_id(result: dict) -> dict[str, dict]:
    return {r["id"]: r for r in result["compressed"]}


def _family(result: dict, family: str) -> list[dict]:
    """Entries of one family at the first DARE seed, sorted by setting."""
    first = result["settings"]["dare_seeds"][0]
    rows = [r for r in result["compressed"] if r["family"] == family and r["seed"] in (None, first)]
    return sorted(rows, key=lambda r: r["setting"])


def test_outputs_written(quick):
    result, out = quick
    assert (out / "compression.md").read_text().startswith("# Compressing a trained vanilla-upcycled MoE")
    assert (out / "compression.png").stat().st_size > 10_000
    assert result["command"] == "python benchmarks/compression.py --quick"
    assert {g["goal"] for g in result["goals"]} >= {"DARE 0.9 within 1 % of the uncompressed perplexity"}
    assert set(result["trained"]) == {"moe", "moe_shared", "dense_ft", "moe_lowlr", "moe_whole", "dense_whole"}
    assert result["trained"]["moe_lowlr"]["lr"] == pytest.approx(result["settings"]["lr"] * 0.1)
    assert {r["family"] for r in result["compressed"]} >= {"ctl_dare", "ctl_quantize", "ext_dare", "ext_quantize"}
    assert {r["family"] for r in result["compressed"]} >= {"whole_dare", "whole_quantize", "whole_quantize_group"}
    # the goals are stated for every trained MoE
    dare_goal = {g["moe"] for g in result["goals"] if g["goal"].startswith("DARE 0.9")}
    assert dare_goal == {"moe", "moe_lowlr", "moe_whole"}
    assert all(isinstance(g["met"], bool) or g["value"] == "not run" for g in result["goals"])


def test_perplexities_finite_and_positive(quick):
    result, _ = quick
    ppls = [result["base_model"]["test_ppl"]] + [t["test_ppl"] for t in result["trained"].values()]
    ppls += [r["test_ppl"] for r in result["compressed"]]
    assert all(math.isfinite(p) and p > 1 for p in ppls), ppls
    # training moved the MoE away from the dense model: its experts are no longer copies of the dense FFN
    assert result["trained"]["moe"]["weights"]["routed"]["delta_rel"] > 1e-3


def test_lossless_settings_match_the_uncompressed_moe(quick):
    result, _ = quick
    by_id = _by_id(result)
    ref = result["trained"]["moe"]["test_ppl"]
    for sid, tol in (("dare_0", 1e-4), ("magnitude_0", 1e-4), ("quant_8_row", 5e-3), ("quant_8_group", 5e-3)):
        assert abs(by_id[sid]["test_ppl"] / ref - 1) < tol, (sid, by_id[sid]["test_ppl"], ref)
        assert abs(by_id[sid]["delta_pct"]) < 100 * tol
    assert by_id["dare_0"]["weights"]["routed"]["error_rel_delta"] < 1e-5
    assert by_id["quant_8_row"]["weights"]["routed"]["error_rel_delta"] < 0.02


def test_added_params_follow_the_papers_counting(quick):
    """Sparse: kept values of all N deltas; k bits: N P k / 16; plus the router (hidden 32, MLP 88, 2 blocks)."""
    result, _ = quick
    s = result["settings"]
    n, layers, numel, router = s["num_experts"], s["base"]["num_layers"], 32 * 88, s["num_experts"] * 32 * 2
    for family in ("dare", "magnitude"):
        for r in _family(result, family):
            kept = max(1, round(numel * (1 - r["setting"])))
            assert r["added_params"] == layers * 3 * n * kept + router, r["id"]
    for family in ("quantize_row", "quantize_group"):
        for r in _family(result, family):
            assert r["added_params"] == layers * 3 * n * numel * r["setting"] // 16 + router, r["id"]


def test_size_shrinks_with_compression(quick):
    result, _ = quick
    for family in ("dare", "magnitude"):
        rows = _family(result, family)  # increasing drop rate
        assert len(rows) >= 3
        added = [r["added_params"] for r in rows]
        disk = [r["bytes_on_disk"]["total"] for r in rows]
        assert added == sorted(added, reverse=True) and len(set(added)) == len(added), added
        assert disk == sorted(disk, reverse=True) and len(set(disk)) == len(disk), disk
    for family in ("quantize_row", "quantize_group"):
        rows = _family(result, family)  # increasing bits
        disk = [r["bytes_on_disk"]["total"] for r in rows]
        assert disk == sorted(disk) and len(set(disk)) == len(disk), disk
    by_id = _by_id(result)
    # DARE 0.9 is far smaller than the uncompressed MoE; keeping the universal FFN whole costs bytes
    assert by_id["dare_0.9"]["bytes_on_disk"]["total"] < result["trained"]["moe"]["bytes_on_disk"]["total"] / 3
    for method in ("dare_0.9", "quantize_2"):
        shared, keep = by_id[f"ext_{method}_shared"], by_id[f"ext_{method}_keep"]
        assert shared["bytes_on_disk"]["total"] < keep["bytes_on_disk"]["total"]
        assert keep["compression_report"]["compressed_bytes"]["universal_dense"] > 0
        assert shared["compression_report"]["compressed_bytes"]["universal_dense"] == 0


def test_dare_seeds_differ_and_errors_grow(quick):
    result, _ = quick
    seeds = [r for r in result["compressed"] if r["family"] == "dare" and r["setting"] == 0.9]
    assert len(seeds) == len(result["settings"]["dare_seeds"]) >= 2
    assert len({r["test_ppl"] for r in seeds}) == len(seeds)  # the seed changes which entries are kept
    # DARE's error grows like sqrt(p / (1 - p)) times the delta; magnitude's stays below the delta's norm
    for r in _family(result, "dare"):
        expected = math.sqrt(r["setting"] / (1 - r["setting"]))
        assert abs(r["weights"]["routed"]["error_rel_delta"] - expected) < 0.25 * expected + 1e-6, r["id"]
    assert all(r["weights"]["routed"]["error_rel_delta"] <= 1.0 for r in _family(result, "magnitude"))


def test_generation_arms(quick):
    result, _ = quick
    arms = result["generation"]["arms"]
    assert set(arms) == set(result["settings"]["gen_arms"])
    new = result["settings"]["gen_prompts"] * result["settings"]["gen_new_tokens"]
    for r in arms.values():
        assert r["tokens_per_s"] > 0 and r["new_tokens_total"] == new


def test_whole_model_moe(quick):
    """The whole-model MoE trains every parameter, its lr is the validation-best of its grid, and its compressed
    adapters carry the trained non-expert modules."""
    result, _ = quick
    s, t = result["settings"], result["trained"]
    w, dense = t["moe_whole"], t["dense_whole"]
    base_params = result["base_model"]["meta"]["num_parameters"]
    hidden, mlp, layers = s["base"]["hidden_size"], 88, s["base"]["num_layers"]
    non_ffn = base_params - layers * 3 * hidden * mlp
    # every non-FFN parameter has a trainable copy, beside the experts + router of the experts-only MoE
    assert w["copied_params"] == non_ffn
    assert w["experts_router_params"] == t["moe"]["trainable_params"]
    assert w["trainable_params"] == w["experts_router_params"] + w["copied_params"]
    assert w["carried_bytes"] == 4 * non_ffn  # fp32
    assert dense["trainable_params"] == base_params
    # the lr: the best validation ppl of the grid, chosen without the test split; the dense run uses it too
    search = w["lr_search"]
    assert [c["lr"] for c in search] == s["whole_lr_grid"]
    assert w["lr"] == min(search, key=lambda c: c["val_ppl"])["lr"] == dense["lr"]
    assert all(set(c) >= {"lr", "val_loss", "val_ppl"} and "test_ppl" not in c for c in search)
    assert math.isclose(w["val_ppl"], min(c["val_ppl"] for c in search), rel_tol=1e-6)
    # the experts moved; with them dropped the trained rest remains (a finite, different model)
    assert w["weights"]["routed"]["delta_rel"] > 1e-3
    dropped = w["deltas_dropped"]["test_ppl"]
    assert math.isfinite(dropped) and dropped > 1 and dropped != w["test_ppl"]
    rows = [r for r in result["compressed"] if r["family"].startswith("whole_")]
    assert len(rows) >= 3
    for r in rows:
        assert r["compression_report"]["compressed_bytes"]["carried"] == w["carried_bytes"], r["id"]
        assert r["bytes_on_disk"]["total"] > w["carried_bytes"], r["id"]
        assert math.isfinite(r["test_ppl"]) and r["test_ppl"] > 1
        assert r["delta_pct"] == pytest.approx(100 * (r["test_ppl"] / w["test_ppl"] - 1))
    by_id = _by_id(result)
    assert by_id["whole_quant_2_row"]["weights"]["routed"]["error_rel_delta"] < 0.6
    # the experts-only MoE's compressed adapters carry nothing (its non-expert weights are the dense model's)
    assert by_id["dare_0.9"]["compression_report"]["compressed_bytes"]["carried"] == 0
    assert t["moe"]["carried_bytes"] == 0


def test_bytes_on_disk_leave_the_readme_out(quick):
    result, _ = quick
    for r in result["compressed"]:
        files = r["bytes_on_disk"]["files"]
        assert r["bytes_on_disk"]["total"] == sum(v for k, v in files.items() if k != "README.md")
        assert r["compression_report"]["file_bytes"] == sum(files.values())
