"""Run configuration: `TaskSpec`, `LifelongConfig` and the settings groups, plus loading them from a recipe YAML.

A recipe YAML mirrors `LifelongConfig` field for field (see recipes/lifelong/*.yaml). Loading validates every key:
an unknown key or a value of the wrong type is refused with its path, e.g. `tasks[1].train.path: expected a string`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from ..reference import DEFAULT_REFERENCE, REFERENCE_CHOICES, Reference
from .data import DataSource


class RecipeError(ValueError):
    """An invalid recipe / configuration value; the message starts with the key path."""


@dataclass
class LoraSettings:
    """The LoRA adapter trained through the whole sequence (one adapter, consolidated at every task boundary)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    target_modules: Union[list[str], str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Module names to adapt, or 'all-linear' (paper: q_proj, v_proj)."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4-bit NF4 (bitsandbytes) from `model`."}
    )


@dataclass
class MemorySettings:
    """Short-to-long memory consolidation (SLMC) of the adapter at every task boundary."""

    enabled: bool = field(default=True, metadata={"help": "Consolidate at task boundaries (False: plain sequence)."})
    energy_threshold: float = field(default=0.9, metadata={"help": "θ: share of the update's energy kept (SVD)."})
    overlap_weight: float = field(
        default=0.5, metadata={"help": "λ: weight of the update part overlapping earlier tasks' memory (0..1)."}
    )


