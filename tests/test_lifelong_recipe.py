"""Recipe YAML loading: key paths in every error, unknown keys, wrong types, cross-field checks; shipped recipes."""

from pathlib import Path

import pytest
import yaml

from trl_lifealign.lifelong.recipe import LifelongConfig, RecipeError, from_dict, load_recipe

REPO = Path(__file__).resolve().parents[1]


def base_recipe():
    return {
        "model": "tiny",
        "output_dir": "run",
        "training": {"learning_rate": 1e-3, "focal_gamma": 2.0},
        "tasks": [
            {"name": "a", "train": {"path": "a/train.json", "columns": {"query": "prompt"}},
             "eval": {"path": "a/eval.json"}},
            {"name": "b", "train": [{"path": "b/train.json"}, {"path": "c/train.json"}],
             "eval": {"path": "b/eval.json"}, "overrides": {"num_train_epochs": 2}},
        ],
    }


def load(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_recipe(path)


def test_valid_recipe_resolves_paths_and_defaults(tmp_path):
    config = load(tmp_path, base_recipe())
    assert config.output_dir == str(tmp_path / "run")
    assert config.tasks[0].train.path == str(tmp_path / "a" / "train.json")
    assert [s.path for s in config.tasks[1].train] == [str(tmp_path / "b/train.json"), str(tmp_path / "c/train.json")]
    assert config.tasks[1].overrides == {"num_train_epochs": 2}
    # Documented defaults.
    assert config.reference == "previous_task"
    assert config.memory.energy_threshold == 0.9 and config.memory.overlap_weight == 0.5
    assert config.replay.fraction == 0.0 and config.optimizer == "reset" and not config.sft_warmup.enabled
    assert [e.name for e in config.resolved_eval_sets()] == ["a", "b"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["tasks"][1]["train"][0].update(path=3), "tasks[1].train[0].path: expected a string"),
        (lambda r: r["tasks"][0]["train"].update(path=["x"]), "tasks[0].train.path: expected a string"),
        (lambda r: r.update(colour="red"), "colour: unknown key"),
        (lambda r: r["tasks"][0].update(evaluate={}), "tasks[0].evaluate: unknown key"),
        (lambda r: r.update(memory={"theta": 0.9}), "memory.theta: unknown key"),
        (lambda r: r.update(memory={"energy_threshold": "high"}), "memory.energy_threshold: expected a number"),
        (lambda r: r.update(memory={"enabled": "yes"}), "memory.enabled: expected true or false"),
        (lambda r: r.update(replay={"capacity": 1.5}), "replay.capacity: expected an integer"),
        (lambda r: r.update(reference="start"), "reference: expected one of 'base', 'previous_task', got 'start'"),
        (lambda r: r.update(optimizer="keep"), "optimizer: expected one of 'reset', 'carry'"),
        (lambda r: r["training"].update(learning_rte=1), "training.learning_rte: unknown FPOConfig field"),
        (lambda r: r["training"].update(output_dir="x"), "training.output_dir: set by the runner"),
        (lambda r: r["tasks"][1]["overrides"].update(epochs=1), "tasks[1].overrides.epochs: unknown FPOConfig field"),
        (lambda r: r.update(tasks=[]), "tasks: at least one task is required"),
        (lambda r: r["tasks"][1].update(name="a"), "tasks[1].name: must be unique"),
        (lambda r: r["tasks"][0].pop("eval"), "tasks[0].eval: required when no top-level eval_sets"),
        (lambda r: r["tasks"][0].pop("train"), "tasks[0]: missing required key(s) train"),
        (lambda r: r["tasks"][0]["train"].update(columns={"query": "question"}), "tasks[0].train: DataSource.columns"),
        (lambda r: r["tasks"][0].update(train={"columns": {}}), "tasks[0].train: DataSource needs exactly one"),
        (lambda r: r.update(memory={"overlap_weight": 1.5}), "memory.overlap_weight: must be a number in [0, 1]"),
        (lambda r: r.update(evaluation={"scorers": ["meteor"]}), "evaluation.scorers: unknown scorer 'meteor'"),
        (lambda r: r.update(evaluation={"scorers": ["judge"]}), "evaluation.judge: required when"),
        (lambda r: r.update(lora={"target_modules": 5}), "lora.target_modules: expected a list or a string"),
        (lambda r: r.update(seed="1"), "seed: expected an integer"),
    ],
)
def test_recipe_errors_name_the_key_path(tmp_path, mutate, message):
    recipe = base_recipe()
    mutate(recipe)
    with pytest.raises(RecipeError) as error:
        load(tmp_path, recipe)
    assert message in str(error.value)
    assert str(tmp_path / "recipe.yaml") in str(error.value)


def test_eval_sets_independent_of_tasks(tmp_path):
    recipe = base_recipe()
    for task in recipe["tasks"]:
        task.pop("eval")
    recipe["eval_sets"] = [{"name": "held-out", "source": {"path": "h.json"}}]
    config = load(tmp_path, recipe)
    assert [(e.name, e.source.path) for e in config.resolved_eval_sets()] == [("held-out", str(tmp_path / "h.json"))]


def test_not_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe: expected a mapping"):
        from_dict(LifelongConfig, [1])


@pytest.mark.parametrize("name", ["lifealign-paper.yaml", "small-qlora.yaml"])
def test_shipped_recipes_validate(name):
    config = load_recipe(REPO / "recipes" / "lifelong" / name)
    assert config.tasks and config.output_dir


def test_preset_expands_under_the_recipe_keys(tmp_path):
    recipe = base_recipe()
    recipe["preset"] = "recommended"
    del recipe["training"]["focal_gamma"]
    recipe["defences"] = {"ewc": {"decay": 0.5}}  # an explicit key wins over the preset's, the rest is kept
    config = load(tmp_path, recipe)
    assert config.memory.enabled is False and config.training["focal_gamma"] == 0.0
    assert config.training["learning_rate"] == 1e-3  # the recipe's other training keys are kept
    assert config.defences.ewc.decay == 0.5 and config.defences.ewc.strength == 10000.0
    recipe["preset"] = "strongest"
    with pytest.raises(RecipeError, match=r"preset: unknown preset 'strongest' \(known: recommended"):
        load(tmp_path, recipe)


@pytest.mark.parametrize("preset", ["recommended", "recommended-replay"])
def test_presets_are_the_benchmark_methods_they_name(tmp_path, preset):
    """A preset gives exactly the benchmarked method the README's numbers describe."""
    from benchmarks.lifelong.runs import build_recipe
    from benchmarks.lifelong.settings import METHODS, BenchSettings
    from trl_lifealign.lifelong.presets import BENCHMARK_METHOD

    tasks = [{"name": n, "train_file": f"{n}.jsonl", "eval_file": f"{n}-dev.jsonl", "monitor_file": f"{n}-m.jsonl"}
             for n in ("a", "b")]
    settings = BenchSettings(tasks=("a", "b"))
    bench = from_dict(LifelongConfig, build_recipe(METHODS[BENCHMARK_METHOD[preset]], settings, tasks, tmp_path, 0))
    recipe = base_recipe()
    del recipe["training"]["focal_gamma"]
    recipe["preset"] = preset
    config = load(tmp_path, recipe)
    assert config.defences == bench.defences and config.memory.enabled == bench.memory.enabled
    assert config.training["focal_gamma"] == bench.training["focal_gamma"]
    assert (config.replay is None) == (bench.replay is None)
    if config.replay is not None:
        assert config.replay.fraction == bench.replay.fraction
