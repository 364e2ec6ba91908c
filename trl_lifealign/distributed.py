"""The one distributed layer: ranks, collectives and full access to sharded LoRA parameters.

Everything in the package that must know whether it runs on several ranks, or whether a parameter is a shard, asks
here: the memory-consolidation callback, the lifelong runner, the evaluation, the defences and the Axolotl trainer.

Sharding schemes and how a full value is read and written (every rank must call the collectives):

- DeepSpeed ZeRO-3: the parameter holds an empty local tensor and carries ``ds_id``; :func:`gathered` brings the
  full value to every rank (``GatheredParameters``) and keeps rank 0's writes on exit.
- DeepSpeed ZeRO-1/2/3 and the bf16 optimizer keep an fp32 *master copy* the next optimizer step writes back into the
  module weights: reads prefer it and writes update it (``safe_get/set_full_fp32_param``).
- PyTorch FSDP2 (``fully_shard``): the parameter is a ``DTensor``; ``full_tensor()`` all-gathers it and a write
  redistributes the full value with the parameter's own mesh and placements. The sharded parameter *is* what the
  optimizer updates, so there is no separate master copy.
- FSDP1 (flat parameters) cannot be read or written per LoRA factor and is refused by :func:`check_sharding_supported`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .errors import LifeAlignError

__all__ = [
    "UnsupportedShardingError",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "broadcast_tensor_",
    "check_sharding_supported",
    "cpu_process_group_defaults",
    "full_shape",
    "gathered",
    "is_dtensor",
    "is_main_process",
    "is_sharded",
    "rank",
    "read_full_fp32",
    "refuse_sharded_training",
    "uses_deepspeed",
    "world_size",
    "write_full",
]


class UnsupportedShardingError(LifeAlignError, RuntimeError):
    """The model is sharded in a way whose LoRA factors cannot be read and written exactly."""


# ------------------------------------------------------------------------------------------------------- ranks


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank: from the process group once it exists, else from the launcher's ``RANK``."""
    return torch.distributed.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks: from the process group once it exists, else from the launcher's ``WORLD_SIZE``."""
    return torch.distributed.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if _initialized():
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small objects such as reports and name lists)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return obj
    payload = [obj]
    torch.distributed.broadcast_object_list(payload, src=src)
    return payload[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-item list without a process group)."""
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    gathered_objects: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered_objects, obj)
    return gathered_objects


def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s values, in place (a no-op on one rank)."""
    if _initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(tensor, src=src)
    return tensor


