"""What the lifelong benchmark compares (methods) and under which settings (one dataclass, presets, ``--set`` keys).

A method is a partial lifelong recipe (``trl_lifealign.lifelong.LifelongConfig`` as a dict) merged over the shared
base recipe, so every method is exactly what a user would get from ``lifealign train`` with those keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The paper's default order without Capybara-Preferences (absent from the public data snapshot).
PAPER_ORDER = ("HC3", "hh-rlhf-harmless-base", "hh-rlhf-helpful-base", "safe-rlhf", "TruthfulQA")
SHORT_TASK_NAMES = {"HC3": "HC3", "hh-rlhf-harmless-base": "harmless", "hh-rlhf-helpful-base": "helpful",
                    "safe-rlhf": "safe", "TruthfulQA": "TruthQA"}


@dataclass(frozen=True)
class BenchMethod:
    """One compared method: a label and the recipe keys it sets (``focal_gamma: null`` means the settings' γ)."""

    name: str
    label: str
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    multi_task: bool = False
    fpo: bool = False

    @property
    def uses_replay(self) -> bool:
        return "replay" in self.recipe


_NO_MEMORY = {"memory": {"enabled": False}}


def _defence(name: str, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**_NO_MEMORY, "defences": {name: settings}, **extra}


# A recipe value "$field" is the BenchSettings field of that name (the knobs the sweeps vary).
METHODS: dict[str, BenchMethod] = {m.name: m for m in (
    BenchMethod("seq-dpo", "Sequential DPO", _NO_MEMORY),
    BenchMethod("replay", "Replay (ER 20%)", {**_NO_MEMORY, "replay": {}}),
    BenchMethod("fpo", "FPO only", _NO_MEMORY, fpo=True),
    BenchMethod("slmc", "SLMC only", {}),
    BenchMethod("lifealign", "LifeAlign (FPO + SLMC)", {}, fpo=True),
    BenchMethod("lifealign-replay", "LifeAlign + replay", {"replay": {}}, fpo=True),
    BenchMethod("multi-task", "Multi-task (upper bound)", _NO_MEMORY, multi_task=True),
    # Defences beyond LifeAlign, each on sequential DPO (γ = 0) with the settings' reference.
    BenchMethod("slmc-subspace", "SLMC, subspace memory", {"memory": {"memory_kind": "subspace"}}),
    BenchMethod("slmc-gpm", "SLMC, subspace + step projection",
                {"memory": {"memory_kind": "subspace", "project_steps": True}}),
    BenchMethod("averaging", "Model averaging", _defence("averaging", {"alpha": "$averaging_alpha"})),
    BenchMethod("ewc", "Online EWC", _defence("ewc", {"strength": "$ewc_strength"})),
    # `preset: recommended`: EWC at the strength the sweep chose, fixed so the preset and the method are one recipe.
    BenchMethod("ewc-10k", "Online EWC (strength 10000)", _defence("ewc", {"strength": 10000.0})),
    BenchMethod("kl-anchor", "KL anchor (prompts only)", _defence("kl_anchor", {"weight": "$kl_weight"})),
    BenchMethod("freeze", "Freeze lowest layers", _defence("freeze_layers", {"num_layers": "$freeze_layers"})),
    BenchMethod("olora", "O-LoRA (reference: base)",
                _defence("olora", {"orthogonality": "$olora_orthogonality"}, reference="base")),
    BenchMethod("merging", "TIES merging of task adapters", _defence("merging", {"method": "$merge_method"})),
    BenchMethod("budget", "Forgetting budget", _defence("forgetting_budget", {"budget": "$budget_points"})),
    # Combinations.
    BenchMethod("averaging-kl", "Averaging + KL anchor",
                {**_NO_MEMORY, "defences": {"averaging": {"alpha": "$averaging_alpha"},
                                            "kl_anchor": {"weight": "$kl_weight"}}}),
    BenchMethod("averaging-budget", "Averaging + budget",
                {**_NO_MEMORY, "defences": {"averaging": {"alpha": "$averaging_alpha"},
                                            "forgetting_budget": {"budget": "$budget_points"}}}),
    BenchMethod("replay-averaging", "Replay + averaging",
                {**_defence("averaging", {"alpha": "$averaging_alpha"}), "replay": {}}),
    BenchMethod("replay-budget", "Replay + budget",
                {**_defence("forgetting_budget", {"budget": "$budget_points"}), "replay": {}}),
    BenchMethod("merging-budget", "TIES merging + budget",
                {**_NO_MEMORY, "defences": {"merging": {"method": "$merge_method"},
                                            "forgetting_budget": {"budget": "$budget_points"}}}),
    BenchMethod("replay-merging", "Replay + TIES merging",
                {**_defence("merging", {"method": "$merge_method"}), "replay": {}}),
)}
BASE_METHODS = ("seq-dpo", "replay", "fpo", "slmc", "lifealign", "lifealign-replay", "multi-task")


def resolve_recipe(value: Any, settings: BenchSettings) -> Any:
    """``value`` with every "$field" string replaced by that settings field."""
    if isinstance(value, dict):
        return {k: resolve_recipe(v, settings) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("$"):
        return getattr(settings, value[1:])
    return value


@dataclass
class BenchSettings:
    """Everything shared by all methods of one benchmark run (model, data sizes, optimisation, method knobs)."""

    model: str = "tiny"  # "tiny" (built and warmed up here) or a built-in pretrained name such as "smollm2"
    # data
    tasks: tuple[str, ...] = PAPER_ORDER
    data_seed: int = 0
    pairs: int = 256
    eval_pairs: int | None = None  # None: every usable pair of the eval split
    monitor_pairs: int = 64  # held-out training pairs the forgetting budget watches
    max_prompt_tokens: int = 48
    max_completion_tokens: int = 48
    chat_template: str = "never"
    # tiny model and tokenizer
    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # causal-LM warm-up shared by every method of a seed (tiny model only)
    warmup_steps: int = 300
    warmup_batch_size: int = 16
    warmup_learning_rate: float = 2e-3
    # LoRA (all linear layers)
    lora_r: int = 8
    lora_alpha: int = 16
    # preference optimisation
    learning_rate: float = 2e-3
    epochs: float = 2.0
    batch_size: int = 8
    beta: float = 0.1
    focal_gamma: float = 2.0
    reference: str = "previous_task"
    optimizer: str = "reset"
    lr_scheduler: str = "linear"
    dtype: str = "float32"
    # bf16 autocast in training (TRL's ``bf16``), on CPU too: 2.3x faster DPO steps for SmolLM2 on a CPU with
    # avx512_bf16 (benchmarks/smollm2_costs.py); evaluation always runs in the model's own dtype.
    bf16_autocast: bool = False
    # SLMC
    energy_threshold: float = 0.9
    overlap_weight: float = 0.5
    # replay
    replay_fraction: float = 0.2
    replay_capacity: int = 3000
    # defences (one or two knobs each)
    averaging_alpha: float = 0.5
    ewc_strength: float = 1000.0
    kl_weight: float = 0.1
    freeze_layers: int = 1
    olora_orthogonality: float = 0.5
    merge_method: str = "ties"
    budget_points: float = 2.0
    # evaluation
    eval_batch_size: int = 16
    generation: bool = False
    generation_rows: int = 16
    generation_cells: str = "all"
    max_new_tokens: int = 48

    @property
    def max_length(self) -> int:
        # +1 for the EOS TRL appends to each completion (+ the chat template's tokens, for a chat model).
        return self.max_prompt_tokens + self.max_completion_tokens + (1 if self.chat_template == "never" else 24)


# ``--set`` / ``--sweep`` keys: short names used in the paper's notation map to settings fields.
SETTING_ALIASES = {"theta": "energy_threshold", "lambda": "overlap_weight", "gamma": "focal_gamma",
                   "lr": "learning_rate"}
CHOICES = {"reference": ("base", "previous_task"), "optimizer": ("reset", "carry"),
           "lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
           "chat_template": ("never", "always", "auto"), "dtype": ("float32", "bfloat16"),
           "merge_method": ("linear", "ties", "dare_linear", "dare_ties"),
           "generation_cells": ("all", "diagonal_and_last")}


def coerce_setting(settings: BenchSettings, key: str, raw: str) -> tuple[str, Any]:
    name = SETTING_ALIASES.get(key, key)
    fields = {f.name: f for f in dataclasses.fields(BenchSettings)}
    if name not in fields or name == "tasks":
        allowed = sorted(set(fields) - {"tasks"} | set(SETTING_ALIASES))
        raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(allowed)}")
    current = getattr(settings, name)
    try:
        if name == "eval_pairs" and raw.lower() in ("none", "all"):
            value: Any = None
        elif isinstance(current, bool):
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(raw)
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, int) or name == "eval_pairs":
            value = int(raw)
        elif isinstance(current, float):
            value = float(raw)
        else:
            value = raw
    except ValueError as error:
        raise ValueError(f"setting {key!r}: cannot read {raw!r} as {type(current).__name__}") from error
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"setting {name!r} must be one of {CHOICES[name]}, got {raw!r}")
    return name, value


