"""The two training stages of a task: the optional SFT warm-up (TRL's ``SFTTrainer``) and the preference stage
(``FPOTrainer``). Each stage hands the model back as it received it (``compat.handed_back_as_received``), so a stage
runs the same on a model that went through earlier tasks in this process as on the freshly built model of a resumed
run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import REF_ADAPTER, drop_ref_adapter
from ..compat import handed_back_as_received, quiet_dataset_progress
from ..distributed import cpu_process_group_defaults
from .config import LifelongConfig

__all__ = ["PreferenceStageResult", "checkpointing_args", "preference_stage", "sft_warmup", "training_args"]

# Training arguments the SFT warm-up shares with the preference stage (precision, memory, process group).
_SHARED_WITH_WARMUP = ("bf16", "fp16", "gradient_checkpointing", "activation_checkpointing",
                       "gradient_accumulation_steps", "use_cpu", "ddp_backend")


def checkpointing_args(values: dict[str, Any], config_class) -> dict[str, Any]:
    """``values`` with ``gradient_checkpointing`` (or the config's default for it: TRL's configs default it to True)
    given as ``activation_checkpointing`` where ``config_class`` has that field (transformers >= 5.23 warns when only
    the old name is set)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    if "activation_checkpointing" not in fields or "activation_checkpointing" in values:
        return values
    values = dict(values)
    values["activation_checkpointing"] = values.pop("gradient_checkpointing", fields["gradient_checkpointing"].default)
    return values


def training_args(config: LifelongConfig, task_index: int, output_dir: Path):
    """The ``FPOConfig`` of task ``task_index``: runner defaults, the recipe's ``training``, the task's overrides,
    then the runner-owned output directory and seed."""
    from trl_lifealign.fpo import FPOConfig

    values: dict[str, Any] = {"report_to": [], "save_strategy": "no", "logging_steps": 10,
                              "per_device_train_batch_size": 4}
    values.update(config.training)
    values.update(config.tasks[task_index].overrides)
    values.update(output_dir=str(output_dir), seed=config.seed + task_index)
    return FPOConfig(**checkpointing_args(cpu_process_group_defaults(values), FPOConfig))


def sft_warmup(config: LifelongConfig, model, tokenizer, rows: list[dict], task_index: int, output_dir: Path,
               show_progress: bool) -> dict[str, Any]:
    """Supervised warm-up on prompt -> chosen with TRL's ``SFTTrainer`` (prompt/completion data, loss on the
    completion only), with the recipe's ``sft_warmup`` settings."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    settings = config.sft_warmup
    shared = {k: v for k, v in config.training.items() if k in _SHARED_WITH_WARMUP}
    args = SFTConfig(**checkpointing_args(cpu_process_group_defaults({
        "output_dir": str(output_dir), "learning_rate": settings.learning_rate,
        "num_train_epochs": settings.num_train_epochs, "max_length": settings.max_length,
        "per_device_train_batch_size": settings.per_device_train_batch_size, "seed": config.seed + task_index,
        "report_to": [], "save_strategy": "no", "logging_steps": 10, "completion_only_loss": True,
        # Per-step bars as in the preference stage: off when the recipe's training turns them off.
        "disable_tqdm": bool(config.training.get("disable_tqdm")) or not show_progress, **shared}), SFTConfig))
    dataset = Dataset.from_list([{"prompt": row["prompt"], "completion": row["chosen"]} for row in rows])
    with handed_back_as_received(model), quiet_dataset_progress():
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        _quiet_printer(trainer)
        output = trainer.train()
    return {"examples": len(trainer.train_dataset), "train_loss": output.training_loss, "steps": output.global_step}


def _quiet_printer(trainer) -> None:
    """No per-step bars means no printed log dicts either (they stay in the trainer's log history)."""
    if trainer.args.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)


@dataclass
class PreferenceStageResult:
    """What the preference stage did: loss, steps, pairs TRL dropped as over-long, and the optimizer state."""

    train_loss: float
    steps: int
    dropped_pairs: int
    log: list[dict[str, Any]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None


def preference_stage(config: LifelongConfig, model, tokenizer, rows: list[dict], task_index: int, output_dir: Path,
                     callbacks: list, show_progress: bool, optimizer_state: dict | None = None
                     ) -> PreferenceStageResult:
    """Train task ``task_index``'s preference pairs with ``FPOTrainer``.

    Reference ``previous_task`` keeps TRL's frozen ``ref`` copy of the adapter (the policy as the task starts);
    ``base`` deletes it right after the trainer is built, so TRL scores the reference with the adapter disabled. The
    copy never outlives the stage. With ``optimizer: carry`` the previous task's AdamW state is loaded first.
    """
    from datasets import Dataset

    from trl_lifealign.fpo import FPOTrainer

    drop_ref_adapter(model)
    with handed_back_as_received(model), quiet_dataset_progress():
        args = training_args(config, task_index, output_dir)
        args.disable_tqdm = args.disable_tqdm or not show_progress
        trainer = FPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=list(callbacks))
        _quiet_printer(trainer)
        if config.reference == "base":
            drop_ref_adapter(model)
        elif REF_ADAPTER not in model.peft_config:
            raise RuntimeError("reference 'previous_task' needs TRL's frozen 'ref' adapter, which this trl version "
                               "did not create")
        if optimizer_state is not None:
            trainer.create_optimizer()
            trainer.optimizer.load_state_dict(optimizer_state)
        dropped = len(rows) - len(trainer.train_dataset)
        output = trainer.train()
        result = PreferenceStageResult(
            train_loss=output.training_loss, steps=output.global_step, dropped_pairs=dropped,
            log=[e for e in trainer.state.log_history if "loss" in e][-1:],
            optimizer_state=trainer.optimizer.state_dict() if config.optimizer == "carry" else None)
        drop_ref_adapter(model)
    return result
