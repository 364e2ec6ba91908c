"""`recipes/trl/fpo.py` end to end on a tiny local model and local dataset files (plain python and accelerate)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_lifealign.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "trl" / "fpo.py"
ROWS = [
    {"prompt": f"Tell me about {t}.", "chosen": f"I like {t} a lot.", "rejected": f"I hate {t} a lot."}
    for t in ["apples", "rivers", "music", "winter", "books", "trains"]
]
COMMON = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
          "--bf16", "false", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
          "--learning_rate", "1e-3", "--focal_gamma", "1.0", "--disable_tqdm", "true"]


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpo_recipe")
    save_tiny_model(root / "tiny", [text for row in ROWS for text in row.values()])
    _write_jsonl(root / "pairs.jsonl", ROWS)
    _write_jsonl(root / "splits" / "train.jsonl", ROWS[:4])
    _write_jsonl(root / "splits" / "test.jsonl", ROWS[4:])
    return root


def _run(command, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


LORA_FLAGS = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]


def test_plain_python_lora_on_a_split_directory(workdir):
    out = workdir / "out-lora"
    result = _run([sys.executable, str(RECIPE), "--model_name_or_path", str(workdir / "tiny"),
                   "--dataset_name", str(workdir / "splits"), "--output_dir", str(out), "--eval_strategy", "steps",
                   "--eval_steps", "2", *LORA_FLAGS, *COMMON], workdir)
    assert "eval_fpo/focal_weight" in result.stdout and "'fpo/focal_weight'" in result.stdout
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # ~20-50 s on a 2-core machine, mostly the launcher and a second interpreter start-up
def test_accelerate_launch_full_finetune_on_a_jsonl_file(workdir):
    accelerate = Path(sys.executable).parent / "accelerate"
    out = workdir / "out-full"
    result = _run([str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE),
                   "--model_name_or_path", str(workdir / "tiny"), "--dataset_name", str(workdir / "pairs.jsonl"),
                   "--output_dir", str(out), *COMMON], workdir)
    assert "'fpo/focal_weight'" in result.stdout
    assert (out / "model.safetensors").is_file()


def test_recipe_main_in_process_full_finetune_on_a_jsonl_file(workdir, tmp_path):
    """The script's own parser and main(), without a subprocess: full fine-tuning (reference loaded from the path)."""
    recipe = _recipe_module()
    parsed = recipe.make_parser().parse_args_into_dataclasses(
        ["--model_name_or_path", str(workdir / "tiny"), "--dataset_name", str(workdir / "pairs.jsonl"),
         "--output_dir", str(tmp_path / "out"), *COMMON]
    )
    assert parsed[1].focal_gamma == 1.0 and parsed[1].loss_type == ["fpo"]
    recipe.main(*parsed[:4])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _recipe_module():
    spec = importlib.util.spec_from_file_location("fpo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_local_dataset_inputs_fail_clearly(workdir, tmp_path):
    recipe = _recipe_module()
    script_args, _, _, dataset_args = recipe.make_parser().parse_args_into_dataclasses(
        ["--dataset_name", str(_write_jsonl(tmp_path / "pairs.txt", ROWS)), "--output_dir", str(tmp_path),
         "--bf16", "false", "--model_name_or_path", str(workdir / "tiny")]
    )
    with pytest.raises(ValueError, match="--dataset_name"):
        recipe.load_preference_dataset(script_args, dataset_args)
    script_args.dataset_name = str(workdir / "pairs.jsonl")
    dataset = recipe.load_preference_dataset(script_args, dataset_args)
    assert list(dataset) == ["train"] and dataset["train"].num_rows == len(ROWS)
