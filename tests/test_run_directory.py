"""A run directory is data, not code: what a resume may trust, what it refuses and how it reports damaged files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from _lifelong_utils import recipe_dict, small_config, tiny_tokenizer_and_model
from safetensors.torch import load_file
from test_lifelong_run import CrashAtTask, SimulatedCrash

from trl_lifealign.lifelong import run_lifelong
from trl_lifealign.lifelong.recipe import LifelongConfig, RecipeError, from_dict, load_recipe
from trl_lifealign.lifelong.state import ConfigurationMismatchError, RunStateError


def _two_tasks(root, name="run", **overrides):
    config = small_config(root / "data", root / name, sft_warmup={"enabled": False}, **overrides)
    config.tasks = config.tasks[:2]
    return config


def _crash_after_first_task(config):
    tokenizer, model = tiny_tokenizer_and_model()
    with pytest.raises(SimulatedCrash):
        run_lifelong(config, model=model, tokenizer=tokenizer, callbacks=[CrashAtTask(1)], show_progress=False)


def _run(config, **kwargs):
    tokenizer, model = tiny_tokenizer_and_model()
    return run_lifelong(config, model=model, tokenizer=tokenizer, show_progress=False, **kwargs)


class WritesMarker:
    """A pickle payload that creates a file when unpickled (what a hostile optimizer.pt could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_optimizer_state_is_not_executed(tmp_path):
    config = _two_tasks(tmp_path, optimizer="carry")
    _crash_after_first_task(config)
    optimizer = next((tmp_path / "run" / "tasks").glob("01-*")) / "optimizer.pt"
    marker = tmp_path / "pwned"
    torch.save({"state": WritesMarker(marker)}, optimizer)
    with pytest.raises(RunStateError, match="optimizer.pt is not a plain tensor file"):
        _run(config)
    assert not marker.exists()


def test_task_directories_come_from_the_configuration_not_the_state_file(tmp_path):
    config = _two_tasks(tmp_path)
    _crash_after_first_task(config)
    state_path = tmp_path / "run" / "state.json"
    state = json.loads(state_path.read_text())
    state["completed"][0]["dir"] = "../../elsewhere"
    state_path.write_text(json.dumps(state))
    with pytest.raises(RunStateError, match="names directory '../../elsewhere'"):
        _run(config)


def test_changed_model_before_the_first_commit_starts_afresh(tmp_path, capsys):
    """Killed during task 1, re-run on another model: π₀ and everything else come from the new model, exactly as a
    clean run of that model."""
    config = _two_tasks(tmp_path)
    tokenizer, model = tiny_tokenizer_and_model()
    with pytest.raises(SimulatedCrash):
        run_lifelong(config, model=model, tokenizer=tokenizer, callbacks=[CrashAtTask(0)], show_progress=False)
    other_tokenizer, other = tiny_tokenizer_and_model()
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)  # a different base model
    resumed = run_lifelong(config, model=other, tokenizer=other_tokenizer, show_progress=False)
    assert "starting afresh" in capsys.readouterr().out
    clean_tokenizer, clean = tiny_tokenizer_and_model()
    with torch.no_grad():
        clean.lm_head.weight.mul_(3.0)
    reference = run_lifelong(_two_tasks(tmp_path, "clean"), model=clean, tokenizer=clean_tokenizer,
                             show_progress=False)
    assert resumed.margin_matrix == reference.margin_matrix


@pytest.mark.parametrize("change, component", [
    (lambda c: setattr(c.evaluation, "max_length", 48), "evaluation"),
    (lambda c: setattr(c.evaluation, "max_rows", 2), "evaluation"),
    (lambda c: c.training.update(learning_rate=2e-2), "settings"),
])
def test_resume_refuses_changed_settings_naming_them(tmp_path, change, component):
    config = _two_tasks(tmp_path)
    _crash_after_first_task(config)
    changed = _two_tasks(tmp_path)
    change(changed)
    with pytest.raises(ConfigurationMismatchError, match=f"{component} changed"):
        _run(changed)


