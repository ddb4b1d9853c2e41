"""`RouterStatsCallback`: per-layer router balance and entropy as Trainer log scalars (off unless added)."""

from __future__ import annotations

from transformers import TrainerCallback

from .router_load import RouterRecorder


class RouterStatsCallback(TrainerCallback):
    """Adds ``router/<layer>/balance`` and ``router/<layer>/entropy`` (and ``router/<layer>/max_over_mean``) of the
    training forward passes of each logging window to the logs (definitions in
    :mod:`ders_peft.diagnostics.router_load`; padding excluded through the attention mask).

    Not installed by default: ``Trainer(..., callbacks=[RouterStatsCallback()])``. Statistics stay on the device
    between logs; each log reads them back once per layer. Works on DeRS models and supported transformers MoEs.
    """

    def __init__(self, log_router_stats: bool = True) -> None:
        self.log_router_stats = log_router_stats
        self.recorder: RouterRecorder | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.log_router_stats and model is not None and self.recorder is None:
            self.recorder = RouterRecorder(model, training_only=True).attach()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.recorder is None or logs is None or "loss" not in logs:
            return
        scalars = {}
        for name, s in self.recorder.stats().items():
            for key in ("balance", "entropy", "max_over_mean"):
                scalars[f"router/{name}/{key}"] = round(s[key], 6)
        self.recorder.reset()
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
