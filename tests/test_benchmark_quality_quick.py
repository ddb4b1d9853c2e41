"""The quality benchmark's quick mode runs end to end and writes its result file, every number in it finite."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_benchmarks_quick import numbers

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(SCRIPT.parent))
    import quality

    return quality


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory, quality):
    """A cache folder holding the quick settings' pretrained base, pretrained once for this module: the script run
    below and the in-process runs both load it from there."""
    import torch

    from ders_peft import local_corpus as lc

    threads = torch.get_num_threads()
    cache = tmp_path_factory.mktemp("quality") / "cache"
    lc.pretrained_base(cache, **quality.QUICK.base)
    torch.set_num_threads(threads)
    return cache


def test_quality_benchmark_quick(tmp_path, quick_cache):
    out = tmp_path / "quality.json"
    (base_dir,) = [d for d in quick_cache.iterdir() if not d.name.startswith("quality-runs-")]
    pretrained_at = (base_dir / "ders_base.json").stat().st_mtime_ns
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--steps",
        "2",
        "--out",
        str(out),
        "--cache",
        str(quick_cache),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".png").is_file()
    result = json.loads(out.read_text())
    assert result["settings"]["steps"] == 2 and result["command"].endswith("--steps 2")
    # the run loaded the module's base instead of pretraining again
    assert result["base_model"]["dir"] == base_dir.name
    assert (base_dir / "ders_base.json").stat().st_mtime_ns == pretrained_at
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
    found = list(numbers(result))
    assert found and all(math.isfinite(v) for _, v in found), [p for p, v in found if not math.isfinite(v)]


@pytest.mark.parametrize("case", ["error in the run", "code changed"])
def test_failed_run_raises_with_the_childs_error_and_stores_nothing(tmp_path, monkeypatch, case):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import quality

    store = tmp_path / "store"
    runner = quality.Runner(quality.QUICK, tmp_path, tmp_path / "data.pt", store, 1, 1, False, print)
    spec = quality.RunSpec("no_such_arm" if case == "error in the run" else "dense", 0, 1e-3)
    if case == "code changed":
        runner.code = "stale-digest"
    expected = "KeyError: 'no_such_arm'" if case == "error in the run" else "changed since the benchmark started"
    with runner:
        with pytest.raises(RuntimeError, match=expected):
            runner.run([spec])
        with pytest.raises(RuntimeError, match=f"not started: run {spec.key} failed"):  # fail fast, start nothing
            runner.run([quality.RunSpec("dense", 1, 1e-3)])
    assert not list(store.glob("*.json"))


@pytest.fixture(scope="module")
def quick_base(quick_cache, quality):
    """The quick settings' base model (from the module's cache) and data, for this module's in-process runs."""
    import torch

    from ders_peft import local_corpus as lc

    threads = torch.get_num_threads()
    base, tokenizer = lc.pretrained_base(quick_cache, **quality.QUICK.base)
    data_path = quick_cache.parent / "data.pt"
    quality.prepare_data(tokenizer, quality.QUICK, data_path)
    yield quality, base.name_or_path, data_path
    torch.set_num_threads(threads)  # run_one sets the run's thread count on this process


@pytest.mark.parametrize("arm", ["dense", "lora_added", "sm_0.9", "lm_r4_all"])
def test_deferred_test_loss_equals_the_in_run_one(quick_base, tmp_path, arm):
    """A sweep run saves its trained tensors instead of evaluating the test split; the test loss evaluated later
    from them equals the one the run itself would have measured, and is the trained model's, not the base's."""
    import torch
    import transformers

    from ders_peft import local_corpus as lc

    quality, base_dir, data_path = quick_base
    spec = quality.RunSpec(arm, 0, 1e-2, 4.0, 16 if arm.startswith("lora") else 0)
    args = (spec, quality.QUICK, base_dir, str(data_path), 1)
    direct = quality.run_one(*args)
    state = tmp_path / "state.pt"
    swept = quality.run_one(*args, state_path=str(state))
    assert "test_loss" not in swept and state.is_file()
    assert swept["val_loss"] == pytest.approx(direct["val_loss"], abs=1e-6)
    later = quality.evaluate_stored_run(*args, str(state))
    assert later["test_loss"] == pytest.approx(direct["test_loss"], abs=1e-6)
    untrained = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert abs(lc.evaluate_loss(untrained, torch.load(data_path)["test"]) - later["test_loss"]) > 1e-3


def test_steps_must_be_positive(tmp_path, quality, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--quick", "--steps", "0", "--out", str(tmp_path / "q.json")])
    assert exit_info.value.code == 2 and "--steps must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()
