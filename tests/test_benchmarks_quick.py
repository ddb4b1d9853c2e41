"""Quick runs of the training-step, parameter-efficiency and generation benchmarks: they complete, every number in
the result file is finite, and the arms they name are there."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def numbers(value, path="$"):
    """Every (path, number) in a parsed JSON value (bools left out)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


def check_train_step(data):
    main = data["step"]["main"]
    arms = {"dense_full_ft", "ders_full_N4k2", "mixtral_N4k2", "ders_lm_r4_N4k2", "ders_lm_r4_N4k2_cpukernel"}
    assert arms | {"ders_sm_0.999_N4k2"} <= set(main)
    assert "ders_lm_fast_cpukernel" in data["layer"]["times_s"]
    assert any(name.startswith("dense_lora_r") for name in main)
    assert data["memory"] and set(data["memory"]) <= set(main) | set(data["step"]["grid"])
    for name, arm in main.items():
        assert arm["times_s"] and all(t > 0 for t in arm["times_s"]), name
    assert data["layer"]["times_s"] and all(t > 0 for ts in data["layer"]["times_s"].values() for t in ts)


def check_params(data):
    assert data["configs"] and set(data["configs"]) == set(data["layers"])
    for model, groups in data["configs"].items():
        assert set(groups) == {"routed_only", "shared_expert"}, model
        for arms in groups.values():
            assert "vanilla (full copies)" in arms
            assert any(a.startswith("DeRS-SM") for a in arms) and any(a.startswith("DeRS-LM") for a in arms)
            assert all(a["added_params"] > 0 and a["trainable_params"] > 0 for a in arms.values())


def check_generation(data):
    assert data["commit"]["commit"] and data["machine"]["date"] and len(data["machine"]["loadavg_1_5_15"]) == 3
    assert data["sections"]
    for section in data["sections"]:
        assert set(section["arms"]) == {"dense", "ders", "ders_kernel", "ders_merged", "exported"}
        for name, arm in section["arms"].items():
            assert arm["tokens_per_s"] > 0 and arm["times_s"] and arm["new_tokens"] == section["model"]["new_tokens"]
            assert section["x_dense"][name] == pytest.approx(
                arm["tokens_per_s"] / section["arms"]["dense"]["tokens_per_s"]
            )
            ratios = [d / a for d, a in zip(section["arms"]["dense"]["times_s"], arm["times_s"], strict=True)]
            assert section["x_dense_per_round"][name] == pytest.approx(statistics.median(ratios))
        assert section["same_tokens_as_export"] == {"ders": True, "ders_kernel": True, "ders_merged": True}


def check_generation_page(data, page):
    """The page's numbers and verdicts are the JSON's (the prose is generated from the result, not fixed)."""
    ratio = data["sections"][0]["x_dense"]["ders"]
    assert f"**{ratio:.2f}x**" in page and data["command"] in page
    verdict = "met" if ratio >= 0.85 else "not met"
    assert f"(goal >= 0.85x: {verdict})" in page
    assert f"met in {int(ratio >= 0.85)} of 1 sections" in page
    kernel = data["sections"][0]["x_dense"]["ders_kernel"]
    assert f"With the compiled CPU decode kernel: **{kernel:.2f}x** (goal >= 0.95x: " in page
    paired = data["sections"][0]["x_dense_per_round"]["ders_kernel"]
    assert f"per round (the median of the rounds' ratios): {paired:.2f}x." in page
    assert f"met in {int(kernel >= 0.95)} of 1 low-rank and sparse sections" in page


def check_thresholds(data):
    assert data["commit"]["commit"] and data["machine"]["date"] and len(data["machine"]["loadavg_1_5_15"]) == 3
    lowrank, sparse = data["lowrank"]["rows"], data["sparse"]["rows"]
    assert [(r["experts"], r["rank"]) for r in lowrank] == [tuple(c) for c in data["settings"]["lowrank"]]
    assert [r["density"] for r in sparse] == data["settings"]["densities"]
    for row in lowrank:
        assert set(row["times_s"]) == {"dense", "stacked", "grouped"} and row["max_abs_diff"] < 1e-3
        assert row["faster"] == min(("stacked", "grouped"), key=lambda arm: row["median_s"][arm])
        won = sum(s < g for s, g in zip(row["times_s"]["stacked"], row["times_s"]["grouped"], strict=True))
        assert row["stacked_won_rounds"] == won and len(row["times_s"]["stacked"]) == data["settings"]["reps"]
    for row in sparse:
        assert set(row["times_s"]) == {"gather", "csr", "dense_mode", "dense"} and row["max_abs_diff"] < 1e-3
        assert row["faster"] == min(("gather", "csr"), key=lambda arm: row["median_s"][arm])
        won = sum(g < c for g, c in zip(row["times_s"]["gather"], row["times_s"]["csr"], strict=True))
        assert row["gather_won_rounds"] == won and len(row["times_s"]["gather"]) == data["settings"]["reps"]
        assert row["faster_csr_dense"] == min(("csr", "dense_mode"), key=lambda arm: row["median_s"][arm])
        won = sum(c < d for c, d in zip(row["times_s"]["csr"], row["times_s"]["dense_mode"], strict=True))
        assert row["csr_won_rounds"] == won
    from ders_peft import functional, grouped_path

    expected = {
        "STACKED_MAX_COLUMNS": functional.STACKED_MAX_COLUMNS,
        "GATHER_DENSITY": grouped_path.GATHER_DENSITY,
        "DENSE_DENSITY": grouped_path.DENSE_DENSITY,
    }
    assert data["constants"] == expected