def apply_settings(settings: BenchSettings, assignments: dict[str, str]) -> BenchSettings:
    """A copy of ``settings`` with ``{"key": "raw value"}`` applied (keys may use the aliases theta, lambda, ...)."""
    changes = dict(coerce_setting(settings, key, raw) for key, raw in assignments.items())
    return dataclasses.replace(settings, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # The tiny model, 3 seeds: the reference benchmark of the README (2-core CPU, ~15 min).
    "tiny": {},
    # One seed, fewer pairs: a few minutes.
    "tiny-quick": {"pairs": 128, "eval_pairs": 64, "warmup_steps": 150},
    # SmolLM2-135M-Instruct through its chat template, greedy answers scored with BLEU-4 / ROUGE-L on the matrix
    # diagonal and last row (what BWT and Last need). The CPU preset: one seed, sized for the 2-core machine.
    # lr 2e-4: at 5e-4 sequential DPO keeps its preference accuracy but its greedy answers degenerate (repetition
    # after the first task, empty or "assistant" by the fifth; README, real-model benchmark).
    "smollm2-cpu": {"model": "smollm2", "chat_template": "always", "pairs": 48, "eval_pairs": 32,
                    "max_prompt_tokens": 96, "max_completion_tokens": 64, "learning_rate": 2e-4, "epochs": 2.0,
                    "batch_size": 4, "eval_batch_size": 8, "generation": True, "generation_rows": 12,
                    "generation_cells": "diagonal_and_last", "max_new_tokens": 48, "freeze_layers": 8,
                    "monitor_pairs": 32, "bf16_autocast": True},
    # The same on a GPU: 3 seeds (the CLI's default), 4x the pairs, every eval pair, bf16, all generation cells.
    "smollm2-gpu": {"model": "smollm2", "chat_template": "always", "pairs": 256, "eval_pairs": None,
                    "max_prompt_tokens": 192, "max_completion_tokens": 128, "learning_rate": 2e-4, "epochs": 2.0,
                    "batch_size": 8, "eval_batch_size": 16, "dtype": "bfloat16", "generation": True,
                    "generation_rows": 32, "generation_cells": "all", "max_new_tokens": 96, "freeze_layers": 8,
                    "monitor_pairs": 64},
}


def preset_settings(name: str, tasks: tuple[str, ...]) -> BenchSettings:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(BenchSettings(tasks=tasks), **PRESETS[name])


@dataclass(frozen=True)
class RunSpec:
    """One (method, seed) run, possibly a sweep variant with settings overridden."""

    method: str
    seed: int
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def variant(self) -> str:
        if not self.overrides:
            return self.method
        return self.method + "@" + ",".join(f"{k}={v}" for k, v in self.overrides)


def parse_sweeps(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["theta=0.5,0.9", "lambda=0,1"]`` -> ``[("theta", ["0.5", "0.9"]), ("lambda", ["0", "1"])]``."""
    sweeps = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        sweeps.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    return sweeps


def plan_runs(methods: list[str], seeds: list[int], sweeps: list[tuple[str, list[str]]],
              sweep_methods: list[str]) -> list[RunSpec]:
    """Seed-major order, so an interrupted run leaves complete seeds behind."""
    specs = []
    for seed in seeds:
        specs += [RunSpec(m, seed) for m in methods]
        for key, values in sweeps:
            for value in values:
                specs += [RunSpec(m, seed, ((key, value),)) for m in sweep_methods]
    return specs
