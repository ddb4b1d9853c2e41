"""The quality benchmark's quick mode runs end to end and writes its result file (numbers are not checked here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
