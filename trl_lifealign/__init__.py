"""trl-lifealign: lifelong preference alignment for TRL and Axolotl.

A model is aligned to one preference dataset after another without forgetting the earlier ones, after LifeAlign
(https://huggingface.co/papers/2509.17183):

- ``FPOConfig`` / ``FPOTrainer``: focalized preference optimization, a drop-in for TRL's ``DPOConfig`` / ``DPOTrainer``.
- ``MemoryConsolidationCallback``: short-to-long memory consolidation of LoRA weights at every task boundary.
- ``run_lifelong`` and friends: task sequences with replay, an evaluation matrix and reports.

Names are imported lazily so that ``import trl_lifealign`` stays cheap and needs none of the optional extras.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "FPOConfig": "trl_lifealign.fpo",
    "FPOTrainer": "trl_lifealign.fpo",
    "fpo_loss": "trl_lifealign.fpo",
    "MemoryConsolidationCallback": "trl_lifealign.slmc",
    "SLMCConfig": "trl_lifealign.slmc",
    "LifeAlignCallback": "trl_lifealign.callbacks",
    "bind_callbacks": "trl_lifealign.callbacks",
    "DataSource": "trl_lifealign.lifelong",
    "TaskSpec": "trl_lifealign.lifelong",
    "LifelongConfig": "trl_lifealign.lifelong",
    "LifelongResult": "trl_lifealign.lifelong",
    "run_lifelong": "trl_lifealign.lifelong",
    "load_recipe": "trl_lifealign.lifelong",
    "continual_metrics": "trl_lifealign.lifelong",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from trl_lifealign.callbacks import LifeAlignCallback, bind_callbacks
    from trl_lifealign.fpo import FPOConfig, FPOTrainer, fpo_loss
    from trl_lifealign.lifelong import (
        DataSource,
        LifelongConfig,
        LifelongResult,
        TaskSpec,
        continual_metrics,
        load_recipe,
        run_lifelong,
    )
    from trl_lifealign.slmc import MemoryConsolidationCallback, SLMCConfig


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trl_lifealign' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
