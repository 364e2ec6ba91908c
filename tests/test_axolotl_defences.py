"""Defences through Axolotl's `lifealign_*` keys: the tiny 2-stage chain with adapter merging and online EWC.

The final adapter must be exactly the (linear) merge of the two stages' trained adapters the merging defence stored,
and EWC's Fisher must be estimated after each stage and its penalty applied in the second.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _axolotl_utils import copy_tiny_recipe, run_chain

pytestmark = pytest.mark.axolotl


@pytest.fixture(scope="module")
def chain_with_defences(tmp_path_factory):
    root = copy_tiny_recipe(tmp_path_factory.mktemp("axolotl-defences") / "tiny")
    base = yaml.safe_load((root / "base.yml").read_text())
    for key in ("lifealign_energy_threshold", "lifealign_overlap_weight"):
        base.pop(key)
    base.update(lifealign_consolidate=False, lifealign_focal_gamma=0.0, lifealign_merging={"method": "linear"},
                lifealign_ewc={"strength": 10.0})
    (root / "base.yml").write_text(yaml.safe_dump(base))
    chain = yaml.safe_load((root / "chain.yml").read_text())
    chain.pop("replay")
    (root / "chain.yml").write_text(yaml.safe_dump(chain))
    result = run_chain(root / "chain.yml", "--no-eval")
    assert result.returncode == 0, result.stdout[-6000:]
    return root / "outputs" / "chain"


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's saved names (no adapter name)."""
    return {name.replace(".default.", "."): tensor for name, tensor in state.items()}


def test_final_adapter_is_the_linear_merge_of_both_stages(chain_with_defences):
    from safetensors.torch import load_file

    merging = chain_with_defences / "manners" / "defences" / "merging"
    manifest = json.loads((merging / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == ["0", "1"] and manifest["method"] == "linear"
    stored = [_plain(load_file(str(merging / manifest["tasks"][t]["file"]))) for t in ("0", "1")]
    final = load_file(str(chain_with_defences / "manners" / "adapter_model.safetensors"))
    assert set(final) == set(stored[0]) == set(stored[1])
    assert any(not torch.equal(stored[0][n], stored[1][n]) for n in final), "stage 2 did not train"
    for name, tensor in final.items():  # linear merge of two same-scaling adapters: the mean of each factor
        torch.testing.assert_close(tensor.float(), (stored[0][name] + stored[1][name]).float() / 2)
    # Stage 1 has nothing to merge with: it saved its trained adapter, which the stage-2 merge read back.
    first = load_file(str(chain_with_defences / "facts" / "adapter_model.safetensors"))
    assert all(torch.equal(first[n].float(), stored[0][n].float()) for n in first)


def test_ewc_fisher_is_kept_across_stages_and_penalises_stage_two(chain_with_defences):
    ewc = json.loads((chain_with_defences / "manners" / "defences" / "ewc" / "ewc.json").read_text())
    assert ewc["tasks"] == 2
    summary = json.loads((chain_with_defences / "manners" / "lifealign_stage_summary.json").read_text())
    assert set(summary["defences"]) == {"ewc", "merging"}
    assert summary["defences"]["merging"]["tasks"] == 2
    log = (chain_with_defences / "manners" / "lifealign_train.log").read_text()
    assert "'ewc/penalty'" in log and "'merging/update_norm'" in log
    assert "'ewc/penalty'" not in (chain_with_defences / "facts" / "lifealign_train.log").read_text()
