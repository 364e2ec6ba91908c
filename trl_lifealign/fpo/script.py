# Copyright the trl-lifealign developers. Licensed under the Apache License, Version 2.0.
"""`lifealign fpo`: TRL's `scripts/dpo.py` (`trl dpo`) with `FPOConfig` / `FPOTrainer` swapped in.

Every flag of TRL's DPO script works here (`ScriptArguments`, `DPOConfig`, `ModelConfig`, and the dataset mixture
`datasets:` section of a `--config` YAML), plus `--focal_gamma` (default 2.0; 0 is exactly DPO) and `--loss_type fpo`
as the default.

# Full training
```bash
accelerate launch -m trl_lifealign fpo \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --focal_gamma 2.0 \
    --learning_rate 5.0e-7 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --output_dir Qwen2-0.5B-FPO
```

# LoRA / QLoRA: add `--use_peft --lora_r 32 --lora_alpha 16` (and `--load_in_4bit` for QLoRA).

# Local data
`--dataset_name` also takes a local directory (TRL/datasets behaviour: `train.jsonl`, `test.jsonl`, ... become the
splits) or, as an addition of this script, a single `.json`, `.jsonl`, `.csv` or `.parquet` file (loaded as the
`train` split). Rows hold `prompt` / `chosen` / `rejected` (strings or chat messages), as for TRL's DPO.
"""

from __future__ import annotations

import argparse
import os

LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_preference_dataset(script_args, dataset_args):
    """The `DatasetDict` TRL's DPO script would load, plus single local files given as `--dataset_name`."""
    from datasets import load_dataset

    if dataset_args is not None and dataset_args.datasets:
        from trl import get_dataset

        return get_dataset(dataset_args)
    name = script_args.dataset_name
    if not name:
        raise ValueError("Either `--dataset_name` or a `datasets:` section in the `--config` YAML must be provided.")
    if os.path.isfile(name):
        extension = os.path.splitext(name)[1].lower()
        if extension not in LOCAL_FILE_BUILDERS:
            raise ValueError(
                f"--dataset_name {name!r}: unsupported file type {extension!r}; use one of "
                f"{sorted(LOCAL_FILE_BUILDERS)} or a directory of split files."
            )
        return load_dataset(LOCAL_FILE_BUILDERS[extension], data_files={script_args.dataset_train_split: name})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def main(script_args, training_args, model_args, dataset_args=None):
    from trl import get_peft_config, get_quantization_config

    from trl_lifealign.fpo import FPOTrainer

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_preference_dataset(script_args, dataset_args)
    for split in [script_args.dataset_train_split] + (
        [script_args.dataset_test_split] if training_args.eval_strategy != "no" else []
    ):
        if split not in dataset:
            raise ValueError(
                f"The dataset has no split {split!r} (it has {list(dataset)}); set --dataset_train_split / "
                "--dataset_test_split, or --eval_strategy no."
            )

    trainer = FPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    if script_args.ignore_bias_buffers:
        import torch

        # DDP cannot broadcast boolean buffers (https://github.com/huggingface/transformers/issues/22482)
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # newer transformers: finish trackers and destroy the process group
        trainer.end()


def make_parser(prog: str | None = None):
    """`TrlParser` over (ScriptArguments, FPOConfig, ModelConfig[, DatasetMixtureConfig if this trl has it])."""
    import trl
    from trl import ModelConfig, ScriptArguments, TrlParser

    from trl_lifealign.fpo import FPOConfig

    dataclass_types = [ScriptArguments, FPOConfig, ModelConfig]
    if hasattr(trl, "DatasetMixtureConfig"):
        dataclass_types.append(trl.DatasetMixtureConfig)
    return TrlParser(dataclass_types, prog=prog)


def run(argv: list[str] | None = None, prog: str = "lifealign fpo") -> int:
    """Parse TRL-style arguments (and an optional `--config` YAML) and train."""
    parsed = make_parser(prog).parse_args_and_config(args=argv, fail_with_unknown_args=False)
    main(*parsed[:4])
    return 0


def add_commands(subparsers) -> None:
    """Register `lifealign fpo`: every further argument goes to TRL's DPO-script parser (`--help` lists them)."""
    parser = subparsers.add_parser(
        "fpo", add_help=False, help="train with FPO, TRL's `trl dpo` script with FPOTrainer (all DPO flags + "
        "--focal_gamma; `lifealign fpo --help` lists them)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: run(args.arguments), quiet=False)


if __name__ == "__main__":
    raise SystemExit(run(prog="python -m trl_lifealign.fpo.script"))