def test_resume_refuses_changed_data_content_at_the_same_path(tmp_path):
    config = _two_tasks(tmp_path)
    _crash_after_first_task(config)
    path = tmp_path / "data" / "concise" / "train.json"
    rows = json.loads(path.read_text())
    rows[0]["chosen"] += " Indeed."
    path.write_text(json.dumps(rows))
    with pytest.raises(ConfigurationMismatchError, match=r"tasks\[0\] changed"):
        _run(config)


def test_a_moved_run_directory_resumes_to_the_same_result(tmp_path):
    config = _two_tasks(tmp_path, name="a")
    _crash_after_first_task(config)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = _two_tasks(tmp_path, name="b")
    resumed = _run(moved)
    reference = _run(_two_tasks(tmp_path, name="clean"))
    assert resumed.margin_matrix == reference.margin_matrix
    for index in (1, 2):
        a, b = (load_file(str(next((tmp_path / run / "tasks").glob(f"0{index}-*")) / "adapter" /
                              "adapter_model.safetensors")) for run in ("b", "clean"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage, error", [
    (lambda run: (run / "state.json").write_text('{"version": 2, "finger'), r"state.json is truncated or corrupt"),
    (lambda run: (run / "state.json").write_text('{"version": 2, "fingerprints": {}}'), "lacks a valid 'completed'"),
    (lambda run: next((run / "tasks").glob("01-*")).joinpath("replay.json").write_text('{"entries": ['),
     "replay.json is truncated or malformed"),
    (lambda run: next((run / "tasks").glob("01-*")).joinpath("adapter", "adapter_model.safetensors")
     .write_bytes(b"\x00" * 40), "adapter_model.safetensors is truncated or corrupt"),
    (lambda run: _edit_manifest(next((run / "tasks").glob("01-*")) / "memory" / "manifest.json"),
     "has a malformed field"),
])
def test_damaged_files_get_errors_naming_them(tmp_path, damage, error):
    config = _two_tasks(tmp_path, replay={"fraction": 0.5, "capacity": 6, "seed": 1})
    _crash_after_first_task(config)
    damage(tmp_path / "run")
    with pytest.raises((RunStateError, ValueError, RuntimeError), match=error):
        _run(config)


def _edit_manifest(path):
    manifest = json.loads(path.read_text())
    manifest["task_count"] = "many"
    path.write_text(json.dumps(manifest))


def test_a_truncated_initial_logps_cache_is_recomputed(tmp_path):
    config = _two_tasks(tmp_path)
    _crash_after_first_task(config)
    (tmp_path / "run" / "initial_logps.json").write_text('{"key": ')
    resumed = _run(config)
    assert resumed.margin_matrix == _run(_two_tasks(tmp_path, name="clean")).margin_matrix


