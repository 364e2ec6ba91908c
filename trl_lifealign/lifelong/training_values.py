"""Checking a recipe's ``training`` / ``overrides`` values against ``FPOConfig`` without building one.

Building an ``FPOConfig`` initialises accelerate's device state (a side effect a multi-process launch must not see)
and accepts values that only fail mid-run (``learning_rate: -1``, a YAML string ``5e-3``). Here every value is
checked against the field's type hint, the common numeric fields against their valid range, and the FPO-specific
options with ``validate_fpo_args`` on a plain namespace, with the key path in every message.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from types import SimpleNamespace
from typing import Any, Literal, Union

from ..errors import LifeAlignError

__all__ = ["RUNNER_OWNED_FIELDS", "RecipeError", "check_training_values"]


class RecipeError(LifeAlignError, ValueError):
    """An invalid recipe / configuration value; the message starts with the key path."""


# FPOConfig / TrainingArguments fields the runner sets itself (per task) and a recipe may not.
RUNNER_OWNED_FIELDS = ("output_dir", "seed", "data_seed", "resume_from_checkpoint", "do_train", "do_eval",
                       "push_to_hub", "hub_model_id", "overwrite_output_dir")

# (low, low_is_open) per numeric field; None means "or null".
_RANGES: dict[str, tuple[float, bool]] = {
    "learning_rate": (0, True), "beta": (0, True), "num_train_epochs": (0, True), "logging_steps": (0, True),
    "per_device_train_batch_size": (1, False), "per_device_eval_batch_size": (1, False),
    "gradient_accumulation_steps": (1, False), "max_length": (1, False), "max_prompt_length": (1, False),
    "max_completion_length": (1, False), "weight_decay": (0, False), "max_grad_norm": (0, False),
    "warmup_steps": (0, False), "focal_gamma": (0, False), "dataloader_num_workers": (0, False),
    "adam_beta1": (0, False), "adam_beta2": (0, False), "adam_epsilon": (0, True),
}
_YAML_FLOAT_HINT = " (YAML 1.1 reads 5e-3 as a string: write 5.0e-3)"


@functools.lru_cache(maxsize=1)
def _fpo_fields() -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
    from trl_lifealign.fpo import FPOConfig

    fields = {f.name: f for f in dataclasses.fields(FPOConfig) if f.init}
    return fields, typing.get_type_hints(FPOConfig)


def _type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit type ``hint`` (None if it does). Unknown classes are accepted unchecked."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return None
    if origin in (Union, types.UnionType):
        errors = [_type_error(value, arg) for arg in typing.get_args(hint)]
        return None if any(e is None for e in errors) else next(e for e in errors if e)
    if hint is type(None):
        return None if value is None else "expected null"
    if origin is Literal:
        return None if value in typing.get_args(hint) else f"expected one of {list(typing.get_args(hint))}"
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number" + (_YAML_FLOAT_HINT if isinstance(value, str) else "")
        return None if math.isfinite(value) else "expected a finite number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    if origin is list or hint is list:
        if not isinstance(value, list):
            return "expected a list"
        (item,) = typing.get_args(hint) or (Any,)
        errors = [_type_error(v, item) for v in value]
        return next((f"item {i}: {e}" for i, e in enumerate(errors) if e), None)
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "expected a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        return None if value in values or isinstance(value, hint) else f"expected one of {values}"
    return None


def _range_error(name: str, value: Any) -> str | None:
    if name not in _RANGES or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, open_ = _RANGES[name]
    if (value <= low) if open_ else (value < low):
        return f"must be {'>' if open_ else '>='} {low:g}, got {value!r}"
    return None


def check_training_values(values: dict[str, Any], path: str, only: set[str] | None = None) -> None:
    """Refuse unknown, runner-owned, ill-typed or out-of-range ``FPOConfig`` values, naming ``path.key``.

    ``values`` are the merged fields a task trains with; only the keys in ``only`` (default: all) are reported, so a
    task's override is blamed on the override and a shared value on ``training``.
    """
    fields, hints = _fpo_fields()
    keys = set(values) if only is None else only
    for key in sorted(keys):
        if key in RUNNER_OWNED_FIELDS:
            raise RecipeError(f"{path}.{key}: set by the runner (use the top-level output_dir / seed)")
        if key not in fields:
            raise RecipeError(f"{path}.{key}: unknown FPOConfig field")
        value = values[key]
        problem = _type_error(value, hints[key]) or _range_error(key, value)
        if problem:
            raise RecipeError(f"{path}.{key}: {problem}, got {value!r}" if "got" not in problem
                              else f"{path}.{key}: {problem}")
    from trl_lifealign.fpo import validate_fpo_args

    defaults = {name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for name, f in fields.items()}
    try:
        validate_fpo_args(SimpleNamespace(**{**defaults, **values}))
    except ValueError as error:
        raise RecipeError(f"{path}: {error}") from None
