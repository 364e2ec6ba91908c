"""Plumbing shared by the defences: the task-boundary callback base, full access to the adapter's LoRA factors, and
the auxiliary-loss hook a trainer calls on every training batch.

A defence is a :class:`TaskBoundaryCallback`: a ``transformers.TrainerCallback`` (so it works with ``FPOTrainer``,
TRL's ``DPOTrainer`` and Axolotl's trainer alike) that a driver (the lifelong runner, the Axolotl plugin, a user's
loop) tells which task is starting (:meth:`TaskBoundaryCallback.start_task`). Boundary actions run right after the
trainer's last optimizer step (:func:`is_last_step`), before ``train()`` returns, in the order the callbacks are
listed: their metrics then reach the trainer's loggers and a ``save_model()`` after ``train()`` saves their result.

Defences that add a term to the training loss (KL anchor, O-LoRA) implement :meth:`TaskBoundaryCallback.auxiliary_loss`;
``FPOTrainer`` adds it through :class:`AuxiliaryLossMixin`, which any other ``DPOTrainer`` subclass can mix in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..adapters import DEFAULT_ADAPTER, lora_factors
from ..callbacks import LifeAlignCallback

__all__ = ["AuxiliaryLossMixin", "TaskBoundaryCallback", "is_last_step", "read_factors", "write_factors"]


def is_last_step(state) -> bool:
    """True in ``on_step_end`` of the optimizer step that ends training."""
    return state.max_steps > 0 and state.global_step >= state.max_steps


def read_factors(model, adapter: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies of ``adapter``'s LoRA factors on every rank (sharded factors gathered; a collective)."""
    values = {}
    with torch.no_grad():
        for name, param in lora_factors(model, adapter).items():
            with dist.gathered([param]):
                values[name] = dist.read_full_fp32(param).to("cpu", copy=True)
    return values


def write_factors(model, values: dict[str, torch.Tensor], adapter: str = DEFAULT_ADAPTER) -> None:
    """Set ``adapter``'s factors (and DeepSpeed's fp32 master copies) to ``values``, which every rank must pass
    identical (compute them from :func:`read_factors` on every rank, or broadcast them first)."""
    params = lora_factors(model, adapter)
    missing = sorted(set(values) - set(params))
    if missing:
        raise KeyError(f"no LoRA factor {missing[0]} in the model's {adapter!r} adapter")
    for name, value in values.items():
        with dist.gathered([params[name]], modify=True):
            dist.write_full(params[name], value)


class TaskBoundaryCallback(LifeAlignCallback):
    """Base of the defences: knows the task index and, optionally, a state directory it persists to (atomically)."""

    name = "defence"

    def __init__(self, state_dir: str | Path | None = None):
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.task_index: int | None = None
        self.last_summary: dict[str, Any] = {}

    def start_task(self, task_index: int, train_rows: list[dict] | None = None) -> None:
        """Called by the driver before the task's trainer is built (``task_index`` 0 is the first task)."""
        self.task_index = task_index

    def auxiliary_loss(self, trainer, model, inputs) -> torch.Tensor | None:
        """A term added to the training loss of this batch (None: nothing); see :class:`AuxiliaryLossMixin`."""
        return None

    def summary(self) -> dict[str, Any]:
        """What the defence did at the last boundary (for the run report)."""
        return dict(self.last_summary)


class AuxiliaryLossMixin:
    """Adds the auxiliary losses of every bound :class:`TaskBoundaryCallback` to the training loss.

    Put it before the DPO trainer in the bases (``class MyDPO(AuxiliaryLossMixin, DPOTrainer)``) and bind the
    callbacks (``trl_lifealign.bind_callbacks(trainer)``; ``FPOTrainer`` does both).
    """

    def preference_loss(self, model, inputs):
        """The trainer's own loss, without the auxiliary terms (e.g. for EWC's Fisher)."""
        return super().compute_loss(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TaskBoundaryCallback) and callback.trainer is self:
                extra = callback.auxiliary_loss(self, model, inputs)
                if extra is not None:
                    loss = loss + extra
        return (loss, outputs) if return_outputs else loss
