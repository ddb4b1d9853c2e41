"""Offline text corpora and a tiny pretrained base model for demos and benchmarks.

Everything here works without network access. Text comes from the running interpreter:

* **Pretraining corpus** (:func:`prose_corpus`): the English documentation in ``pydoc_data.topics`` plus the source
  of every standard-library top-level module/package *except* the code domain below (and except
  :data:`PRETRAIN_EXCLUDED`: ``encodings`` is mostly codec tables, ``pydoc_data`` duplicates the pydoc text).
* **Code domain** (:func:`code_domain_files`): the source of :data:`CODE_DOMAIN_PACKAGES` (``asyncio``,
  ``concurrent``, ``email``, ``http``, ``json``, ``logging``, ``multiprocessing``, ``unittest``, ``urllib``,
  ``xml``), held apart from pretraining so that it is a genuinely new domain for fine-tuning / upcycling.

:func:`pretrained_base` trains a byte-level BPE tokenizer and a tiny Llama on the pretraining corpus and caches
both on disk (atomically), so later calls load in about a second.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "BOS_TOKEN",
    "CODE_DOMAIN_PACKAGES",
    "DEFAULT_PRETRAIN_CHARS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PRETRAIN_EXCLUDED",
    "code_domain_files",
    "evaluate_loss",
    "pack_tokens",
    "pretrain",
    "pretrained_base",
    "pretraining_files",
    "pretraining_packages",
    "prose_corpus",
    "pydoc_text",
    "python_source_files",
    "read_texts",
    "split_by_file",
    "stdlib_top_level_names",
    "tiny_llama_config",
    "train_tokenizer",
]

T = TypeVar("T")

#: Standard-library packages held apart from pretraining; their source is the "new domain".
CODE_DOMAIN_PACKAGES: tuple[str, ...] = (
    "asyncio",
    "concurrent",
    "email",
    "http",
    "json",
    "logging",
    "multiprocessing",
    "unittest",
    "urllib",
    "xml",
)
#: Top-level stdlib names used by neither set (codec tables; a duplicate of :func:`pydoc_text`).
PRETRAIN_EXCLUDED: tuple[str, ...] = ("encodings", "pydoc_data")
#: Default character budget of the pretraining corpus (about 1.2M tokens with the default tokenizer).
DEFAULT_PRETRAIN_CHARS = 4_000_000

# Distinct special tokens. The pad token is deliberately *not* the eos token: collators that mask labels where
# ``input_ids == pad_token_id`` would otherwise also mask every eos, and the model would never learn to stop.
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_CACHE_FORMAT = 1  # bump when the training recipe changes so stale caches are not reused
_META_FILE = "ders_base.json"  # written last inside the temp dir: a cache dir is valid iff it holds this file


# ----------------------------------------------------------------------------------------------------------------
# Files and text
# ----------------------------------------------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _top_level_entries() -> dict[str, Path]:
    """Map top-level stdlib module/package name -> path of its ``.py`` file or package directory."""
    entries: dict[str, Path] = {}
    for path in sorted(_stdlib_root().iterdir()):
        if path.is_dir():
            # Packages only: skips ``config-3.x-...``, ``lib-dynload``, ``site-packages`` and the test suites.
            if path.name.isidentifier() and path.name not in _SKIP_DIRS:
                entries[path.name] = path
        elif path.suffix == ".py" and not path.name.startswith("_sysconfigdata"):  # machine-specific data
            entries[path.stem] = path
    return entries


def stdlib_top_level_names() -> list[str]:
    """Sorted names of all top-level standard-library modules and packages that have Python source."""
    return sorted(_top_level_entries())


def _normalize_name(name: str) -> str:
    return name[:-3] if name.endswith(".py") else name


def python_source_files(packages: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[Path]:
    """Sorted ``.py`` files of the running Python's standard library.

    ``packages`` restricts the result to those top-level modules/packages (``"asyncio"``, ``"json"``,
    ``"argparse"`` or ``"argparse.py"``); unknown names raise ``ValueError``. ``exclude`` removes top-level names
    (unknown ones are ignored, since the stdlib differs between Python versions). ``site-packages``, ``test``,
    ``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__`` directories are always skipped.
    """
    entries = _top_level_entries()
    if packages is None:
        wanted = set(entries)
    else:
        wanted = {_normalize_name(p) for p in packages}
        unknown = sorted(wanted - set(entries))
        if unknown:
            raise ValueError(f"not top-level stdlib modules/packages with source: {unknown}")
    wanted -= {_normalize_name(e) for e in exclude}
    files: list[Path] = []
    for name in sorted(wanted):
        path = entries[name]
        if path.is_file():
            files.append(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
            files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def pydoc_text() -> str:
    """The English documentation topics of ``pydoc_data.topics``, sorted by topic name and joined; empty (the corpus
    is then the standard library's source alone) on a Python install that leaves ``pydoc_data`` out."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return ""

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def split_by_file(
    paths: Sequence[T], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[T], list[T], list[T]]:
    """Deterministic file-level train/val/test split (independent of the input order).

    Files are sorted, shuffled with ``random.Random(seed)`` and cut by ``fractions``; every split with a
    positive fraction gets at least one file when there are enough files. Each split is returned sorted.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    items = sorted(paths, key=str)
    random.Random(seed).shuffle(items)
    n = len(items)
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    if n >= 3:  # keep every split with a positive fraction non-empty
        n_val, n_test = max(n_val, int(fractions[1] > 0)), max(n_test, int(fractions[2] > 0))
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    n_train = n - n_val - n_test
    train, val, test = items[:n_train], items[n_train : n_train + n_val], items[n_train + n_val :]
    return sorted(train, key=str), sorted(val, key=str), sorted(test, key=str)


def read_texts(paths: Iterable[str | Path], max_chars: int | None = None) -> list[str]:
    """Read files (UTF-8, undecodable bytes replaced) in the given order, stopping at ``max_chars`` characters.

    The document that crosses the budget is truncated so the total is exactly ``max_chars``.
    """
    texts: list[str] = []
    total = 0
    for path in paths:
        if max_chars is not None and total >= max_chars:
            break
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        texts.append(text)
        total += len(text)
    return texts


def pretraining_packages() -> list[str]:
    """Top-level stdlib names used for pretraining: everything except the code domain and the exclusions."""
    held_out = set(CODE_DOMAIN_PACKAGES) | set(PRETRAIN_EXCLUDED)
    return [name for name in stdlib_top_level_names() if name not in held_out]


def pretraining_files() -> list[Path]:
    """Sorted source files of :func:`pretraining_packages`."""
    return python_source_files(pretraining_packages())


def code_domain_files(exclude: Sequence[str] = ()) -> list[Path]:
    """Sorted source files of :data:`CODE_DOMAIN_PACKAGES` (minus ``exclude``); disjoint from pretraining."""
    available = set(stdlib_top_level_names())
    names = [p for p in CODE_DOMAIN_PACKAGES if p in available]
    return python_source_files(names, exclude=exclude)


def prose_corpus(max_chars: int | None = DEFAULT_PRETRAIN_CHARS, split: str = "all", seed: int = 0) -> list[str]:
    """Documents of the pretraining corpus: pydoc text first, then pretraining source files.

    ``split`` is ``"all"`` or one of ``"train"``, ``"val"``, ``"test"`` of :func:`split_by_file` over the source
    files (the pydoc text belongs to ``"train"``/``"all"``). Files are taken in a seeded shuffled order until
    ``max_chars`` characters, so the capped corpus samples all packages, deterministically.
    """
    files = pretraining_files()
    if split != "all":
        splits = dict(zip(("train", "val", "test"), split_by_file(files, seed=seed)))
        if split not in splits:
            raise ValueError(f"split must be 'all', 'train', 'val' or 'test', got {split!r}")
        files = splits[split]
    files = sorted(files)
    random.Random(seed).shuffle(files)
    docs = [text for text in [pydoc_text()] if text] if split in ("all", "train") else []
    if max_chars is not None:
        docs = [d[:max_chars] for d in docs]
        max_chars -= sum(len(d) for d in docs)
    return docs + read_texts(files, max_chars=max_chars)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and data
# ----------------------------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (lossless round trip, no ``unk``) wrapped as a fast HF tokenizer.

    Special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` get ids 0, 1, 2; pad is distinct from eos (see
    :data:`PAD_TOKEN`). No special tokens are added when encoding; :func:`pack_tokens` inserts eos itself.
    """
    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    min_vocab = len(specials) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab} (byte alphabet + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def pack_tokens(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], seq_len: int) -> torch.LongTensor:
    """Tokenize ``texts``, append eos after each document, concatenate and cut into ``(n_blocks, seq_len)``.

    The trailing partial block is dropped.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be positive")
    texts = list(texts)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token")
    # Encode with the backend directly: batched and without the "sequence longer than model_max_length" warning.
    encodings = tokenizer._tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
    ids: list[int] = []
    for enc in encodings:
        ids.extend(enc.ids)
        ids.append(eos)
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


# ----------------------------------------------------------------------------------------------------------------
# Model, training, evaluation
# ----------------------------------------------------------------------------------------------------------------


def _mlp_width(hidden_size: int) -> int:
    """Llama-style MLP width: 8/3 * hidden, rounded up to a multiple of 8 (128 -> 344)."""
    return 8 * math.ceil(hidden_size * 8 / 3 / 8)


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 128,
    intermediate_size: int = 344,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    **kwargs: object,
) -> LlamaConfig:
    """A small untied Llama configuration; extra ``kwargs`` (e.g. token ids) go to :class:`LlamaConfig`."""
    settings: dict[str, object] = {
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    settings.update(kwargs)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        **settings,
    )


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
    weight_decay: float = 0.1,
    warmup_steps: int | None = None,
    param_groups: list[dict] | None = None,
) -> list[float]:
    """Causal-LM training with AdamW, linear warmup + cosine decay and grad clipping; returns the loss per step.

    Batches are drawn from ``blocks`` (``(n, seq_len)`` token ids) in seeded shuffled epochs. ``log_every > 0``
    prints progress every that many steps. ``param_groups`` (each with its own ``lr`` and ``weight_decay``, e.g. from
    ``ders_peft.training.param_groups``) replace the default decay / no-decay split; the schedule scales every
    group's learning rate by the same factor. The model is left in eval mode.
    """
    if len(blocks) == 0:
        raise ValueError("no training blocks")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups if param_groups is None else param_groups, lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    model.train()
    order = torch.randperm(len(blocks), generator=generator)
    cursor = 0
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order = torch.randperm(len(blocks), generator=generator)
            cursor = 0
        batch = blocks[order[cursor : cursor + batch_size]]
        cursor += batch_size
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every > 0 and ((step + 1) % log_every == 0 or step + 1 == steps):
            elapsed = time.perf_counter() - start
            left = elapsed / (step + 1) * (steps - step - 1)
            msg = f"[pretrain] step {step + 1}/{steps} loss {losses[-1]:.4f} ({elapsed:.1f}s, ~{left:.0f}s left)"
            print(msg, flush=True)
    model.eval()
    return losses


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all predicted tokens of ``blocks``; restores the training mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            targets = batch[:, 1:]
            flat = logits.reshape(-1, logits.size(-1)).float()
            total += F.cross_entropy(flat, targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate (need blocks of length >= 2)")
    return float(total) / count


# ----------------------------------------------------------------------------------------------------------------
# Cached pretrained base
# ----------------------------------------------------------------------------------------------------------------


def _cache_name(**settings: object) -> str:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"  # the stdlib (hence the corpus) differs per version
    parts = "-".join(f"{k}{v}" for k, v in settings.items())
    return f"llama-{parts}-{py}-f{_CACHE_FORMAT}"


def _is_valid_cache(path: Path) -> bool:
    return (path / _META_FILE).is_file() and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def _load_base(path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer


def _save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, meta: dict, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the directory complete


def pretrained_base(
    cache_dir: str | Path = "~/.cache/ders_peft/base",
    *,
    steps: int = 300,
    seq_len: int = 128,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 4,
    batch_size: int = 32,
    lr: float = 3e-3,
    max_chars: int = DEFAULT_PRETRAIN_CHARS,
    seed: int = 0,
    force: bool = False,
    log_every: int = 0,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny Llama + tokenizer pretrained on :func:`prose_corpus`, cached under ``cache_dir``.

    The cache subdirectory name encodes all settings and the Python version. The first call trains the tokenizer
    on the train split of the pretraining corpus, pretrains for ``steps`` steps, records train/val losses and
    timing in ``ders_base.json`` and moves the finished directory into place atomically (an interrupted run leaves
    only a ``.tmp-*`` directory, never a valid-looking cache). Later calls load from disk; ``force`` retrains.
    The model is returned in eval mode.
    """
    root = Path(cache_dir).expanduser()
    name = _cache_name(
        v=vocab_size, h=hidden_size, L=num_layers, t=seq_len, s=steps, b=batch_size, lr=lr, c=max_chars, seed=seed
    )
    final = root / name
    if not force and _is_valid_cache(final):
        return _load_base(final)

    start = time.perf_counter()
    train_texts = prose_corpus(max_chars=max_chars, split="train", seed=seed)
    val_texts = prose_corpus(max_chars=max(max_chars // 20, 20_000), split="val", seed=seed)
    max_positions = max(512, seq_len)
    tokenizer = train_tokenizer(train_texts, vocab_size=vocab_size, model_max_length=max_positions)
    train_blocks = pack_tokens(tokenizer, train_texts, seq_len)
    val_blocks = pack_tokens(tokenizer, val_texts, seq_len)[:256]
    torch.manual_seed(seed)
    config = tiny_llama_config(
        len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=_mlp_width(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    prep_seconds = time.perf_counter() - start
    losses = pretrain(model, train_blocks, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log_every=log_every)
    train_seconds = time.perf_counter() - start - prep_seconds
    meta = {
        "format": _CACHE_FORMAT,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "settings": {
            "steps": steps,
            "seq_len": seq_len,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "batch_size": batch_size,
            "lr": lr,
            "max_chars": max_chars,
            "seed": seed,
        },
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_blocks": len(train_blocks),
        "val_blocks": len(val_blocks),
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "val_loss": evaluate_loss(model, val_blocks) if len(val_blocks) else None,
        "prep_seconds": round(prep_seconds, 2),
        "train_seconds": round(train_seconds, 2),
    }

    from .atomic import write_dir

    root.mkdir(parents=True, exist_ok=True)
    try:  # written into a temporary sibling, then swapped in (an invalid leftover or force=True: replaced)
        write_dir(final, lambda tmp: _save_base(model, tokenizer, meta, tmp), what="cache")
    except OSError:
        if not _is_valid_cache(final):  # not a concurrent writer that finished first
            raise
    return _load_base(final)


if __name__ == "__main__":  # pragma: no cover - manual smoke run: python -m ders_peft.local_corpus [cache_dir]
    _model, _tok = pretrained_base(*sys.argv[1:2], log_every=25)
    print(json.dumps(json.loads((Path(_model.name_or_path) / _META_FILE).read_text()), indent=2))
