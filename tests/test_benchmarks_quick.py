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