def test_crossover_brackets(monkeypatch):
    """The crossover read from the rows: the last point the small-side arm wins before the first the other wins."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import thresholds

    rows = [{"x": x, "faster": f} for x, f in [(4, "b"), (1, "a"), (2, "a"), (8, "b")]]
    assert thresholds._crossover(rows, "x", "a", "b") == {"a_wins_up_to": 2, "b_wins_from": 4, "consistent": True}
    rows = [{"x": x, "faster": f} for x, f in [(1, "a"), (2, "b"), (4, "a")]]
    assert thresholds._crossover(rows, "x", "a", "b") == {"a_wins_up_to": 1, "b_wins_from": 2, "consistent": False}
    rows = [{"x": 1, "faster": "b"}, {"x": 2, "faster": "b"}]
    assert thresholds._crossover(rows, "x", "a", "b") == {"a_wins_up_to": None, "b_wins_from": 1, "consistent": True}


def test_train_step_memory_goal_rows(monkeypatch):
    """DeRS-SM p=0.9's memory goal is read against both LoRA arms: the one rank-matched to DeRS-LM and the one with
    DeRS-SM p=0.9's own trainable count (when the memory part measured it)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import train_step

    names = ["dense_full_ft", "ders_lm_r4_N4k2", "ders_full_N4k2", "mixtral_N4k2"]
    results = {
        "step": {"main": {n: {"median_s": 1.0} for n in names}},
        "layer": {"ratio_to_dense": {"ders_lm_fast": 1.2}},
        "memory": {
            n: {"peak_over_start_mb": mb}
            for n, mb in [("ders_lm_r4_N4k2", 300), ("dense_lora_r8", 400), ("dense_lora_r12", 500)]
            + [("ders_sm_0.9_N4k2", 440)]
        },
    }
    rows = {r["what"]: r for r in train_step.targets(results, "dense_lora_r8", "dense_lora_r12")}
    mine = rows["peak memory: DeRS-SM p=0.9 / dense_lora_r8 (issue 15)"]
    same = rows["peak memory: DeRS-SM p=0.9 / dense_lora_r12 (same trainable count)"]
    assert (mine["measured"], mine["target"], mine["met"]) == (1.1, 1.0, False)
    assert (same["measured"], same["target"], same["met"]) == (0.88, 1.0, True)
    rows = {r["what"] for r in train_step.targets(results, "dense_lora_r8")}  # no matched arm measured
    assert not any("same trainable count" in w for w in rows) and "peak memory: DeRS-SM p=0.9 / dense+LoRA" in rows


@pytest.mark.parametrize(
    "script,result,check",
    [
        ("train_step.py", "benchmarks_train_step.json", check_train_step),
        ("param_efficiency.py", "benchmarks_params.json", check_params),
        ("generation.py", "benchmarks_generation.json", check_generation),
        ("thresholds.py", "benchmarks_thresholds.json", check_thresholds),
    ],
)
def test_benchmark_quick_mode_writes_results(tmp_path, script, result, check):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / result).read_text())
    assert data["command"].startswith("python benchmarks/")
    found = list(numbers(data))
    assert found and all(math.isfinite(v) for _, v in found), [p for p, v in found if not math.isfinite(v)]
    check(data)
    if script == "generation.py":
        check_generation_page(data, (tmp_path / "benchmarks_generation.md").read_text())


def test_quick_runs_never_write_into_docs(monkeypatch):
    """A bare ``--quick`` (no output option) writes into a new temporary folder, never over the committed results."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _common

    quick = _common.output_dir(None, quick=True)
    assert quick.is_dir() and not any(quick.iterdir())
    assert ROOT / "docs" not in (quick, *quick.parents)
    assert _common.output_dir(None, quick=False) == ROOT / "docs"
    assert _common.output_dir(Path("elsewhere"), quick=True) == Path("elsewhere")
    quick.rmdir()
