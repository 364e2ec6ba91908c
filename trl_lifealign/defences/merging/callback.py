"""``AdapterMergingCallback``: after each task, merge every task's trained adapter with PEFT's
``add_weighted_adapter`` and continue from the merge.

At a task's last optimizer step the trained ``default`` adapter is stored (``state_dir/task{t}.safetensors``, atomic,
listed with its SHA-256 in ``state_dir/manifest.json``); then the stored adapters of tasks ``0..t`` are loaded into
temporary adapters, merged by PEFT (TIES, DARE and linear are PEFT's, not re-implemented here), the merged factors are
copied into ``default`` and the temporary adapters deleted. The next task trains from the merge.

PEFT merges LoRA adapters factor by factor (``lora_A`` with ``lora_A``, ``lora_B`` with ``lora_B``), each factor
multiplied by ``sqrt(weight · scaling)``: a cheap approximation of merging the weight updates ΔW = s·B·A (PEFT's
exact alternatives, ``cat`` and the ``*_svd`` types, change the rank and are not offered). Weights chosen here:

- ``linear`` / ``dare_linear``: ``1/n²`` each, so each merged factor is the plain mean of the n task factors (``1/n``
  would give ``sqrt(n)`` times the mean and the adapter would grow with every task);
- ``ties`` / ``dare_ties``: ``1.0`` each, as in PEFT's merging guide: TIES' disjoint merge already averages the
  entries that agree with the elected sign.

These types need every adapter to have the same rank, which holds (each task trains the same ``default``); a
per-module ``rank_pattern``, DoRA and ``modules_to_save`` are refused. DARE's random drop is seeded by
``seed + t``. Merging holds n + 1 extra adapters in memory for a moment. DeepSpeed and sharded parameters are refused.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch

from ... import distributed as dist
from ...adapters import (
    DEFAULT_ADAPTER,
    AdapterFileError,
    adapter_state,
    load_adapter_file,
    load_adapter_state,
    lora_factors,
    lora_layout,
)
from ...atomic import atomic_write_bytes, atomic_write_json, sha256_file
from ..averaging.callback import check_lora_adapter, lora_pairs, lora_scalings, update_norm
from ..base import TaskBoundaryCallback, is_last_step, read_factors, write_factors
from ..config import MergingConfig

__all__ = ["AdapterMergingCallback", "merge_weights", "peft_merged_factors"]

MANIFEST = "manifest.json"
_TARGET = "merge_out"
_ADAPTER_COMPONENT = r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.{}(?=\.|$)"


def merge_weights(method: str, count: int) -> list[float]:
    """The weight of each of ``count`` task adapters given to PEFT (see the module docstring)."""
    return [1.0 / count**2] * count if method in ("linear", "dare_linear") else [1.0] * count


def _delete(model, names: list[str]) -> None:
    for name in names:
        if name in model.peft_config:
            model.delete_adapter(name)


def _restore(model, active: list[str], flags: dict[str, bool]) -> None:
    """Give ``model`` back its active adapters and ``requires_grad`` flags (adding/deleting adapters moves them)."""
    if list(model.active_adapters) != active and len(active) == 1:
        model.set_adapter(active[0])
    elif list(model.active_adapters) != active:
        model.base_model.set_adapter(active)
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])


def peft_merged_factors(model, states: list[dict[str, torch.Tensor]], method: str, density: float | None,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """``{default factor name: value}`` of PEFT's ``add_weighted_adapter`` over ``states`` (adapter states under
    PEFT's names), rescaled so ``default`` (its own LoRA scaling) holds the same ΔW as PEFT's merged adapter. The
    model's adapters, active set and ``requires_grad`` flags are as before on return."""
    config = model.peft_config[DEFAULT_ADAPTER]
    sources = [f"merge_src{j}" for j in range(len(states))]
    active = list(model.active_adapters)
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    _delete(model, [*sources, _TARGET])  # left by an interrupted merge (add_weighted_adapter would keep a stale one)
    try:
        for name, state in zip(sources, states):
            model.add_adapter(name, copy.deepcopy(config))
            load_adapter_state(model, state, name)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(seed)  # DARE's random drop
            model.add_weighted_adapter(sources, merge_weights(method, len(states)), _TARGET, combination_type=method,
                                       density=None if method == "linear" else density)
        values = {}
        for name in lora_factors(model, DEFAULT_ADAPTER):
            layer = model.get_submodule(name.split(".lora_")[0])
            ratio = math.sqrt(layer.scaling[_TARGET] / layer.scaling[DEFAULT_ADAPTER])
            merged = model.get_parameter(re.sub(_ADAPTER_COMPONENT.format(DEFAULT_ADAPTER), rf".\1.{_TARGET}", name))
            values[name] = merged.detach().to("cpu", torch.float32) * ratio
        return values
    finally:
        _delete(model, [*sources, _TARGET])
        _restore(model, active, flags)


