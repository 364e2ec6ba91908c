"""Worker launched by tests/test_slmc_deepspeed.py: one DPO run with three SLMC boundaries, recording every factor.

    DS_ACCELERATOR=cpu accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file CFG \
        tests/_slmc_ds_worker.py OUT_DIR ZERO2_CFG ZERO3_CFG     # one run per config, one after the other
    python tests/_slmc_ds_worker.py OUT_DIR none               # the same run in one process, no DeepSpeed

Boundaries: after step 2 and step 4 on demand (consolidate + begin_task inside training, so the same DeepSpeed
optimizer continues), and at on_train_end. After the step-4 boundary the learning rate is set to 0: the 5th optimizer
step must then leave the consolidated weights exactly as they are (a stale fp32 master copy would restore the
pre-consolidation weights). Each rank saves what it saw (gathered full values) to OUT_DIR/<i>/rank<r>.pt.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _slmc_utils import dpo_config, task_dataset, tiny_lora_model
from conftest import PREFERENCE_ROWS
from transformers import TrainerCallback

from trl_lifealign.slmc import MemoryConsolidationCallback
from trl_lifealign.tiny import train_tokenizer

THETA, LAMBDA = 0.6, 0.3


def gathered_factors(model, with_master: bool = False):
    values, masters = {}, {}
    for name, param in model.named_parameters():
        if not (".lora_A.default." in name or ".lora_B.default." in name):
            continue
        context = contextlib.nullcontext()
        if hasattr(param, "ds_id"):
            import deepspeed

            context = deepspeed.zero.GatheredParameters([param], modifier_rank=None)
        with context:
            values[name] = param.detach().float().cpu().clone()
        if with_master and (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")):
            from deepspeed.utils import safe_get_full_fp32_param

            masters[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone().reshape(values[name].shape)
    return (values, masters) if with_master else values


class Boundaries(TrainerCallback):
    def __init__(self, slmc):
        self.slmc = slmc
        self.record = {"begin": [], "pre": [], "post": [], "master": [], "after_lr0_step": None, "ranks": []}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record["begin"].append(gathered_factors(model))

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step in (2, 4):
            self.record["pre"].append(gathered_factors(model))
            self.slmc.consolidate(model)
            post, master = gathered_factors(model, with_master=True)
            self.record["post"].append(post)
            self.record["master"].append(master)
            self.slmc.begin_task(model)
            self.record["begin"].append(gathered_factors(model))
        if state.global_step == 4:
            for group in optimizer.param_groups:
                group["lr"] = 0.0
            lr_scheduler.base_lrs = [0.0 for _ in lr_scheduler.base_lrs]
        if state.global_step == 5:
            self.record["after_lr0_step"] = gathered_factors(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.record["pre"].append(gathered_factors(model))  # listed before the SLMC callback: pre-consolidation


def run(ds_config: str, out_dir: Path) -> None:
    distributed = ds_config != "none"
    if distributed:
        # Several DeepSpeed configs in one launch: TrainingArguments builds its DeepSpeedPlugin from this variable.
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds_config
    texts = [text for row in PREFERENCE_ROWS for text in row.values()]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_lora_model(tokenizer)
    slmc = MemoryConsolidationCallback(out_dir / "memory", energy_threshold=THETA, overlap_weight=LAMBDA)
    boundaries = Boundaries(slmc)
    from trl import DPOTrainer

    # accelerate launch --use_deepspeed passes the DeepSpeed config through the environment. On CPU, accelerate only
    # counts the DeepSpeed ranks when a backend is named (otherwise it sees 1 process and the batch sizes mismatch).
    extra = {"ddp_backend": "gloo"} if distributed else {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(
            out_dir / "out", per_device_train_batch_size=4 // world, max_steps=5, lr_scheduler_type="constant",
            learning_rate=2e-2, **extra
        ),
        train_dataset=task_dataset(PREFERENCE_ROWS, 0),
        processing_class=tokenizer,
        callbacks=[boundaries, slmc],
    )
    trainer.train()
    record = boundaries.record
    record["post"].append(gathered_factors(trainer.model))
    record["reports"] = [r.metrics() for r in slmc.reports]
    record["sharded"] = [r.sharded for r in slmc.reports]
    record["log_history"] = trainer.state.log_history
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    record["zero_stage"] = trainer.accelerator.state.deepspeed_plugin.zero_stage if distributed else 0
    torch.save(record, out_dir / f"rank{rank}.pt")


def main() -> None:
    """argv: OUT_DIR CONFIG [CONFIG ...]; each CONFIG is a DeepSpeed JSON (or "none"), run in turn into OUT_DIR/<i>."""
    out_dir = Path(sys.argv[1])
    for index, ds_config in enumerate(sys.argv[2:]):
        run(ds_config, out_dir / str(index))


if __name__ == "__main__":
    main()
