"""``FreezeLayersCallback``: keep the LoRA factors of the lowest decoder layers as the first task left them.

For every task after the first, the ``default`` adapter's factors of layers ``0 .. num_layers − 1`` (picked by
``math.frozen_parameter_names``) stay bit-identical through the task while the others train.

They are frozen by dropping their gradients, not by ``requires_grad=False``: PEFT's ``set_adapter`` and
``disable_adapter``, which TRL calls around every reference forward (``ref`` adapter or adapters disabled), switch
``requires_grad`` back on for the whole adapter, and a flag that changes between the forward and the backward breaks
non-reentrant activation checkpointing ("recomputed tensors do not match"). Instead a post-accumulate-grad hook sets
each frozen factor's ``.grad`` back to None as soon as the backward fills it, before gradient clipping (so they do not
count in the gradient norm) and before the optimizer step: the optimizer, built before training began, still lists
them, but PyTorch's optimizers skip a parameter whose ``.grad`` is None, weight decay included. ``requires_grad`` is
never changed, so the model is handed back as received.

When training ends the hooks are removed and the frozen values are checked against the task's start, and restored
(with a warning) if anything stepped them anyway, e.g. an optimizer that steps parameters without a gradient.
DeepSpeed and sharded (FSDP2) factors are refused: their optimizers do exactly that.
"""

from __future__ import annotations

import logging

import torch

from ... import distributed as dist
from ...adapters import lora_factors
from ..base import TaskBoundaryCallback
from ..config import FreezeLayersConfig
from .math import frozen_parameter_names, layer_index

__all__ = ["FreezeLayersCallback"]

logger = logging.getLogger(__name__)


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


class FreezeLayersCallback(TaskBoundaryCallback):
    """Freeze the ``default`` adapter's LoRA factors of the lowest ``config.num_layers`` layers after the first task.

    Args:
        config: the settings (:class:`~trl_lifealign.defences.config.FreezeLayersConfig`; None: the defaults).

    Call :meth:`start_task` before each task's trainer is built; task 0 trains everything. ``last_summary`` is
    ``{"frozen_layers": k, "frozen_factors": n}`` (0 and 0 on the first task) and ``freeze/frozen_factors`` is logged
    when training begins.
    """

    name = "freeze_layers"

    def __init__(self, config: FreezeLayersConfig | None = None):
        super().__init__(None)
        self.config = config if config is not None else FreezeLayersConfig()
        self._frozen: dict[str, torch.nn.Parameter] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    def frozen_factors(self, model) -> dict[str, torch.nn.Parameter]:
        """The factors frozen in tasks after the first: ``{name: parameter}``; a clear error when the model has no
        LoRA layer above the frozen ones."""
        k = self.config.num_layers
        factors = lora_factors(model)
        layers = sorted({index for index in map(layer_index, factors) if index is not None})
        if len(layers) < k + 1:
            raise ValueError(f"FreezeLayersConfig.num_layers={k}: the model has LoRA factors in {len(layers)} decoder "
                             f"layer(s) {layers}; freezing {k} needs at least {k + 1} so that one still trains")
        names = frozen_parameter_names(factors, k)
        if not names:
            raise ValueError(f"FreezeLayersConfig.num_layers={k}: no LoRA factor in layers 0..{k - 1} (LoRA layers: "
                             f"{layers})")
        return {name: factors[name] for name in names}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("FreezeLayersCallback received no model from the trainer")
        if self.task_index is None:
            raise RuntimeError("FreezeLayersCallback: call start_task(task_index) before training each task")
        self._release()
        dist.refuse_sharded_training(model, "FreezeLayersCallback", "its optimizer steps parameters that have no "
                                     "gradient, so frozen factors would still move", self.trainer)
        if self.task_index == 0:
            self.frozen_factors(model)  # a layout that cannot be frozen fails now, not after the first task
            self.last_summary = {"frozen_layers": 0, "frozen_factors": 0}
        else:
            self._freeze(model)
            self.last_summary = {"frozen_layers": self.config.num_layers, "frozen_factors": len(self._frozen)}
        self.log_metrics({"freeze/frozen_factors": float(self.last_summary["frozen_factors"])}, state)

    def _freeze(self, model) -> None:
        frozen = self.frozen_factors(model)
        self._frozen = frozen
        self._start = {name: param.detach().clone() for name, param in frozen.items()}
        for param in frozen.values():
            param.grad = None
            if param.requires_grad:  # one that needs no gradient gets none anyway
                self._hooks.append(param.register_post_accumulate_grad_hook(_drop_grad))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        moved = [name for name, param in self._frozen.items() if not torch.equal(param.detach(), self._start[name])]
        if moved:
            logger.warning("FreezeLayersCallback: %d frozen factor(s) changed during the task (first %s); restoring "
                           "their values from the task's start", len(moved), moved[0])
            with torch.no_grad():
                for name in moved:
                    self._frozen[name].copy_(self._start[name])
        self._release()

    def _release(self) -> None:
        """Remove the gradient hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._frozen, self._start = [], {}, {}
