"""Training a tiny Llama and a tiny Phi (biased FFN) with DeRS under TRL SFTTrainer and HF Trainer on CPU: the loss
falls, gradient checkpointing changes nothing, exactly the DeRS tensors train, peft's parameter counts are right, and
bf16 models keep their base copy in bf16."""

from __future__ import annotations

import re

import pytest
import torch
from ders_testing import ders_layers, tiny_model
from peft import get_peft_model
from trainer_testing import (
    COMMON_ARGS,
    SENTENCE,
    padded_lm_dataset,
    single_thread,
    text_dataset,
    word_tokenizer,
)
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import ders_peft

STEPS = 30  # the loss-falls check
GC_STEPS = 5  # the checkpointing-equality check: the first steps of the same run, with and without checkpointing
# a larger init than the default 0.02 lets the frozen LM head express confident predictions, so the loss can fall far
INIT = 0.2
DERS_PARAM = re.compile(r"\.ders_(router|delta|bias|base)\.")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _config(**kw) -> ders_peft.DeRSConfig:
    return ders_peft.DeRSConfig(**{"target_modules": ["mlp"], "num_experts": 4, "top_k": 2, "rank": 4, **kw})


def _trainer(kind: str, family: str, tmp_path, gradient_checkpointing: bool, model=None, steps: int = STEPS):
    """A trainer over a fixed batch (the same sentence twice)."""
    model = model if model is not None else tiny_model(family, initializer_range=INIT)
    tok = word_tokenizer()
    common = dict(
        COMMON_ARGS,
        output_dir=str(tmp_path / f"{kind}-{family}-{gradient_checkpointing}"),
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=2,
        gradient_checkpointing=gradient_checkpointing,
    )
    if kind == "sft":
        args = SFTConfig(**common, max_length=32)
        data = text_dataset([SENTENCE] * 2)
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=_config())
    args = TrainingArguments(**common)
    return Trainer(
        model=get_peft_model(model, _config()), args=args, train_dataset=padded_lm_dataset(tok, [SENTENCE] * 2)
    )


def _train(trainer) -> tuple[list[float], int]:
    """Train; return the per-step losses and the number of calls of the first DeRS layer's forward (recomputation
    under gradient checkpointing adds calls)."""
    calls = []
    handle = ders_layers(trainer.model)[0].register_forward_pre_hook(lambda *a: calls.append(1))
    trainer.train()
    handle.remove()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == trainer.args.max_steps
    return losses, len(calls)


@pytest.mark.parametrize("family", ["llama", "phi"])
@pytest.mark.parametrize("kind", ["sft", "hf"])
def test_loss_falls_and_gradient_checkpointing_changes_nothing(kind, family, tmp_path):
    """STEPS plain steps make the loss fall; GC_STEPS steps under gradient checkpointing (constant learning rate, same
    seed and batch) give the same per-step losses as the plain run's first GC_STEPS steps."""
    trainer = _trainer(kind, family, tmp_path, gradient_checkpointing=False)
    without_gc, calls_plain = _train(trainer)
    gc_trainer = _trainer(kind, family, tmp_path, gradient_checkpointing=True, steps=GC_STEPS)
    with_gc, calls_gc = _train(gc_trainer)
    assert calls_plain == STEPS and calls_gc > GC_STEPS  # checkpointing really recomputed the DeRS layer
    assert without_gc[-1] < 0.3 * without_gc[0], without_gc  # e.g. 5.2 -> 0.35 on Llama
    assert without_gc[GC_STEPS - 1] < without_gc[0]  # the compared steps already train
    torch.testing.assert_close(torch.tensor(with_gc), torch.tensor(without_gc[:GC_STEPS]), atol=1e-5, rtol=0)
    for t in (trainer, gc_trainer):
        assert all("router_aux_loss" in h for h in t.state.log_history if "loss" in h)


@pytest.mark.parametrize("kind", ["sft", "hf"])
def test_training_updates_exactly_the_ders_tensors(kind, tmp_path):
    """A few steps move every router, delta, per-expert bias and base-copy tensor and leave every original weight
    bit-identical and frozen."""
    model = tiny_model("phi", initializer_range=INIT)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(kind, "phi", tmp_path, gradient_checkpointing=True, model=model, steps=3)
    params = dict(trainer.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if DERS_PARAM.search(n)}
    assert {DERS_PARAM.search(n).group(1) for n in trainable} == {"router", "delta", "bias", "base"}
    initial = {n: params[n].detach().clone() for n in trainable}
    _train(trainer)
    for name in trainable:
        assert not torch.equal(params[name].detach(), initial[name]), name
    for name, value in original.items():
        wrapped = "base_model.model." + name.replace(".mlp.", ".mlp.base_layer.")
        assert not params[wrapped].requires_grad
        assert torch.equal(params[wrapped].detach(), value), name


