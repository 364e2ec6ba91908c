"""End to end: a 3-task tiny run with replay, SFT warm-up, SLMC and optimizer carry; resume; CLI; references."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from _lifelong_utils import recipe_dict, small_config, tiny_tokenizer_and_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from trl_lifealign.lifelong import run_lifelong


class SimulatedCrash(RuntimeError):
    pass


class CrashAtTask(TrainerCallback):
    """Raises inside the preference stage of the `crash_at`-th trainer it is attached to (0-based)."""

    def __init__(self, crash_at: int):
        self.crash_at, self.trainers_seen = crash_at, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainers_seen += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainers_seen - 1 == self.crash_at:
            raise SimulatedCrash("simulated interruption")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifelong")
    config = small_config(root / "data", root / "full", optimizer="carry")
    tokenizer, model = tiny_tokenizer_and_model()
    return root, run_lifelong(config, model=model, tokenizer=tokenizer), model


def _adapter(run_dir, index):
    task_dir = sorted((run_dir / "tasks").iterdir())[index]
    return load_file(str(task_dir / "adapter" / "adapter_model.safetensors"))


def test_three_task_run_produces_a_complete_report(full_run):
    _, result, _ = full_run
    run_dir = result.run_dir
    assert result.task_names == ["concise", "polite", "detailed"] == result.eval_names
    assert len(result.matrix) == 3 and all(len(row) == 3 for row in result.matrix)
    assert result.initial_row == [0.5, 0.5, 0.5]
    assert all(0.0 <= v <= 1.0 for row in result.matrix for v in row)
    assert set(result.metrics) == {"last", "ap", "bwt", "fwt"} and None not in result.metrics.values()
    assert result.matrix[0][0] > 0.5  # the first task was learned

    report = json.loads((run_dir / "report.json").read_text())
    tasks = report["tasks"]
    # Replay: random half of each finished task, capacity 6 (FIFO): 0, 4, then 6 replayed pairs.
    assert [t["replayed_pairs"] for t in tasks] == [0, 4, 6]
    assert tasks[2]["replay_by_task"] == {"concise": 2, "polite": 4}
    assert all(t["sft_warmup"]["steps"] > 0 for t in tasks)
    assert [t["consolidation"]["task_index"] for t in tasks] == [0, 1, 2]
    assert tasks[0]["consolidation"]["conflict"] == 0.0 and tasks[2]["consolidation"]["conflict"] > 0.0
    for index, task in enumerate(tasks):
        task_dir = run_dir / task["dir"]
        assert (task_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert (task_dir / "adapter" / "adapter_config.json").is_file()
        assert json.loads((task_dir / "memory" / "manifest.json").read_text())["task_count"] == index + 1
        assert (task_dir / "optimizer.pt").is_file()
    markdown = (run_dir / "report.md").read_text()
    for text in ("| Last | AP | BWT | FWT |", "matrix_accuracy.png", "accuracy_curves.png", "| concise |"):
        assert text in markdown
    assert (run_dir / "matrix_accuracy.png").stat().st_size > 1000
    assert (run_dir / "accuracy_curves.png").stat().st_size > 1000

    # The saved adapter of each task is the consolidated one and differs from task to task.
    assert not torch.equal(_adapter(run_dir, 0)[next(iter(_adapter(run_dir, 0)))],
                           _adapter(run_dir, 1)[next(iter(_adapter(run_dir, 1)))])

    # `lifealign report RUN_DIR` re-renders the markdown and the plots.
    from trl_lifealign.cli import main

    for name in ("report.md", "matrix_accuracy.png", "accuracy_curves.png"):
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == markdown and (run_dir / "matrix_accuracy.png").is_file()


def test_trainers_leave_no_state_on_the_model(full_run):
    """The stages' trainers (SFT warm-up, FPO) switch on gradient checkpointing and input-require-grads hooks, wrap
    forwards (bf16 autocast) and flag modules as accelerate-prepared; the runner undoes it after each stage, so the
    next stage and the evaluation see the same model as a resumed run's freshly built one. (The LoRA wrapper around
    this base model is not reachable from here; the resume test below catches a leak there.)"""
    _, _, model = full_run  # the base model the runner wrapped with LoRA and trained on three tasks
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(k in vars(m) for m in model.modules() for k in ("forward", "_is_accelerate_prepared"))
    assert model.config.use_cache is True


def test_resume_after_interruption_equals_uninterrupted_run(full_run, tmp_path):
    """Crash inside task 2's preference stage, re-run: same adapters (bit for bit) and metrics as an uninterrupted run.

    Replay, SFT warm-up, SLMC and optimizer carry are on (their state is restored from the last committed task). The
    crashed attempt already ran task 2's warm-up on its in-memory model; the resumed run starts task 2 on a fresh one.
    The uninterrupted run is `full_run` (same configuration, another output_dir).
    """
    _, full, _ = full_run
    config = small_config(tmp_path / "data", tmp_path / "resumed", optimizer="carry")
    tokenizer, model = tiny_tokenizer_and_model()
    with pytest.raises(SimulatedCrash):
        run_lifelong(config, model=model, tokenizer=tokenizer, callbacks=[CrashAtTask(1)])
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert [t["name"] for t in state["completed"]] == ["concise"]

    tokenizer, model = tiny_tokenizer_and_model()  # a fresh process would rebuild the same model
    resumed = run_lifelong(config, model=model, tokenizer=tokenizer)
    assert resumed.matrix == full.matrix
    assert resumed.margin_matrix == full.margin_matrix
    for index in range(3):
        a, b = _adapter(full.run_dir, index), _adapter(resumed.run_dir, index)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run re-run is a no-op that returns the same result.
    again = run_lifelong(config, model=tiny_tokenizer_and_model()[1], tokenizer=tokenizer)
    assert again.matrix == full.matrix

    changed = small_config(tmp_path / "data", tmp_path / "resumed", optimizer="reset")
    with pytest.raises(ValueError, match=r"committed task\(s\) of a different configuration: settings changed"):
        run_lifelong(changed, model=tiny_tokenizer_and_model()[1], tokenizer=tokenizer)


def test_cli_train_from_recipe_with_base_reference(tmp_path, capsys):
    """`lifealign train RECIPE.yaml` on a model saved to disk; reference base (the other tests use the default
    previous_task), no SFT, no memory, with generation metrics."""
    from trl_lifealign.cli import main

    tokenizer, model = tiny_tokenizer_and_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = recipe_dict(tmp_path / "data", tmp_path / "run", tmp_path / "model")
    recipe.update(reference="base", memory={"enabled": False}, replay={"fraction": 0.0},
                  sft_warmup={"enabled": False})
    recipe["evaluation"].update(generation=True, generation_rows=2, max_new_tokens=4)
    recipe["tasks"] = recipe["tasks"][:2]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Last" in out and "BWT" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["reference"] == "base"
    assert report["tasks"][0]["consolidation"] is None and not (tmp_path / "run" / "memory").exists()
    assert report["matrix"]["accuracy"][0][0] > 0.5
    generation = report["generation"]
    assert set(generation) == {"bleu4", "rougeL"}
    assert len(generation["rougeL"]["matrix"]) == 2 and len(generation["rougeL"]["initial_row"]) == 2
    assert set(generation["bleu4"]["metrics"]) == {"last", "ap", "bwt", "fwt"}
    assert "## Generation: rougeL" in (tmp_path / "run" / "report.md").read_text()


def test_bad_data_fails_before_training_and_skip_counts(tmp_path):
    config = small_config(tmp_path / "data", tmp_path / "run")
    skipping = small_config(tmp_path / "data", tmp_path / "run2", skip_bad_rows=True)
    rows = json.loads((tmp_path / "data" / "polite" / "train.json").read_text())
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[5]["chosen"] = ""
    (tmp_path / "data" / "polite" / "train.json").write_text(json.dumps(rows))
    tokenizer, model = tiny_tokenizer_and_model()
    with pytest.raises(ValueError, match=r"polite/train.json row 3: chosen is identical to rejected"):
        run_lifelong(config, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "run" / "tasks").exists()  # nothing trained

    from trl_lifealign.lifelong.data import load_preference_data

    data = load_preference_data(skipping.tasks[1].train, skip_bad_rows=True)
    assert data.summary()["skipped_total"] == 2


class RecordReference(TrainerCallback):
    """At the start of every preference stage: does the model carry TRL's frozen "ref" adapter, and is it the policy
    the stage starts from?"""

    def __init__(self):
        self.seen: list[tuple[bool, bool | None]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        has_ref = "ref" in model.peft_config
        same = None
        if has_ref:
            pairs = [(p, params[n.replace(".ref.", ".default.")]) for n, p in params.items() if ".ref." in n]
            same = bool(pairs) and all(torch.equal(r, d) for r, d in pairs)
        self.seen.append((has_ref, same))


@pytest.mark.parametrize("reference", ["previous_task", "base"])
def test_reference_policy_of_each_task(tmp_path, reference):
    """previous_task: every stage's reference is TRL's frozen copy of the adapter it starts from; base: no copy, so
    TRL scores the reference with the adapter disabled."""
    config = small_config(tmp_path / "data", tmp_path / "run", reference=reference, sft_warmup={"enabled": False},
                          replay={"fraction": 0.0})
    config.tasks = config.tasks[:2]
    recorder = RecordReference()
    tokenizer, model = tiny_tokenizer_and_model()
    run_lifelong(config, model=model, tokenizer=tokenizer, callbacks=[recorder])
    assert recorder.seen == ([(True, True)] * 2 if reference == "previous_task" else [(False, None)] * 2)
    assert "ref" not in model.peft_config  # the frozen copy never outlives its stage


def test_component_metrics_reach_tensorboard(tmp_path):
    """`report_to: tensorboard`: the trainer's own metrics and every component's group/name metrics (fpo/*, slmc/*,
    a defence's) land in the event files, with no wiring by the user."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(tmp_path / "data", tmp_path / "run", sft_warmup={"enabled": False},
                          defences={"ewc": {"strength": 10.0, "fisher_batches": 1}})
    config.tasks = config.tasks[:2]
    config.training.update(report_to=["tensorboard"], logging_steps=1)  # events under each task's trainer dir
    tokenizer, model = tiny_tokenizer_and_model()
    run_lifelong(config, model=model, tokenizer=tokenizer, show_progress=False)
    tags = set()
    for events in (tmp_path / "run" / "tasks").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/fpo/focal_weight", "train/slmc/conflict", "train/slmc/kept_energy", "train/ewc/penalty",
            "train/ewc/fisher_mean"} <= tags, sorted(tags)


def test_runner_progress_shows_no_trainer_bars_when_training_turns_them_off(tmp_path, capfd):
    """The runner's own task and eval bars only: `disable_tqdm` in `training` holds for the SFT warm-up too."""
    config = small_config(tmp_path / "data", tmp_path / "run")
    config.tasks = config.tasks[:1]
    config.training.update(disable_tqdm=True)
    tokenizer, model = tiny_tokenizer_and_model()
    result = run_lifelong(config, model=model, tokenizer=tokenizer, show_progress=True)
    assert result.report.tasks[0].sft_warmup["steps"] > 0
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "tasks" in output  # the runner's bar, which has a description
    assert "train_runtime" not in output  # a trainer's printed log dict
    assert not re.search(r"(^|[\r\n])\s*\d+%\|", output), output  # a trainer's step bar has none
