"""``LifeAlignCallback``: the base of every trl-lifealign ``TrainerCallback``, so their metrics reach the user's
loggers.

A transformers callback never sees its trainer, so it cannot call ``trainer.log`` (the only route to ``report_to``
loggers: TensorBoard, W&B, ...). Our trainers (``FPOTrainer`` and everything built on it, the lifelong runner and the
Axolotl trainer included) bind every ``LifeAlignCallback`` they hold to themselves; with another trainer (a plain
``trl.DPOTrainer``, ``SFTTrainer``, ...) call ``bind_callbacks(trainer)`` once after building it.

Metrics are named ``group/name`` (``slmc/conflict``, ``ewc/penalty``, ...). Without a bound trainer they still land in
``state.log_history``.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

__all__ = ["LifeAlignCallback", "bind_callbacks"]


class LifeAlignCallback(TrainerCallback):
    """A callback that logs through the trainer it is bound to."""

    trainer: Any = None

    def bind_trainer(self, trainer) -> None:
        """Log through ``trainer`` from now on (called by :func:`bind_callbacks`)."""
        self.trainer = trainer

    def log_metrics(self, metrics: dict[str, float], state=None) -> None:
        """Log ``metrics`` now: through the bound trainer's ``log`` (every ``report_to`` logger sees them), otherwise
        appended to ``state.log_history``."""
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        elif state is not None:
            state.log_history.append({**metrics, "step": state.global_step})

    def record_step_metric(self, name: str, value: float) -> None:
        """Add ``value`` to the metrics TRL averages into its next log (per-step quantities such as a penalty); a
        trainer without TRL's metric store gets it logged directly."""
        from .compat import record_trainer_metric

        if self.trainer is not None and hasattr(self.trainer, "_metrics"):
            record_trainer_metric(self.trainer, name, value)
        elif self.trainer is not None:
            self.trainer.log({name: float(value)})


def bind_callbacks(trainer) -> None:
    """Bind every :class:`LifeAlignCallback` of ``trainer`` to it, so their metrics go through ``trainer.log``."""
    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", []):
        if isinstance(callback, LifeAlignCallback):
            callback.bind_trainer(trainer)
