"""What a lifelong run is: ``TaskSpec``, ``LifelongConfig`` and its settings groups, each validated on construction.

Every value a recipe can set is checked here, before any model loads, and a bad one raises ``RecipeError`` whose
message starts with the key path (``training.learning_rate: ...``). Construction has no side effects on the process.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..defences.config import (
    AveragingConfig,
    EWCConfig,
    ForgettingBudgetConfig,
    FreezeLayersConfig,
    KLAnchorConfig,
    MergingConfig,
    OLoRAConfig,
)
from ..reference import DEFAULT_REFERENCE, REFERENCE_CHOICES, Reference
from ..slmc.config import SLMCConfig
from .data import DataSource
from .replay import DEFAULT_REPLAY_CAPACITY
from .training_values import RecipeError, check_training_values

__all__ = [
    "EvalSpec", "EvaluationSettings", "LifelongConfig", "LoraSettings", "MemorySettings", "RecipeError",
    "ReplaySettings", "SFTWarmupSettings", "TaskSpec", "TORCH_DTYPES", "validate_config",
]

TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
KNOWN_SCORERS = ("bleu4", "rougeL", "judge")


def _number(value: Any, key: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            integer: bool = False) -> None:
    """Refuse ``value`` unless it is a finite number (an integer with ``integer``) within [low, high]."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise RecipeError(f"{key}: expected {kind}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise RecipeError(f"{key}: must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise RecipeError(f"{key}: must be <= {high:g}, got {value!r}")


@dataclass
class LoraSettings:
    """The LoRA adapter trained through the whole sequence (one adapter, consolidated at every task boundary)."""

    r: int = field(default=8, metadata={"help": "LoRA rank (>= 1)."})
    alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r), > 0."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout in [0, 1)."})
    target_modules: Union[list[str], str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Module names to adapt, or 'all-linear' (paper: q_proj, v_proj)."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4-bit NF4 (bitsandbytes) from `model`."}
    )

    def __post_init__(self):
        _number(self.r, "lora.r", 1, integer=True)
        _number(self.alpha, "lora.alpha", 0, low_open=True)
        _number(self.dropout, "lora.dropout", 0, 0.999)
        targets = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise RecipeError(f"lora.target_modules: expected a non-empty list of module names or 'all-linear', got "
                              f"{self.target_modules!r}")


@dataclass
class MemorySettings(SLMCConfig):
    """Short-to-long memory consolidation (SLMC) of the adapter at every task boundary: ``SLMCConfig`` + a switch."""

    enabled: bool = field(default=True, metadata={"help": "Consolidate at task boundaries (False: plain sequence)."})

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as error:
            raise RecipeError(f"memory.{error}") from None


@dataclass
class ReplaySettings:
    """Experience replay: a random `fraction` of each finished task enters a FIFO buffer mixed into later tasks."""

    fraction: float = field(default=0.0, metadata={"help": "Share of each finished task kept (0 = off; paper 0.2)."})
    capacity: int = field(default=DEFAULT_REPLAY_CAPACITY,
                          metadata={"help": "Buffer size in pairs; the oldest are dropped when full."})
    seed: int = field(default=0, metadata={"help": "Seed of the per-task random selection."})

    def __post_init__(self):
        _number(self.fraction, "replay.fraction", 0, 1)
        _number(self.capacity, "replay.capacity", 0, integer=True)
        _number(self.seed, "replay.seed", 0, integer=True)


@dataclass
class SFTWarmupSettings:
    """Optional supervised warm-up on (prompt -> chosen) before each task's preference stage (as in the paper)."""

    enabled: bool = field(default=False, metadata={"help": "Run the SFT warm-up stage before every task."})
    learning_rate: float = field(default=1e-4, metadata={"help": "SFT learning rate (paper 1e-4), > 0."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "SFT epochs per task, > 0."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "SFT batch size per device (>= 1)."})
    max_length: int = field(default=512, metadata={"help": "Truncate prompt+chosen to this many tokens (>= 1)."})

    def __post_init__(self):
        _number(self.learning_rate, "sft_warmup.learning_rate", 0, low_open=True)
        _number(self.num_train_epochs, "sft_warmup.num_train_epochs", 0, low_open=True)
        _number(self.per_device_train_batch_size, "sft_warmup.per_device_train_batch_size", 1, integer=True)
        _number(self.max_length, "sft_warmup.max_length", 1, integer=True)


