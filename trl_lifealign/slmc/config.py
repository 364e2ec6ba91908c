"""``SLMCConfig``: the single home of memory consolidation's settings, their defaults and their valid ranges.

Taken by ``MemoryConsolidationCallback``, the lifelong recipe (its ``memory:`` section), the Axolotl plugin (its
``lifealign_*`` keys) and the benchmark. Standard library only, so YAML schemas import it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = ["DEFAULT_BASIS_REL_TOL", "MEMORY_KINDS", "SLMCConfig"]

DEFAULT_BASIS_REL_TOL = 1e-4
"""Relative residual norm below which a consolidated update adds no new basis direction (float32 rounding of a
Gram-Schmidt step is ~1e-6 relative; genuinely new directions in practice are far above 1e-4)."""

MEMORY_KINDS = ("paper", "subspace")


def _check_fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}: must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class SLMCConfig:
    """Short-to-long memory consolidation (LifeAlign's SLMC) of LoRA factors at every task boundary."""

    energy_threshold: float = field(
        default=0.9,
        metadata={"help": "θ in [0, 1]: share of the update's spectral energy Σσ² kept by SVD denoising (1 keeps "
                          "everything, 0 keeps rank 1)."},
    )
    overlap_weight: float = field(
        default=0.5,
        metadata={"help": "λ in [0, 1]: weight of the update's part lying in earlier tasks' memory (1 keeps it, 0 "
                          "keeps only the part orthogonal to every earlier task)."},
    )
    basis_rel_tol: float = field(
        default=DEFAULT_BASIS_REL_TOL,
        metadata={"help": "An update whose residual outside the memory is below this share of its norm adds no "
                          "memory direction (in (0, 1))."},
    )
    adapter_names: Union[list[str], None] = field(
        default=None,
        metadata={"help": "LoRA adapters to consolidate (default: the model's active adapters except TRL's frozen "
                          "'ref')."},
    )
    memory_kind: Literal["paper", "subspace"] = field(
        default="paper",
        metadata={"help": "'paper': one flattened direction per task and factor (LifeAlign); 'subspace': per factor "
                          "an orthonormal basis of the leading singular directions of each task's update (its row "
                          "space for lora_A, column space for lora_B), rank chosen by θ."},
    )
    project_steps: bool = field(
        default=False,
        metadata={"help": "'subspace' memory only: also remove every optimizer step's change of a factor lying in the "
                          "stored subspace (gradient projection during training, as in GPM), not only at the "
                          "boundary. The boundary then finds nothing inside the subspace, so overlap_weight (λ) "
                          "has no effect."},
    )

    def __post_init__(self):
        self.energy_threshold = _check_fraction(self.energy_threshold, "energy_threshold")
        self.overlap_weight = _check_fraction(self.overlap_weight, "overlap_weight")
        tol = self.basis_rel_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol < 1.0:
            raise ValueError(f"basis_rel_tol: must be a number in (0, 1), got {tol!r}")
        self.basis_rel_tol = float(tol)
        if isinstance(self.adapter_names, str):
            self.adapter_names = [self.adapter_names]
        if self.adapter_names is not None:
            if not self.adapter_names or not all(isinstance(n, str) and n for n in self.adapter_names):
                raise ValueError(f"adapter_names: must be a non-empty list of adapter names, got "
                                 f"{self.adapter_names!r}")
            if "ref" in self.adapter_names:
                raise ValueError("adapter_names: 'ref' is TRL's frozen reference copy; it cannot be consolidated")
        if self.memory_kind not in MEMORY_KINDS:
            raise ValueError(f"memory_kind: must be one of {MEMORY_KINDS}, got {self.memory_kind!r}")
        if not isinstance(self.project_steps, bool):
            raise ValueError(f"project_steps: must be true or false, got {self.project_steps!r}")
        if self.project_steps and self.memory_kind != "subspace":
            raise ValueError("project_steps: needs memory_kind='subspace' (the paper's memory has no per-factor "
                             "subspace to project steps against)")
