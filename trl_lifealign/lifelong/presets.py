"""Recipe presets: the benchmark's recommended defences against forgetting as one recipe key, ``preset: NAME``.

A preset is a partial recipe. ``expand_preset`` lays the recipe over it (mappings merged key by key, the recipe's
values win), so ``preset: recommended`` plus any explicit key is that preset with the key changed. Each preset is
exactly a method of the lifelong benchmark (``benchmarks/lifelong``, named in ``BENCHMARK_METHOD``), so the numbers
in the README's "Which defence should I use?" are what the preset gives on that benchmark.
"""

from __future__ import annotations

import copy
from typing import Any

from .training_values import RecipeError

# Sequential DPO (γ = 0, no SLMC) plus the defences that did best on the benchmark.
RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    # Keeps no earlier preference data: online EWC on the LoRA factors (a diagonal Fisher, one adapter's size).
    "recommended": {"training": {"focal_gamma": 0.0}, "memory": {"enabled": False},
                    "defences": {"ewc": {"strength": 10000.0}}},
    # Keeps a 20% replay sample of every finished task's pairs; each task's update is halved at its end.
    "recommended-replay": {"training": {"focal_gamma": 0.0}, "memory": {"enabled": False},
                           "replay": {"fraction": 0.2},
                           "defences": {"averaging": {"alpha": 0.5}}},
}
BENCHMARK_METHOD = {"recommended": "ewc-10k", "recommended-replay": "replay-averaging"}


def merged_recipe(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A copy of recipe dict ``base`` with ``top`` laid over it: mappings merged key by key, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged_recipe(out[key], value) if nested else value
    return out


def expand_preset(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a recipe as a dict) with its ``preset`` key replaced by the preset's keys under the recipe's own."""
    if "preset" not in data:
        return data
    recipe = {k: v for k, v in data.items() if k != "preset"}
    name = data["preset"]
    if name not in RECIPE_PRESETS:
        raise RecipeError(f"preset: unknown preset {name!r} (known: {', '.join(RECIPE_PRESETS)})")
    return merged_recipe(RECIPE_PRESETS[name], recipe)
