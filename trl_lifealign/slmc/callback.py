"""``MemoryConsolidationCallback``: LifeAlign's short-to-long memory consolidation at every task boundary.

A task boundary is one ``trainer.train()`` call: the trained LoRA factors are snapshotted (float32, CPU) in
``on_train_begin`` and consolidated in ``on_train_end``, so a ``trainer.save_model()`` after ``train()`` saves the
consolidated adapter. ``begin_task(model)`` / ``consolidate(model)`` mark boundaries by hand.

Distributed training: every rank must run the callback (the Trainer does). Under DeepSpeed ZeRO-3 the factors are
gathered on all ranks (a collective), rank 0 does the math, the result is broadcast, and both the module weights and
the optimizer's fp32 master copy are overwritten (ZeRO-1/2 and DeepSpeed's bf16 optimizer: the master copy too), so
the next optimizer step starts from the consolidated weights and all ranks hold identical values. Rank 0 alone keeps
the snapshot and the long-term memory in RAM and writes ``memory_dir``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .math import DEFAULT_BASIS_REL_TOL, ConsolidationResult, consolidate_update
from .memory import LongTermMemory, ModelSpec

__all__ = [
    "ConsolidationReport",
    "MemoryConsolidationCallback",
    "NonFiniteUpdateError",
    "all_finite",
    "consolidate_factor",
]

logger = logging.getLogger(__name__)

REF_ADAPTER = "ref"  # TRL's frozen reference copy of the adapter; never consolidated
_FACTOR_PATTERN = r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.{adapter}(\.weight)?$"


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
        zero3_partitioned: the factors were partitioned by DeepSpeed ZeRO-3 (gathered for the boundary).
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
    zero3_partitioned: bool = False

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


def consolidate_factor(
    memory: LongTermMemory,
    name: str,
    update: torch.Tensor,
    snapshot: torch.Tensor,
    energy_threshold: float,
    overlap_weight: float,
    basis_rel_tol: float = DEFAULT_BASIS_REL_TOL,
) -> tuple[torch.Tensor, ConsolidationResult, dict[str, float]]:
    """One factor's boundary: consolidate ``update`` (= trained - ``snapshot``, float32, already checked finite with
    :func:`all_finite`) against ``memory``'s basis
    for ``name``, append the new direction to the memory, and return ``(snapshot + consolidated update, result,
    stats)``. The callback and ``benchmarks/consolidation_scale.py`` both run exactly this.

    The new direction is computed straight into the memory's spare row and the snapshot is added in place to the
    (freshly allocated) consolidated update, so the returned value aliases ``result.update`` (which then holds the
    new factor value, not the update) and no other full-size temporary is made.
    """
    result = consolidate_update(
        update, memory.basis(name), energy_threshold, overlap_weight, basis_rel_tol,
        direction_out=memory.next_direction_buffer(name), check_finite=False,  # the caller checked (all_finite)
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
    if value.data_ptr() == update.data_ptr():  # never happens today (the result is a new tensor); stay safe anyway
        value = snapshot + value
    else:
        value.add_(snapshot)  # bit-identical to snapshot + value (IEEE addition commutes)
    return value, result, stats


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _has_master_copy(param: torch.Tensor) -> bool:
    # DeepSpeed ZeRO-3 params carry ds_id (and, once the optimizer exists, _z3_optimizer); ZeRO-1/2 and the bf16
    # optimizer link an fp32 fragment via _hp_mapping.
    return (hasattr(param, "ds_id") and hasattr(param, "_z3_optimizer")) or hasattr(param, "_hp_mapping")


def _full_shape(param: torch.Tensor) -> list[int]:
    return list(param.ds_shape) if _is_zero3(param) else list(param.shape)


@contextlib.contextmanager
def _gathered(param: torch.Tensor, modify: bool):
    """Full values of a ZeRO-3 partitioned parameter on every rank (a collective); rank 0's writes persist."""
    if not _is_zero3(param):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None):
        yield


def _read_full_fp32(param: torch.Tensor) -> torch.Tensor:
    """Full float32 value of a factor, from the optimizer's master copy when DeepSpeed keeps one (a collective)."""
    if _has_master_copy(param):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master.detach().reshape(_full_shape(param)).float()
    return param.detach().float()


def _broadcast_object(obj: Any, world_size: int) -> Any:
    if world_size == 1:
        return obj
    payload = [obj]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