@dataclass
class EvaluationSettings:
    """The evaluation matrix after every task."""

    batch_size: int = field(default=8, metadata={"help": "Pairs per forward pass when scoring log-probs (>= 1)."})
    max_rows: Union[int, None] = field(default=None, metadata={"help": "Use at most this many pairs per eval set "
                                                                        "(>= 1; null: all)."})
    max_length: int = field(default=512, metadata={"help": "Truncate prompt+response to this many tokens (>= 1)."})
    generation: bool = field(default=False, metadata={"help": "Also generate greedily and score the answers."})
    generation_rows: int = field(default=16, metadata={"help": "Prompts per eval set for generation metrics."})
    generation_cells: Literal["all", "diagonal_and_last"] = field(
        default="all", metadata={"help": "Matrix cells generated and scored: 'all', or only each task's own set and "
                                         "the last row (what BWT and Last need; much cheaper)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length for generation metrics."})
    scorers: list[str] = field(
        default_factory=lambda: ["bleu4", "rougeL"],
        metadata={"help": "Generation scorers by name: bleu4 (sacrebleu), rougeL (rouge-score), judge (an LLM judge "
                          "configured under `judge`)."},
    )
    judge: Union[dict[str, Any], None] = field(
        default=None, metadata={"help": "LLM-judge settings (backend, model, ...), needed when scorers lists judge."}
    )

    def __post_init__(self):
        _number(self.batch_size, "evaluation.batch_size", 1, integer=True)
        if self.max_rows is not None:
            _number(self.max_rows, "evaluation.max_rows", 1, integer=True)
        _number(self.max_length, "evaluation.max_length", 1, integer=True)
        _number(self.generation_rows, "evaluation.generation_rows", 1, integer=True)
        _number(self.max_new_tokens, "evaluation.max_new_tokens", 1, integer=True)
        if self.generation_cells not in ("all", "diagonal_and_last"):
            raise RecipeError(f"evaluation.generation_cells: expected 'all' or 'diagonal_and_last', got "
                              f"{self.generation_cells!r}")
        for scorer in self.scorers:
            if scorer not in KNOWN_SCORERS:
                raise RecipeError(f"evaluation.scorers: unknown scorer {scorer!r} (known: {', '.join(KNOWN_SCORERS)})")
        if "judge" in self.scorers:
            if self.judge is None:
                raise RecipeError("evaluation.judge: required when evaluation.scorers lists 'judge'")
            from .judge import validate_config as validate_judge

            try:
                validate_judge(self.judge)
            except ValueError as error:
                raise RecipeError(f"evaluation.judge: {error}") from None


@dataclass
class EvalSpec:
    """A named evaluation set, given independently of the training stages."""

    name: str = field(metadata={"help": "Column name in the evaluation matrix."})
    source: DataSource = field(metadata={"help": "The evaluation pairs."})


@dataclass
class BudgetSettings(ForgettingBudgetConfig):
    """The forgetting budget plus the pairs it monitors: one set per task, in task order, disjoint from the eval
    sets the matrix is scored on (the budget holds on what it monitors; the matrix shows how far it generalises)."""

    monitor_sets: list[EvalSpec] = field(default_factory=list,
                                         metadata={"help": "One {name, source} per task, in task order."})


_DEFENCE_CONFIGS = {"averaging": AveragingConfig, "ewc": EWCConfig, "kl_anchor": KLAnchorConfig,
                    "freeze_layers": FreezeLayersConfig, "olora": OLoRAConfig, "merging": MergingConfig,
                    "forgetting_budget": BudgetSettings}


@dataclass
class DefencesSettings:
    """Continual-learning defences beyond LifeAlign (each off unless its section is given); see README "Which defence
    should I use?"."""

    averaging: Union[AveragingConfig, None] = field(default=None, metadata={"help": "Model averaging at boundaries."})
    ewc: Union[EWCConfig, None] = field(default=None, metadata={"help": "Online EWC on the LoRA factors."})
    kl_anchor: Union[KLAnchorConfig, None] = field(default=None, metadata={"help": "KL anchor on earlier prompts."})
    freeze_layers: Union[FreezeLayersConfig, None] = field(default=None, metadata={"help": "Freeze the lowest layers."})
    olora: Union[OLoRAConfig, None] = field(default=None, metadata={"help": "O-LoRA: one adapter per task."})
    merging: Union[MergingConfig, None] = field(default=None, metadata={"help": "Merge per-task adapters (PEFT)."})
    forgetting_budget: Union[BudgetSettings, None] = field(default=None, metadata={"help": "A forgetting budget."})

    def enabled(self) -> list[str]:
        return [name for name in _DEFENCE_CONFIGS if getattr(self, name) is not None]


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


