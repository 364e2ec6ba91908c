"""End to end with real Axolotl 0.19 on CPU: the tiny 2-stage chain recipe through `lifealign axolotl-chain`.

One chain run (module fixture) is checked from several angles; the resume test then re-runs it after erasing the
record of stage 2 (the state a crash between consolidation and the atomic record leaves behind).
"""

from __future__ import annotations

import json

import pytest
import torch
from _axolotl_utils import assert_first_stage_saved_consolidated, copy_tiny_recipe, run_chain

pytestmark = pytest.mark.axolotl

STAGES = ("facts", "manners")


@pytest.fixture(scope="module")
def finished_chain(tmp_path_factory):
    root = copy_tiny_recipe(tmp_path_factory.mktemp("axolotl-chain") / "tiny")
    result = run_chain(root / "chain.yml")
    assert result.returncode == 0, result.stdout[-6000:]
    return root, root / "outputs" / "chain", result.stdout


def _state(chain_dir):
    return json.loads((chain_dir / "chain_state.json").read_text())


def test_every_stage_is_recorded_with_its_consolidation(finished_chain):
    _, chain_dir, _ = finished_chain
    state = _state(chain_dir)["stages"]
    assert [name for name in STAGES if state[name]["finished"]] == list(STAGES)
    assert [state[name]["consolidations"] for name in STAGES] == [1, 2]


def test_stage_logs_carry_fpo_metrics(finished_chain):
    _, chain_dir, _ = finished_chain
    for name in STAGES:
        log = (chain_dir / name / "lifealign_train.log").read_text()
        assert "'fpo/focal_weight'" in log, f"no fpo/* metric in the {name} log"
        assert "LifeAlign: FPO (focal_gamma=2.0)" in log
        summary = json.loads((chain_dir / name / "lifealign_stage_summary.json").read_text())
        assert summary["consolidation"]["slmc/task"] == STAGES.index(name)
        assert summary["global_step"] == 3
    first, second = (json.loads((chain_dir / n / "lifealign_stage_summary.json").read_text()) for n in STAGES)
    # Replay (fraction 0.5 of 6 rows = 3, capped at capacity 2) only from the second stage on.
    assert (first["train_pairs"], first["replayed_pairs"]) == (6, 0)
    assert (second["train_pairs"], second["replayed_pairs"]) == (8, 2)


def test_a_seeded_chain_is_reproducible(finished_chain, tmp_path):
    """The same chain run again (another copy, same seed) saves bit-identical adapters at every stage."""
    from safetensors.torch import load_file

    root, chain_dir, _ = finished_chain
    again = copy_tiny_recipe(tmp_path / "tiny")
    result = run_chain(again / "chain.yml", "--no-validate", "--no-eval")
    assert result.returncode == 0, result.stdout[-6000:]
    for name in STAGES:
        first, second = (load_file(str(d / name / "adapter_model.safetensors"))
                         for d in (chain_dir, again / "outputs" / "chain"))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), f"stage {name} differs between two runs"


def test_memory_records_two_consolidations(finished_chain):
    from trl_lifealign.slmc import LongTermMemory

    _, chain_dir, _ = finished_chain
    assert LongTermMemory.load(chain_dir / "facts" / "memory").task_count == 1
    final = LongTermMemory.load(chain_dir / "manners" / "memory")
    assert final.task_count == 2
    assert len(final.history) == 2


def test_stage1_saved_adapter_is_the_consolidated_one(finished_chain):
    _, chain_dir, _ = finished_chain
    assert_first_stage_saved_consolidated(chain_dir / "facts")


def test_stage2_starts_from_stage1_adapter(finished_chain):
    """The stage-2 trainer writes the adapter values it actually holds after loading; they are stage 1's saved ones."""
    from safetensors.torch import load_file

    _, chain_dir, _ = finished_chain
    start = json.loads((chain_dir / "manners" / "lifealign_start_adapter.json").read_text())
    assert start["previous_adapter"] == str((chain_dir / "facts").resolve())
    saved = load_file(str(chain_dir / "facts" / "adapter_model.safetensors"))
    assert set(start["tensors"]) == set(saved)
    for name, (total, norm) in start["tensors"].items():
        assert total == pytest.approx(saved[name].double().sum().item(), rel=1e-9, abs=1e-12)
        assert norm == pytest.approx(saved[name].double().norm().item(), rel=1e-9)
    final = load_file(str(chain_dir / "manners" / "adapter_model.safetensors"))
    assert any(not torch.equal(final[name], saved[name]) for name in saved), "stage 2 did not train"
    # The recipe's reference previous_task: TRL's frozen "ref" adapter is the adapter stage 2 started from.
    assert start["reference"] == "previous_task" and start["ref_adapter_equals_start"] is True


def test_final_adapter_loads_with_peft(finished_chain):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, chain_dir, _ = finished_chain
    base = AutoModelForCausalLM.from_pretrained(root / "tiny-llama")
    model = PeftModel.from_pretrained(base, chain_dir / "manners")
    saved = load_file(str(chain_dir / "manners" / "adapter_model.safetensors"))
    loaded = {n.replace(".default.", "."): p for n, p in model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name].detach(), tensor)
    tokenizer = AutoTokenizer.from_pretrained(root / "tiny-llama")
    with torch.no_grad():
        logits = model(**tokenizer("Say hello politely.", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_chain_report_has_the_evaluation_matrix(finished_chain):
    _, chain_dir, _ = finished_chain
    report = json.loads((chain_dir / "report.json").read_text())
    assert report["task_names"] == list(STAGES) and report["eval_names"] == list(STAGES)
    accuracy = report["matrix"]["accuracy"]
    assert len(accuracy) == 2 and all(len(row) == 2 and all(0 <= v <= 1 for v in row) for row in accuracy)
    assert report["initial_row"]["accuracy"] == [0.5, 0.5]  # π₀ against itself: every margin is a tie
    assert set(report["metrics"]) == {"last", "ap", "bwt", "fwt"}
    assert [task["train_pairs"] for task in report["tasks"]] == [6, 8]
    assert (chain_dir / "report.md").is_file() and (chain_dir / "matrix_accuracy.png").is_file()


def test_interrupted_chain_resumes_at_first_unfinished_stage(finished_chain):
    """Drop stage 2's record (its memory already holds 2 consolidations, as after a crash before the record)."""
    from trl_lifealign.slmc import LongTermMemory

    root, chain_dir, _ = finished_chain
    state = _state(chain_dir)
    facts_record = state["stages"]["facts"]
    del state["stages"]["manners"]
    (chain_dir / "chain_state.json").write_text(json.dumps(state))
    assert LongTermMemory.load(chain_dir / "manners" / "memory").task_count == 2

    result = run_chain(root / "chain.yml", "--no-validate", "--no-eval")  # both were exercised by the first run
    assert result.returncode == 0, result.stdout[-6000:]
    assert "'facts': finished earlier, skipping" in result.stdout
    assert "stage 2/2 'manners': " in result.stdout and "stage 1/2 'facts': /" not in result.stdout
    resumed = _state(chain_dir)["stages"]
    assert resumed["facts"] == facts_record
    assert resumed["manners"]["finished"] and resumed["manners"]["consolidations"] == 2
    assert LongTermMemory.load(chain_dir / "manners" / "memory").task_count == 2
