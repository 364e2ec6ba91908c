"""Every Axolotl recipe (each stage of each chain, as the chain renders it) loads through Axolotl's own validation.

No model is downloaded: Axolotl's schema validation does not read `base_model`, so each stage is first validated as
written (hub ids included) against the recipe's target hardware (GPU capabilities passed explicitly, as
`axolotl train` would detect them there); then Axolotl's `normalize_config`, which loads the model config, runs with
`base_model` pointed at a local tiny Llama (the only key changed).
"""

from __future__ import annotations

import json
import os

import pytest
from _axolotl_utils import RECIPES, REPO

pytestmark = pytest.mark.axolotl

TARGET_GPU = {"bf16": True, "fp8": False, "tf32": True, "compute_capability": "sm_90"}
ENV_CAPABILITIES = {"torch_version": "2.13.0"}
CHAINS = sorted(RECIPES.glob("*/chain.yml"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from trl_lifealign.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), ["hello world", "a tiny model for validation"])


def test_the_three_recipes_exist():
    assert {path.parent.name for path in CHAINS} >= {"tiny", "llama-3.1-8b-lora", "llama-3.1-70b-qlora"}


@pytest.mark.parametrize("chain_file", CHAINS, ids=[path.parent.name for path in CHAINS])
def test_recipe_stages_validate_with_axolotl(chain_file, tiny_model_dir, monkeypatch):
    from axolotl_plugin.spec import load_chain, render_stage_config
    from axolotl_plugin.validation import validate_stage_config

    chain = load_chain(chain_file)
    monkeypatch.chdir(chain.root)  # relative paths (deepspeed JSON, data) resolve as in the stage processes
    capabilities = {**TARGET_GPU, "n_gpu": chain.num_processes}
    for index, stage in enumerate(chain.stages):
        config = render_stage_config(chain, index)
        validated = validate_stage_config(config, where=f"{chain_file}:{stage.name}", capabilities=capabilities,
                                          env_capabilities=ENV_CAPABILITIES, normalize=False)
        assert validated.rl == "dpo" and validated.adapter in ("lora", "qlora")
        assert validated.trainer_cls == "axolotl_plugin.trainer.AxolotlFPOTrainer"
        assert validated.dpo_loss_type == ["fpo"]
        assert validated.lifealign_memory_dir == str(chain.output_dir / stage.name / "memory")
        if index:
            assert validated.lifealign_previous_adapter == str(chain.output_dir / chain.stages[index - 1].name)
        if validated.deepspeed:
            deepspeed_file = chain.root / validated.deepspeed
            assert json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"] == 3
        normalized = validate_stage_config({**config, "base_model": str(tiny_model_dir)}, where=stage.name,
                                           capabilities=capabilities, env_capabilities=ENV_CAPABILITIES)
        assert normalized.batch_size == normalized.micro_batch_size * normalized.gradient_accumulation_steps


def test_70b_recipe_is_qlora_on_zero3_with_8_processes():
    from axolotl_plugin.chain import launch_command
    from axolotl_plugin.spec import load_chain, render_stage_config

    chain = load_chain(RECIPES / "llama-3.1-70b-qlora" / "chain.yml")
    config = render_stage_config(chain, 0)
    assert config["load_in_4bit"] and config["adapter"] == "qlora"
    assert os.path.normpath(chain.root / config["deepspeed"]) == str(REPO / "recipes" / "deepspeed" / "zero3_bf16.json")
    assert config["gradient_checkpointing"] and config["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    command = launch_command(chain, chain.root / "stage.yml")
    assert command[command.index("--launcher"):][:5] == ["--launcher", "accelerate", "--", "--num_processes", "8"]
