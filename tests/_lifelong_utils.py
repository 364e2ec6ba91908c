"""Shared set-up for the lifelong runner tests: tiny conflicting tasks on disk, a tiny model, a small config."""

from __future__ import annotations

from pathlib import Path

from trl_lifealign.lifelong.demo import demo_texts, make_demo_tasks, write_demo_data
from trl_lifealign.lifelong.recipe import LifelongConfig

TRAIN_PAIRS, EVAL_PAIRS = 8, 4


def tiny_tokenizer_and_model():
    from trl_lifealign.tiny import build_tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(demo_texts(make_demo_tasks(TRAIN_PAIRS, EVAL_PAIRS)), vocab_size=300)
    return tokenizer, build_tiny_llama(tokenizer, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, seed=0)


def write_data(directory: Path):
    return write_demo_data(directory, TRAIN_PAIRS, EVAL_PAIRS)


def recipe_dict(data_dir: Path, output_dir: Path, model_dir: Path | None = None) -> dict:
    """The 3-task test recipe as a YAML-ready dict: replay, SFT warm-up, SLMC, optimizer carry."""
    paths = write_data(data_dir)
    recipe = {
        "output_dir": str(output_dir),
        "seed": 3,
        "chat_template": "never",  # a random tiny model: keep the raw text the tests were calibrated on
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"learning_rate": 5e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4, "beta": 0.1,
                     "max_length": 64, "logging_steps": 1, "use_cpu": True},
        "replay": {"fraction": 0.5, "capacity": 6, "seed": 1},
        "sft_warmup": {"enabled": True, "learning_rate": 1e-3, "num_train_epochs": 1,
                       "per_device_train_batch_size": 4, "max_length": 64},
        "evaluation": {"batch_size": 4, "max_length": 64},
        "tasks": [{"name": name, "train": {"path": str(p["train"]), "columns": {"query": "prompt"}},
                   "eval": {"path": str(p["eval"]), "columns": {"query": "prompt"}}} for name, p in paths.items()],
    }
    recipe["tasks"][1]["overrides"] = {"learning_rate": 1e-2}
    if model_dir is not None:
        recipe["model"] = str(model_dir)
    return recipe


def small_config(data_dir: Path, output_dir: Path, **overrides) -> LifelongConfig:
    from trl_lifealign.lifelong.recipe import from_dict

    recipe = recipe_dict(data_dir, output_dir)
    recipe.update(overrides)
    return from_dict(LifelongConfig, recipe)
