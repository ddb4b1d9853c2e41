"""lm-evaluation-harness: a DeRS adapter (``peft=``) and its exported MoE give the same scores on local tasks.

Nothing is downloaded: the tasks are written from local text (a stdlib module's docstrings) as JSON files with
lm-eval YAML configs, the tokenizer is a word-level one over that text, and the model is a tiny Llama.
"""

from __future__ import annotations

import inspect
import json
import random
import re

import pytest
import torch
from ders_testing import randomize_adapter
from peft import get_peft_model

import ders_peft
from ders_peft.cli import main

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ders_peft[eval]')")


def _sentences() -> list[str]:
    import argparse as source  # any stdlib module with prose docstrings

    text = " ".join(inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(source))
    words = re.findall(r"[a-z]+", text.lower())
    return [" ".join(words[i : i + 12]) for i in range(0, len(words) - 12, 12)][:40]


def _word_tokenizer(sentences: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in sentences for w in s.split()})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _write_tasks(root, sentences: list[str]) -> None:
    rng = random.Random(0)
    mc = []
    for i, s in enumerate(sentences[:24]):
        words = s.split()
        others = rng.sample([t for j, t in enumerate(sentences) if j != i], 3)
        choices = [" ".join(words[6:])] + [" ".join(t.split()[6:]) for t in others]
        order = rng.sample(range(4), 4)
        mc.append({"context": " ".join(words[:6]), "choices": [choices[k] for k in order], "gold": order.index(0)})
    _write_task(
        root, "ders_local_mc", mc, 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"', ["acc", "acc_norm"],
    )  # fmt: skip
    _write_task(
        root, "ders_local_ppl", [{"text": s} for s in sentences[24:]],
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"',
        ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    )  # fmt: skip


def _write_task(root, name: str, rows: list[dict], prompt: str, metrics: list[str]) -> None:
    """``name.jsonl`` (the rows) and ``name.yaml``: an lm-eval task over that local file."""
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
    listed = "".join(f"  - metric: {m}\n" for m in metrics)
    (root / f"{name}.yaml").write_text(f"{header}{prompt}\nmetric_list:\n{listed}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    sentences = _sentences()
    tokenizer = _word_tokenizer(sentences)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    dense = LlamaForCausalLM(cfg).eval()
    dense.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = get_peft_model(dense, ders_peft.DeRSConfig(num_experts=4, top_k=2, rank=2, task_type="CAUSAL_LM"))
    randomize_adapter(model, std=0.5)  # large deltas: a wrong expert mapping changes the scores
    model.save_pretrained(root / "adapter")
    ders_peft.export_moe(model.eval(), root / "moe", tokenizer=tokenizer)
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, sentences)
    return root


def _scores(results: dict) -> dict[str, float]:
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                out[f"{task}/{key}"] = value
    return out


def _evaluate(model_args: str, tasks_dir) -> dict[str, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="hf",
        model_args=model_args + ",dtype=float32",
        tasks=["ders_local_mc", "ders_local_ppl"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu",
        batch_size=4,
    )
    return _scores(results)


def test_adapter_and_export_score_the_same(dirs):
    adapter = _evaluate(f"pretrained={dirs / 'base'},peft={dirs / 'adapter'}", dirs / "tasks")
    moe = _evaluate(f"pretrained={dirs / 'moe'}", dirs / "tasks")
    dense = _evaluate(f"pretrained={dirs / 'base'}", dirs / "tasks")
    assert set(adapter) >= {"ders_local_mc/acc,none", "ders_local_ppl/word_perplexity,none"}, adapter
    assert adapter.keys() == moe.keys()
    for key in adapter:
        assert moe[key] == pytest.approx(adapter[key], rel=1e-5), key
    # the adapter was really applied: the deltas change the perplexity
    key = "ders_local_ppl/word_perplexity,none"
    assert abs(dense[key] - adapter[key]) > 1e-3 * dense[key], (dense[key], adapter[key])


def test_cli_runs_lm_eval_with_a_ders_adapter(dirs, tmp_path, capsys):
    """``ders-peft lm-eval run ... peft=ADAPTER``: lm-eval's own command line loads the DeRS adapter."""
    model_args = f"pretrained={dirs / 'base'},peft={dirs / 'adapter'},dtype=float32"
    argv = ["lm-eval", "run", "--model", "hf", "--model_args", model_args, "--tasks", "ders_local_ppl"]
    argv += ["--include_path", str(dirs / "tasks"), "--device", "cpu", "--output_path", str(tmp_path / "res")]
    assert main(argv) == 0
    (result_file,) = (tmp_path / "res").rglob("results_*.json")
    got = _scores(json.loads(result_file.read_text()))
    want = _evaluate(f"pretrained={dirs / 'moe'}", dirs / "tasks")
    key = "ders_local_ppl/word_perplexity,none"
    assert got[key] == pytest.approx(want[key], rel=1e-5)
    assert "ders_local_ppl" in capsys.readouterr().out  # lm-eval's results table


def test_cli_without_lm_eval_is_a_one_line_refusal(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["lm-eval", "run", "--tasks", "x"]) == 2
    assert "pip install 'ders_peft[eval]'" in capsys.readouterr().err
