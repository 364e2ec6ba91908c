"""Worker launched by tests/test_slmc_fsdp.py: a plain torch loop with three SLMC boundaries under PyTorch FSDP2.

    torchrun --standalone --nproc_per_node 2 tests/_slmc_fsdp_worker.py OUT fp32 bf16mp bf16 fsdp1  # 2 ranks, gloo
    torchrun --standalone --nproc_per_node 1 tests/_slmc_fsdp_worker.py OUT bf16mp    # the same run on 1 rank
    python tests/_slmc_fsdp_worker.py OUT plain-fp32 plain-bf16                      # 1 process, no FSDP at all

Modes (each run into OUT_DIR/<mode>):

- ``fp32``: tiny Llama + LoRA (q_proj, v_proj, r 4), ``fully_shard`` per decoder layer and on the root, fp32 params.
- ``bf16mp``: the same with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (fp32 sharded
  params, bf16 compute).
- ``bf16``: the same as ``fp32`` with the whole model in bfloat16 (bf16 sharded params).
- ``plain-fp32`` / ``plain-bf16``: the model and loop of ``fp32`` / ``bf16`` without a process group or FSDP (the
  1-process references).
- ``fsdp1``: a fresh model wrapped in FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``); records the
  error ``MemoryConsolidationCallback.begin_task`` raises for the wrapper and for the wrapped PeftModel inside it.

The loop: AdamW, a causal-LM loss on fixed token batches that every rank sees identically (so the averaged gradient
equals the single-process gradient), ``begin_task`` at the start, ``STEPS`` optimizer steps per task, then
``consolidate`` + ``begin_task``; after the second boundary one optimizer step with learning rate 0 (it must leave the
consolidated values exactly as they are), then the third task. Each rank saves what it saw (full values gathered with
``DTensor.full_tensor()``, independent of ``trl_lifealign.distributed``, and its local shards) to
OUT_DIR/<mode>/rank<r>.pt; the memory is written to OUT_DIR/<mode>/memory.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _slmc_utils import tiny_lora_model
from conftest import PREFERENCE_ROWS

from trl_lifealign.slmc import MemoryConsolidationCallback
from trl_lifealign.tiny import train_tokenizer

THETA, LAMBDA = 0.6, 0.3
STEPS = 3  # optimizer steps per task
TASKS = 3
LEARNING_RATE = 2e-2
BATCH, SEQ_LEN = 4, 16


def tokenizer():
    texts = [text for row in PREFERENCE_ROWS for text in row.values()]
    return train_tokenizer(texts, vocab_size=300)


def batch(step: int, vocab_size: int) -> torch.Tensor:
    """The fixed token batch of optimizer step ``step`` (identical on every rank; special tokens excluded)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(4, vocab_size, (BATCH, SEQ_LEN), generator=generator)


def is_factor(name: str) -> bool:
    return ".lora_A.default." in name or ".lora_B.default." in name


def full_values(model) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies of every LoRA factor (all-gathered with ``full_tensor()`` for DTensors)."""
    from torch.distributed.tensor import DTensor

    values = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_factor(name):
                full = param.full_tensor() if isinstance(param, DTensor) else param
                values[name] = full.detach().float().cpu().clone()
    return values


def local_shards(model) -> dict[str, torch.Tensor]:
    """This rank's local shard of every LoRA factor (what the optimizer updates), as stored (no dtype cast)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (param.to_local() if isinstance(param, DTensor) else param).detach().cpu().clone()
        for name, param in model.named_parameters()
        if is_factor(name)
    }


def build(mode: str, tok):
    model = tiny_lora_model(tok, seed=0)
    if mode in ("bf16", "plain-bf16"):
        model.to(torch.bfloat16)
    if not mode.startswith("plain"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if mode == "bf16mp":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
    return model


def train_run(mode: str, out_dir: Path) -> None:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tok = tokenizer()
    model = build(mode, tok)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    slmc = MemoryConsolidationCallback(out_dir / "memory", energy_threshold=THETA, overlap_weight=LAMBDA)
    record = {"begin": [], "pre": [], "post": [], "post_local": [], "losses": [], "mode": mode,
              "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
              "param_types": sorted({type(p).__name__ for n, p in model.named_parameters() if is_factor(n)}),
              "param_dtypes": sorted({str(p.dtype) for n, p in model.named_parameters() if is_factor(n)})}
    step = 0

    def optimizer_step():
        nonlocal step
        tokens = batch(step, len(tok))
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record["losses"].append(float(loss.detach()))
        step += 1

    slmc.begin_task(model)
    record["begin"].append(full_values(model))
    for task in range(TASKS):
        if task == 2:
            # One step with learning rate 0: FSDP2's sharded parameters must already hold the consolidated values.
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            optimizer_step()
            record["after_lr0_step"] = full_values(model)
            record["after_lr0_step_local"] = local_shards(model)
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE
        for _ in range(STEPS):
            optimizer_step()
        record["pre"].append(full_values(model))
        slmc.consolidate(model)
        record["post"].append(full_values(model))
        record["post_local"].append(local_shards(model))
        if task < TASKS - 1:
            slmc.begin_task(model)
            record["begin"].append(full_values(model))
    # A forward pass after the last boundary must use the consolidated values.
    with torch.no_grad():
        tokens = batch(10_000, len(tok))
        record["final_loss"] = float(model(input_ids=tokens, labels=tokens).loss)
    record["reports"] = [report.metrics() for report in slmc.reports]
    record["sharded"] = [report.sharded for report in slmc.reports]
    torch.save(record, out_dir / f"rank{rank}.pt")


def fsdp1_run(out_dir: Path) -> None:
    """FSDP1 must be refused, whether the callback is given the wrapper or the PeftModel inside it."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    rank = torch.distributed.get_rank()
    tok = tokenizer()
    results = {}
    for name, policy in (("root_only", None), ("per_layer", ModuleWrapPolicy({LlamaDecoderLayer}))):
        wrapped = FullyShardedDataParallel(tiny_lora_model(tok, seed=0), use_orig_params=True,
                                           auto_wrap_policy=policy, device_id=torch.device("cpu"))
        for target_name, target in (("wrapper", wrapped), ("inner", wrapped.module)):
            slmc = MemoryConsolidationCallback(out_dir / f"memory-{name}-{target_name}")
            try:
                slmc.begin_task(target)
            except Exception as error:
                results[f"{name}/{target_name}"] = {"type": type(error).__name__, "message": str(error),
                                                    "mro": [c.__name__ for c in type(error).__mro__]}
            else:
                results[f"{name}/{target_name}"] = None
        torch.distributed.barrier()
    torch.save(results, out_dir / f"rank{rank}.pt")


def run(out_root: Path, modes: list[str]) -> None:
    """Each mode in turn into ``out_root/<mode>``; a gloo process group (from the launcher's environment) is set up
    for the FSDP modes and torn down at the end."""
    distributed = "RANK" in os.environ and any(not mode.startswith("plain") for mode in modes)
    if distributed:
        torch.distributed.init_process_group("gloo")
    try:
        for mode in modes:
            out_dir = Path(out_root) / mode
            out_dir.mkdir(parents=True, exist_ok=True)
            if mode == "fsdp1":
                fsdp1_run(out_dir)
            else:
                train_run(mode, out_dir)
            if distributed:
                torch.distributed.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def main() -> None:
    """argv: OUT_DIR MODE [MODE ...]."""
    run(Path(sys.argv[1]), sys.argv[2:])


if __name__ == "__main__":
    main()
