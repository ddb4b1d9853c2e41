"""Tests for the offline corpus, tokenizer, tiny pretraining loop and the atomic base-model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import ders_peft.local_corpus as lc
from ders_peft.local_corpus import (
    CODE_DOMAIN_PACKAGES,
    code_domain_files,
    evaluate_loss,
    pack_tokens,
    pretrain,
    pretrained_base,
    pretraining_files,
    pretraining_packages,
    prose_corpus,
    pydoc_text,
    python_source_files,
    split_by_file,
    tiny_llama_config,
    train_tokenizer,
)

TINY = {"steps": 3, "seq_len": 32, "vocab_size": 300, "hidden_size": 32, "num_layers": 1, "batch_size": 4}
TINY_CHARS = 60_000


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(prose_corpus(max_chars=200_000), vocab_size=512)


def test_package_sets_disjoint_and_nonempty():
    pretrain_names = set(pretraining_packages())
    assert pretrain_names and set(CODE_DOMAIN_PACKAGES)
    assert pretrain_names.isdisjoint(CODE_DOMAIN_PACKAGES)
    pre_files, domain_files = set(pretraining_files()), set(code_domain_files())
    assert pre_files and domain_files
    assert pre_files.isdisjoint(domain_files)
    assert {p.relative_to(lc._stdlib_root()).parts[0] for p in domain_files} == set(CODE_DOMAIN_PACKAGES)


def test_python_source_files_filters():
    files = python_source_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    skipped = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    assert not any(skipped & set(f.parts[len(lc._stdlib_root().parts) :]) for f in files)
    json_files = python_source_files(["json", "argparse.py"])
    assert any(f.name == "argparse.py" for f in json_files) and any(f.parent.name == "json" for f in json_files)
    assert python_source_files(["json", "argparse"], exclude=["argparse"]) == python_source_files(["json"])
    with pytest.raises(ValueError):
        python_source_files(["no_such_module_xyz"])


def test_text_sources_deterministic():
    text = pydoc_text()
    assert len(text) > 100_000 and text == pydoc_text()
    corpus = prose_corpus(max_chars=50_000)
    assert sum(map(len, corpus)) == 50_000 and corpus == prose_corpus(max_chars=50_000)
    val = prose_corpus(max_chars=10_000, split="val")
    assert sum(map(len, val)) == 10_000 and text[:1000] not in "".join(val)


def test_split_by_file_deterministic_disjoint_covering():
    files = code_domain_files()
    train, val, test = split_by_file(files)
    assert (train, val, test) == split_by_file(list(reversed(files)))
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(train + val + test) == sorted(files)
    assert len(train) > len(val) > 0 and len(test) > 0
    assert split_by_file(files, seed=1) != (train, val, test)
    assert [len(s) for s in split_by_file(list(range(3)))] == [1, 1, 1]


def test_tokenizer_round_trip_and_specials(tokenizer):
    snippet = 'async def main(x: int) -> None:\n\tawait f(x)  # héllo 🐍\r\n    return {"a": [1, 2]}\n\n'
    assert tokenizer.decode(tokenizer.encode(snippet)) == snippet
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert len(tokenizer) == 512


def test_pack_tokens_shapes(tokenizer):
    texts = ["def f():\n    return 1\n", "x = 2\n" * 50]
    n_tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)
    blocks = pack_tokens(tokenizer, texts, seq_len=16)
    assert blocks.dtype == torch.long and blocks.shape == (n_tokens // 16, 16)
    assert blocks.view(-1)[len(tokenizer.encode(texts[0]))] == tokenizer.eos_token_id
    assert pack_tokens(tokenizer, ["a"], seq_len=64).shape == (0, 64)


def test_pretrain_lowers_loss(tokenizer):
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), hidden_size=32, intermediate_size=88, num_hidden_layers=2)
    model = LlamaForCausalLM(config)
    blocks = pack_tokens(tokenizer, prose_corpus(max_chars=20_000), seq_len=32)[:8]
    before = evaluate_loss(model, blocks)
    losses = pretrain(model, blocks, steps=20, batch_size=8, lr=1e-2)
    after = evaluate_loss(model, blocks)
    assert len(losses) == 20 and not model.training
    assert losses[-1] < losses[0] - 1.0
    assert after < before - 1.0


def _valid_caches(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if lc._is_valid_cache(p)] if root.exists() else []


def test_pretrained_base_caches_and_reloads(tmp_path, monkeypatch):
    model, tok = pretrained_base(tmp_path, max_chars=TINY_CHARS, **TINY)
    assert len(_valid_caches(tmp_path)) == 1
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())

    def fail(*args, **kwargs):
        raise AssertionError("retrained instead of loading from the cache")

    monkeypatch.setattr(lc, "pretrain", fail)
    model2, tok2 = pretrained_base(tmp_path, max_chars=TINY_CHARS, **TINY)
    ids = torch.tensor([tok.encode("import os\nprint(os.getcwd())\n")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    assert tok2.encode("x = 1") == tok.encode("x = 1") and tok2.pad_token_id == tok.pad_token_id
    # Different settings go to a different directory (and would need training).
    with pytest.raises(AssertionError, match="retrained"):
        pretrained_base(tmp_path, max_chars=TINY_CHARS, **{**TINY, "steps": 4})


def test_interrupted_write_leaves_no_valid_cache(tmp_path, monkeypatch):
    def broken_save(model, tokenizer, meta, path):
        model.save_pretrained(path)  # partially written ...
        raise KeyboardInterrupt("simulated interruption")  # ... then interrupted

    monkeypatch.setattr(lc, "_save_base", broken_save)
    with pytest.raises(KeyboardInterrupt):
        pretrained_base(tmp_path, max_chars=TINY_CHARS, **TINY)
    assert _valid_caches(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # the temp dir was cleaned up

    monkeypatch.undo()
    pretrained_base(tmp_path, max_chars=TINY_CHARS, **TINY)
    assert len(_valid_caches(tmp_path)) == 1


def test_corpus_without_pydoc_data(monkeypatch):
    """A Python install without ``pydoc_data`` still gives a pretraining corpus (the standard library's source)."""
    import builtins

    real_import = builtins.__import__

    def no_pydoc(name, *args, **kwargs):
        if name.startswith("pydoc_data"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydoc)
    assert lc.pydoc_text() == ""
    docs = lc.prose_corpus(max_chars=20_000)
    assert docs and sum(len(d) for d in docs) == 20_000 and all(docs)
