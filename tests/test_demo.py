"""The README's demo runs end to end (quick settings): pretrain, upcycle, SFTTrainer, save, reload, export."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import demo  # noqa: E402


def test_demo_quick(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = demo.main(["--quick", "--out", str(out), "--cache", str(cache)])
    assert result["reload_diff"] == 0.0
    assert result["export_class"] == "MixtralForCausalLM" and result["export_diff"] < 1e-4
    assert result["loss_after"] < result["loss_before"]
    assert result["added"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "mixtral" / "config.json").is_file() and (out / "dense_base" / "tokenizer.json").is_file()
    assert len(list(cache.iterdir())) == 1  # the pretrained base, cached
    printed = capsys.readouterr().out
    first = printed.splitlines()[:3]  # says up front how long it takes and what it writes where
    assert "min" in first[0] and str(out) in first[1] and str(cache) in first[1]
    steps = [f"[{i}/6]" for i in range(1, 7)]
    assert all(s in printed for s in steps) and [printed.index(s) for s in steps] == sorted(
        printed.index(s) for s in steps
    )
    assert "[pretrain] step" in printed and "s left)" in printed  # pretraining progress with an ETA
    # second run: the base comes from the cache (no pretraining lines)
    demo.main(["--quick", "--out", str(tmp_path / "out2"), "--cache", str(cache)])
    assert "[pretrain] step" not in capsys.readouterr().out


def test_demo_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