# ---------------------------------------------------------------------------------------------------- parameters
HIDDEN, INTER, LAYERS, N = 32, 48, 2, 4  # tiny_model defaults: hidden, intermediate, blocks; experts in these tests


def expected_ders_params(family: str, delta_type: str, train_base: bool, rank: int = 4, sparse_rate: float = 0.9):
    """DeRS parameters per model, counted from the shapes: router + base copy + deltas + per-expert biases."""
    h, i = HIDDEN, INTER
    mats = [(i, h), (i, h), (h, i)] if family == "llama" else [(i, h), (h, i)]  # (out, in) of each FFN matrix
    per_layer = N * h  # router
    for out_f, in_f in mats:
        if delta_type == "lowrank":
            per_layer += N * rank * (out_f + in_f)
        elif delta_type == "sparse":
            per_layer += N * round(out_f * in_f * (1 - sparse_rate))
        else:  # full expert copies
            per_layer += N * out_f * in_f
        if train_base and delta_type != "full":
            per_layer += out_f * in_f
        if family == "phi":
            per_layer += N * out_f  # one bias per expert
    return LAYERS * per_layer


CASES = [
    ("llama", "lowrank", True),
    ("llama", "lowrank", False),
    ("llama", "sparse", True),
    ("llama", "full", True),
    ("phi", "lowrank", True),
    ("phi", "lowrank", False),
]


@pytest.mark.parametrize("family,delta_type,train_base", CASES)
def test_trainable_parameters(family, delta_type, train_base, capsys):
    dense = tiny_model(family)
    dense_names = {n for n, _ in dense.named_parameters()}
    dense_count = sum(p.numel() for p in dense.parameters())
    cfg = _config(delta_type=delta_type, train_base=train_base, sparse_rate=0.9)
    model = get_peft_model(dense, cfg)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if DERS_PARAM.search(n)}
    kinds = {DERS_PARAM.search(n).group(1) for n in trainable}
    want_kinds = {"router", "delta"} | ({"bias"} if family == "phi" else set())
    want_kinds |= {"base"} if train_base and delta_type != "full" else set()
    assert kinds == want_kinds
    originals = {"base_model.model." + n.replace(".mlp.", ".mlp.base_layer.") for n in dense_names}
    assert originals <= set(params) and not (originals & trainable)

    added = expected_ders_params(family, delta_type, train_base)
    assert sum(params[n].numel() for n in trainable) == added
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    match = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", printed)
    assert match, printed
    n_trainable, n_all = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert (n_trainable, n_all) == (added, dense_count + added)
    assert float(match.group(3)) == pytest.approx(100 * added / (dense_count + added), abs=1e-4)


# ---------------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("family", ["llama", "phi"])
def test_bf16_model_keeps_bf16_base_copy_and_trains(family):
    model = get_peft_model(tiny_model(family, initializer_range=INIT).to(torch.bfloat16), _config(train_base=True))
    dtypes: dict[str, set] = {}
    for name, p in model.named_parameters():
        key = DERS_PARAM.search(name).group(1) if DERS_PARAM.search(name) else "original"
        dtypes.setdefault(key, set()).add(p.dtype)
    assert dtypes["base"] == {torch.bfloat16}  # as large as the dense FFN: not upcast
    assert dtypes["original"] == {torch.bfloat16}
    assert dtypes["router"] == dtypes["delta"] == {torch.float32}  # peft's adapter autocast
    if family == "phi":
        assert dtypes["bias"] == {torch.float32}

    tok = word_tokenizer()
    batch = padded_lm_dataset(tok, [SENTENCE, "the cat sat on a mat"]).with_format("torch")[:]
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        for p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p.detach(), b) for p, b in zip(trainable, before))
    assert {p.dtype for n, p in model.named_parameters() if ".ders_base." in n} == {torch.bfloat16}


def test_bf16_without_autocast_keeps_everything_bf16():
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), _config(), autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 90, (2, 6))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_bf16_model_under_sft_trainer(tmp_path):
    model = tiny_model("llama", initializer_range=INIT).to(torch.bfloat16)
    trainer = _trainer("sft", "llama", tmp_path, gradient_checkpointing=True, model=model, steps=5)
    losses, _ = _train(trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    dtypes = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".ders_base." in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if ".ders_router." in n or ".ders_delta." in n} == {torch.float32}
