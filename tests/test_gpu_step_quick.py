"""The CPU-runnable part of the prepared GPU check: ``benchmarks/gpu_step.py --quick --device cpu`` runs every arm
at a tiny shape and writes a JSON and a markdown table with every arm, finite numbers, and goals that follow from
them; and the shell script that drives a GPU run stays within its time budget by construction."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

from test_benchmarks_quick import numbers

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "dense_full_ft", "mixtral_N8k2", "ders_full_N8k2", "ders_lm_r4_N8k2", "ders_sm_0.999_N8k2", "ders_sm_0.9_N8k2",
}  # fmt: skip


def test_gpu_step_quick_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--quick", "--device", "cpu", "--out-dir",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "benchmarks_gpu.json").read_text())
    assert data["command"].startswith("python benchmarks/gpu_step.py")
    arms = data["arms"]
    lora = [name for name in arms if name.startswith("dense_lora_r")]
    assert set(arms) == ARMS | set(lora) and len(lora) == 1 and lora[0] == f"dense_lora_r{data['lora_rank_matched']}"
    found = list(numbers(data))
    assert found and all(math.isfinite(v) for _, v in found), [p for p, v in found if not math.isfinite(v)]
    for name, arm in arms.items():
        assert len(arm["times_s"]) == data["reps"] and all(t > 0 for t in arm["times_s"]), name
        assert arm["median_s"] == statistics.median(arm["times_s"]), name
        assert arm["trainable_params"] > 0 and arm["peak_memory_mb"] is None, name  # no memory counter on CPU
    assert arms["ders_lm_r4_N8k2"]["adapter_dtype"] == "float32" and arms["ders_full_N8k2"]["adapter_dtype"] == (
        "bfloat16"
    )
    lm_ratio = arms["ders_lm_r4_N8k2"]["median_s"] / arms["dense_full_ft"]["median_s"]
    goal = next(t for t in data["targets"] if t["what"].startswith("step: DeRS-LM r4 / dense"))
    assert goal["measured"] == round(lm_ratio, 3) and goal["met"] == (lm_ratio <= 1.1)
    table = (tmp_path / "benchmarks_gpu.md").read_text()
    assert all(f"| {name} |" in table for name in arms)


def test_gpu_check_script_budget():
    """The script runs the device tests and the timing script under timeouts that add up to at most 7 minutes (the
    eighth is for the install), and the timing script's own budget leaves its last arm a minute inside its timeout."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    timeouts = [int(t) for t in re.findall(r"timeout (\d+) ", script)]
    assert len(timeouts) == 2 and sum(timeouts) <= 420, timeouts
    assert "DERS_TEST_DEVICES=cuda" in script and "-k cuda" in script
    budget = float(re.search(r"--budget-s (\d+)", script).group(1))
    assert budget < timeouts[1] - 60  # the last arm started before the budget ends has a minute to finish
