"""Router losses: the formulas (by hand and against transformers' Mixtral loss), padding exclusion, the backward
injection, and that the losses reach the optimizer, correctly scaled, under HF Trainer and TRL SFTTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from ders_testing import tiny_model
from peft import get_peft_model
from trainer_testing import (
    COMMON_ARGS,
    SENTENCE,
    GradCapture,
    InputCapture,
    padded_lm_dataset,
    reference_router_aux,
    reference_router_grads,
    router_params,
    single_thread,
    text_dataset,
    word_tokenizer,
)
from transformers import Trainer, TrainingArguments
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from trl import SFTConfig, SFTTrainer

import ders_peft
from ders_peft.routing import Router, inject_aux_loss, load_balancing_loss, route, z_loss
from ders_peft.trainer_callback import DeRSTrainerCallback, micro_batches_in_step


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# ---------------------------------------------------------------------------------------------------- formulas
PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
IDX = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])


def test_load_balancing_loss_hand_value():
    # slots per expert: e0 3, e1 3, e2 2 -> f = (.75, .75, .5); mean probs P = (.375, .325, .3)
    # N * sum f P = 3 * (.28125 + .24375 + .15) = 2.025
    got = load_balancing_loss(PROBS, IDX, 3)
    assert got.item() == pytest.approx(2.025, abs=1e-6)


def test_load_balancing_loss_hand_value_with_mask():
    # token 3 is padding: slots e0 2, e1 3, e2 1 over 3 tokens -> f = (2/3, 1, 1/3); P = (1.3, 1.1, .6) / 3
    # N * sum f P = 3 * (2.6 + 3.3 + .6) / 9 = 6.5 / 3
    got = load_balancing_loss(PROBS, IDX, 3, token_mask=torch.tensor([1, 1, 1, 0]))
    assert got.item() == pytest.approx(6.5 / 3, abs=1e-6)


def _random_routing(batch: int, seq: int, num_experts: int, top_k: int, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch * seq, num_experts, generator=gen) * 2.0).to(device)
    logits.requires_grad_(True)
    plan, probs = route(logits, top_k, normalize=True)
    return logits, plan, probs


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_matches_transformers_mixtral(top_k, device):
    batch, seq, num_experts = 3, 7, 5
    logits, plan, probs = _random_routing(batch, seq, num_experts, top_k, device=device)
    ours = load_balancing_loss(probs, plan.expert_idx, num_experts)
    theirs = load_balancing_loss_func((logits,), num_experts, top_k)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # the gradients (which flow through the probabilities only) agree too
    g_ours = torch.autograd.grad(ours, logits)[0]
    g_theirs = torch.autograd.grad(theirs, logits)[0]
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_with_mask_matches_transformers_mixtral(top_k, device):
    batch, seq, num_experts = 3, 7, 5
    logits, plan, probs = _random_routing(batch, seq, num_experts, top_k, seed=3, device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[0, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    ours = load_balancing_loss(probs, plan.expert_idx, num_experts, token_mask=mask.reshape(-1))
    theirs = load_balancing_loss_func((logits,), num_experts, top_k, attention_mask=mask)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    unmasked = load_balancing_loss(probs, plan.expert_idx, num_experts)
    assert abs(unmasked.item() - ours.item()) > 1e-3  # the mask really changes the value here


def test_padding_tokens_are_excluded():
    """With a mask, both losses equal the losses computed on the real tokens alone."""
    logits, plan, probs = _random_routing(4, 6, 4, 2, seed=5)
    keep = torch.rand(24, generator=torch.Generator().manual_seed(1)) > 0.4
    assert 0 < keep.sum() < 24
    masked = load_balancing_loss(probs, plan.expert_idx, 4, token_mask=keep)
    only_real = load_balancing_loss(probs[keep], plan.expert_idx[keep], 4)
    torch.testing.assert_close(masked, only_real)
    torch.testing.assert_close(z_loss(logits, keep), z_loss(logits[keep]))


def test_all_padding_gives_zero_not_nan():
    logits, plan, probs = _random_routing(2, 3, 4, 2)
    none = torch.zeros(6)
    assert load_balancing_loss(probs, plan.expert_idx, 4, token_mask=none).item() == 0.0
    assert z_loss(logits, none).item() == 0.0


def test_z_loss_hand_value():
    rows = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 4.0, 0.5]]
    lse = [math.log(sum(math.exp(v) for v in row)) for row in rows]
    logits = torch.tensor(rows)
    assert z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 3, rel=1e-6)
    mask = torch.tensor([1, 0, 1])
    assert z_loss(logits, mask).item() == pytest.approx((lse[0] ** 2 + lse[2] ** 2) / 2, rel=1e-6)


def test_router_runs_in_its_own_dtype_under_autocast():
    router = Router(16, 4, init_std=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    want = x.float() @ router.weight.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
        assert torch.nn.functional.linear(x.float(), router.weight).dtype == torch.bfloat16  # autocast is on
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------- injection
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_inject_aux_loss_gradient(scale):
    gen = torch.Generator().manual_seed(0)
    w_out = torch.randn(4, 3, generator=gen, requires_grad=True)
    w_aux = torch.randn(3, generator=gen, requires_grad=True)
    x = torch.randn(5, 4, generator=gen)
    coef = 0.3

    def aux_of(w):
        return coef * (w.exp().sum() + w.pow(3).sum())

    y = x @ w_out
    injected = inject_aux_loss(y, aux_of(w_aux), scale)
    torch.testing.assert_close(injected, y, rtol=0, atol=0)  # forward is the identity
    upstream = torch.randn(5, 3, generator=gen)
    (injected * upstream).sum().backward()
    want_aux = scale * coef * (w_aux.detach().exp() + 3 * w_aux.detach() ** 2)
    torch.testing.assert_close(w_aux.grad, want_aux)
    torch.testing.assert_close(w_out.grad, x.t() @ upstream)  # the main gradient is untouched


def test_inject_aux_loss_is_a_no_op_without_grad():
    y = torch.randn(3, 2, requires_grad=True)
    assert inject_aux_loss(y, torch.tensor(1.0), 1.0) is y
    z = torch.randn(3, 2)
    assert inject_aux_loss(z, torch.tensor(1.0, requires_grad=True), 1.0) is z


def _peft(family="llama", **cfg):
    kw = dict(target_modules=["mlp"], num_experts=4, top_k=2, rank=2, router_aux_loss_coef=0.5)
    kw.update(cfg)
    model = get_peft_model(tiny_model(family), ders_peft.DeRSConfig(**kw))
    with torch.no_grad():  # a less uniform router, so the losses have sizeable gradients
        for p in router_params(model).values():
            p.mul_(20.0)
    return model


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_model_router_grad_is_exactly_the_aux_gradient(family, device):
    """With the LM loss isolated (multiplied by zero) the routers' gradient is coef * scale * d(aux), with padding
    excluded through the attention mask the tuner captures, and summed over layers along every path."""
    model = _peft(family, router_z_loss_coef=0.05).to(device)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    scale = 0.5
    model.base_model.set_router_loss_scale(scale)
    model.train()
    out = model(input_ids=ids, attention_mask=mask)
    (out.logits * 0.0).sum().backward()
    got = {n: p.grad for n, p in router_params(model).items()}
    want = reference_router_grads(model, [{"input_ids": ids, "attention_mask": mask}], [scale])
    assert all(w.abs().max() > 1e-4 for w in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-7, rtol=1e-4)
    # the same model without the mask would give a different gradient: the mask really was used
    unmasked = reference_router_grads(model, [{"input_ids": ids}], [scale])
    assert any((unmasked[n] - want[n]).abs().max() > 1e-4 for n in want)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_attention_mask_is_captured_for_every_call_style(task_type):
    """PeftModel (no task_type, as SFTTrainer builds it) and PeftModelForCausalLM reach the transformers model by
    different paths; a positional mask on the base model and a call without a mask must be seen too."""
    model = _peft(task_type=task_type)
    runtime = model.base_model.runtime
    ids = torch.randint(3, 90, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    model(input_ids=ids, attention_mask=mask)
    assert runtime.attention_mask is mask
    model(input_ids=ids)
    assert runtime.attention_mask is None
    model.get_base_model()(ids, mask)
    assert runtime.attention_mask is mask


def test_router_stats_record_layer_means():
    model = _peft()
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.train()
    model(input_ids=ids, attention_mask=mask)
    stats = model.base_model.pop_router_stats()
    _, lbs = reference_router_aux(model, {"input_ids": ids, "attention_mask": mask})
    assert stats["router_aux_loss"] == pytest.approx(float(sum(lbs) / len(lbs)), rel=1e-5)
    assert model.base_model.pop_router_stats() == {}  # popped


def test_no_router_loss_in_eval_or_without_grad():
    model = _peft()
    ids = torch.randint(3, 90, (1, 5))
    model.eval()
    model(input_ids=ids)
    model.train()
    with torch.no_grad():
        model(input_ids=ids)
    assert model.base_model.pop_router_stats() == {}


# ---------------------------------------------------------------------------------------------------- trainers
TEXTS = [SENTENCE, "the cat sat on a mat", "a dog ran to the green tree and the sun", "big blue house"]
LB_COEF, Z_COEF = 0.5, 0.05


def _run(kind, tmp_path, lb_coef, z_coef, batch: int, ga: int, steps: int = 1, n_texts: int | None = None, **extra):
    """Train (lr 0, no clipping) with HF Trainer or SFTTrainer; return router grads per step, the DeRS-model inputs
    and scales of every training forward, the trainer and the peft model."""
    cfg = ders_peft.DeRSConfig(
        target_modules=["mlp"], num_experts=4, top_k=2, rank=2, router_aux_loss_coef=lb_coef, router_z_loss_coef=z_coef
    )
    tok = word_tokenizer()
    grads = GradCapture()
    common = dict(
        COMMON_ARGS,
        output_dir=str(tmp_path / f"{kind}-{lb_coef}"),
        learning_rate=0.0,
        max_grad_norm=0.0,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        max_steps=steps,
    )
    common.update(extra)
    texts = TEXTS[: n_texts or batch * ga]
    if kind == "sft":
        # SFTConfig defaults to bf16 autocast, even on CPU; the exact comparisons here need fp32
        args = SFTConfig(**{"bf16": False, **common}, max_length=32)
        trainer = SFTTrainer(
            model=tiny_model("llama"),
            args=args,
            train_dataset=text_dataset(texts),
            processing_class=tok,
            peft_config=cfg,
            callbacks=[grads],
        )
    else:
        model = get_peft_model(tiny_model("llama"), cfg)
        args = TrainingArguments(**common)
        trainer = Trainer(model=model, args=args, train_dataset=padded_lm_dataset(tok, texts), callbacks=[grads])
    peft_model = trainer.model
    with torch.no_grad():
        for p in router_params(peft_model).values():
            p.mul_(20.0)
    inputs = InputCapture(peft_model)
    trainer.train()
    inputs.remove()
    return grads.steps, inputs, trainer, peft_model


def _assert_aux_contribution(kind, tmp_path, ga, batch, **extra):
    with_aux, inputs, _, model = _run(kind, tmp_path, LB_COEF, Z_COEF, batch, ga, **extra)
    without, _, _, _ = _run(kind, tmp_path, 0.0, 0.0, batch, ga, **extra)
    assert len(inputs.calls) == ga and inputs.scales == [1.0 / ga] * ga
    assert any((c["attention_mask"] == 0).any() for c in inputs.calls)  # padding present in the trained batches
    want = reference_router_grads(model, inputs.calls, [1.0 / ga] * ga)
    for name, w in want.items():
        diff = with_aux[0][name] - without[0][name]
        assert diff.abs().max() > 1e-4  # the coefficient changes the router's gradient
        torch.testing.assert_close(diff, w, atol=2e-6, rtol=1e-3)


@pytest.mark.parametrize(
    "gc",
    [
        dict(gradient_checkpointing=True),  # SFTConfig's default (non-reentrant)
        dict(gradient_checkpointing=False),
        dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
    ],
    ids=["gc", "no-gc", "gc-reentrant"],
)
def test_sft_trainer_router_grad_changes_with_coefficient(tmp_path, gc):
    """Under SFTTrainer (whose loss ignores ``outputs.loss``) the router gradient with coefficients minus the one
    without equals the hand-computed aux gradient, with padding excluded, whatever the checkpointing mode."""
    _assert_aux_contribution("sft", tmp_path, ga=1, batch=2, **gc)


def test_sft_trainer_gradient_accumulation_averages_aux(tmp_path):
    """GA=2 over two micro-batches: the aux contribution is the mean of the two micro-batches' aux gradients."""
    _assert_aux_contribution("sft", tmp_path, ga=2, batch=2)


