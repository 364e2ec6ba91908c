"""Online elastic weight consolidation (Schwarz et al. 2018, "Progress & Compress"): the math in ``math``, the
``transformers.TrainerCallback`` in ``callback``."""

from .callback import EWCCallback, EWCState, EWCStateError, load_ewc_state

__all__ = ["EWCCallback", "EWCState", "EWCStateError", "load_ewc_state"]