class MemoryConsolidationCallback(TrainerCallback):
    """Consolidate the trained LoRA adapter(s) into long-term memory at each task boundary (LifeAlign's SLMC).

    Per LoRA factor (every ``lora_A`` / ``lora_B`` weight of the trained adapters, separately, like the paper) the
    task's update ``u = current - snapshot`` is denoised by truncated SVD (keep ``energy_threshold`` of its energy),
    its part inside the span of earlier tasks' consolidated updates is scaled by ``overlap_weight``, and the factor
    becomes ``snapshot + result``; the result's new direction joins the factor's basis in ``memory_dir``.

    Args:
        memory_dir: where the long-term memory lives. A new callback on an existing directory continues its sequence.
        energy_threshold: theta in [0, 1]; 1 keeps the whole update.
        overlap_weight: lambda in [0, 1]; 1 keeps the in-span part, 0 keeps only the part orthogonal to earlier tasks.
        adapter_names: adapters to consolidate. Default: the model's active adapters except TRL's frozen ``"ref"``.
        basis_rel_tol: relative residual below which an update adds no basis direction.
        consolidate_on_train_end: consolidate automatically when ``train()`` ends (and snapshot when it begins).

    The last boundary's statistics are in ``last_report`` (a :class:`ConsolidationReport`) and, as ``slmc/...``
    metrics, in the trainer's ``state.log_history`` (through ``trainer.log`` when ``self.trainer`` is set).
    """

    def __init__(
        self,
        memory_dir: str | Path,
        energy_threshold: float = 0.9,
        overlap_weight: float = 0.5,
        adapter_names: list[str] | str | None = None,
        basis_rel_tol: float = DEFAULT_BASIS_REL_TOL,
        consolidate_on_train_end: bool = True,
    ):
        if not 0.0 <= energy_threshold <= 1.0:
            raise ValueError(f"energy_threshold must be in [0, 1], got {energy_threshold}")
        if not 0.0 <= overlap_weight <= 1.0:
            raise ValueError(f"overlap_weight must be in [0, 1], got {overlap_weight}")
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        if adapter_names is not None and REF_ADAPTER in adapter_names:
            raise ValueError(f"adapter {REF_ADAPTER!r} is TRL's frozen reference copy; it cannot be consolidated")
        self.memory_dir = Path(memory_dir)
        self.energy_threshold = float(energy_threshold)
        self.overlap_weight = float(overlap_weight)
        self.adapter_names = list(adapter_names) if adapter_names is not None else None
        self.basis_rel_tol = float(basis_rel_tol)
        self.consolidate_on_train_end = consolidate_on_train_end
        self.trainer = None  # optional handle: metrics then go through trainer.log (and so to report_to loggers)
        self.last_report: ConsolidationReport | None = None
        self.reports: list[ConsolidationReport] = []
        self.memory: LongTermMemory | None = None  # rank 0 only
        self._snapshot: dict[str, torch.Tensor] | None = None  # rank 0 only
        self._task_open = False

    # --------------------------------------------------------------------------------------------- model plumbing
    def _factors(self, model) -> tuple[dict[str, torch.nn.Parameter], ModelSpec]:
        """The consolidated factors (name -> parameter, model order) and the LoRA layout; clear error without LoRA."""
        peft_config = getattr(model, "peft_config", None)
        if not isinstance(peft_config, dict) or not peft_config:
            raise ValueError(
                f"MemoryConsolidationCallback needs a PEFT LoRA model (peft.PeftModel); got {type(model).__name__} "
                "without LoRA adapters. Pass peft_config to the trainer or wrap the model with peft.get_peft_model."
            )
        if self.adapter_names is not None:
            adapters = list(self.adapter_names)
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
        spec_adapters: dict[str, dict] = {}
        for name in adapters:
            config = peft_config[name]
            if getattr(config, "peft_type", None) is None or str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
                raise ValueError(f"adapter {name!r} is not a LoRA adapter ({getattr(config, 'peft_type', None)})")
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
            spec_adapters[name] = {"rank": int(config.r), "target_modules": targets}
        patterns = {name: re.compile(_FACTOR_PATTERN.format(adapter=re.escape(name))) for name in adapters}
        factors: dict[str, torch.nn.Parameter] = {}
        for param_name, param in model.named_parameters():
            if any(pattern.search(param_name) for pattern in patterns.values()):
                factors[param_name] = param
        for name, pattern in patterns.items():
            if not any(pattern.search(param_name) for param_name in factors):
                raise ValueError(f"adapter {name!r} has no LoRA factors (lora_A / lora_B) in {type(model).__name__}")
        spec = ModelSpec(adapters=spec_adapters, factors={n: _full_shape(p) for n, p in factors.items()})
        return factors, spec

    def _ensure_memory(self, spec: ModelSpec) -> None:
        if self.memory is not None:
            from .memory import check_spec

            check_spec(self.memory.spec, spec, self.memory_dir)
            return
        if LongTermMemory.exists(self.memory_dir):
            self.memory = LongTermMemory.load(self.memory_dir, expected=spec)
        else:
            self.memory = LongTermMemory(memory_dir=self.memory_dir, spec=spec)

    # -------------------------------------------------------------------------------------------------- public API
    @property
    def task_count(self) -> int:
        """Consolidated boundaries so far (rank 0; other ranks report the count of their own reports)."""
        return self.memory.task_count if self.memory is not None else len(self.reports)

    def begin_task(self, model) -> None:
        """Snapshot the trained LoRA factors (float32, CPU) as the start of a task. Every rank must call it."""
        factors, spec = self._factors(model)
        rank, _ = _dist_info()
        if rank == 0:
            self._ensure_memory(spec)
        snapshot: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in factors.items():
                with _gathered(param, modify=False):
                    value = _read_full_fp32(param)
                    if rank == 0:
                        snapshot[name] = value.to("cpu", copy=True)
        self._snapshot = snapshot if rank == 0 else None
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
        rank, world_size = _dist_info()
        if rank == 0:
            self._ensure_memory(spec)
            if set(self._snapshot) != set(factors):
                raise RuntimeError("the model's LoRA factors changed between begin_task() and consolidate()")

        # Pass 1: raw updates (rank 0), refused as a whole if any is non-finite.
        updates: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in factors.items():
                with _gathered(param, modify=False):
                    value = _read_full_fp32(param)
                    if rank == 0:
                        updates[name] = value.to("cpu") - self._snapshot[name]
        bad = [name for name, update in updates.items() if not all_finite(update)] if rank == 0 else None
        bad = _broadcast_object(bad, world_size)
        if bad:
            self._task_open = False
            self._snapshot = None
            raise NonFiniteUpdateError(
                f"NaN/Inf in the task update of {len(bad)} LoRA factor(s), first {bad[0]}; the weights were left at "
                f"their trained values and the memory at {self.memory_dir} is unchanged"
            )

        # Rank 0: the math, one factor at a time (new values replace the raw updates to bound memory).
        stats: dict[str, dict[str, float]] = {}
        unchanged: set[str] = set()
        if rank == 0:
            memory = self.memory
            for name in factors:
                updates[name], result, stats[name] = consolidate_factor(
                    memory, name, updates[name], self._snapshot[name],
                    self.energy_threshold, self.overlap_weight, self.basis_rel_tol,
                )
                if result.unchanged:
                    unchanged.add(name)
        unchanged = _broadcast_object(unchanged, world_size)

        # Pass 2: write back (module weights and DeepSpeed's fp32 master copy), identical on every rank.
        with torch.no_grad():
            for name, param in factors.items():
                if name in unchanged:
                    continue
                with _gathered(param, modify=True):
                    if rank == 0:
                        value = updates.pop(name).to(param.device)
                    else:
                        value = torch.empty(_full_shape(param), dtype=torch.float32, device=param.device)
                    if world_size > 1:
                        torch.distributed.broadcast(value, src=0)
                    if _has_master_copy(param):
                        from deepspeed.utils import safe_set_full_fp32_param

                        safe_set_full_fp32_param(param, value)
                    param.data.copy_(value.reshape(param.data.shape).to(param.dtype))

        report = None
        if rank == 0:
            memory = self.memory
            memory.energy_threshold, memory.overlap_weight = self.energy_threshold, self.overlap_weight
            memory.basis_rel_tol = self.basis_rel_tol
            task_index = memory.task_count
            memory.task_count += 1
            energy = sum(s["energy"] for s in stats.values())
            denoised = sum(s["denoised_sq"] for s in stats.values())
            in_span = sum(s["denoised_sq"] * s["conflict"] ** 2 for s in stats.values())
            summary = {
                "task_index": task_index,
                "kept_rank_mean": sum(s["kept_rank"] for s in stats.values()) / len(stats),
                "kept_energy": sum(s["energy"] * s["kept_energy"] for s in stats.values()) / energy if energy else 1.0,
                "conflict": (in_span / denoised) ** 0.5 if denoised else 0.0,
                "update_norm": sum(s["update_sq"] for s in stats.values()) ** 0.5,
                "consolidated_norm": sum(s["consolidated_sq"] for s in stats.values()) ** 0.5,
                "zero3_partitioned": any(_is_zero3(param) for param in factors.values()),
            }
            memory.history.append(
                {**summary, "energy_threshold": self.energy_threshold, "overlap_weight": self.overlap_weight}
            )
            memory.save()
            report = ConsolidationReport(
                seconds=time.perf_counter() - started,
                memory_disk_bytes=memory.disk_bytes,
                memory_ram_bytes=memory.ram_bytes,
                snapshot_ram_bytes=sum(t.numel() * 4 for t in self._snapshot.values()),
                factors={
                    n: {k: s[k] for k in ("kept_rank", "kept_energy", "conflict", "basis_rank")}
                    for n, s in stats.items()
                },
                **summary,
            )
        report = _broadcast_object(report, world_size)
        if world_size > 1:
            torch.distributed.barrier()
        self._snapshot = None
        self._task_open = False
        self.last_report = report
        self.reports.append(report)
        logger.info(
            "SLMC task %d consolidated in %.2fs: kept rank %.2f, kept energy %.3f, conflict %.3f",
            report.task_index, report.seconds, report.kept_rank_mean, report.kept_energy, report.conflict,
        )
        return report

    # -------------------------------------------------------------------------------------------- trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.consolidate_on_train_end:
            return
        if model is None:
            raise RuntimeError("MemoryConsolidationCallback.on_train_begin received no model")
        self.begin_task(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.consolidate_on_train_end:
            return
        if model is None:
            raise RuntimeError("MemoryConsolidationCallback.on_train_end received no model")
        report = self.consolidate(model)
        metrics = report.metrics()
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})
