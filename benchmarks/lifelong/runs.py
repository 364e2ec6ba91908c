"""One benchmark run = one ``lifealign train`` run: the recipe of a (method, seed), run in this process or a worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trl_lifealign.atomic import atomic_write_json, atomic_write_text
from trl_lifealign.lifelong.presets import merged_recipe
from trl_lifealign.lifelong.state import INITIAL_LOGPS_FILE

from .settings import METHODS, BenchMethod, BenchSettings, resolve_recipe

RESULT_FILE = "bench_run.json"


def build_recipe(method: BenchMethod, settings: BenchSettings, tasks: list[dict[str, str]], run_dir: Path,
                 seed: int) -> dict[str, Any]:
    """The lifelong recipe (as a dict) of one method: the same data, steps and seed for every method.

    ``tasks`` are ``{"name", "train_file", "eval_file"}`` (the prepared JSON Lines files).
    """
    if method.multi_task:
        stages = [{"name": "all-tasks", "train": [{"path": t["train_file"]} for t in tasks]}]
    else:
        stages = [{"name": t["name"], "train": {"path": t["train_file"]}} for t in tasks]
    base = {
        "output_dir": str(run_dir), "seed": seed, "tasks": stages, "torch_dtype": settings.dtype,
        "eval_sets": [{"name": t["name"], "source": {"path": t["eval_file"]}} for t in tasks],
        "lora": {"r": settings.lora_r, "alpha": settings.lora_alpha, "target_modules": "all-linear"},
        "training": {
            "learning_rate": settings.learning_rate, "num_train_epochs": settings.epochs,
            "per_device_train_batch_size": settings.batch_size, "gradient_accumulation_steps": 1,
            "beta": settings.beta, "focal_gamma": settings.focal_gamma if method.fpo else 0.0,
            "max_length": settings.max_length, "lr_scheduler_type": settings.lr_scheduler, "warmup_steps": 0.1,
            "logging_steps": 10_000, "bf16": settings.bf16_autocast or (settings.dtype == "bfloat16" and _has_cuda()),
            "gradient_checkpointing": False, "save_strategy": "no",
            "report_to": "none", "use_cpu": not _has_cuda()},
        "memory": {"enabled": True, "energy_threshold": settings.energy_threshold,
                   "overlap_weight": settings.overlap_weight},
        "reference": settings.reference, "optimizer": settings.optimizer, "chat_template": settings.chat_template,
        "evaluation": {"batch_size": settings.eval_batch_size, "max_length": settings.max_length,
                       "generation": settings.generation, "generation_rows": settings.generation_rows,
                       "generation_cells": settings.generation_cells, "max_new_tokens": settings.max_new_tokens},
    }
    recipe = merged_recipe(base, resolve_recipe(method.recipe, settings))
    budget = recipe.get("defences", {}).get("forgetting_budget")
    if budget is not None and not method.multi_task:
        budget["monitor_sets"] = [{"name": t["name"], "source": {"path": t["monitor_file"]}} for t in tasks]
    if "replay" in recipe:
        recipe["replay"] = {"fraction": settings.replay_fraction, "capacity": settings.replay_capacity, "seed": seed,
                            **recipe["replay"]}
    return recipe


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point: run one (method, seed) with ``run_lifelong`` and store its result atomically.

    Several workers share the terminal: third-party output is silenced (from the first import on), only the
    benchmark's own lines remain. An interrupted run resumes after its last committed task (the runner checks that
    nothing else changed).
    """
    import torch

    from trl_lifealign.allocator import reuse_freed_memory_on_cpu
    from trl_lifealign.compat import quiet_third_party

    torch.set_num_threads(job["threads"])
    reuse_freed_memory_on_cpu()
    with quiet_third_party():
        return _run_one(job)


def share_initial_logps(run_dir: Path) -> Path | None:
    """Start ``run_dir`` with π₀'s cached log-probs from another method's run at the same seed, if one has them.

    Every method of a seed scores the same π₀ on the same eval sets; the runner reuses the copy only if its key
    (model, loading dtype, tokenizer, evaluation settings and data) matches its own, and recomputes it otherwise.
    Returns the file copied from, or None.
    """
    target = run_dir / "runner" / INITIAL_LOGPS_FILE
    if target.exists():
        return None
    for source in sorted(run_dir.parent.parent.glob(f"*/{run_dir.name}/runner/{INITIAL_LOGPS_FILE}")):
        if source != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, source.read_text(encoding="utf-8"))
            return source
    return None


def _run_one(job: dict[str, Any]) -> dict[str, Any]:
    from trl_lifealign.lifelong import LifelongConfig, run_lifelong
    from trl_lifealign.lifelong.recipe import from_dict

    settings = BenchSettings(**{**job["settings"], "tasks": tuple(job["settings"]["tasks"])})
    run_dir = Path(job["run_dir"])
    recipe = build_recipe(METHODS[job["method"]], settings, job["tasks"], run_dir / "runner", job["seed"])
    recipe["model"] = job["model_dir"]
    share_initial_logps(run_dir)
    started = time.perf_counter()
    result = run_lifelong(from_dict(LifelongConfig, recipe), show_progress=False)
    record = {"fingerprint": job["fingerprint"], "variant": job["variant"], "method": job["method"],
              "seed": job["seed"], "overrides": job["overrides"], "seconds": time.perf_counter() - started,
              "threads": job["threads"], "report": result.report.to_dict()}
    atomic_write_json(run_dir / RESULT_FILE, record, sort_keys=True, default=str)
    return record
