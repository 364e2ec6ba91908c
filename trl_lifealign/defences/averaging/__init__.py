"""Model averaging at a task boundary ("Mitigating the Alignment Tax of RLHF", arXiv 2309.06256):
the math in ``math``, the ``transformers.TrainerCallback`` in ``callback``."""

from .callback import ModelAveragingCallback

__all__ = ["ModelAveragingCallback"]