class AdapterMergingCallback(TaskBoundaryCallback):
    """Merge all tasks' trained adapters with PEFT at each boundary; the next task starts from the merge.

    Args:
        config: PEFT combination type and density (:class:`MergingConfig`).
        state_dir: where each task's trained adapter and the manifest are stored (a new callback on the same
            directory continues the sequence).
        seed: DARE's random drop at task ``t`` is drawn from ``seed + t``.

    The driver calls ``start_task(t)``; without it the task index is the number of adapters stored so far. Logs
    ``merging/tasks`` (adapters merged) and ``merging/update_norm`` (norm of the change of ΔW the merge made to the
    trained adapter, LoRA scaling included).
    """

    name = "merging"

    def __init__(self, config: MergingConfig | None = None, state_dir=None, seed: int = 0):
        if state_dir is None:
            raise ValueError("AdapterMergingCallback needs a state_dir for the task adapters")
        super().__init__(state_dir)
        self.config = config if config is not None else MergingConfig()
        self.seed = seed
        self._open = False

    def manifest(self) -> dict:
        """The stored adapters: ``{"layout", "tasks": {index: {"file", "sha256"}}}`` (empty before the first)."""
        path = self.state_dir / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {"layout": None, "tasks": {}}

    def _check_model(self, model, args=None):
        dist.refuse_sharded_training(model, "AdapterMergingCallback", "it loads and merges PEFT adapters between tasks",
                                     self.trainer, args)
        config = check_lora_adapter(model, DEFAULT_ADAPTER, "AdapterMergingCallback")
        if getattr(config, "rank_pattern", None) or getattr(config, "modules_to_save", None):
            raise ValueError("AdapterMergingCallback: adapters with a rank_pattern or modules_to_save cannot be merged "
                             "by PEFT's add_weighted_adapter into the default adapter")
        layout, stored = lora_layout(config), self.manifest()["layout"]
        if stored is not None and stored != json.loads(json.dumps(layout)):
            raise ValueError(f"AdapterMergingCallback: the adapters in {self.state_dir} have LoRA layout {stored}, "
                             f"the model's default adapter {layout}")
        return layout

    def store(self, model, task: int) -> list[dict[str, torch.Tensor]]:
        """Store ``default`` as task ``task``'s adapter; returns the states of tasks ``0..task``, in order."""
        layout = self._check_model(model)
        state = adapter_state(model, DEFAULT_ADAPTER)
        manifest = self.manifest()
        if dist.is_main_process():
            from safetensors.torch import save

            path = self.state_dir / f"task{task}.safetensors"
            atomic_write_bytes(path, save(state))
            manifest["tasks"][str(task)] = {"file": path.name, "sha256": sha256_file(path)}
            manifest.update(layout=layout, method=self.config.method, density=self.config.density)
            atomic_write_json(self.state_dir / MANIFEST, manifest)
        dist.barrier()
        return [self._load(j, self.manifest()) for j in range(task + 1)]

    def _load(self, task: int, manifest: dict) -> dict[str, torch.Tensor]:
        entry = manifest["tasks"].get(str(task))
        if entry is None:
            raise AdapterFileError(f"no stored adapter for task {task} in {self.state_dir / MANIFEST}")
        path = Path(self.state_dir) / entry["file"]
        state = load_adapter_file(path)
        if sha256_file(path) != entry["sha256"]:
            raise AdapterFileError(f"adapter file {path} does not match its SHA-256 in {MANIFEST}")
        return state

    def merge(self, model) -> dict:
        """Store the trained adapter and replace it by the merge of every task's (every rank calls it)."""
        task = self.task_index if self.task_index is not None else len(self.manifest()["tasks"])
        states = self.store(model, task)
        trained = read_factors(model)
        merged = trained
        if len(states) > 1:
            merged = peft_merged_factors(model, states, self.config.method, self.config.density, self.seed + task)
            write_factors(model, merged)
        pairs = lora_pairs(trained)
        self.last_summary = {"task": task, "tasks": len(states), "method": self.config.method,
                             "weights": merge_weights(self.config.method, len(states)),
                             "update_norm": update_norm(trained, merged, pairs, lora_scalings(model, pairs))}
        return self.summary()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("AdapterMergingCallback received no model from the trainer")
        self._check_model(model, args)
        self._open = True

    def _finish(self, model, state) -> None:
        self._open = False
        summary = self.merge(model)
        self.log_metrics({"merging/tasks": float(summary["tasks"]), "merging/update_norm": summary["update_norm"]},
                         state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._open and is_last_step(state):
            self._finish(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._open:  # training stopped before its last step
            self._finish(model, state)
