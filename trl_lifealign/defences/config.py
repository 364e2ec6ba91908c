"""The settings of every defence, one dataclass each, validated on construction (standard library only: recipe and
Axolotl schemas import them without torch). A ``ValueError`` message starts with the field name."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = ["AveragingConfig", "EWCConfig", "ForgettingBudgetConfig", "FreezeLayersConfig", "KLAnchorConfig",
           "MergingConfig", "OLoRAConfig"]


def _number(value: Any, key: str, low: float, high: float | None = None, *, low_open: bool = False,
            integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ValueError(f"{key}: expected {'an integer' if integer else 'a finite number'}, got {value!r}")
    if (value <= low) if low_open else (value < low):
        raise ValueError(f"{key}: must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{key}: must be <= {high:g}, got {value!r}")


@dataclass
class AveragingConfig:
    """Model averaging at each task boundary ("Mitigating the Alignment Tax of RLHF", arXiv 2309.06256): the adapter
    becomes start + α·(trained − start)."""

    alpha: float = field(default=0.5,
                         metadata={"help": "α in [0, 1]: 1 keeps the trained adapter, 0 the task's start."})
    per_layer: Union[dict[str, float], None] = field(
        default=None, metadata={"help": "α per decoder layer: {'0-3': 0.3, '12-': 0.8, '5': 1.0} (others: alpha)."})
    space: Literal["product", "factors"] = field(
        default="product", metadata={"help": "'product': exact on ΔW = s·B·A, re-factorised to rank r; 'factors': "
                                             "interpolate lora_A and lora_B separately."})

    def __post_init__(self):
        _number(self.alpha, "alpha", 0, 1)
        for key, value in (self.per_layer or {}).items():
            _number(value, f"per_layer[{key!r}]", 0, 1)
        if self.space not in ("product", "factors"):
            raise ValueError(f"space: expected 'product' or 'factors', got {self.space!r}")


@dataclass
class EWCConfig:
    """Online EWC on the LoRA factors (Schwarz et al. 2018): a diagonal Fisher from the finished tasks' preference
    loss anchors later tasks through a quadratic penalty."""

    strength: float = field(default=1000.0, metadata={"help": "Penalty weight (λ of (λ/2)·Σ F·(θ−θ*)²), > 0."})
    decay: float = field(default=0.9, metadata={"help": "γ in [0, 1]: F ← γ·F_old + F_task."})
    fisher_batches: int = field(default=16, metadata={"help": "Training batches of a finished task the Fisher is "
                                                              "estimated on (>= 1)."})

    def __post_init__(self):
        _number(self.strength, "strength", 0, low_open=True)
        _number(self.decay, "decay", 0, 1)
        _number(self.fisher_batches, "fisher_batches", 1, integer=True)


@dataclass
class KLAnchorConfig:
    """A KL anchor on a prompt-only memory (LwF): earlier tasks' prompts with the previous policy's own greedy
    answers; later tasks add the token-level KL(π_start ‖ π_θ) on them to the loss. Keeps no preference labels."""

    # The KL on the policy's own answers stays small (0.01-0.05 nats per token on the benchmark's tiny model, against
    # a DPO loss of 0.5-0.8), so the term needs a weight near 10 to matter; 0.1 changed nothing there.
    weight: float = field(default=10.0, metadata={"help": "Weight of the KL term in the loss, > 0."})
    prompts_per_task: int = field(default=32, metadata={"help": "Prompts kept from each finished task (>= 1)."})
    capacity: int = field(default=256, metadata={"help": "Prompts kept in all (FIFO), >= 1."})
    max_new_tokens: int = field(default=48, metadata={"help": "Length of the stored greedy answers (>= 1)."})
    batch_size: int = field(default=4, metadata={"help": "Anchor prompts per training batch (>= 1)."})

    def __post_init__(self):
        _number(self.weight, "weight", 0, low_open=True)
        for key in ("prompts_per_task", "capacity", "max_new_tokens", "batch_size"):
            _number(getattr(self, key), key, 1, integer=True)


@dataclass
class FreezeLayersConfig:
    """Layer freezing after the first task ("spurious forgetting", arXiv 2501.13453): the LoRA factors of the lowest
    ``num_layers`` decoder layers stay as the first task left them."""

    num_layers: int = field(default=4, metadata={"help": "Lowest decoder layers kept fixed after the first task."})

    def __post_init__(self):
        _number(self.num_layers, "num_layers", 1, integer=True)


@dataclass
class OLoRAConfig:
    """O-LoRA (arXiv 2310.14152): a new LoRA adapter per task, earlier ones frozen and kept active, and an
    orthogonality penalty between the new adapter's lora_A and the earlier ones'."""

    orthogonality: float = field(default=0.5, metadata={"help": "Weight λ₁ of Σ‖A_new·A_iᵀ‖², >= 0."})

    def __post_init__(self):
        _number(self.orthogonality, "orthogonality", 0)


MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")


@dataclass
class MergingConfig:
    """Merging of per-task adapters at each boundary with PEFT's ``add_weighted_adapter``: every task trains its own
    copy of the merged adapter, then all task adapters are merged again."""

    method: Literal["linear", "ties", "dare_linear", "dare_ties"] = field(
        default="ties", metadata={"help": "PEFT combination type: linear, ties, dare_linear or dare_ties."})
    density: float = field(default=0.5, metadata={"help": "Share of each task vector kept by TIES/DARE, in (0, 1]."})

    def __post_init__(self):
        if self.method not in MERGE_METHODS:
            raise ValueError(f"method: expected one of {MERGE_METHODS}, got {self.method!r}")
        _number(self.density, "density", 0, 1, low_open=True)


@dataclass
class ForgettingBudgetConfig:
    """A forgetting budget: after each task, if an earlier task's score on its monitor set dropped by more than
    ``budget`` points below the score it had after its own training, the adapter is pulled back toward the task's
    start by the largest step α that keeps every earlier task within budget (a short search on the monitor sets)."""

    budget: float = field(default=2.0, metadata={"help": "Allowed drop in points of preference accuracy, > 0."})
    max_evaluations: int = field(default=6, metadata={"help": "Evaluations of the monitor sets per search (>= 2)."})
    space: Literal["product", "factors"] = field(default="product", metadata={"help": "As for averaging."})

    def __post_init__(self):
        _number(self.budget, "budget", 0, 100, low_open=True)
        _number(self.max_evaluations, "max_evaluations", 2, integer=True)
        if self.space not in ("product", "factors"):
            raise ValueError(f"space: expected 'product' or 'factors', got {self.space!r}")
