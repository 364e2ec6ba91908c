"""Focalized preference optimization (FPO): a drop-in replacement for TRL's DPOConfig / DPOTrainer.

`fpo_loss` is pure tensor math (`trl_lifealign.fpo.loss` imports only torch); `FPOConfig` / `FPOTrainer` are the TRL
plumbing around it; `FPOLossMixin` gives the loss to any other `trl.DPOTrainer` subclass (e.g. Axolotl's). Names are
resolved lazily so that importing the loss alone does not import trl.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "fpo_loss": "trl_lifealign.fpo.loss",
    "FPOConfig": "trl_lifealign.fpo.config",
    "validate_fpo_args": "trl_lifealign.fpo.config",
    "FPOLossMixin": "trl_lifealign.fpo.trainer",
    "FPOTrainer": "trl_lifealign.fpo.trainer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .config import FPOConfig, validate_fpo_args
    from .loss import fpo_loss
    from .trainer import FPOLossMixin, FPOTrainer


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trl_lifealign.fpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
