"""A forgetting budget: the largest step towards the trained adapter that keeps every earlier task:
the math in ``math``, the ``transformers.TrainerCallback`` in ``callback``."""

from .callback import ForgettingBudgetCallback

__all__ = ["ForgettingBudgetCallback"]