def test_hf_trainer_gradient_accumulation_averages_aux(tmp_path):
    _assert_aux_contribution("hf", tmp_path, ga=2, batch=1, gradient_checkpointing=True)


@pytest.mark.parametrize("kind", ["hf", "sft"])
def test_trainer_lm_loss_is_not_summed_over_micro_batches(tmp_path, kind):
    """The 1/GA aux scale is right because the trainers do not sum the LM loss over micro-batches either: with GA=2
    over two one-example micro-batches the LM gradient equals the one of a single two-example batch (both normalise by
    the token count of the whole accumulated batch)."""
    accumulated, _, _, _ = _run(kind, tmp_path, 0.0, 0.0, batch=1, ga=2)
    single, _, _, _ = _run(kind, tmp_path / "single", 0.0, 0.0, batch=2, ga=1)
    names = [n for n in single[0] if "ders_base" in n or "lora_b" in n]  # the router's LM gradient is 0 at init
    assert names
    for name in names:
        assert single[0][name].abs().max() > 1e-5
        torch.testing.assert_close(accumulated[0][name], single[0][name], atol=1e-7, rtol=1e-4)


def test_scale_follows_short_last_accumulation_window(tmp_path):
    """3 micro-batches per epoch with GA=2: steps of 2 then 1 micro-batch; each forward runs with scale 1/that."""
    _, inputs, trainer, _ = _run("hf", tmp_path, LB_COEF, 0.0, batch=1, ga=2, steps=4, n_texts=3, learning_rate=1e-3)
    assert inputs.scales == [0.5, 0.5, 1.0, 0.5, 0.5, 1.0]
    # after training the scale is back to 1 for plain training loops
    assert trainer.model.base_model.runtime.aux_grad_scale == 1.0


@pytest.mark.parametrize(
    "ga,batches,step,want",
    [(1, 10, 0, 1), (4, 8, 0, 4), (4, 8, 1, 4), (4, 10, 2, 2), (4, 10, 5, 2), (4, 10, 3, 4), (3, None, 7, 3)],
)
def test_micro_batches_in_step(ga, batches, step, want):
    assert micro_batches_in_step(ga, batches, step) == want


@pytest.mark.parametrize("kind", ["hf", "sft"])
def test_router_losses_in_training_logs(tmp_path, kind):
    _, inputs, trainer, model = _run(kind, tmp_path, LB_COEF, Z_COEF, batch=2, ga=1, steps=2, learning_rate=0.0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all("router_aux_loss" in h and "router_z_loss" in h for h in logs)
    # lr 0: both steps see the initial weights; the logged value is the layer mean of the hand-computed loss
    _, lbs = reference_router_aux(model, inputs.calls[0])
    assert logs[0]["router_aux_loss"] == pytest.approx(float(sum(lbs) / len(lbs)), rel=1e-4)
    assert DeRSTrainerCallback in [type(cb) for cb in trainer.callback_handler.callbacks]
