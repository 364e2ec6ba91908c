"""Adapter merging at task boundaries with PEFT's own ``add_weighted_adapter`` (linear, TIES, DARE): see
``callback``."""

from .callback import AdapterMergingCallback

__all__ = ["AdapterMergingCallback"]
