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
"""

from .data import BadRecordError, DataSource, PreferenceData, load_preference_data
from .evaluation import (
    BLEU4Scorer,
    EvalSet,
    RougeLScorer,
    Scorer,
    evaluate_generation,
    evaluate_preferences,
    reference_logps,
)
from .metrics import continual_metrics, preference_accuracy
from .recipe import (
    EvalSpec,
    EvaluationSettings,
    LifelongConfig,
    LoraSettings,
    MemorySettings,
    RecipeError,
    ReplaySettings,
    SFTWarmupSettings,
    TaskSpec,
    load_recipe,
)
from .replay import ReplayBuffer
from .runner import LifelongResult, run_lifelong

__all__ = [
    "BLEU4Scorer", "BadRecordError", "DataSource", "EvalSet", "EvalSpec", "EvaluationSettings", "LifelongConfig",
    "LifelongResult", "LoraSettings", "MemorySettings", "PreferenceData", "RecipeError", "ReplayBuffer",
    "ReplaySettings", "RougeLScorer", "SFTWarmupSettings", "Scorer", "TaskSpec", "continual_metrics",
    "evaluate_generation", "evaluate_preferences", "load_preference_data", "preference_accuracy", "reference_logps",
    "run_lifelong", "load_recipe",
]
