"""Process-group settings shared by the lifelong runner and the Axolotl plugin."""

from __future__ import annotations

import os
from typing import Any

import torch


def cpu_process_group_defaults(training_args: dict[str, Any]) -> dict[str, Any]:
    """``training_args`` with ``ddp_backend="gloo"`` added when several ranks run without CUDA (unless it is set).

    On CPU ranks accelerate only counts the processes when a backend is named; otherwise each rank believes it is
    alone and DeepSpeed refuses the batch sizes ("train_batch_size ... != micro_batch * grad_acc * world_size").
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        training_args.setdefault("ddp_backend", "gloo")
    return training_args
