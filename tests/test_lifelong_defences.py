"""Every defence from a recipe through the lifelong runner: it runs, reports what it did, and a run interrupted in
its second task resumes to exactly the uninterrupted result (its state is committed with each task)."""

from __future__ import annotations

import pytest
import torch
from _lifelong_utils import recipe_dict, tiny_tokenizer_and_model
from safetensors.torch import load_file
from test_lifelong_run import CrashAtTask, SimulatedCrash

from trl_lifealign.lifelong import run_lifelong
from trl_lifealign.lifelong.recipe import LifelongConfig, RecipeError, from_dict

DEFENCES = {
    "averaging": {"defences": {"averaging": {"alpha": 0.5}}},
    "ewc": {"defences": {"ewc": {"strength": 100.0, "fisher_batches": 2}}},
    "kl_anchor": {"defences": {"kl_anchor": {"weight": 0.5, "prompts_per_task": 4, "max_new_tokens": 6}}},
    "freeze_layers": {"defences": {"freeze_layers": {"num_layers": 1}}},
    "merging": {"defences": {"merging": {"method": "ties", "density": 0.5}}},
    "olora": {"defences": {"olora": {"orthogonality": 0.5}}, "reference": "base", "memory": {"enabled": False}},
    "subspace": {"memory": {"memory_kind": "subspace", "project_steps": True}},
    "forgetting_budget": {"defences": {"forgetting_budget": {"budget": 0.1}}},
}


def _config(tmp_path, name: str, run: str):
    recipe = recipe_dict(tmp_path / "data", tmp_path / run)
    recipe.update(sft_warmup={"enabled": False}, replay={"fraction": 0.0})
    recipe["tasks"] = recipe["tasks"][:2]
    recipe["training"]["gradient_checkpointing"] = False
    for key, value in DEFENCES[name].items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    if name == "forgetting_budget":  # monitored on the training files: disjoint from the scored eval files
        recipe["defences"]["forgetting_budget"]["monitor_sets"] = [
            {"name": t["name"], "source": t["train"]} for t in recipe["tasks"]]
    return from_dict(LifelongConfig, recipe)


def _adapters(run_dir):
    return [load_file(str(p / "adapter" / "adapter_model.safetensors"))
            for p in sorted((run_dir / "tasks").iterdir())]


@pytest.mark.parametrize("name", list(DEFENCES))
def test_defence_runs_reports_and_resumes_exactly(tmp_path, name):
    tokenizer, model = tiny_tokenizer_and_model()
    full = run_lifelong(_config(tmp_path, name, "full"), model=model, tokenizer=tokenizer, show_progress=False)
    tasks = full.report.tasks
    if name != "subspace":
        assert list(tasks[1].defences) == [name] and tasks[1].defences[name] is not None
    else:
        assert tasks[1].consolidation["task_index"] == 1

    config = _config(tmp_path, name, "resumed")
    tokenizer, model = tiny_tokenizer_and_model()
    with pytest.raises(SimulatedCrash):
        run_lifelong(config, model=model, tokenizer=tokenizer, callbacks=[CrashAtTask(1)], show_progress=False)
    tokenizer, model = tiny_tokenizer_and_model()
    resumed = run_lifelong(config, model=model, tokenizer=tokenizer, show_progress=False)
    assert resumed.margin_matrix == full.margin_matrix
    for a, b in zip(_adapters(full.run_dir), _adapters(resumed.run_dir)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("update, message", [
    ({"defences": {"kl_anchor": {}}, "reference": "base"}, "defences.kl_anchor: needs reference: previous_task"),
    ({"defences": {"olora": {}}}, "defences.olora: needs reference: base"),
    ({"defences": {"olora": {}, "averaging": {}}, "reference": "base"}, "cannot be combined with ['averaging']"),
    ({"defences": {"olora": {}}, "reference": "base", "memory": {"enabled": False}, "optimizer": "carry"},
     "cannot be combined with optimizer: carry"),
    ({"defences": {"forgetting_budget": {"budget": 2.0}}}, "one set per task"),
    ({"defences": {"ewc": {"strength": 0}}}, "defences.ewc.strength: must be > 0"),
    ({"memory": {"project_steps": True}}, "memory.project_steps: needs memory_kind='subspace'"),
])
def test_refused_combinations_name_the_reason(tmp_path, update, message):
    recipe = recipe_dict(tmp_path / "data", tmp_path / "run")
    recipe.update(update)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(LifelongConfig, recipe)
