"""The tiny Axolotl chain under DeepSpeed ZeRO-3 on 2 CPU ranks (real Axolotl 0.19, real DeepSpeed, torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _axolotl_utils import REPO, assert_first_stage_saved_consolidated, copy_tiny_recipe, run_chain

pytestmark = [pytest.mark.axolotl, pytest.mark.deepspeed]


def test_tiny_chain_under_zero3_on_two_cpu_ranks(tmp_path):
    deepspeed = pytest.importorskip("deepspeed")
    root = copy_tiny_recipe(tmp_path / "tiny")
    base = yaml.safe_load((root / "base.yml").read_text())
    base["deepspeed"] = str(REPO / "recipes" / "deepspeed" / "zero3.json")
    (root / "base.yml").write_text(yaml.safe_dump(base, sort_keys=False))
    chain = yaml.safe_load((root / "chain.yml").read_text())
    # accelerate's launcher starts one process on a host without GPUs; torchrun starts both ranks.
    chain.update(launcher="torchrun", num_processes=2)
    chain.pop("evaluation")
    (root / "chain.yml").write_text(yaml.safe_dump(chain, sort_keys=False))
    extensions = Path.home() / ".cache" / "trl-lifealign" / "torch_extensions" / f"deepspeed-{deepspeed.__version__}"
    result = run_chain(root / "chain.yml", timeout=900,
                       extra_env={"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 0, result.stdout[-8000:]

    chain_dir = root / "outputs" / "chain"
    stages = json.loads((chain_dir / "chain_state.json").read_text())["stages"]
    assert [stages[name]["consolidations"] for name in ("facts", "manners")] == [1, 2]
    # Consolidation wrote into the partitioned factors (and their fp32 master copy) before Axolotl gathered and saved.
    assert_first_stage_saved_consolidated(chain_dir / "facts")
    from trl_lifealign.slmc import LongTermMemory

    history = LongTermMemory.load(chain_dir / "manners" / "memory").history
    assert [entry["sharded"] for entry in history] == [True, True]  # both boundaries ran under ZeRO-3
    start = json.loads((chain_dir / "manners" / "lifealign_start_adapter.json").read_text())
    assert start["reference"] == "previous_task" and start["ref_adapter_equals_start"] is True
    from safetensors.torch import load_file

    saved = load_file(str(chain_dir / "facts" / "adapter_model.safetensors"))
    for name, (total, norm) in start["tensors"].items():
        assert total == pytest.approx(saved[name].double().sum().item(), rel=1e-9, abs=1e-12)
        assert norm == pytest.approx(saved[name].double().norm().item(), rel=1e-9)
    summary = json.loads((chain_dir / "manners" / "lifealign_stage_summary.json").read_text())
    assert summary["consolidation"]["slmc/task"] == 1 and summary["global_step"] == 3
