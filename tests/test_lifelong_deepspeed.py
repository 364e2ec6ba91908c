"""The 3-task tiny recipe under `accelerate launch` with DeepSpeed ZeRO-3 on 2 CPU ranks vs one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _lifelong_utils import recipe_dict, tiny_tokenizer_and_model

pytestmark = pytest.mark.deepspeed


def _launch_zero3(recipe_path: Path, expect_success: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``lifealign train`` with DeepSpeed ZeRO-3 on 2 CPU ranks."""
    import deepspeed

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # DeepSpeed JIT-builds its CPU comm op under a version-less name: keep the build per DeepSpeed version.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trl-lifealign" / "torch_extensions"
                                               / f"deepspeed-{deepspeed.__version__}"))
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--use_deepspeed", "--zero_stage", "3",
               "-m", "trl_lifealign", "train", str(recipe_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert (result.returncode == 0) == expect_success, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _zero3_and_single_recipes(tmp_path: Path, recipe: dict) -> tuple[Path, Path]:
    """The recipe for 2 ranks x 2 pairs and for 1 process x 2 pairs x 2 accumulation steps (same global batch)."""
    recipe["training"].pop("use_cpu")
    recipe["training"].update(bf16=False, per_device_train_batch_size=2)
    recipe["sft_warmup"]["per_device_train_batch_size"] = 2
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    single = dict(recipe, output_dir=str(tmp_path / "single"))
    single["training"] = dict(recipe["training"], gradient_accumulation_steps=2, use_cpu=True)
    (tmp_path / "single.yaml").write_text(yaml.safe_dump(single), encoding="utf-8")
    return tmp_path / "zero3.yaml", tmp_path / "single.yaml"


def _assert_close_runs(distributed: dict, reference: dict) -> None:
    # The data order differs between 2 ranks and 1 process, so the runs agree up to training noise: accuracy within
    # one eval pair (4 pairs per set) and margins within a tolerance set by their scale.
    for row_ds, row_single in zip(distributed["matrix"]["accuracy"], reference["matrix"]["accuracy"], strict=True):
        assert row_ds == pytest.approx(row_single, abs=0.25 + 1e-9)
    scale = max(abs(v) for row in reference["matrix"]["margin"] for v in row)
    for row_ds, row_single in zip(distributed["matrix"]["margin"], reference["matrix"]["margin"], strict=True):
        assert row_ds == pytest.approx(row_single, abs=0.5 * scale)
    assert distributed["initial_row"] == reference["initial_row"]


def test_zero3_defences_two_ranks_match_single_process(tmp_path):
    """Averaging and the forgetting budget on ZeRO-3 partitioned factors (2 ranks) vs one process; the KL anchor is
    refused there with a message naming it."""
    pytest.importorskip("deepspeed")
    from trl_lifealign.lifelong import load_recipe, run_lifelong

    tokenizer, model = tiny_tokenizer_and_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = recipe_dict(tmp_path / "data", tmp_path / "zero3", tmp_path / "model")
    recipe.update(replay={"fraction": 0.0}, memory={"enabled": False})
    recipe["sft_warmup"]["enabled"] = False
    recipe["tasks"] = recipe["tasks"][:2]
    recipe["defences"] = {
        "averaging": {"alpha": 0.5},
        # Monitored on the training files (disjoint from the scored eval files); 2 points: every step is taken.
        "forgetting_budget": {"budget": 2.0, "monitor_sets": [{"name": t["name"], "source": t["train"]}
                                                             for t in recipe["tasks"]]}}
    zero3, single = _zero3_and_single_recipes(tmp_path, recipe)
    _launch_zero3(zero3)

    distributed = json.loads((tmp_path / "zero3" / "report.json").read_text())
    reference = run_lifelong(load_recipe(single)).report.to_dict()
    for run in (distributed, reference):
        defences = run["tasks"][1]["defences"]
        assert set(defences) == {"averaging", "forgetting_budget"}
        assert defences["averaging"]["alpha_mean"] == 0.5 and defences["averaging"]["task"] == 1
        assert defences["forgetting_budget"]["alpha"] == 1.0 and defences["forgetting_budget"]["reachable"]
    _assert_close_runs(distributed, reference)

    recipe["defences"] = {"kl_anchor": {"weight": 0.5, "prompts_per_task": 4, "max_new_tokens": 6}}
    recipe["output_dir"] = str(tmp_path / "kl_anchor")
    (tmp_path / "kl_anchor.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    refused = _launch_zero3(tmp_path / "kl_anchor.yaml", expect_success=False)
    assert "KLAnchorCallback does not support DeepSpeed" in refused.stdout + refused.stderr


def test_zero3_two_ranks_matches_single_process(tmp_path):
    pytest.importorskip("deepspeed")
    from trl_lifealign.lifelong import load_recipe, run_lifelong

    tokenizer, model = tiny_tokenizer_and_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # Same global batch in both runs: 2 ranks x 2 pairs, or 1 process x 2 pairs x 2 accumulation steps.
    recipe = recipe_dict(tmp_path / "data", tmp_path / "zero3", tmp_path / "model")
    zero3, single = _zero3_and_single_recipes(tmp_path, recipe)
    result = _launch_zero3(zero3)
    assert "Last" in result.stdout

    distributed = json.loads((tmp_path / "zero3" / "report.json").read_text())
    reference = run_lifelong(load_recipe(single)).report.to_dict()
    assert [t["consolidation"]["task_index"] for t in distributed["tasks"]] == [0, 1, 2]
    assert [t["replayed_pairs"] for t in distributed["tasks"]] == [0, 4, 6]
    for task in distributed["tasks"]:
        assert (tmp_path / "zero3" / task["dir"] / "adapter" / "adapter_model.safetensors").is_file()
    _assert_close_runs(distributed, reference)
