"""Helpers for the Trainer / SFTTrainer tests: a local tokenizer, small datasets, gradient and input capture, and a
plain re-implementation of the router losses used as the reference for the gradients the trainers produce."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback

from ders_peft.layer import DeRSLayer

WORDS = "the a cat dog sat ran on to mat red blue green house tree big small and old new sun".split()
SENTENCE = "the big cat sat on the red mat and the small dog ran to the old house"


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared 2-core machine, tiny models train several times faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS` with pad/eos/unk tokens (built locally, no Hub)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_dataset(texts: list[str]) -> Dataset:
    return Dataset.from_dict({"text": list(texts)})


def padded_lm_dataset(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> Dataset:
    """Tokenised causal-LM examples (text + eos) right-padded to a common length; labels are -100 on padding."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for x in ids:
        pad = width - len(x)
        rows["input_ids"].append(x + [tokenizer.pad_token_id] * pad)
        rows["attention_mask"].append([1] * len(x) + [0] * pad)
        rows["labels"].append(x + [-100] * pad)
    return Dataset.from_dict(rows)


COMMON_ARGS = dict(
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
    logging_steps=1,
    dataloader_num_workers=0,
    seed=0,
)


class GradCapture(TrainerCallback):
    """Copies the gradients of the parameters whose name contains ``key`` just before every optimizer step
    (after clipping: pass ``max_grad_norm=0`` to see raw gradients)."""

    def __init__(self, key: str = "ders_") -> None:
        self.key = key
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if self.key in n and p.grad is not None}
        )


class InputCapture:
    """Records the inputs of every training call of the transformers model inside a peft model, and the router-loss
    gradient scale in force."""

    KEYS = ("input_ids", "attention_mask", "position_ids")

    def __init__(self, peft_model) -> None:
        self.runtime = peft_model.base_model.runtime
        self.calls: list[dict[str, torch.Tensor]] = []
        self.scales: list[float] = []
        self.handle = peft_model.get_base_model().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.calls.append({k: kwargs[k].detach().clone() for k in self.KEYS if kwargs.get(k) is not None})
            self.scales.append(self.runtime.aux_grad_scale)

    def remove(self) -> None:
        self.handle.remove()


def router_losses_by_hand(
    x: torch.Tensor, router_weight: torch.Tensor, top_k: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing loss ``N * sum_e f_e P_e`` and z-loss of one layer, written out over real tokens only."""
    x = x.reshape(-1, x.shape[-1]).to(router_weight.dtype)
    logits = x @ router_weight.t()
    if mask is not None:
        logits = logits[mask.reshape(-1).bool()]  # drop padding tokens entirely
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = torch.zeros_like(probs)
    chosen.scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
    frac = chosen.sum(0) / num_tokens  # routed slots per token per expert
    mean_prob = probs.sum(0) / num_tokens
    lb = num_experts * (frac * mean_prob).sum()
    z = (torch.logsumexp(logits.float(), dim=-1) ** 2).sum() / num_tokens
    return lb, z


def reference_router_aux(peft_model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Weighted router losses of one batch summed over layers, computed by hand from each DeRS layer's input (the
    model runs in eval mode so the library's own injection is off). Returns the total (with graph) and the per-layer
    load-balancing values."""
    layers = [m for m in peft_model.modules() if isinstance(m, DeRSLayer)]
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, a[0])) for i, m in enumerate(layers)]
    was_training = peft_model.training
    peft_model.eval()
    try:
        peft_model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        peft_model.train(was_training)
    mask = inputs.get("attention_mask")
    total, lbs = 0.0, []
    for i, layer in enumerate(layers):
        adapter = layer.active_adapters[0]
        cfg = layer.ders_settings[adapter]
        lb, z = router_losses_by_hand(seen[i], layer.ders_router[adapter].weight, cfg.top_k, mask)
        lbs.append(lb.detach())
        total = total + cfg.router_aux_loss_coef * lb + cfg.router_z_loss_coef * z
    return total, lbs


def router_params(peft_model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if "ders_router" in n}


def reference_router_grads(peft_model, batches: list[dict[str, torch.Tensor]], weights: list[float]):
    """``sum_b weights[b] * d(router aux of batch b) / d(router weights)`` by autograd on the hand-written losses."""
    params = router_params(peft_model)
    total = 0.0
    for batch, w in zip(batches, weights, strict=True):
        aux, _ = reference_router_aux(peft_model, batch)
        total = total + w * aux
    grads = torch.autograd.grad(total, list(params.values()))
    return dict(zip(params, grads, strict=True))
