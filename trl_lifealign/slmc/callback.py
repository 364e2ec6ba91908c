"""``MemoryConsolidationCallback``: LifeAlign's short-to-long memory consolidation at every task boundary.

A task boundary is one ``trainer.train()`` call: the trained LoRA factors are snapshotted (float32, CPU) when training
begins (unless a task was already begun by hand, e.g. before an SFT warm-up) and consolidated right after the last
optimizer step, so the consolidation metrics reach the trainer's loggers and a ``trainer.save_model()`` after
``train()`` saves the consolidated adapter. ``begin_task(model)`` / ``consolidate(model)`` mark boundaries by hand.

Distributed training: every rank must run the callback (the Trainer does). Sharded factors (DeepSpeed ZeRO-3, FSDP2)
are gathered on all ranks, rank 0 does the math, the result is broadcast and written into the module weights and
into the optimizer's fp32 master copy where DeepSpeed keeps one (``trl_lifealign.distributed``), so the next
optimizer step starts from the consolidated weights and all ranks hold identical values. Rank 0 alone keeps the
snapshot and the long-term memory in RAM and writes ``memory_dir``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import distributed as dist
from ..adapters import REF_ADAPTER, lora_factors
from ..callbacks import LifeAlignCallback
from .config import SLMCConfig
from .math import ConsolidationResult, consolidate_update
from .memory import LongTermMemory, MemoryMismatchError, ModelSpec, check_spec

__all__ = [
    "ConsolidationReport",
    "MemoryConsolidationCallback",
    "NonFiniteUpdateError",
    "all_finite",
    "consolidate_factor",
]

logger = logging.getLogger(__name__)


class NonFiniteUpdateError(RuntimeError):
    """A task update holds NaN or Inf: nothing was written back and the memory is unchanged."""


@dataclass
class ConsolidationReport:
    """Statistics of one task boundary (identical on every rank).

    Attributes:
        task_index: 0-based index of the consolidated task in the memory's sequence.
        seconds: wall time of the consolidation (gather, math, write-back, memory save).
        kept_rank_mean: mean over factors of the number of singular directions kept by denoising.
        kept_energy: share of the total update energy kept by denoising (over all factors).
        conflict: ``||in-span part|| / ||denoised update||`` over all factors together (0 on the first task).
        update_norm / consolidated_norm: Frobenius norms of the raw and consolidated updates over all factors.
        memory_disk_bytes / memory_ram_bytes: long-term memory size after the boundary.
        snapshot_ram_bytes: size of the snapshot held between boundaries.
        factors: per factor {"kept_rank", "kept_energy", "conflict", "basis_rank"}.
        sharded: the factors were sharded (DeepSpeed ZeRO-3 or FSDP2) and gathered for the boundary.
    """

    task_index: int
    seconds: float
    kept_rank_mean: float
    kept_energy: float
    conflict: float
    update_norm: float
    consolidated_norm: float
    memory_disk_bytes: int
    memory_ram_bytes: int
    snapshot_ram_bytes: int
    factors: dict[str, dict[str, float]] = field(default_factory=dict)
    sharded: bool = False

    @property
    def zero3_partitioned(self) -> bool:
        """Deprecated name of :attr:`sharded` (removed in 0.3)."""
        import warnings

        warnings.warn("ConsolidationReport.zero3_partitioned is deprecated: use .sharded (removed in 0.3)",
                      FutureWarning, stacklevel=2)
        return self.sharded

    def metrics(self) -> dict[str, float]:
        """Scalar metrics named ``slmc/...`` for trainer logs."""
        return {
            "slmc/task": float(self.task_index),
            "slmc/seconds": self.seconds,
            "slmc/kept_rank_mean": self.kept_rank_mean,
            "slmc/kept_energy": self.kept_energy,
            "slmc/conflict": self.conflict,
            "slmc/update_norm": self.update_norm,
            "slmc/consolidated_norm": self.consolidated_norm,
            "slmc/memory_disk_mb": self.memory_disk_bytes / 2**20,
            "slmc/memory_ram_mb": self.memory_ram_bytes / 2**20,
        }


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN/Inf."""
    # One reduction instead of an elementwise pass + bool temporary: any NaN/Inf makes the sum non-finite (a
    # non-finite sum of finite values, i.e. an overflow, is re-checked element by element).
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def consolidate_factor(memory: LongTermMemory, name: str, update: torch.Tensor, snapshot: torch.Tensor,
                       config: SLMCConfig) -> tuple[torch.Tensor, ConsolidationResult, dict[str, float]]:
    """One factor's boundary: consolidate ``update`` (= trained - ``snapshot``, float32, already checked with
    :func:`all_finite`) against ``memory``'s basis for ``name``, append the new direction to the memory, and return
    ``(snapshot + consolidated update, result, stats)``. The callback and ``benchmarks/consolidation_scale.py`` both
    run exactly this.

    The new direction is computed straight into the memory's spare row and the snapshot is added in place to the
    (freshly allocated) consolidated update, so the returned value aliases ``result.update`` (which then holds the
    new factor value, not the update) and no other full-size temporary is made.
    """
    result = consolidate_update(
        update, memory.basis(name), config.energy_threshold, config.overlap_weight, config.basis_rel_tol,
        direction_out=memory.next_direction_buffer(name), check_finite=False,
    )
    if result.new_direction is not None:
        memory.append_direction(name, result.new_direction)
    beta = result.update.reshape(-1)
    stats = {
        "kept_rank": result.kept_rank,
        "kept_energy": result.kept_energy,
        "conflict": result.conflict,
        "energy": result.energy,
        "update_sq": result.energy,  # sum of sigma**2 = squared Frobenius norm (no extra pass)
        "consolidated_sq": float(torch.dot(beta, beta)),
        "denoised_sq": result.energy * result.kept_energy,
        "basis_rank": memory.basis_ranks()[name],
    }
    value = result.update.to(torch.float32)
    value.add_(snapshot)  # a new tensor of ours (consolidate_update never returns its input); = snapshot + value
    return value, result, stats


