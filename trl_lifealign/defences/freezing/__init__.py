"""Layer freezing against "spurious forgetting" (arXiv 2501.13453): the math in ``math``, the
``transformers.TrainerCallback`` in ``callback``."""

from .callback import FreezeLayersCallback

__all__ = ["FreezeLayersCallback"]
