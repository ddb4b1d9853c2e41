"""The quality benchmark's quick mode runs end to end and writes its result file (numbers are not checked here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def test_quality_benchmark_quick(tmp_path):
    out = tmp_path / "quality.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".png").is_file()
    result = json.loads(out.read_text())
    assert set(result["arms"]) == {
        "dense",
        "dense_mlp",
        "lora_added",
        "lora_trainable",
        "vanilla",
        "lm_r1",
        "lm_r4",
        "sm_0.999",
        "sm_0.9",
        "lm_r4_frozen",
        "ext_lm_r4",
        "vanilla_all",
        "lm_r4_all",
    }


@pytest.mark.parametrize("case", ["error in the run", "library changed"])
def test_failed_run_raises_with_the_childs_error_and_stores_nothing(tmp_path, monkeypatch, case):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import quality

    store = tmp_path / "store"
    runner = quality.Runner(quality.QUICK, tmp_path, tmp_path / "data.pt", store, 1, 1, False, print)
    spec = quality.RunSpec("no_such_arm" if case == "error in the run" else "dense", 0, 1e-3)
    if case == "library changed":
        runner.library = "stale-digest"
    expected = "KeyError: 'no_such_arm'" if case == "error in the run" else "changed since the benchmark started"
    with runner, pytest.raises(RuntimeError, match=expected):
        runner.run([spec])
    assert not list(store.glob("*.json"))