def test_leftovers_are_cleaned_and_files_follow_the_umask(tmp_path):
    config = _two_tasks(tmp_path)
    _crash_after_first_task(config)
    run = tmp_path / "run"
    (run / ".state.json.abc.tmp").write_text("half")
    (run / "memory" / ".basis-x.tmp").write_text("half")
    (run / "tasks" / ".01-concise.xyz.tmp").mkdir()
    previous = os.umask(0o022)
    try:
        _run(config)
    finally:
        os.umask(previous)
    assert not list(run.rglob("*.tmp"))
    assert stat.S_IMODE((run / "state.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((run / "report.json").stat().st_mode) == 0o644


def test_two_processes_on_one_run_directory_are_locked_out(tmp_path):
    from trl_lifealign.lifelong.state import RunDirectory

    directory = RunDirectory(tmp_path / "run")
    with directory.locked():
        script = ("from trl_lifealign.lifelong.state import RunDirectory, RunStateError\n"
                  f"try:\n    RunDirectory({str(tmp_path / 'run')!r}).locked().__enter__()\n"
                  "except RunStateError as e:\n    print('locked:', e)\n")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "locked: another process is running in" in out


def test_over_long_training_pairs_are_reported_as_dropped(tmp_path):
    config = _two_tasks(tmp_path)
    path = tmp_path / "data" / "concise" / "train.json"
    rows = json.loads(path.read_text())
    rows[0]["query"] = " ".join(["Question: is the sky blue?"] * 30)
    path.write_text(json.dumps(rows))
    result = _run(config)
    assert result.report.tasks[0].dropped_pairs == 1 and result.report.tasks[0].train_pairs == len(rows)


BAD_VALUES = [
    ({"training": {"learning_rate": -1}}, "training.learning_rate: must be > 0"),
    ({"training": {"learning_rate": float("nan")}}, "training.learning_rate: expected a finite number"),
    ({"training": {"learning_rate": "abc"}}, "training.learning_rate: expected a number"),
    ({"training": {"learning_rate": "5e-3"}}, "write 5.0e-3"),
    ({"training": {"beta": "high"}}, "training.beta: expected a number"),
    ({"training": {"beta": float("nan")}}, "training.beta: expected a finite number"),
    ({"training": {"max_length": "64"}}, "training.max_length: expected an integer"),
    ({"training": {"gradient_accumulation_steps": 0}}, "training.gradient_accumulation_steps: must be >= 1"),
    ({"training": {"per_device_train_batch_size": 0}}, "training.per_device_train_batch_size: must be >= 1"),
    ({"sft_warmup": {"learning_rate": -1}}, "sft_warmup.learning_rate: must be > 0"),
    ({"evaluation": {"batch_size": 0}}, "evaluation.batch_size: must be >= 1"),
    ({"evaluation": {"max_rows": 0}}, "evaluation.max_rows: must be >= 1"),
    ({"seed": -1}, "seed: must be >= 0"),
    ({"torch_dtype": "float33"}, "torch_dtype: expected one of"),
    ({"memory": {"energy_threshold": float("nan")}}, "memory.energy_threshold: must be a number in [0, 1]"),
]


@pytest.mark.parametrize("update, message", BAD_VALUES)
def test_every_recipe_value_is_checked_at_load(tmp_path, update, message):
    recipe = recipe_dict(tmp_path / "data", tmp_path / "run")
    for key, value in update.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("'5e-3'", "5e-3"), encoding="utf-8")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert message in str(error.value)


@pytest.mark.parametrize("name", ["x" * 300, "a\x00b", "../up", ""])
def test_task_names_must_be_plain(tmp_path, name):
    recipe = recipe_dict(tmp_path / "data", tmp_path / "run")
    recipe["tasks"][0]["name"] = name
    with pytest.raises(RecipeError, match=r"tasks\[0\].name"):
        from_dict(LifelongConfig, recipe)


def test_a_bad_per_task_override_fails_before_training(tmp_path):
    recipe = recipe_dict(tmp_path / "data", tmp_path / "run")
    recipe["tasks"][2]["overrides"] = {"learning_rate": -1.0}
    with pytest.raises(RecipeError, match=r"tasks\[2\].overrides.learning_rate: must be > 0"):
        from_dict(LifelongConfig, recipe)


def test_cli_reports_data_and_run_errors_in_one_line(tmp_path, capsys):
    from trl_lifealign.cli import main

    tokenizer, model = tiny_tokenizer_and_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = recipe_dict(tmp_path / "data", tmp_path / "run", tmp_path / "model")
    (tmp_path / "data" / "polite" / "train.json").write_bytes("[{\"query\": \"caf\xe9\"}]".encode("latin-1"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lifealign train: error:") and "polite/train.json: not UTF-8" in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("content, message", [
    (None, r"no EWC state at .*state\.json: was the previous task"),
    ('{"format": "x", "form', r"EWC state .*state\.json is truncated or corrupt"),
    ('["not", "a", "dict"]', r"state\.json is not in the EWC state format 'trl-lifealign-ewc'"),
    ('{"format": "trl-lifealign-ewc", "format_version": 9}', r"has format version 9; this version of trl-lifealign "
                                                               r"reads versions \[1, 2\]"),
])
def test_versioned_state_files_are_checked_with_errors_naming_them(tmp_path, content, message):
    from trl_lifealign.atomic import read_versioned_json

    path = tmp_path / "state.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(RunStateError, match=message):
        read_versioned_json(path, "trl-lifealign-ewc", (1, 2), RunStateError, "EWC state",
                            ": was the previous task trained with EWCCallback?")
    path.write_text('{"format": "trl-lifealign-ewc", "format_version": 2, "tasks": 3}', encoding="utf-8")
    assert read_versioned_json(path, "trl-lifealign-ewc", (1, 2), RunStateError, "EWC state")["tasks"] == 3
