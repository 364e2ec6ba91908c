"""Loud failures: a misspelled plugin path or a wrong-typed/out-of-range key stops the run with a clear message.

Axolotl 0.19 skips a plugin it cannot import and drops the keys its schema does not declare, so without these guards
the run would silently become plain DPO. Two real `axolotl train` runs (the guards inside Axolotl's own process) and
fast in-process checks through Axolotl's real config validation.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from _axolotl_utils import TINY_RECIPE, axolotl_train, copy_tiny_recipe

pytestmark = pytest.mark.axolotl

DATASET = {"path": "./data/task1.json", "split": "train", "type": "chat_template.default",
           "field_messages": "prompt", "field_chosen": "chosen", "field_rejected": "rejected"}


@pytest.fixture(scope="module")
def recipe_copy(tmp_path_factory):
    return copy_tiny_recipe(tmp_path_factory.mktemp("axolotl-failures") / "tiny")


def _stage_yaml(root, name, **changes):
    config = yaml.safe_load((root / "base.yml").read_text())
    config.update(datasets=[DATASET], output_dir=f"./outputs/{name}", lifealign_memory_dir=f"./outputs/{name}-memory")
    config.update(changes)
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_misspelled_plugin_path_stops_axolotl_train(recipe_copy):
    """Axolotl prints 'Failed to load plugin' and goes on; our trainer (trainer_cls) then refuses to run."""
    config = _stage_yaml(recipe_copy, "misspelled", plugins=["axolotl_plugn.LifeAlignPlugin"])
    result = axolotl_train(config)
    assert result.returncode != 0
    assert "the LifeAlign plugin is not registered" in result.stdout
    assert "Failed to load plugin: axolotl_plugn.LifeAlignPlugin" in result.stdout
    assert "'loss'" not in result.stdout, "a training step ran"
    assert not (recipe_copy / "outputs" / "misspelled" / "adapter_model.safetensors").exists()


def test_wrong_typed_key_stops_axolotl_train(recipe_copy):
    config = _stage_yaml(recipe_copy, "wrongtype", lifealign_focal_gamma="high")
    result = axolotl_train(config, timeout=120)
    assert result.returncode != 0
    assert "lifealign_focal_gamma" in result.stdout and "valid number" in result.stdout
    assert "Starting trainer" not in result.stdout


def test_chain_refuses_misspelled_plugin_before_launching(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    for name in ("chain.yml", "base.yml"):
        (root / name).write_text((TINY_RECIPE / name).read_text().replace(
            "axolotl_plugin.LifeAlignPlugin", "axolotl_plugin.LifeAlignPlugn"))
    from axolotl_plugin.chain import validate_chain
    from axolotl_plugin.spec import ChainError, load_chain

    with pytest.raises(ChainError, match="plugin 'axolotl_plugin.LifeAlignPlugn': module 'axolotl_plugin' has "
                                              "no 'LifeAlignPlugn'"):
        validate_chain(load_chain(root / "chain.yml"))
    (root / "base.yml").write_text((TINY_RECIPE / "base.yml").read_text().replace(
        "axolotl_plugin.LifeAlignPlugin", "axolotl_plugn.LifeAlignPlugin"))
    with pytest.raises(ChainError, match="plugin 'axolotl_plugn.LifeAlignPlugin' cannot be imported"):
        validate_chain(load_chain(root / "chain.yml"))
    assert not (root / "outputs").exists()


# ---------------------------------------------------------------------------------- in-process, Axolotl's validation


@pytest.fixture(scope="module")
def base_config(recipe_copy, tmp_path_factory):
    config = yaml.safe_load((recipe_copy / "base.yml").read_text())
    config.update(base_model=str(recipe_copy / "tiny-llama"), datasets=[copy.deepcopy(DATASET)],
                  output_dir=str(tmp_path_factory.mktemp("out")), lifealign_memory_dir="/tmp/unused-memory")
    return config


def _validate(config):
    from axolotl_plugin.validation import validate_stage_config

    return validate_stage_config(config, normalize=False)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lifealign_energy_threshold": 1.5}, "lifealign_energy_threshold"),
        ({"lifealign_overlap_weight": -0.1}, "lifealign_overlap_weight"),
        ({"lifealign_focal_gamma": -1.0}, "lifealign_focal_gamma"),
        ({"lifealign_focal_gamma": "2.0"}, "lifealign_focal_gamma"),
        ({"lifealign_replay_capacity": 2.5}, "lifealign_replay_capacity"),
        ({"lifealign_reference": "teacher"}, "lifealign_reference"),
        ({"lifealign_consolidate": "yes"}, "lifealign_consolidate"),
        ({"lifealign_memory_dir": None}, "lifealign_memory_dir is required"),
        ({"dpo_loss_type": ["sigmoid"]}, "does not include 'fpo'"),
        ({"lifealign_replay_fraction": 0.5}, "needs lifealign_replay_stages"),
    ],
)
def test_args_model_refuses_bad_values(base_config, changes, message):
    from pydantic import ValidationError

    config = {**base_config, **changes}
    if changes.get("lifealign_memory_dir", "set") is None:
        del config["lifealign_memory_dir"]
    with pytest.raises(ValidationError, match=message):
        _validate(config)


def test_plugin_refuses_non_dpo_and_foreign_trainer(base_config):
    with pytest.raises(ValueError, match="needs `rl: dpo`"):
        _validate({**base_config, "rl": "kto"})
    with pytest.raises(ValueError, match="is not a subclass of axolotl_plugin.trainer.AxolotlFPOTrainer"):
        _validate({**base_config, "trainer_cls": "axolotl.core.trainers.dpo.trainer.AxolotlDPOTrainer"})


def test_keys_without_plugin_are_refused_by_the_chain_check(base_config):
    from axolotl_plugin.validation import StageConfigError, check_plugins_importable

    with pytest.raises(StageConfigError, match="does not list axolotl_plugin.LifeAlignPlugin"):
        check_plugins_importable({**base_config, "plugins": []}, "stage")


def test_valid_config_reaches_axolotl_with_our_keys(base_config):
    validated = _validate(base_config)
    assert validated.trainer_cls == "axolotl_plugin.trainer.AxolotlFPOTrainer"
    assert validated.dpo_loss_type == ["fpo"]
    assert validated.lifealign_focal_gamma == 2.0 and validated.lifealign_reference == "previous_task"
