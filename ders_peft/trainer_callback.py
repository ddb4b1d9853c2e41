"""A `transformers.TrainerCallback` that scales router losses under gradient accumulation and logs them.

``import ders_peft`` appends it to transformers' default callbacks, so HF ``Trainer`` and TRL ``SFTTrainer`` pick it
up without user code; it does nothing for models without DeRS layers.

Why ``1 / micro-batches``: the router losses are injected into the backward pass of every micro-batch (see
:func:`ders_peft.routing.inject_aux_loss`), while ``Trainer`` weights each micro-batch's LM loss by one over the
number of micro-batches of the optimizer step (it divides the per-batch mean by
``current_gradient_accumulation_steps``, or normalises by the token count of the whole accumulated batch). Scaling
the injected gradient the same way makes one optimizer step see the mean router loss of its micro-batches.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


def find_ders_tuners(model) -> list:
    """DeRS tuners (``DeRSModel`` instances) inside ``model`` (a PeftModel, a DeRSModel or a wrapped module)."""
    from .model import DeRSModel

    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, DeRSModel)]


def micro_batches_in_step(gradient_accumulation_steps: int, batches_per_epoch: int | None, global_step: int) -> int:
    """Number of micro-batches ``Trainer`` accumulates for the optimizer step that starts after ``global_step`` steps.

    Every step accumulates ``gradient_accumulation_steps`` batches except the last step of an epoch, which takes the
    remainder when the epoch's batch count is not a multiple of it (``Trainer._run_epoch``). Without a known epoch
    length (iterable datasets) every step is full.
    """
    ga = max(1, gradient_accumulation_steps)
    if not batches_per_epoch:
        return ga
    steps_per_epoch = math.ceil(batches_per_epoch / ga)
    if global_step % steps_per_epoch == steps_per_epoch - 1:
        return batches_per_epoch - (steps_per_epoch - 1) * ga
    return ga


def _epoch_length(dataloader) -> int | None:
    try:
        return len(dataloader)
    except TypeError:
        return None


class DeRSTrainerCallback(TrainerCallback):
    """Sets the router-loss gradient scale to ``1 / micro-batches of the optimizer step`` and adds the mean router
    losses (``router_aux_loss``, ``router_z_loss``: unweighted by their coefficients, averaged over layers and forward
    passes) of each logging window to the training logs."""

    @staticmethod
    def _set_scale(model, scale: float) -> None:
        for tuner in find_ders_tuners(model):
            tuner.set_router_loss_scale(scale)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set_scale(model, 1.0 / max(1, args.gradient_accumulation_steps))

    def on_step_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        n = micro_batches_in_step(args.gradient_accumulation_steps, _epoch_length(train_dataloader), state.global_step)
        self._set_scale(model, 1.0 / n)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Outside a Trainer (plain training loops) the router losses get a unit gradient again.
        self._set_scale(model, 1.0)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        tuners = find_ders_tuners(model)
        if not tuners:
            return
        stats: dict[str, list[float]] = {}
        for tuner in tuners:
            for k, v in tuner.pop_router_stats().items():
                stats.setdefault(k, []).append(v)
        means = {k: sum(v) / len(v) for k, v in stats.items()}
        means = {k: round(v, 6) for k, v in mean_over_processes(means, args.device).items()}
        logs.update(means)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)


ROUTER_STATS = ("router_aux_loss", "router_z_loss")


def mean_over_processes(means: dict[str, float], device) -> dict[str, float]:
    """Average each rank's router-loss means over the processes of a distributed run (DDP/FSDP/DeepSpeed), as
    ``Trainer`` does for the logged ``loss``; unchanged outside one. Every rank calls ``on_log`` at the same steps;
    a name a rank did not record counts for the ranks that did."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return means
    values = [means.get(k, 0.0) for k in ROUTER_STATS] + [float(k in means) for k in ROUTER_STATS]
    buf = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(buf)
    n = len(ROUTER_STATS)
    return {k: float(buf[i] / buf[n + i]) for i, k in enumerate(ROUTER_STATS) if buf[n + i] > 0}


def install_default_callback() -> None:
    """Append :class:`DeRSTrainerCallback` to transformers' default Trainer callbacks (idempotent)."""
    import transformers.trainer as hf_trainer

    if not any(getattr(cb, "__name__", "") == DeRSTrainerCallback.__name__ for cb in hf_trainer.DEFAULT_CALLBACKS):
        hf_trainer.DEFAULT_CALLBACKS.append(DeRSTrainerCallback)
