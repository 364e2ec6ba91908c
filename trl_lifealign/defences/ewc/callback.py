"""``EWCCallback``: online EWC on the default adapter's LoRA factors, as a task-boundary callback (math in ``math``).

During task ``t > 0`` the factors θ are pulled towards θ* (their values when the task's training began) by the
gradient ``strength · F · (θ − θ*)`` of ``(strength / 2) · Σ F · (θ − θ*)²``, added to ``.grad`` right before each
optimizer step: after gradient clipping (the pull is never clipped), and only to factors that have a gradient that
step (frozen ones, e.g. by ``FreezeLayersCallback``, are left alone). After each task's last optimizer step the task's
Fisher is estimated and folded in: ``F ← decay · F + F_task``.

``F_task`` is the *empirical* diagonal Fisher of batch gradients: the mean over up to ``fisher_batches`` training
batches of the task (the trainer's dataloader, shuffled deterministically) of the squared gradient of the batch's
preference loss (auxiliary losses left out); a cheap proxy for importance, not the Fisher of per-example scores.

``state_dir`` holds the Fisher (``ewc-fisher-NNNNN.safetensors``) and the manifest ``ewc.json`` (format version, tasks
folded in, size and SHA-256), written data first, each atomically. Anchors need no saving: each task reads them from
the model at its start, so a new callback on the same ``state_dir`` (a resumed run) computes the same penalty.
Gradients must be in each factor's ``.grad``: DeepSpeed and sharded (FSDP2) factors are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch

from ... import distributed as dist
from ...adapters import lora_factors
from ...atomic import atomic_write_bytes, atomic_write_json, fsync_dir, read_versioned_json
from ...compat import prepare_trainer_inputs, trainer_metrics_kept
from ...errors import LifeAlignError
from ..base import AuxiliaryLossMixin, TaskBoundaryCallback, is_last_step, read_factors
from ..config import EWCConfig
from .math import FisherAccumulator, add_ewc_grad_, online_fisher

__all__ = ["EWCCallback", "EWCState", "EWCStateError", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME",
           "load_ewc_state"]

FORMAT_NAME, FORMAT_VERSION = "trl-lifealign-ewc", 1
MANIFEST_NAME = "ewc.json"
_DATA_PREFIX = "ewc-fisher-"


class EWCStateError(LifeAlignError, RuntimeError):
    """The EWC state in ``state_dir`` is missing, truncated, corrupt or belongs to another LoRA layout."""


class EWCState(NamedTuple):
    """The consolidated Fisher and the indices of the tasks folded into it (in order)."""

    fisher: dict[str, torch.Tensor]
    task_indices: list[int]


def load_ewc_state(state_dir: str | Path) -> EWCState:
    """Read and check the state :class:`EWCCallback` saved; :class:`EWCStateError` names the file at fault."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    manifest_path = Path(state_dir) / MANIFEST_NAME
    manifest = read_versioned_json(manifest_path, FORMAT_NAME, (FORMAT_VERSION,), EWCStateError, "EWC state",
                                   ": was the previous task trained with EWCCallback and this state_dir?")
    try:
        data_name, size, digest = str(manifest["data_file"]), int(manifest["data_bytes"]), str(manifest["data_sha256"])
        task_indices = [int(t) for t in manifest["task_indices"]]
    except (KeyError, TypeError, ValueError) as error:
        raise EWCStateError(f"EWC manifest {manifest_path} lacks or mangles field {error}") from None
    if Path(data_name).name != data_name or not data_name.startswith(_DATA_PREFIX):
        raise EWCStateError(f"EWC manifest {manifest_path} names an unexpected data file {data_name!r}")
    data_path = manifest_path.parent / data_name
    if not data_path.is_file():
        raise EWCStateError(f"EWC Fisher file {data_path} named by {manifest_path} is missing")
    data = data_path.read_bytes()
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise EWCStateError(f"EWC Fisher file {data_path} is truncated or corrupt ({len(data)} bytes, manifest "
                            f"{manifest_path} says {size} and another SHA-256)")
    try:
        fisher = load(data)
    except (SafetensorError, ValueError) as error:
        raise EWCStateError(f"EWC Fisher file {data_path} is corrupt: {error}") from None
    return EWCState(fisher=fisher, task_indices=task_indices)


