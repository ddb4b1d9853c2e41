"""``ders-peft compress``: the CLI writes the adapter ``compress()`` makes, and refuses bad options by name."""

from __future__ import annotations

import copy

import pytest
import torch
from ders_testing import randomize_adapter, tiny_model
from peft import PeftModel, get_peft_model

import ders_peft
from ders_peft.cli import main

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dense = tiny_model("llama")
    moe = get_peft_model(copy.deepcopy(dense), ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="full"))
    randomize_adapter(moe.eval(), std=0.05)
    dense.save_pretrained(root / "dense")
    moe.save_pretrained(root / "full")
    ders_peft.export_moe(moe, root / "mixtral")
    return root, dense, moe


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("source", ["--adapter", "--moe"])
def test_cli_writes_the_adapter_compress_makes(saved, source, capsys):
    root, dense, moe = saved
    src = root / ("full" if source == "--adapter" else "mixtral")
    out = root / f"out{source}"
    argv = ["compress", "--base", str(root / "dense"), source, str(src), "--method", "dare", "--drop-rate", "0.5"]
    assert main([*argv, "--seed", "3", "--out", str(out)]) == 0
    assert "wrote a DeRS dare adapter" in capsys.readouterr().out
    loaded = PeftModel.from_pretrained(copy.deepcopy(dense), out).eval()
    want = ders_peft.compress(moe, ders_peft.CompressionConfig(method="dare", drop_rate=0.5, seed=3), progress=False)
    torch.testing.assert_close(_logits(loaded), _logits(want), atol=1e-6, rtol=0)
    assert loaded.peft_config["default"].base_model_name_or_path == str(root / "dense")


def test_cli_quantize(saved):
    root, dense, moe = saved
    out = root / "q"
    argv = ["compress", "--base", str(root / "dense"), "--adapter", str(root / "full"), "--method", "quantize"]
    assert main([*argv, "--bits", "4", "--group-size", "16", "--out", str(out)]) == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(dense), out).eval()
    assert loaded.peft_config["default"].delta_type == "quantized" and loaded.peft_config["default"].bits == 4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "dare"], "needs --drop-rate"),
        (["--method", "dare", "--drop-rate", "0.5", "--bits", "2"], "--bits do not apply to --method dare"),
        (["--method", "quantize"], "needs --bits"),
        (["--method", "magnitude", "--drop-rate", "1.5"], "--drop-rate=1.5 is invalid"),
        (["--method", "quantize", "--bits", "4", "--group-size", "0"], "--group-size=0 is invalid"),
    ],
)
def test_cli_refuses_bad_options(saved, extra, message, capsys):
    root, _, _ = saved
    argv = ["compress", "--base", str(root / "dense"), "--adapter", str(root / "full"), *extra]
    assert main([*argv, "--out", str(root / "never")]) == 2
    assert message in capsys.readouterr().err
    assert not (root / "never").exists()


def test_cli_refuses_bad_paths(saved, capsys):
    root, _, _ = saved
    base = ["--method", "dare", "--drop-rate", "0.5"]
    cases = [
        (["--base", str(root / "nothing"), "--adapter", str(root / "full")], "--base="),
        (["--base", str(root / "dense"), "--adapter", str(root / "dense")], "adapter_config.json"),
        (["--base", str(root / "dense"), "--moe", str(root / "nothing")], "--moe="),
        (["--base", str(root / "dense"), "--adapter", str(root / "full")], "not an empty directory"),
    ]
    for paths, message in cases:
        out = root / "dense" if message == "not an empty directory" else root / "never"
        assert main(["compress", *paths, *base, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (root / "dense" / "config.json").is_file()  # the refused output directory is untouched


def test_cli_offers_only_the_dense_based_methods(saved, capsys):
    root, _, _ = saved
    argv = ["compress", "--base", str(root / "dense"), "--adapter", str(root / "full"), "--method", "d2moe"]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(root / "never")])
    assert stop.value.code == 2 and "invalid choice: 'd2moe'" in capsys.readouterr().err
