"""``OLoRACallback``: O-LoRA (arXiv 2310.14152) on PEFT's multi-adapter API; the penalty itself is in ``math``.

Each task trains a fresh LoRA adapter while the finished tasks' adapters stay active and frozen, and the loss adds
``orthogonality · Σ_i ||A_new·A_iᵀ||²`` over every LoRA module. The adapter being trained is always PEFT's
``default``: at the start of task ``t >= 1`` :meth:`OLoRACallback.prepare_model` moves the finished adapter into a
frozen ``task{t-1}`` and re-initialises ``default`` (PEFT's initialisation, seeded by ``t``). Why: a trainer builds its
optimizer from the parameters requiring gradients when ``train()`` starts, before any callback runs, and PEFT's
``set_adapter`` (called by TRL and ``drop_ref_adapter``) re-marks only the named adapter trainable; with the trained
adapter named ``default`` the optimizer is right whatever was reset. Driver protocol per task ``t``::

    olora.prepare_model(model, t)            # before the trainer (t = 0: only checks)
    trainer = FPOTrainer(model=model, ..., callbacks=[olora])
    drop_ref_adapter(model)                  # the reference is the base model (see below)
    trainer.train()                          # on_train_begin re-activates every adapter; saved to state_dir at the end

Reference: the base model, every adapter disabled. TRL's ``ref`` adapter is a copy of ``default`` alone and TRL
switches to it with ``set_adapter``, which deactivates the frozen adapters: ``reference: previous_task`` is refused.

Memory: each task adds one frozen adapter, ``r·(d_in + d_out)`` parameters per targeted module (``parameters_per_task``
in ``last_summary``); gradients and optimizer state stay those of one adapter; the forward runs one LoRA path per
adapter. DeepSpeed and sharded parameters are refused (adapters are added between tasks).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from ... import distributed as dist
from ...adapters import (
    ADAPTER_WEIGHTS,
    DEFAULT_ADAPTER,
    REF_ADAPTER,
    adapter_state,
    check_same_lora,
    load_adapter_file,
    load_adapter_state,
    lora_factors,
)
from ...atomic import atomic_write_dir
from ..averaging.callback import check_lora_adapter
from ..base import TaskBoundaryCallback, is_last_step
from ..config import OLoRAConfig
from .math import orthogonality_penalty

__all__ = ["MANIFEST", "OLoRACallback", "load_olora_model"]

MANIFEST = "olora.json"
_INIT_ADAPTER = "olora_init"
_A_FACTOR = re.compile(r"\.(lora_A|lora_embedding_A)\.default(?=\.|$)")


_SHARDING_REASON = "it adds and removes PEFT adapters between tasks, which a sharded engine cannot follow"


def _activate(model, names: list[str]) -> None:
    """Make ``names`` the active adapters, only ``default`` trainable."""
    if names == [DEFAULT_ADAPTER]:
        model.set_adapter(DEFAULT_ADAPTER)
    else:
        model.base_model.set_adapter(names)
    for name in names:
        for param in lora_factors(model, name).values():
            param.requires_grad_(name == DEFAULT_ADAPTER)


class OLoRACallback(TaskBoundaryCallback):
    """O-LoRA: one LoRA adapter per task, earlier ones frozen and active, an orthogonality penalty on ``lora_A``.

    Args:
        config: the penalty weight (:class:`OLoRAConfig`).
        lora_config: the LoRA settings of every task adapter (those of the model's ``default`` adapter; None: take
            them from it).
        state_dir: where :meth:`save` writes every adapter after each task's last step (None: not saved).
        seed: the initialisation of task ``t``'s adapter is drawn from ``seed + t``.

    Logs ``olora/penalty`` (Σ_i ||A_new·A_iᵀ||², before the weight) every step from the second task on, and at each
    boundary ``olora/adapters`` and ``olora/adapter_parameters``.
    """

    name = "olora"

    def __init__(self, config: OLoRAConfig | None = None, lora_config=None, state_dir=None, seed: int = 0):
        super().__init__(state_dir)
        self.config = config if config is not None else OLoRAConfig()
        self.lora_config = lora_config
        self.seed = seed
        self._pairs: list[tuple[torch.nn.Parameter, list[torch.nn.Parameter]]] | None = None
        self._hooks: list = []
        self._open = False

    @property
    def adapter_names(self) -> list[str]:
        """The active adapters of the current task, frozen first, ``default`` (trained) last."""
        return [f"task{i}" for i in range(self.task_index or 0)] + [DEFAULT_ADAPTER]

    # ------------------------------------------------------------------------------------------------ the model
    def _config(self, model):
        default = check_lora_adapter(model, DEFAULT_ADAPTER, "OLoRACallback")
        if self.lora_config is None:
            return default
        check_same_lora(default, self.lora_config, "OLoRACallback's lora_config")
        return self.lora_config

    def prepare_model(self, model, task_index: int) -> None:
        """Set the model up for task ``task_index`` (call before building its trainer; calling it again is harmless).

        For ``t >= 1`` the finished adapter (``default``) becomes the frozen ``task{t-1}`` and ``default`` is
        re-initialised as PEFT initialises a new adapter, from seed ``seed + t``. Earlier adapters must be present
        (after a restart: :meth:`load` first).
        """
        dist.refuse_sharded_training(model, "OLoRACallback", _SHARDING_REASON)
        config = self._config(model)
        self.start_task(task_index)
        names = self.adapter_names
        missing = [n for n in names[:-2] if n not in model.peft_config]
        if missing:
            raise ValueError(f"OLoRACallback: task {task_index} needs the adapters of the earlier tasks, {missing} "
                             "are missing: call load(model, directory) after a restart")
        if task_index >= 1 and names[-2] not in model.peft_config:
            finished = adapter_state(model, DEFAULT_ADAPTER)
            model.add_adapter(names[-2], _without_dropout(config))
            load_adapter_state(model, finished, names[-2])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + task_index)
                model.add_adapter(_INIT_ADAPTER, copy.deepcopy(config))
            load_adapter_state(model, adapter_state(model, _INIT_ADAPTER), DEFAULT_ADAPTER)
            model.delete_adapter(_INIT_ADAPTER)
        _activate(model, names)

    def activate(self, model) -> None:
        """Re-activate every task adapter, only ``default`` trainable (TRL / ``drop_ref_adapter`` reset them)."""
        _activate(model, self.adapter_names)

    # ---------------------------------------------------------------------------------------------- the penalty
    def penalty(self, model) -> torch.Tensor | None:
        """Σ over LoRA modules of Σ_i ||A_default·A_iᵀ||² (autograd through ``default``); None on the first task."""
        frozen = self.adapter_names[:-1]
        if not frozen:
            return None
        if self._pairs is None:  # (lora_A of default, the frozen adapters' lora_A) per module, cached per task
            self._pairs = [(param, [model.get_parameter(_A_FACTOR.sub(rf".\1.{f}", name)) for f in frozen])
                           for name, param in lora_factors(model, DEFAULT_ADAPTER).items() if _A_FACTOR.search(name)]
        return torch.stack([orthogonality_penalty(a, earlier) for a, earlier in self._pairs]).sum()

    def auxiliary_loss(self, trainer, model, inputs) -> torch.Tensor | None:
        value = self.penalty(trainer.model if trainer is not None else model)
        if value is None:
            return None
        self.record_step_metric("olora/penalty", float(value.detach()))
        return self.config.orthogonality * value if self.config.orthogonality > 0 else None

    # ------------------------------------------------------------------------------------------ save and load
    def save(self, model, directory) -> None:
        """Write every task adapter as PEFT folders (``default`` at the top, ``task{i}/`` below) plus ``olora.json``,
        atomically, on the main process; reload with :meth:`load` (resume) or :func:`load_olora_model`."""
        names = self.adapter_names
        manifest = {"task_index": self.task_index or 0, "adapters": names,
                    "parameters_per_task": _adapter_parameters(model)}
        if dist.is_main_process():
            def write(staging: Path) -> None:
                model.save_pretrained(str(staging), selected_adapters=names)
                (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

            atomic_write_dir(directory, write)
        dist.barrier()

    def load(self, model, directory) -> int:
        """Restore every adapter saved by :meth:`save` into ``model`` (a PeftModel with ``default``); returns the task
        index saved, after which ``prepare_model(model, index + 1)`` starts the next task."""
        dist.refuse_sharded_training(model, "OLoRACallback", _SHARDING_REASON)
        config = self._config(model)
        directory = Path(directory)
        manifest = _read_manifest(directory)
        for name in manifest["adapters"]:
            folder = directory if name == DEFAULT_ADAPTER else directory / name
            if name not in model.peft_config:
                model.add_adapter(name, _without_dropout(config))
            load_adapter_state(model, load_adapter_file(folder / ADAPTER_WEIGHTS), name)
        self.start_task(int(manifest["task_index"]))
        _activate(model, self.adapter_names)
        return self.task_index

    # -------------------------------------------------------------------------------------------- trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("OLoRACallback received no model from the trainer")
        dist.refuse_sharded_training(model, "OLoRACallback", _SHARDING_REASON, self.trainer, args)
        if REF_ADAPTER in model.peft_config:
            raise ValueError(
                "OLoRACallback: the model carries TRL's 'ref' adapter. O-LoRA's DPO reference is the base model (all "
                "adapters disabled): TRL's 'ref' is a copy of 'default' alone and TRL switches to it with "
                "set_adapter, which deactivates the earlier tasks' adapters, so reference: previous_task is not "
                "supported. Drop it after building the trainer (trl_lifealign.adapters.drop_ref_adapter(model)).")
        if self.task_index is None or any(n not in model.peft_config for n in self.adapter_names):
            raise RuntimeError("OLoRACallback: call prepare_model(model, task_index) before building the trainer")
        self.activate(model)
        _check_optimizer(model, optimizer)
        self._pairs = None
        self.penalty(model)
        self._remove_hooks()
        self._hooks = _freeze_hooks(model, self.adapter_names[:-1])
        self._open = True

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _boundary(self, model, state) -> None:
        self._open = False
        per_task, names = _adapter_parameters(model), self.adapter_names
        self.last_summary = {"task": self.task_index, "adapters": names, "parameters_per_task": per_task,
                             "adapter_parameters": per_task * len(names)}
        if self.state_dir is not None:
            self.save(model, self.state_dir)
        self.log_metrics({"olora/adapters": float(len(names)),
                          "olora/adapter_parameters": float(len(names) * per_task)}, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._open and is_last_step(state):
            self._boundary(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._remove_hooks()
        if model is not None:
            self.activate(model)
        if self._open:  # training stopped before its last step
            self._boundary(model, state)


def _freeze_hooks(model, frozen: list[str]) -> list:
    """Forward pre-hooks freezing the ``frozen`` adapters' factors of each LoRA layer right before it runs.

    PEFT's ``disable_adapter()`` (TRL's base-model reference forward) re-marks every active adapter trainable when it
    exits. Freezing again inside each LoRA layer's own forward keeps the earlier adapters out of autograd, and stays
    consistent when activation checkpointing recomputes the layer in backward (the hooks run again there).
    """
    if not frozen:
        return []
    pattern = re.compile(rf"(?:^|\.)lora_\w+\.(?:{'|'.join(map(re.escape, frozen))})(?:\.|$)")
    handles = []
    for module in model.modules():
        if any(DEFAULT_ADAPTER in (getattr(module, attr, None) or {}) for attr in ("lora_A", "lora_embedding_A")):
            params = [p for name, p in module.named_parameters() if pattern.search(name)]

            def freeze(layer, inputs, params=params) -> None:
                for param in params:
                    param.requires_grad_(False)

            handles.append(module.register_forward_pre_hook(freeze))
    return handles


def _without_dropout(config):
    """A copy of ``config`` without LoRA dropout (frozen adapters are part of the fixed model)."""
    config = copy.deepcopy(config)
    config.lora_dropout = 0.0
    return config


def _adapter_parameters(model) -> int:
    """Parameters of one task adapter (all tasks share the layout)."""
    return sum(p.numel() for p in lora_factors(model, DEFAULT_ADAPTER).values())


def _check_optimizer(model, optimizer) -> None:
    if optimizer is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not all(id(p) in held for p in lora_factors(model, DEFAULT_ADAPTER).values()):
        raise RuntimeError("OLoRACallback: the trainer's optimizer does not hold the 'default' adapter: something "
                           "froze it before train(); call prepare_model(model, task_index) before building the trainer")


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not an O-LoRA folder written by OLoRACallback.save")
    manifest = json.loads(path.read_text())
    if manifest.get("adapters", [None])[-1] != DEFAULT_ADAPTER:
        raise ValueError(f"{path}: 'adapters' must end with {DEFAULT_ADAPTER!r}, got {manifest.get('adapters')}")
    return manifest


def load_olora_model(base_model, directory, is_trainable: bool = False):
    """A ``PeftModel`` with every task adapter of an O-LoRA folder loaded and active, in training order: the model
    O-LoRA trained (``PeftModel.from_pretrained`` + ``load_adapter`` for the frozen tasks + ``set_adapter``)."""
    from peft import PeftModel

    directory = Path(directory)
    names = _read_manifest(directory)["adapters"]
    model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable)
    for name in names[:-1]:
        model.load_adapter(str(directory / name), adapter_name=name, is_trainable=is_trainable)
    _activate(model, names)
    for param in ([] if is_trainable else lora_factors(model, DEFAULT_ADAPTER).values()):
        param.requires_grad_(False)
    return model