def uses_deepspeed() -> bool:
    """Whether accelerate was told to run DeepSpeed (``accelerate launch --use_deepspeed`` sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def cpu_process_group_defaults(training_args: dict[str, Any]) -> dict[str, Any]:
    """``training_args`` with ``ddp_backend="gloo"`` added when several ranks run without CUDA (unless it is set).

    On CPU ranks accelerate only counts the processes when a backend is named; otherwise each rank believes it is
    alone and DeepSpeed refuses the batch sizes ("train_batch_size ... != micro_batch * grad_acc * world_size").
    """
    if world_size() > 1 and not torch.cuda.is_available():
        training_args.setdefault("ddp_backend", "gloo")
    return training_args


# -------------------------------------------------------------------------------------------- sharded parameters


def is_dtensor(param: torch.Tensor) -> bool:
    """A PyTorch ``DTensor`` (FSDP2 / tensor parallel shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch builds without distributed support
        return False
    return isinstance(param, DTensor)


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _has_deepspeed_master_copy(param: torch.Tensor) -> bool:
    # ZeRO-3 params carry ds_id (and, once the optimizer exists, _z3_optimizer); ZeRO-1/2 and the bf16 optimizer link
    # an fp32 fragment via _hp_mapping.
    return (_is_zero3(param) and hasattr(param, "_z3_optimizer")) or hasattr(param, "_hp_mapping")


def is_sharded(param: torch.Tensor) -> bool:
    """The local tensor is not the full parameter (ZeRO-3 partition or DTensor shard)."""
    return _is_zero3(param) or is_dtensor(param)


def full_shape(param: torch.Tensor) -> list[int]:
    """The parameter's full shape, whatever its local shard holds."""
    if _is_zero3(param):
        return list(param.ds_shape)
    return list(param.shape)  # a DTensor reports its global shape


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modify: bool = False):
    """Full values of ZeRO-3 partitioned ``params`` on every rank inside the block (a collective; a no-op otherwise).

    With ``modify``, rank 0's in-place writes are kept (re-partitioned) when the block exits. DTensors need no
    context: :func:`read_full_fp32` and :func:`write_full` gather and scatter them.
    """
    partitioned = [p for p in params if _is_zero3(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


def read_full_fp32(param: torch.Tensor) -> torch.Tensor:
    """The full float32 value of ``param`` on every rank (inside :func:`gathered` for ZeRO-3; a collective for
    DTensors and DeepSpeed master copies). Prefers the optimizer's fp32 master copy where DeepSpeed keeps one."""
    if _has_deepspeed_master_copy(param):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            return master.detach().reshape(full_shape(param)).float()
    if is_dtensor(param):
        return param.detach().full_tensor().float()
    return param.detach().float()


def write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set ``param`` (and DeepSpeed's fp32 master copy) to the full ``value``, which every rank must pass identical.

    Call inside ``gathered(..., modify=True)`` for ZeRO-3 parameters. For a DTensor each rank keeps its own shard of
    ``value`` (no communication: the value is already everywhere).
    """
    with torch.no_grad():
        if _has_deepspeed_master_copy(param):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(param, value.to(param.device, torch.float32))
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)
            param.to_local().copy_(shard.to_local())
            return
        param.data.copy_(value.reshape(param.data.shape).to(param.device, param.dtype))


def refuse_sharded_training(model: torch.nn.Module, what: str, reason: str, trainer=None, args=None) -> None:
    """Raise :class:`UnsupportedShardingError` (``what`` cannot work there, because ``reason``) under DeepSpeed (any
    stage; from the launcher's environment, the trainer or its arguments) or with sharded parameters (FSDP2)."""
    deepspeed = uses_deepspeed() or getattr(trainer, "is_deepspeed_enabled", False) or bool(getattr(args, "deepspeed",
                                                                                                    None))
    if deepspeed or any(is_sharded(p) for p in model.parameters()):
        raise UnsupportedShardingError(f"{what} does not support DeepSpeed or sharded parameters (FSDP): {reason}. "
                                       "Train on one device or with plain DDP.")
    check_sharding_supported(model, what)


def check_sharding_supported(model: torch.nn.Module, what: str) -> None:
    """Refuse sharding schemes under which ``what`` could not be exact, with a message saying what to use instead.

    - FSDP1 (``FullyShardedDataParallel`` wrappers, flat parameters): LoRA factors are views into flat shards. Also
      caught when ``model`` is the module *inside* a root-only wrapper (no wrapper among its modules): FSDP1 marks
      every parameter it flattened with ``_fsdp_flattened`` (with ``use_orig_params=True`` they stay visible, as
      1-D views of this rank's part of the flat shard, and would otherwise be consolidated as if they were whole).
    - FSDP2 with a 4-bit (bitsandbytes) base: the quantised weights cannot be sharded as DTensors, and Axolotl 0.19
      refuses the combination for preference training anyway.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()) or any(
            getattr(param, "_fsdp_flattened", False) for param in model.parameters()):
        raise UnsupportedShardingError(
            f"{what} does not support FSDP1 (FullyShardedDataParallel with flat parameters): the LoRA factors are "
            "views into flat shards. Use FSDP2 (accelerate `fsdp_version: 2`) or DeepSpeed ZeRO-3."
        )
    if any(is_dtensor(p) for p in model.parameters()) and getattr(model, "is_loaded_in_4bit", False):
        raise UnsupportedShardingError(
            f"{what} does not support FSDP2 with a 4-bit (bitsandbytes) base model; use DeepSpeed ZeRO-3 for QLoRA."
        )
