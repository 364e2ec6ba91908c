"""O-LoRA (arXiv 2310.14152): orthogonality between the new task's LoRA A and the earlier ones:
the math in ``math``, the ``transformers.TrainerCallback`` in ``callback``."""

from .callback import OLoRACallback, load_olora_model

__all__ = ["OLoRACallback", "load_olora_model"]
