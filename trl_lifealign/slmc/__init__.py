"""SLMC: short-to-long memory consolidation of LoRA weights at task boundaries (LifeAlign, arXiv 2509.17183).

- :class:`SLMCConfig`: the settings (standard library only).
- :mod:`trl_lifealign.slmc.math`: pure tensor functions (denoise, span split, basis extension, consolidation).
- :mod:`trl_lifealign.slmc.memory`: the long-term memory on disk (bases + manifest, atomic, validated).
- :class:`MemoryConsolidationCallback`: the ``transformers.TrainerCallback`` wiring them into any Trainer.

Names are resolved lazily, so that ``from trl_lifealign.slmc.config import SLMCConfig`` needs no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "SLMCConfig": "config",
    "ConsolidationReport": "callback",
    "MemoryConsolidationCallback": "callback",
    "NonFiniteUpdateError": "callback",
    "consolidate_factor": "callback",
    "ConsolidationResult": "math",
    "DenoiseResult": "math",
    "consolidate_update": "math",
    "denoise_by_energy": "math",
    "extend_basis": "math",
    "split_by_span": "math",
    "LongTermMemory": "memory",
    "MemoryFormatError": "memory",
    "MemoryMismatchError": "memory",
    "ModelSpec": "memory",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .callback import ConsolidationReport, MemoryConsolidationCallback, NonFiniteUpdateError, consolidate_factor
    from .config import SLMCConfig
    from .math import (
        ConsolidationResult,
        DenoiseResult,
        consolidate_update,
        denoise_by_energy,
        extend_basis,
        split_by_span,
    )
    from .memory import LongTermMemory, MemoryFormatError, MemoryMismatchError, ModelSpec


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trl_lifealign.slmc' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