def _save_ewc_state(state_dir: Path, state: EWCState, decay: float) -> None:
    """Data file (new name) first, then the manifest naming it, then drop older data files; each write atomic."""
    from safetensors.torch import save

    data = save({name: value.contiguous() for name, value in state.fisher.items()}, metadata={"format": FORMAT_NAME})
    data_name = f"{_DATA_PREFIX}{len(state.task_indices):05d}.safetensors"
    atomic_write_bytes(state_dir / data_name, data)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tasks": len(state.task_indices),
                "task_indices": state.task_indices, "decay": decay, "data_file": data_name, "data_bytes": len(data),
                "data_sha256": hashlib.sha256(data).hexdigest(),
                "factors": {name: list(value.shape) for name, value in state.fisher.items()}}
    atomic_write_json(state_dir / MANIFEST_NAME, manifest)
    fsync_dir(state_dir)
    for stale in state_dir.glob(f"{_DATA_PREFIX}*.safetensors"):
        if stale.name != data_name:
            stale.unlink()


# Candidates for compat.py (private trainer internals, transformers 5.16–5.23 / trl 1.9–1.16).
def _preference_loss(trainer, model, inputs) -> torch.Tensor:
    """The trainer's loss without the auxiliary losses :class:`AuxiliaryLossMixin` adds."""
    if isinstance(trainer, AuxiliaryLossMixin):
        return trainer.preference_loss(model, inputs)
    return trainer.compute_loss(model, inputs)