def consolidate_factor_subspace(memory: LongTermMemory, name: str, update: torch.Tensor, snapshot: torch.Tensor,
                                config: SLMCConfig) -> tuple[torch.Tensor, bool, dict[str, float]]:
    """:func:`consolidate_factor` for the ``subspace`` memory: the update's part in the factor's stored row (lora_A)
    or column (lora_B) space is scaled by λ, and the leading directions of the result join that space."""
    from .subspace import consolidate_update_subspace, factor_side

    result = consolidate_update_subspace(update, memory.basis(name).T, factor_side(name), config.energy_threshold,
                                         config.overlap_weight, config.basis_rel_tol)
    memory.set_basis(name, result.basis.T)
    beta = result.update.to(torch.float32)
    stats = {"kept_rank": result.kept_rank, "kept_energy": result.kept_energy, "conflict": result.in_span_share,
             "energy": result.energy, "update_sq": result.energy, "consolidated_sq": float(beta.pow(2).sum()),
             "denoised_sq": result.energy * result.kept_energy, "basis_rank": memory.basis_ranks()[name]}
    unchanged = result.kept_energy == 1.0 and result.kept_rank == min(update.shape) and (
        config.overlap_weight == 1.0 or result.in_span_share == 0.0)
    return snapshot + beta, unchanged, stats


def _summary(stats: dict[str, dict[str, float]]) -> dict[str, float]:
    energy = sum(s["energy"] for s in stats.values())
    denoised = sum(s["denoised_sq"] for s in stats.values())
    in_span = sum(s["denoised_sq"] * s["conflict"] ** 2 for s in stats.values())
    return {
        "kept_rank_mean": sum(s["kept_rank"] for s in stats.values()) / len(stats),
        "kept_energy": sum(s["energy"] * s["kept_energy"] for s in stats.values()) / energy if energy else 1.0,
        "conflict": (in_span / denoised) ** 0.5 if denoised else 0.0,
        "update_norm": sum(s["update_sq"] for s in stats.values()) ** 0.5,
        "consolidated_norm": sum(s["consolidated_sq"] for s in stats.values()) ** 0.5,
    }


