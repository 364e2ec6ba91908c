"""SLMC under real DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo): one launch runs both stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _slmc_utils import reference_sequence, rel_err

pytestmark = pytest.mark.deepspeed

TESTS = Path(__file__).resolve().parent
STAGES = (2, 3)


def _ds_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000000,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Rank records of the 2-rank ZeRO-2 and ZeRO-3 runs, and of the same run in one process without DeepSpeed."""
    import deepspeed

    root = tmp_path_factory.mktemp("slmc_ds")
    configs = []
    for stage in STAGES:
        path = root / f"zero{stage}.json"
        path.write_text(json.dumps(_ds_config(stage)))
        configs.append(str(path))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # DeepSpeed JIT-builds its CPU shared-memory comm op into TORCH_EXTENSIONS_DIR under a version-less name: keep
    # ours per DeepSpeed version so another installation's build cannot shadow it.
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        str(Path.home() / ".cache" / "trl-lifealign" / "torch_extensions" / f"deepspeed-{deepspeed.__version__}"),
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--use_deepspeed", "--deepspeed_config_file", configs[0],
        str(TESTS / "_slmc_ds_worker.py"), str(root / "ds"), *configs,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    import _slmc_ds_worker

    _slmc_ds_worker.run("none", root / "single")
    load = lambda path: torch.load(path, weights_only=False)
    return {
        stage: [load(root / "ds" / str(index) / f"rank{rank}.pt") for rank in (0, 1)]
        for index, stage in enumerate(STAGES)
    } | {"single": load(root / "single" / "rank0.pt"), "root": root}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_consolidation_is_exact_and_sticks(runs, stage):
    rank0, rank1 = runs[stage]
    single = runs["single"]
    assert rank0["zero_stage"] == stage
    # All ranks end bit-identical (and report the same statistics).
    for key in ("begin", "pre", "post", "master"):
        for mine, theirs in zip(rank0[key], rank1[key]):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[n], theirs[n]) for n in mine), key
    assert rank0["reports"] == rank1["reports"] and len(rank0["reports"]) == 3

    names = list(rank0["post"][0])
    assert len(names) == 8
    for name in names:
        updates = [(rank0["pre"][t][name] - rank0["begin"][t][name]).double().numpy() for t in range(3)]
        betas = reference_sequence(updates, 0.6, 0.3)
        for task in range(3):
            expected = rank0["begin"][task][name].double().numpy() + betas[task]
            assert rel_err(rank0["post"][task][name].numpy(), expected) < 1e-5, (name, task)
            # Same consolidated weights as the same run in one process without DeepSpeed.
            assert rel_err(rank0["post"][task][name].numpy(), single["post"][task][name].numpy()) < 1e-5
        for task in range(2):
            assert rel_err(rank0["pre"][task][name].numpy(), rank0["post"][task][name].numpy()) > 1e-3
    for task in range(2):
        # The optimizer's fp32 master copy holds the consolidated values ...
        assert all(torch.equal(rank0["master"][task][n], rank0["post"][task][n]) for n in names)
    # ... so the next optimizer step (learning rate 0) starts from them, not from the pre-consolidation weights.
    after = rank0["after_lr0_step"]
    assert all(torch.equal(after[n], rank0["post"][1][n]) for n in names)
    assert not any(torch.equal(after[n], rank0["pre"][1][n]) for n in names)
    manifest = json.loads((runs["root"] / "ds" / str(STAGES.index(stage)) / "memory" / "manifest.json").read_text())
    assert manifest["task_count"] == 3
    assert rank0["sharded"] == [stage == 3] * 3 and single["sharded"] == [False] * 3
    assert [entry["sharded"] for entry in manifest["history"]] == [stage == 3] * 3
