"""Recipe YAML -> `LifelongConfig`: typed construction from plain dicts with the key path in every error.

A recipe YAML mirrors `LifelongConfig` (see `trl_lifealign.lifelong.config`) field for field. Loading validates every
key and value before any model loads: an unknown key, a value of the wrong type or out of range is refused with its
path, e.g. `tasks[1].train.path: expected a string`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from .config import (  # noqa: F401  (re-exported: the recipe's schema)
    EvalSpec,
    EvaluationSettings,
    LifelongConfig,
    LoraSettings,
    MemorySettings,
    ReplaySettings,
    SFTWarmupSettings,
    TaskSpec,
)
from .presets import expand_preset
from .training_values import RecipeError

# ----------------------------------------------------------------------------------------------------------------
# Typed construction from plain dicts (YAML), with key paths in every error.

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a mapping",
               list: "a list"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except RecipeError as error:
                errors.append(error)
        # A mapping that matched the dataclass member but failed inside: report the inner, more precise error.
        for error in errors:
            if not str(error).startswith(f"{path}: expected"):
                raise error
        raise RecipeError(f"{path}: expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{path}: expected {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list")
        (item_type,) = typing.get_args(tp)
        return [_convert(item, item_type, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping")
        key_type, value_type = typing.get_args(tp)
        return {_convert(k, key_type, f"{path}.{k}"): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (YAML 1.1 reads 5e-3 as a string: write 5.0e-3)" if isinstance(value, str) else ""
            raise RecipeError(f"{path}: expected a number, got {value!r}{hint}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string")
        return value
    raise RecipeError(f"{path}: unsupported type {tp!r}")  # a schema bug, not a user error


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types with the key path."""
    where = path or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise RecipeError(f"{key_path}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _convert(value, hints[key], key_path)
    missing = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as error:
        key, sep, rest = str(error).partition(": ")
        if sep and key in fields:  # "field: message" from a config's own validation: name the full key path
            raise RecipeError(f"{where}.{key}: {rest}" if path else f"{key}: {rest}") from error
        raise RecipeError(f"{where}: {error}") from error


def load_recipe(path: str | Path) -> LifelongConfig:
    """Read a recipe YAML into a validated `LifelongConfig`.

    Relative data paths and a relative `output_dir` are resolved against the recipe's folder.
    """
    import yaml

    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{path}: not a readable UTF-8 YAML file ({error})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a YAML mapping")
    base = path.resolve().parent

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(base / value)
        return value

    def resolve_source(source: Any) -> None:
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            source["path"] = resolve(source["path"])

    for task in data.get("tasks") or []:
        if isinstance(task, dict):
            train = task.get("train")
            for source in train if isinstance(train, list) else [train]:
                resolve_source(source)
            resolve_source(task.get("eval"))
    budget = (data.get("defences") or {}).get("forgetting_budget") if isinstance(data.get("defences"), dict) else None
    monitor_sets = budget.get("monitor_sets") if isinstance(budget, dict) else None
    for spec in [*(data.get("eval_sets") or []), *(monitor_sets if isinstance(monitor_sets, list) else [])]:
        if isinstance(spec, dict):
            resolve_source(spec.get("source"))
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = resolve(data["output_dir"])
    for key in ("model", "tokenizer"):  # a relative model path that exists locally beats a hub id
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            data[key] = str(base / value)
    try:
        return from_dict(LifelongConfig, expand_preset(data))
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from error