@dataclass
class ReplaySettings:
    """Experience replay: a random `fraction` of each finished task enters a FIFO buffer mixed into later tasks."""

    fraction: float = field(default=0.0, metadata={"help": "Share of each finished task kept (0 = off; paper 0.2)."})
    capacity: int = field(default=1000, metadata={"help": "Buffer size in pairs; the oldest are dropped when full."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-task random selection."})


@dataclass
class SFTWarmupSettings:
    """Optional supervised warm-up on (prompt -> chosen) before each task's preference stage (as in the paper)."""

    enabled: bool = field(default=False, metadata={"help": "Run the SFT warm-up stage before every task."})
    learning_rate: float = field(default=1e-4, metadata={"help": "SFT learning rate (paper 1e-4)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "SFT epochs per task."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "SFT batch size per device."})
    max_length: int = field(default=512, metadata={"help": "Truncate prompt+chosen to this many tokens."})


@dataclass
class EvaluationSettings:
    """The evaluation matrix after every task."""

    batch_size: int = field(default=8, metadata={"help": "Pairs per forward pass when scoring log-probs."})
    max_rows: Union[int, None] = field(default=None, metadata={"help": "Use at most this many pairs per eval set."})
    max_length: int = field(default=512, metadata={"help": "Truncate prompt+response to this many tokens."})
    generation: bool = field(default=False, metadata={"help": "Also generate greedily and score BLEU-4 / ROUGE-L."})
    generation_rows: int = field(default=16, metadata={"help": "Prompts per eval set for generation metrics."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length for generation metrics."})
    scorers: list[str] = field(
        default_factory=lambda: ["bleu4", "rougeL"],
        metadata={"help": "Generation scorers by name (bleu4: sacrebleu, rougeL: rouge-score)."},
    )


@dataclass
class EvalSpec:
    """A named evaluation set, given independently of the training stages."""

    name: str = field(metadata={"help": "Column name in the evaluation matrix."})
    source: DataSource = field(metadata={"help": "The evaluation pairs."})


@dataclass
class TaskSpec:
    """One task of the sequence: its training data, its evaluation data and its training overrides."""

    name: str = field(metadata={"help": "Task name (used in directories, reports and plots)."})
    train: Union[DataSource, list[DataSource]] = field(
        metadata={"help": "Training data; a list trains one stage on all the sources (e.g. a multi-task bound)."}
    )
    eval: Union[DataSource, None] = field(default=None, metadata={"help": "This task's evaluation split."})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "FPOConfig fields for this task only, e.g. {num_train_epochs: 2}."}
    )

    def train_sources(self) -> list[DataSource]:
        return self.train if isinstance(self.train, list) else [self.train]


# FPOConfig / TrainingArguments fields the runner sets itself (per task) and a recipe may not.
RUNNER_OWNED_FIELDS = ("output_dir", "seed", "data_seed", "resume_from_checkpoint", "do_train", "do_eval",
                       "push_to_hub", "hub_model_id", "overwrite_output_dir")


@dataclass
class LifelongConfig:
    """Everything a lifelong run needs. Defaults: reference `base`, θ=0.9, λ=0.5, γ=2, replay off, no SFT warm-up,
    optimizer reset at every task, bad rows are errors.
    """

    output_dir: str = field(metadata={"help": "Run directory (resumed when it holds a run of the same recipe)."})
    tasks: list[TaskSpec] = field(metadata={"help": "The tasks, in training order."})
    model: Union[str, None] = field(
        default=None, metadata={"help": "Model path or hub id (None: pass an in-memory model to run_lifelong)."}
    )
    tokenizer: Union[str, None] = field(default=None, metadata={"help": "Tokenizer path or id (default: `model`)."})
    torch_dtype: str = field(default="float32", metadata={"help": "Dtype to load `model` in (float32, bfloat16...)."})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA / QLoRA settings."})
    training: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "FPOConfig fields shared by all tasks (learning_rate, beta, focal_gamma, ...)."},
    )
    memory: MemorySettings = field(default_factory=MemorySettings, metadata={"help": "SLMC settings."})
    reference: Reference = field(
        default=DEFAULT_REFERENCE,
        metadata={"help": "Reference policy: 'previous_task' (the policy as the task starts, the default) or 'base' "
                          "(adapter disabled, as in LifeAlign's official code)."},
    )
    replay: ReplaySettings = field(default_factory=ReplaySettings, metadata={"help": "Replay buffer settings."})
    sft_warmup: SFTWarmupSettings = field(default_factory=SFTWarmupSettings, metadata={"help": "SFT warm-up."})
    optimizer: Literal["reset", "carry"] = field(
        default="reset", metadata={"help": "'reset': fresh AdamW per task; 'carry': moments carried to the next task."}
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip (and count) invalid records, not error."})
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings, metadata={"help": "Evaluation."})
    eval_sets: Union[list[EvalSpec], None] = field(
        default=None, metadata={"help": "Evaluation sets (default: every task's `eval`, in task order)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; task i trains with seed + i."})

    def __post_init__(self):
        validate_config(self)

    def resolved_eval_sets(self) -> list[EvalSpec]:
        """The evaluation columns: `eval_sets` if given, else each task's eval split."""
        if self.eval_sets is not None:
            return list(self.eval_sets)
        return [EvalSpec(name=task.name, source=task.eval) for task in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fpo_config_fields() -> dict[str, dataclasses.Field]:
    from trl_lifealign.fpo import FPOConfig

    return {f.name: f for f in dataclasses.fields(FPOConfig) if f.init}


def validate_training_fields(values: dict[str, Any], path: str) -> None:
    """Refuse keys that are not FPOConfig fields, or that the runner owns."""
    known = _fpo_config_fields()
    for key in values:
        if key in RUNNER_OWNED_FIELDS:
            raise RecipeError(f"{path}.{key}: set by the runner (use the top-level output_dir / seed)")
        if key not in known:
            raise RecipeError(f"{path}.{key}: unknown FPOConfig field")


def _check_fpo_values(config: LifelongConfig) -> None:
    """Build each task's FPOConfig once so bad values fail now, not after hours of earlier tasks."""
    import tempfile

    from trl_lifealign.fpo import FPOConfig

    # Only in a single process: a TrainingArguments built here (use_cpu, no DeepSpeed) would reset the shared
    # accelerate state of a launched multi-process run; there, the same errors surface when each task starts.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    saved = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    try:
        for index, task in enumerate(config.tasks):
            where = f"tasks[{index}].overrides" if task.overrides else "training"
            values = {**config.training, **task.overrides}
            values.pop("deepspeed", None)
            try:
                FPOConfig(output_dir=tempfile.gettempdir(), **{"use_cpu": True, **values})
            except (ValueError, TypeError) as error:
                raise RecipeError(f"{where}: {error}") from error
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = saved


def validate_config(config: LifelongConfig) -> None:
    """Cross-field checks (types are checked when loading from a dict)."""
    if not config.tasks:
        raise RecipeError("tasks: at least one task is required")
    names = [task.name for task in config.tasks]
    for index, name in enumerate(names):
        if not name or "/" in name or name in names[:index]:
            raise RecipeError(f"tasks[{index}].name: must be non-empty, unique and contain no '/' (got {name!r})")
    validate_training_fields(config.training, "training")
    for index, task in enumerate(config.tasks):
        validate_training_fields(task.overrides, f"tasks[{index}].overrides")
        if isinstance(task.train, list) and not task.train:
            raise RecipeError(f"tasks[{index}].train: empty list")
        if config.eval_sets is None and task.eval is None:
            raise RecipeError(f"tasks[{index}].eval: required when no top-level eval_sets are given")
    _check_fpo_values(config)
    if config.eval_sets is not None:
        eval_names = [spec.name for spec in config.eval_sets]
        if len(set(eval_names)) != len(eval_names) or not eval_names:
            raise RecipeError(f"eval_sets: names must be unique and at least one set given (got {eval_names})")
    if config.reference not in REFERENCE_CHOICES:
        raise RecipeError(f"reference: expected 'base' or 'previous_task', got {config.reference!r}")
    if config.optimizer not in ("reset", "carry"):
        raise RecipeError(f"optimizer: expected 'reset' or 'carry', got {config.optimizer!r}")
    if not 0.0 <= config.memory.energy_threshold <= 1.0:
        raise RecipeError(f"memory.energy_threshold: must be in [0, 1], got {config.memory.energy_threshold}")
    if not 0.0 <= config.memory.overlap_weight <= 1.0:
        raise RecipeError(f"memory.overlap_weight: must be in [0, 1], got {config.memory.overlap_weight}")
    if not 0.0 <= config.replay.fraction <= 1.0:
        raise RecipeError(f"replay.fraction: must be in [0, 1], got {config.replay.fraction}")
    if config.replay.capacity < 0:
        raise RecipeError(f"replay.capacity: must be >= 0, got {config.replay.capacity}")
    if config.lora.r <= 0:
        raise RecipeError(f"lora.r: must be positive, got {config.lora.r}")
    for scorer in config.evaluation.scorers:
        if scorer not in ("bleu4", "rougeL"):
            raise RecipeError(f"evaluation.scorers: unknown scorer {scorer!r} (known: bleu4, rougeL)")


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
            raise RecipeError(f"{path}: expected a number")
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
        raise RecipeError(f"{where}: {error}") from error


def load_recipe(path: str | Path) -> LifelongConfig:
    """Read a recipe YAML into a validated `LifelongConfig`.

    Relative data paths and a relative `output_dir` are resolved against the recipe's folder.
    """
    import yaml

    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
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
    for spec in data.get("eval_sets") or []:
        if isinstance(spec, dict):
            resolve_source(spec.get("source"))
    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = resolve(data["output_dir"])
    for key in ("model", "tokenizer"):  # a relative model path that exists locally beats a hub id
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            data[key] = str(base / value)
    try:
        return from_dict(LifelongConfig, data)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from error