class EWCCallback(TaskBoundaryCallback):
    """Online EWC on the ``default`` adapter's LoRA factors across tasks (see the module docstring).

    Args:
        config: the settings (:class:`~trl_lifealign.defences.config.EWCConfig`; None: the defaults).
        state_dir: where the consolidated Fisher is saved (and read by a new callback, e.g. on resume).

    Call :meth:`start_task` before each task's trainer is built; the callback must be bound to the trainer (FPOTrainer
    does it, else ``bind_callbacks(trainer)``). Logs ``ewc/penalty`` each step of later tasks and ``ewc/fisher_mean``,
    ``ewc/fisher_max``, ``ewc/tasks`` at each task's end.
    """

    name = "ewc"

    def __init__(self, config: EWCConfig | None, state_dir: str | Path):
        super().__init__(state_dir)
        self.config = config if config is not None else EWCConfig()
        self.state: EWCState | None = None
        self.last_penalty: float | None = None
        self._anchors: dict[str, torch.Tensor] | None = None
        self._fisher: dict[str, torch.Tensor] | None = None  # the stored Fisher on the factors' devices
        self._finished = True

    def _check_model(self, model) -> dict[str, torch.nn.Parameter]:
        if model is None:
            raise RuntimeError("EWCCallback received no model from the trainer")
        dist.refuse_sharded_training(model, "EWCCallback", "the gradients it adds to and squares are not in the "
                                     "factors' .grad there", self.trainer)
        factors = lora_factors(model)
        if not factors:
            raise ValueError(f"EWCCallback needs a PEFT LoRA model with a 'default' adapter, not {type(model)}")
        return factors

    def _require_trainer(self):
        if self.trainer is None:
            raise RuntimeError("EWCCallback is not bound to a trainer, so it cannot estimate the Fisher on the task's "
                               "data: use FPOTrainer or call trl_lifealign.callbacks.bind_callbacks(trainer)")
        return self.trainer

    def _load_previous(self, factors) -> EWCState:
        state = self.state if self.state is not None else load_ewc_state(self.state_dir)
        where = self.state_dir / MANIFEST_NAME
        if any(t >= self.task_index for t in state.task_indices):
            raise EWCStateError(f"EWC state at {where} already holds task(s) {state.task_indices}, task "
                                f"{self.task_index} is starting: point state_dir at the state saved after the "
                                "previous task")
        missing, extra = sorted(set(factors) - set(state.fisher)), sorted(set(state.fisher) - set(factors))
        bad = [n for n in factors if n in state.fisher and tuple(state.fisher[n].shape) != tuple(factors[n].shape)]
        if missing or extra or bad:
            raise EWCStateError(f"EWC state at {where} belongs to another LoRA layout (first differing factor: "
                                f"{(missing + extra + bad)[0]})")
        return state

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        factors = self._check_model(model)
        self._require_trainer()
        if self.task_index is None:
            raise RuntimeError("EWCCallback: call start_task(task_index) before training each task")
        self._finished = False
        self._anchors = self._fisher = None
        if self.task_index == 0:
            self.state = None  # the first task starts a new sequence
            return
        self.state = self._load_previous(factors)
        self._anchors = {n: v.to(factors[n].device) for n, v in read_factors(model).items()}
        self._fisher = {n: f.to(factors[n].device) for n, f in self.state.fisher.items()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._anchors is None:
            return
        params = {n: p for n, p in lora_factors(model).items() if p.grad is not None}
        self.last_penalty = add_ewc_grad_(params, self._anchors, self._fisher, self.config.strength)
        self.record_step_metric("ewc/penalty", self.last_penalty)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._finished and is_last_step(state):
            self.end_task(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._finished:  # training stopped before its last step (e.g. early stopping): still a boundary
            self.end_task(model, state)

    def end_task(self, model, state=None) -> None:
        """Estimate the task's Fisher, fold it into the stored one, save it and log its statistics."""
        task_fisher, batches = self.estimate_fisher(model)
        previous = self.state.fisher if self.state is not None else None
        fisher = online_fisher(previous, task_fisher, self.config.decay)
        self.state = EWCState(fisher, [*(self.state.task_indices if self.state else []), self.task_index])
        if dist.is_main_process():
            _save_ewc_state(self.state_dir, self.state, self.config.decay)
        dist.barrier()
        values = torch.cat([f.reshape(-1) for f in fisher.values()])
        self.last_summary = {"tasks": len(self.state.task_indices), "fisher_batches": batches,
                             "fisher_mean": float(values.mean()), "fisher_max": float(values.max())}
        metrics = {f"ewc/{k}": float(self.last_summary[k]) for k in ("fisher_mean", "fisher_max", "tasks")}
        self._anchors = self._fisher = None
        self._finished = True
        self.log_metrics(metrics, state)

    def estimate_fisher(self, model) -> tuple[dict[str, torch.Tensor], int]:
        """``({factor: mean squared batch gradient (float32, CPU)}, batches used)`` over up to ``fisher_batches``
        batches of the bound trainer's training data, in train mode as in training; gradients are zeroed after."""
        trainer = self._require_trainer()
        factors = self._check_model(model)
        wrapped = getattr(trainer, "model_wrapped", None) or model
        accumulator = FisherAccumulator()
        was_training = wrapped.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        model.zero_grad(set_to_none=True)
        wrapped.train()
        try:
            with trainer_metrics_kept(trainer), torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(getattr(trainer.args, "seed", 0)) + int(self.task_index or 0))
                for inputs in trainer.get_train_dataloader():
                    if accumulator.count >= self.config.fisher_batches:
                        break
                    inputs = prepare_trainer_inputs(trainer, inputs)
                    with trainer.compute_loss_context_manager():
                        loss = _preference_loss(trainer, wrapped, inputs)
                    loss.backward()
                    accumulator.update({n: p.grad for n, p in factors.items()})
                    model.zero_grad(set_to_none=True)
        finally:
            model.zero_grad(set_to_none=True)
            wrapped.train(was_training)
        if accumulator.count == 0:
            raise RuntimeError("EWCCallback: the trainer's training dataloader yielded no batch to estimate the Fisher")
        fisher = accumulator.fisher()
        # Factors without a gradient in every batch (frozen ones) get a zero Fisher, so every task has the same names.
        return ({n: fisher[n].cpu() if n in fisher else torch.zeros(p.shape, dtype=torch.float32)
                 for n, p in factors.items()}, accumulator.count)
