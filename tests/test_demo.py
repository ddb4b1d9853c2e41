"""The README's demo runs end to end (quick settings): pretrain, upcycle, SFTTrainer, save, reload."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import demo  # noqa: E402


def test_demo_quick(tmp_path):
    result = demo.main(["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert result["reload_diff"] == 0.0
    assert result["loss_after"] < result["loss_before"]
    assert result["added"] > 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
