"""Lifelong preference alignment runs: a task sequence with FPO + SLMC, replay, an evaluation matrix and reports.

Python API (a few lines from your own script)::

    from trl_lifealign.lifelong import DataSource, LifelongConfig, TaskSpec, run_lifelong

    config = LifelongConfig(
        output_dir="runs/hh", model="Qwen/Qwen2.5-0.5B-Instruct",
        training={"learning_rate": 5e-6, "num_train_epochs": 1, "beta": 0.1},
        tasks=[TaskSpec("helpful", train=DataSource(path="helpful/train.json", columns={"query": "prompt"}),
                        eval=DataSource(path="helpful/dev.json", columns={"query": "prompt"})),
               TaskSpec("harmless", train=..., eval=...)],
    )
    result = run_lifelong(config)
    print(result.metrics)          # {"last", "ap", "bwt", "fwt"}

or from a recipe YAML: ``run_lifelong(load_recipe("recipe.yaml"))`` / ``lifealign train recipe.yaml``.

Names are resolved lazily: importing the package (e.g. for the command line) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BadRecordError": "data", "DataError": "data", "DataSource": "data", "PreferenceData": "data",
    "load_preference_data": "data",
    "EvalSet": "evaluation", "PreparedEvalSet": "evaluation", "evaluate_preferences": "evaluation",
    "initial_policy_logps": "evaluation", "prepare_eval_sets": "evaluation", "reference_logps": "evaluation",
    "BLEU4Scorer": "generation", "RougeLScorer": "generation", "Scorer": "generation",
    "evaluate_generation": "generation",
    "JudgeScorer": "judge",
    "continual_metrics": "metrics", "preference_accuracy": "metrics",
    "EvalSpec": "config", "EvaluationSettings": "config", "LifelongConfig": "config", "LoraSettings": "config",
    "MemorySettings": "config", "ReplaySettings": "config", "SFTWarmupSettings": "config", "TaskSpec": "config",
    "RecipeError": "training_values", "load_recipe": "recipe", "RECIPE_PRESETS": "presets", "expand_preset": "presets",
    "ReplayBuffer": "replay",
    "LifelongReport": "report", "TaskRecord": "report",
    "ConfigurationMismatchError": "state", "RunStateError": "state",
    "LifelongResult": "runner", "run_lifelong": "runner",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .config import (
        EvalSpec,
        EvaluationSettings,
        LifelongConfig,
        LoraSettings,
        MemorySettings,
        ReplaySettings,
        SFTWarmupSettings,
        TaskSpec,
    )
    from .data import BadRecordError, DataError, DataSource, PreferenceData, load_preference_data
    from .evaluation import (
        EvalSet,
        PreparedEvalSet,
        evaluate_preferences,
        initial_policy_logps,
        prepare_eval_sets,
        reference_logps,
    )
    from .generation import BLEU4Scorer, RougeLScorer, Scorer, evaluate_generation
    from .judge import JudgeScorer
    from .metrics import continual_metrics, preference_accuracy
    from .presets import RECIPE_PRESETS, expand_preset
    from .recipe import load_recipe
    from .replay import ReplayBuffer
    from .report import LifelongReport, TaskRecord
    from .runner import LifelongResult, run_lifelong
    from .state import ConfigurationMismatchError, RunStateError
    from .training_values import RecipeError


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trl_lifealign.lifelong' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
