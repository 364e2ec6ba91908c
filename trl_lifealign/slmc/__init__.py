"""SLMC: short-to-long memory consolidation of LoRA weights at task boundaries (LifeAlign, arXiv 2509.17183).

- :mod:`trl_lifealign.slmc.math`: pure tensor functions (denoise, span split, basis extension, consolidation).
- :mod:`trl_lifealign.slmc.memory`: the long-term memory on disk (bases + manifest, atomic, validated).
- :class:`MemoryConsolidationCallback`: the ``transformers.TrainerCallback`` wiring them into any Trainer.
"""

from .callback import ConsolidationReport, MemoryConsolidationCallback, NonFiniteUpdateError, consolidate_factor
from .math import (
    ConsolidationResult,
    DenoiseResult,
    consolidate_update,
    denoise_by_energy,
    extend_basis,
    split_by_span,
)
from .memory import LongTermMemory, MemoryFormatError, MemoryMismatchError, ModelSpec

__all__ = [
    "ConsolidationReport",
    "ConsolidationResult",
    "DenoiseResult",
    "LongTermMemory",
    "MemoryConsolidationCallback",
    "MemoryFormatError",
    "MemoryMismatchError",
    "ModelSpec",
    "NonFiniteUpdateError",
    "consolidate_factor",
    "consolidate_update",
    "denoise_by_energy",
    "extend_basis",
    "split_by_span",
]
