"""The ``ders-peft`` CLI beyond export/compress: ``--version`` and ``inspect`` (exit codes, files, numbers)."""

from __future__ import annotations

import json

import pytest
from ders_testing import randomize_adapter, tiny_model
from peft import get_peft_model

import ders_peft
from ders_peft import diagnostics
from ders_peft.cli import EXIT_OK, EXIT_REFUSED, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"ders-peft {ders_peft.__version__}"


def test_inspect_writes_the_diagnostics_of_an_adapter(tmp_path, capsys):
    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="lowrank", rank=2)
    model = get_peft_model(tiny_model("llama", hidden=16, inter=24), cfg)
    randomize_adapter(model, std=0.3)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "out"
    tiny_model("llama", hidden=16, inter=24).save_pretrained(base)
    model.save_pretrained(adapter)
    assert main(["inspect", str(adapter), "--base", str(base), "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"wrote {out / 'diagnostics.json'}" in printed and f"wrote {out / 'similarity.png'}" in printed
    data = json.loads((out / "diagnostics.json").read_text())
    want = diagnostics.expert_similarity(model.eval())
    assert set(data["similarity"]) == set(want)
    for name, entry in want.items():
        got = data["similarity"][name]["projections"]["ffn"]["to_base"]
        assert got == pytest.approx(entry["projections"]["ffn"]["to_base"], abs=1e-5)
    assert (out / "summary.txt").read_text().strip() in printed


def test_inspect_refuses_a_missing_dir_in_one_line(tmp_path, capsys):
    code = main(["inspect", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == EXIT_REFUSED and "nope" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(tmp_path), "--max-tokens", "0", "--out", str(tmp_path / "o")]) == EXIT_REFUSED
    assert "--max-tokens=0" in capsys.readouterr().err


def test_params_of_a_7b_config_on_meta_matches_the_formula(tmp_path, capsys):
    """Llama-2-7B shape from config.json alone (no weights): DeRS-LM r=4, N=8 adds per block a router (8 x 4096) and
    8 experts' A (r x in) and B (out x r) for gate/up (4096 -> 11008) and down (11008 -> 4096)."""
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    ).save_pretrained(tmp_path / "llama7b")
    code = main(["params", str(tmp_path / "llama7b"), "--num-experts", "8", "--rank", "4", "--json"])
    assert code == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    h, i, n, r = 4096, 11008, 8, 4
    per_block = n * h + n * r * 3 * (h + i)
    assert report["added_params"] == 32 * per_block
    assert report["dense_params"] == 6_738_415_616  # Llama-2-7B
    assert main(["params", str(tmp_path / "llama7b"), "--rank", "2"]) == EXIT_OK
    assert "added" in capsys.readouterr().out


def test_params_refuses_a_dir_without_config(tmp_path, capsys):
    assert main(["params", str(tmp_path)]) == EXIT_REFUSED
    assert "config.json" in capsys.readouterr().err


def _scored_model_dir(tmp_path):
    from trainer_testing import SENTENCE, word_tokenizer

    cfg = ders_peft.DeRSConfig(num_experts=4, top_k=2, delta_type="lowrank", rank=2)
    model = get_peft_model(tiny_model("llama", hidden=16, inter=24), cfg)
    randomize_adapter(model, std=0.3)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_model("llama", hidden=16, inter=24).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    model.save_pretrained(adapter)
    text = (SENTENCE + " ") * 4
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": SENTENCE}) + "\n" + json.dumps({"text": SENTENCE}) + "\n")
    ids = word_tokenizer()(text, return_tensors="pt").input_ids[0]
    return model.eval(), base, adapter, text, ids


def test_eval_ppl_equals_the_direct_loss(tmp_path, capsys):
    import math

    import torch

    model, base, adapter, text, ids = _scored_model_dir(tmp_path)
    capsys.readouterr()  # what saving printed (deepspeed, when installed, logs to stdout on its first import)
    n = ids.numel()
    head = ["eval-ppl", str(adapter), "--base", str(base), "--json"]
    argv = [*head, "--data", str(tmp_path / "t.txt")]
    assert main([*argv, "--max-length", str(n), "--stride", str(n)]) == EXIT_OK
    got = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        loss = float(model(input_ids=ids[None], labels=ids[None]).loss)  # one window: the whole text
    assert got["tokens"] == n - 1 and got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(loss * (n - 1) / math.log(2) / len(text.encode()), rel=1e-5)
    # non-overlapping windows of 16: each window's own loss, first token of each window unscored
    assert main([*argv, "--max-length", "16", "--stride", "16"]) == EXIT_OK
    got = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        parts = [ids[b : b + 16] for b in range(0, n, 16)]
        parts = [p for p in parts if p.numel() > 1]
        nll = sum(float(model(input_ids=p[None], labels=p[None]).loss) * (p.numel() - 1) for p in parts)
        count = sum(p.numel() - 1 for p in parts)
    assert got["tokens"] == count and got["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
    # overlapping windows: every token but the first predicted once
    assert main([*argv, "--max-length", "16", "--stride", "8"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == n - 1
    windows = 1 + -(-(n - 16) // 8)  # the progress bar counts the windows scored
    assert "eval-ppl: 100%" in captured.err and f"{windows}/{windows}" in captured.err, captured.err
    assert main([*argv, "--max-length", "16", "--stride", "8", "--no-progress"]) == EXIT_OK
    assert "eval-ppl:" not in capsys.readouterr().err
    # .jsonl with a text field works; a line without one is refused naming the line
    assert main([*head, "--data", str(tmp_path / "t.jsonl")]) == EXIT_OK
    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    assert main([*head, "--data", str(tmp_path / "bad.jsonl")]) == EXIT_REFUSED
    assert "line 1 has no string field 'text'" in capsys.readouterr().err
    assert main([*argv, "--max-length", "8", "--stride", "9"]) == EXIT_REFUSED


def test_train_saves_a_trained_adapter_and_resumes(tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from trainer_testing import SENTENCE, word_tokenizer
    from transformers import AutoModelForCausalLM

    base, out = tmp_path / "base", tmp_path / "run"
    tiny_model("llama", hidden=16, inter=24).save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    (tmp_path / "d.txt").write_text("\n\n".join([SENTENCE] * 8))
    argv = ["train", "--base", str(base), "--data", str(tmp_path / "d.txt"), "--out", str(out)]
    argv += ["--num-experts", "4", "--rank", "2", "--lr", "1e-2", "--batch-size", "2", "--max-length", "32"]
    assert main([*argv, "--max-steps", "2", "--save-steps", "2"]) == EXIT_OK
    assert f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    trained = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in trained.items() if "lora_b" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # B starts at zero: training moved it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out / "adapter"))
    assert model.peft_config["default"].num_experts == 4
    # resume: continues from checkpoint-2 to step 3
    assert main([*argv, "--max-steps", "3", "--resume"]) == EXIT_OK
    assert "trained 3 steps" in capsys.readouterr().out
    state = json.loads((out / "trainer" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # refusals: no checkpoint to resume from, a .jsonl line without text
    assert main([*argv[:-10], "--out", str(tmp_path / "new"), "--resume"]) == EXIT_REFUSED
    assert "holds no checkpoint" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\n')
    bad = ["train", "--base", str(base), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")]
    assert main(bad) == EXIT_REFUSED and "no string field 'text'" in capsys.readouterr().err
