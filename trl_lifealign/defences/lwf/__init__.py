"""A KL anchor to the previous model, Learning-without-Forgetting style: the math in ``math``, the
``transformers.TrainerCallback`` in ``callback``."""

from .callback import KLAnchorCallback, KLAnchorError, load_anchor_memory

__all__ = ["KLAnchorCallback", "KLAnchorError", "load_anchor_memory"]