class MemoryConsolidationCallback(LifeAlignCallback):
    """Consolidate the trained LoRA adapter(s) into long-term memory at each task boundary (LifeAlign's SLMC).

    Per LoRA factor (every ``lora_A`` / ``lora_B`` weight of the trained adapters, separately, like the paper) the
    task's update ``u = current - snapshot`` is denoised by truncated SVD (keep θ of its energy), its part inside the
    span of earlier tasks' consolidated updates is scaled by λ, and the factor becomes ``snapshot + result``; the
    result's new direction joins the factor's basis in ``memory_dir``.

    Args:
        memory_dir: where the long-term memory lives. A new callback on an existing directory continues its sequence.
        config: the settings (:class:`SLMCConfig`); keyword arguments override its fields, e.g.
            ``MemoryConsolidationCallback("memory", energy_threshold=0.8)``.
        consolidate_on_train_end: snapshot when ``train()`` begins (unless a task is already begun) and consolidate
            after its last optimizer step; False = only on demand.

    The last boundary's statistics are in ``last_report`` and, as ``slmc/...`` metrics, in the trainer's logs (every
    ``report_to`` logger, see :mod:`trl_lifealign.callbacks`).
    """

    def __init__(self, memory_dir: str | Path, config: SLMCConfig | None = None, *,
                 consolidate_on_train_end: bool = True, **config_fields):
        base = config if config is not None else SLMCConfig()
        self.config = SLMCConfig(**{**vars(base), **config_fields}) if config_fields else base
        self.memory_dir = Path(memory_dir)
        self.consolidate_on_train_end = consolidate_on_train_end
        self.last_report: ConsolidationReport | None = None
        self.reports: list[ConsolidationReport] = []
        self.memory: LongTermMemory | None = None  # rank 0 only
        self._snapshot: dict[str, torch.Tensor] | None = None  # rank 0 only
        self._task_open = False
        self._bases_for_steps: dict[str, tuple[torch.Tensor, str]] | None = None
        self._step_params: dict[str, torch.nn.Parameter] = {}
        self._before_step: dict[str, torch.Tensor] = {}

    @property
    def task_open(self) -> bool:
        """A task was begun and not yet consolidated."""
        return self._task_open

    # --------------------------------------------------------------------------------------------- model plumbing
    def _adapters(self, model) -> list[str]:
        peft_config = getattr(model, "peft_config", None)
        if not isinstance(peft_config, dict) or not peft_config:
            raise ValueError(
                f"MemoryConsolidationCallback needs a PEFT LoRA model (peft.PeftModel); got {type(model).__name__} "
                "without LoRA adapters. Pass peft_config to the trainer or wrap the model with peft.get_peft_model."
            )
        if self.config.adapter_names is not None:
            adapters = list(self.config.adapter_names)
        else:
            active = getattr(model, "active_adapters", None)
            if callable(active):  # some PEFT versions expose it as a method on the tuner
                active = active()
            adapters = [name for name in (active or list(peft_config)) if name != REF_ADAPTER]
        missing = [name for name in adapters if name not in peft_config]
        if missing:
            raise ValueError(f"adapter(s) {missing} not in the model; it has {sorted(peft_config)}")
        if not adapters:
            raise ValueError(f"no adapter to consolidate among {sorted(peft_config)} ({REF_ADAPTER!r} is never used)")
        return adapters

    def _factors(self, model) -> tuple[dict[str, torch.nn.Parameter], ModelSpec]:
        """The consolidated factors (name -> parameter, model order) and the LoRA layout; clear error without LoRA."""
        dist.check_sharding_supported(model, "MemoryConsolidationCallback")
        spec_adapters: dict[str, dict] = {}
        factors: dict[str, torch.nn.Parameter] = {}
        for name in self._adapters(model):
            config = model.peft_config[name]
            if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
                raise ValueError(f"adapter {name!r} is not a LoRA adapter ({config.peft_type})")
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            spec_adapters[name] = {"rank": int(config.r), "target_modules": targets}
            found = lora_factors(model, name)
            if not found:
                raise ValueError(f"adapter {name!r} has no LoRA factors (lora_A / lora_B) in {type(model).__name__}")
            factors.update(found)
        spec = ModelSpec(adapters=spec_adapters, factors={n: dist.full_shape(p) for n, p in factors.items()})
        return factors, spec

    def _ensure_memory(self, spec: ModelSpec) -> None:
        if self.memory is not None:
            check_spec(self.memory.spec, spec, self.memory_dir)
        elif LongTermMemory.exists(self.memory_dir):
            self.memory = LongTermMemory.load(self.memory_dir, expected=spec)
            if self.memory.kind != self.config.memory_kind:
                raise MemoryMismatchError(f"SLMC memory at {self.memory_dir} is a {self.memory.kind!r} memory; the "
                                          f"settings ask for memory_kind {self.config.memory_kind!r}")
        else:
            self.memory = LongTermMemory(memory_dir=self.memory_dir, spec=spec, kind=self.config.memory_kind)

    def _full_values(self, factors: dict[str, torch.nn.Parameter]):
        """Yield ``(name, full float32 value on rank 0 / None elsewhere)``, one factor gathered at a time."""
        main = dist.is_main_process()
        with torch.no_grad():
            for name, param in factors.items():
                with dist.gathered([param]):
                    value = dist.read_full_fp32(param)
                    yield name, (value.to("cpu", copy=True) if main else None)

    # -------------------------------------------------------------------------------------------------- public API
    @property
    def task_count(self) -> int:
        """Consolidated boundaries so far (rank 0; other ranks report the count of their own reports)."""
        return self.memory.task_count if self.memory is not None else len(self.reports)

    def begin_task(self, model) -> None:
        """Snapshot the trained LoRA factors (float32, CPU) as the start of a task. Every rank must call it."""
        factors, spec = self._factors(model)
        if dist.is_main_process():
            self._ensure_memory(spec)
        snapshot = dict(self._full_values(factors))
        self._snapshot = snapshot if dist.is_main_process() else None
        self._task_open = True

    def consolidate(self, model) -> ConsolidationReport:
        """Consolidate the task begun by :meth:`begin_task` into the model and the long-term memory.

        Every rank must call it. Either every factor is consolidated and the memory saved, or (NaN/Inf in an update)
        nothing is written and :class:`NonFiniteUpdateError` is raised, leaving the trained weights as they are.
        """
        if not self._task_open:
            raise RuntimeError("consolidate() called without begin_task(): no snapshot of the task's start")
        started = time.perf_counter()
        factors, spec = self._factors(model)
        main = dist.is_main_process()
        if main:
            self._ensure_memory(spec)
            if set(self._snapshot) != set(factors):
                raise RuntimeError("the model's LoRA factors changed between begin_task() and consolidate()")
        updates = {name: value - self._snapshot[name] for name, value in self._full_values(factors) if main}
        self._refuse_non_finite(updates)
        stats: dict[str, dict[str, float]] = {}
        unchanged: set[str] = set()
        if main:  # the math, one factor at a time (new values replace the raw updates to bound memory)
            for name in factors:
                if self.config.memory_kind == "subspace":
                    updates[name], same, stats[name] = consolidate_factor_subspace(
                        self.memory, name, updates[name], self._snapshot[name], self.config)
                else:
                    updates[name], result, stats[name] = consolidate_factor(
                        self.memory, name, updates[name], self._snapshot[name], self.config)
                    same = result.unchanged
                if same:
                    unchanged.add(name)
        self._write_back(factors, updates, dist.broadcast_object(unchanged))
        report = self._save_and_report(stats, factors, started) if main else None
        report = dist.broadcast_object(report)
        dist.barrier()
        self._snapshot, self._task_open = None, False
        self.last_report = report
        self.reports.append(report)
        logger.info("SLMC task %d consolidated in %.2fs: kept rank %.2f, kept energy %.3f, conflict %.3f",
                    report.task_index, report.seconds, report.kept_rank_mean, report.kept_energy, report.conflict)
        return report

    def _refuse_non_finite(self, updates: dict[str, torch.Tensor]) -> None:
        bad = [name for name, update in updates.items() if not all_finite(update)] if dist.is_main_process() else None
        bad = dist.broadcast_object(bad)
        if bad:
            self._task_open, self._snapshot = False, None
            raise NonFiniteUpdateError(
                f"NaN/Inf in the task update of {len(bad)} LoRA factor(s), first {bad[0]}; the weights were left at "
                f"their trained values and the memory at {self.memory_dir} is unchanged"
            )

    @staticmethod
    def _write_back(factors, values: dict[str, torch.Tensor], unchanged: set[str]) -> None:
        """Rank 0's new values into every rank's factors (module weights and master copies)."""
        for name, param in factors.items():
            if name in unchanged:
                continue
            with dist.gathered([param], modify=True):
                value = values.pop(name, None)
                value = value.to(param.device) if value is not None else torch.empty(
                    dist.full_shape(param), dtype=torch.float32, device=param.device)
                dist.write_full(param, dist.broadcast_tensor_(value))

    def _save_and_report(self, stats, factors, started: float) -> ConsolidationReport:
        memory = self.memory
        memory.energy_threshold, memory.overlap_weight = self.config.energy_threshold, self.config.overlap_weight
        memory.basis_rel_tol = self.config.basis_rel_tol
        task_index = memory.task_count
        memory.task_count += 1
        summary = {"task_index": task_index, **_summary(stats),
                   "sharded": any(dist.is_sharded(param) for param in factors.values())}
        memory.history.append({**summary, "energy_threshold": self.config.energy_threshold,
                               "overlap_weight": self.config.overlap_weight})
        memory.save()
        return ConsolidationReport(
            seconds=time.perf_counter() - started,
            memory_disk_bytes=memory.disk_bytes,
            memory_ram_bytes=memory.ram_bytes,
            snapshot_ram_bytes=sum(t.numel() * 4 for t in self._snapshot.values()),
            factors={n: {k: s[k] for k in ("kept_rank", "kept_energy", "conflict", "basis_rank")}
                     for n, s in stats.items()},
            **summary,
        )

    # -------------------------------------------------------------------------------------------- trainer events
    def _consolidate_and_log(self, model, state) -> None:
        if model is None:
            raise RuntimeError("MemoryConsolidationCallback received no model from the trainer")
        self.log_metrics(self.consolidate(model).metrics(), state)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("MemoryConsolidationCallback received no model from the trainer")
        if self.consolidate_on_train_end and not self._task_open:
            self.begin_task(model)
        if self.config.project_steps:
            if self.memory is None:
                self._ensure_memory(self._factors(model)[1])
            self._prepare_step_projection(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.consolidate_on_train_end and self._task_open and state.global_step >= state.max_steps:
            self._consolidate_and_log(model, state)

    # Gradient projection during training (memory_kind "subspace", project_steps): every optimizer step's change of a
    # factor loses its part in the factor's stored subspace. The change, not the gradient, is projected: Adam's
    # per-coordinate scaling would rotate a projected gradient back into the subspace.
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.config.project_steps or self._bases_for_steps is None:
            return
        self._before_step = {name: param.detach().clone() for name, param in self._step_params.items()}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.config.project_steps or self._bases_for_steps is None:
            return
        from .subspace import project_step_

        removed = 0.0
        with torch.no_grad():
            for name, param in self._step_params.items():
                basis, side = self._bases_for_steps[name]
                delta = (param.detach().float() - self._before_step[name].float())
                total = float(delta.norm())
                project_step_(delta, basis, side)
                removed += max(total**2 - float(delta.norm()) ** 2, 0.0)
                param.copy_((self._before_step[name].float() + delta).to(param.dtype))
        self.record_step_metric("slmc/step_projected_norm", removed**0.5)

    def _prepare_step_projection(self, model) -> None:
        """The stored subspace of every factor, for projecting optimizer steps (needs unsharded parameters)."""
        self._bases_for_steps = None
        if not self.config.project_steps:
            return
        from .subspace import factor_side

        factors, _ = self._factors(model)
        dist.refuse_sharded_training(model, "SLMC project_steps", "it edits every optimizer step's parameter change "
                                     "in place, where the module weights must be the optimizer's parameters",
                                     self.trainer)
        bases = {name: self.memory.basis(name).T for name in factors}
        self._step_params = factors
        self._bases_for_steps = {name: (bases[name], factor_side(name)) for name in factors}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Training that stopped before its last step (early stopping, no steps at all) still ends the task.
        if self.consolidate_on_train_end and self._task_open:
            self._consolidate_and_log(model, state)
