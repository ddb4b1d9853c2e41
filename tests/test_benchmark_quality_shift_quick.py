"""The strong-shift quality benchmark's quick mode runs end to end (every arm, the levers, two seeds) and writes its
JSON, markdown and PNG, every number finite; bad arm names are refused before anything runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from test_benchmarks_quick import numbers

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_shift.py"
ARMS = ["base", "dense", "vanilla", "lora", "lm_r1", "lm_r4", "sm", "vanilla+kmeans", "lm_r4+kmeans+small", "sm+small"]


def _run(tmp_path, *extra):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--cache", str(tmp_path / "cache"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)


def test_quality_shift_quick(tmp_path):
    out = tmp_path / "shift.json"
    extra = ["--out", str(out), "--arms", ",".join(ARMS), "--seeds", "0,1", "--lr-grid", "1e-3,3e-3"]
    proc = _run(tmp_path, *extra, "--lr-groups", "router=2,delta_b=4", "--note", "partial")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    result = json.loads(out.read_text())
    assert result["arms"] == ARMS and list(result["budgets"]) == ["3"]
    arms = result["budgets"]["3"]
    assert set(arms) == set(ARMS)
    for name, arm in arms.items():
        assert arm["lr"] in (1e-3, 3e-3) and len(arm["test_loss"]["values"]) == 2, name  # both seeds at the chosen lr
        assert set(arm["val_loss_by_lr"]) == ({"0.001"} if name == "base" else {"0.001", "0.003"}), name
    assert arms["base"]["params"]["trainable"] == 0 and arms["dense"]["params"]["added"] == 0
    assert (
        arms["lora"]["params"]["added"] > 0 and arms["vanilla"]["params"]["added"] > arms["lm_r4"]["params"]["added"]
    )
    assert arms["lm_r4+kmeans+small"]["kmeans"]["logit_std"] > 0.99 and arms["lm_r4"]["kmeans"] is None
    assert result["settings"]["lr_groups"] == [["router", 2.0], ["delta_b", 4.0]]
    assert result["commit"] and "--note partial" in result["command"]
    assert "**partial**" in out.with_suffix(".md").read_text()
    found = list(numbers(result))
    assert found and all(math.isfinite(v) for _, v in found), [p for p, v in found if not math.isfinite(v)]
    # the untrained base is the base model: its test loss is the recorded one
    assert arms["base"]["test_loss"]["mean"] == result["base_test_loss"]


def test_bad_arm_or_lever_is_refused_before_running(tmp_path):
    for arms, message in (("lm_rx", "unknown arm 'lm_rx'"), ("dense+kmeans", "lever 'kmeans' does not apply")):
        proc = _run(tmp_path, "--out", str(tmp_path / "x.json"), "--arms", arms)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    proc = _run(tmp_path, "--out", str(tmp_path / "x.json"), "--lr-groups", "rooter=2")
    assert proc.returncode == 2 and "--lr-groups item 'rooter=2'" in proc.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "cache").exists()