@dataclass
class LifelongConfig:
    """Everything a lifelong run needs. Defaults: reference `previous_task`, θ=0.9, λ=0.5, γ=2, replay off, no SFT
    warm-up, optimizer reset at every task, bad rows are errors, chat template applied when the tokenizer has one.
    """

    output_dir: str = field(metadata={"help": "Run directory (resumed when it holds a run of the same recipe)."})
    tasks: list[TaskSpec] = field(metadata={"help": "The tasks, in training order."})
    model: Union[str, None] = field(
        default=None, metadata={"help": "Model path, hub id, or a built-in name such as 'smollm2' (None: pass an "
                                        "in-memory model to run_lifelong)."}
    )
    tokenizer: Union[str, None] = field(default=None, metadata={"help": "Tokenizer path or id (default: `model`)."})
    torch_dtype: str = field(default="float32",
                             metadata={"help": f"Dtype to load `model` in ({', '.join(TORCH_DTYPES)})."})
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
    defences: DefencesSettings = field(default_factory=DefencesSettings,
                                       metadata={"help": "Defences beyond LifeAlign (averaging, EWC, KL anchor, ...)."})
    optimizer: Literal["reset", "carry"] = field(
        default="reset", metadata={"help": "'reset': fresh AdamW per task; 'carry': moments carried to the next task."}
    )
    chat_template: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "Turn plain-string pairs into a user turn and assistant turns so the tokenizer's chat "
                          "template formats them: 'auto' when the tokenizer has a chat template."},
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip (and count) invalid records, not error."})
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings, metadata={"help": "Evaluation."})
    eval_sets: Union[list[EvalSpec], None] = field(
        default=None, metadata={"help": "Evaluation sets (default: every task's `eval`, in task order)."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed (>= 0); task i trains with seed + i."})

    def __post_init__(self):
        validate_config(self)

    def resolved_eval_sets(self) -> list[EvalSpec]:
        """The evaluation columns: `eval_sets` if given, else each task's eval split."""
        if self.eval_sets is not None:
            return list(self.eval_sets)
        return [EvalSpec(name=task.name, source=task.eval) for task in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_names(names: list[str], what: str) -> None:
    for index, name in enumerate(names):
        if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name):
            raise RecipeError(f"{what}[{index}].name: must be 1-100 letters, digits or ._+- (starting with a letter "
                              f"or digit), got {name!r}")
        if name in names[:index]:
            raise RecipeError(f"{what}[{index}].name: must be unique, {name!r} is repeated")


def validate_config(config: LifelongConfig) -> None:
    """Cross-field and value checks (types are checked when loading from a dict)."""
    if not config.tasks:
        raise RecipeError("tasks: at least one task is required")
    _check_names([task.name for task in config.tasks], "tasks")
    if config.torch_dtype not in TORCH_DTYPES:
        raise RecipeError(f"torch_dtype: expected one of {', '.join(TORCH_DTYPES)}, got {config.torch_dtype!r}")
    _number(config.seed, "seed", 0, 2**32 - 1 - len(config.tasks), integer=True)
    check_training_values(config.training, "training")
    for index, task in enumerate(config.tasks):
        check_training_values({**config.training, **task.overrides}, f"tasks[{index}].overrides",
                              only=set(task.overrides))
        if isinstance(task.train, list) and not task.train:
            raise RecipeError(f"tasks[{index}].train: empty list")
        if config.eval_sets is None and task.eval is None:
            raise RecipeError(f"tasks[{index}].eval: required when no top-level eval_sets are given")
    if config.eval_sets is not None:
        if not config.eval_sets:
            raise RecipeError("eval_sets: at least one set is required")
        _check_names([spec.name for spec in config.eval_sets], "eval_sets")
    if config.reference not in REFERENCE_CHOICES:
        raise RecipeError(f"reference: expected one of {', '.join(map(repr, REFERENCE_CHOICES))}, got "
                          f"{config.reference!r}")
    if config.optimizer not in ("reset", "carry"):
        raise RecipeError(f"optimizer: expected one of 'reset', 'carry', got {config.optimizer!r}")
    if config.chat_template not in ("auto", "always", "never"):
        raise RecipeError(f"chat_template: expected one of 'auto', 'always', 'never', got {config.chat_template!r}")
    _check_defences(config)


# Defences that act on the one `default` adapter, which O-LoRA freezes after the first task.
_SINGLE_ADAPTER = ("averaging", "ewc", "kl_anchor", "freeze_layers", "merging", "forgetting_budget")


def _check_defences(config: LifelongConfig) -> None:
    """The combinations that cannot work, refused with the reason."""
    defences = config.defences
    if defences.kl_anchor is not None and config.reference != "previous_task":
        raise RecipeError("defences.kl_anchor: needs reference: previous_task (the anchor is the policy as each task "
                          "starts, TRL's frozen 'ref' adapter)")
    if defences.olora is not None:
        if config.reference != "base":
            raise RecipeError("defences.olora: needs reference: base (with one adapter per task, TRL's 'ref' copy of "
                              "the default adapter is not the policy as the task starts)")
        if config.optimizer == "carry":
            raise RecipeError("defences.olora: cannot be combined with optimizer: carry (each task trains a freshly "
                              "initialised adapter, so the previous task's AdamW moments do not belong to it)")
        clash = [name for name in _SINGLE_ADAPTER if getattr(defences, name) is not None]
        if config.memory.enabled or clash:
            raise RecipeError(f"defences.olora: cannot be combined with {clash or ['memory (SLMC)']}: O-LoRA keeps "
                              "each "
                              "task in an adapter of its own, the others act on one adapter across tasks")
    budget = defences.forgetting_budget
    if budget is not None and len(budget.monitor_sets) != len(config.tasks):
        raise RecipeError(f"defences.forgetting_budget.monitor_sets: one set per task ({len(config.tasks)}), got "
                          f"{len(budget.monitor_sets)}")
