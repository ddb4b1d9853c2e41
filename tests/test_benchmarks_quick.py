"""Smoke runs of the training-step and parameter-efficiency benchmarks in --quick mode (completion only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "script,result",
    [("train_step.py", "benchmarks_train_step.json"), ("param_efficiency.py", "benchmarks_params.json")],
)
def test_benchmark_quick_mode_writes_results(tmp_path, script, result):
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
