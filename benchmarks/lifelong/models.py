"""The model every method of a seed starts from: a tiny Llama trained here (tokenizer + causal-LM warm-up), or a
real pretrained model (``trl_lifealign.pretrained``) used as it is."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from trl_lifealign.atomic import atomic_write_dir

from .data import TaskData, fingerprint
from .settings import BenchSettings

FINGERPRINT_VERSION = 3


def build_tokenizer(output_dir: Path, corpus: list[str], settings: BenchSettings):
    """Train (or load the cached) BPE tokenizer of the tiny model on the train splits."""
    from transformers import AutoTokenizer

    from trl_lifealign.tiny import train_tokenizer

    key = fingerprint({"v": FINGERPRINT_VERSION, "vocab": settings.vocab_size, "tasks": settings.tasks,
                       "corpus": len(corpus), "chars": sum(len(t) for t in corpus)})
    path = output_dir / "cache" / f"tokenizer-{key}"
    if not path.is_dir():
        tokenizer = train_tokenizer(corpus, vocab_size=settings.vocab_size, model_max_length=2 * settings.max_length)
        atomic_write_dir(path, tokenizer.save_pretrained)
    return AutoTokenizer.from_pretrained(path), path


def warmup_texts(tasks: list[TaskData], eos_token: str) -> list[str]:
    """Prompt + chosen and prompt + rejected of every usable training pair: the warm model has no built-in
    preference."""
    return [row["prompt"] + "\n" + row[key] + eos_token for task in tasks for row in task.train_all
            for key in ("chosen", "rejected")]


def warm_model_path(output_dir: Path, tokenizer_dir: Path, tasks: list[TaskData], settings: BenchSettings,
                    seed: int) -> Path:
    """Where the seed's warmed-up tiny Llama is cached (the name is a fingerprint of what determines it)."""
    key = fingerprint({
        "v": FINGERPRINT_VERSION, "tokenizer": tokenizer_dir.name, "seed": seed,
        "model": [settings.hidden_size, settings.num_hidden_layers, settings.num_attention_heads],
        "warmup": [settings.warmup_steps, settings.warmup_batch_size, settings.warmup_learning_rate,
                   settings.max_length],
        "data": [(t.name, len(t.train_all), fingerprint(t.train_all)) for t in tasks],
    })
    return output_dir / "cache" / f"warm-seed{seed}-{key}"


def build_warm_model(path: str, tokenizer_dir: str, texts: list[str], settings: dict[str, Any], seed: int,
                     threads: int | None = None) -> dict[str, float]:
    """Build the seed's tiny Llama, train it as a causal LM on ``texts`` (transformers' ``Trainer``) and save it with
    the tokenizer, atomically, at ``path``. Runs in the main process or in a worker (hence plain arguments); in a
    worker, third-party output (import-time notices, "Writing model shards" bars) is silenced as in ``run_one``."""
    from trl_lifealign.compat import quiet_third_party

    with quiet_third_party():
        return _build_warm_model(path, tokenizer_dir, texts, settings, seed, threads)


def _build_warm_model(path: str, tokenizer_dir: str, texts: list[str], settings: dict[str, Any], seed: int,
                      threads: int | None) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from trl_lifealign.tiny import build_tiny_llama

    if threads:
        torch.set_num_threads(threads)
    config = BenchSettings(**{**settings, "tasks": tuple(settings["tasks"])})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny_llama(tokenizer, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                             num_attention_heads=config.num_attention_heads,
                             max_position_embeddings=max(512, config.max_length), seed=seed)
    random.Random(seed).shuffle(texts := list(texts))
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda batch: tokenizer(batch["text"], add_special_tokens=False, truncation=True,
                                max_length=config.max_length), batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(Path(path).parent / f".{Path(path).name}.trainer.tmp"), max_steps=config.warmup_steps,
        per_device_train_batch_size=config.warmup_batch_size, learning_rate=config.warmup_learning_rate,
        warmup_steps=20, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, seed=seed,
        report_to=[], save_strategy="no", logging_steps=20, disable_tqdm=True, use_cpu=True)
    started = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    stats = {"first_loss": losses[0] if losses else float("nan"), "final_loss": losses[-1] if losses else float("nan"),
             "seconds": time.perf_counter() - started, "seed": seed}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warmup.json").write_text(json.dumps(stats, indent=2) + "\n")

    atomic_write_dir(path, write)
    return stats
