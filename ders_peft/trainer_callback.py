"""A `transformers.TrainerCallback` that scales router losses under gradient accumulation and logs them.

``import ders_peft`` appends it to transformers' default callbacks, so HF ``Trainer`` and TRL ``SFTTrainer`` pick it
up without user code; it does nothing for models without DeRS layers.
"""

from __future__ import annotations

from transformers import TrainerCallback


def find_ders_tuners(model) -> list:
    """DeRS tuners (``DeRSModel`` instances) inside ``model`` (a PeftModel, a DeRSModel or a wrapped module)."""
    from .model import DeRSModel

    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, DeRSModel)]


class DeRSTrainerCallback(TrainerCallback):
    """Sets the router-loss gradient scale to ``1 / gradient_accumulation_steps`` and adds the mean router losses
    (``router_aux_loss``, ``router_z_loss``) of each logging window to the training logs."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for tuner in find_ders_tuners(model):
            tuner.set_router_loss_scale(1.0 / max(1, args.gradient_accumulation_steps))

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        stats: dict[str, list[float]] = {}
        for tuner in find_ders_tuners(model):
            for k, v in tuner.pop_router_stats().items():
                stats.setdefault(k, []).append(v)
        means = {k: round(sum(v) / len(v), 6) for k, v in stats.items()}
        logs.update(means)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)


def install_default_callback() -> None:
    """Append :class:`DeRSTrainerCallback` to transformers' default Trainer callbacks (idempotent)."""
    import transformers.trainer as hf_trainer

    if not any(getattr(cb, "__name__", "") == DeRSTrainerCallback.__name__ for cb in hf_trainer.DEFAULT_CALLBACKS):
        hf_trainer.DEFAULT_CALLBACKS.append(DeRSTrainerCallback)
