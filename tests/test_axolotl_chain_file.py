"""The chain file: rendering of stage configs and refusal of malformed chains (no Axolotl process started)."""

from __future__ import annotations

import pytest
import yaml
from _axolotl_utils import TINY_RECIPE

pytestmark = pytest.mark.axolotl


def _write(tmp_path, chain: dict, base: dict | None = None):
    if base is not None:
        (tmp_path / "base.yml").write_text(yaml.safe_dump(base))
    path = tmp_path / "chain.yml"
    path.write_text(yaml.safe_dump(chain))
    return path


def test_tiny_recipe_renders_chained_stages():
    from axolotl_plugin.spec import load_chain, render_stage_config

    chain = load_chain(TINY_RECIPE / "chain.yml")
    first, second = (render_stage_config(chain, i) for i in range(2))
    assert first["output_dir"] == str(TINY_RECIPE / "outputs" / "chain" / "facts")
    assert "lifealign_previous_adapter" not in first and "lifealign_replay_stages" not in first
    assert second["lifealign_previous_adapter"] == first["output_dir"]
    assert second["lifealign_memory_dir"] == str(TINY_RECIPE / "outputs" / "chain" / "manners" / "memory")
    assert second["lifealign_replay_stages"] == [{"name": "facts", "datasets": first["datasets"]}]
    assert (second["lifealign_replay_fraction"], second["lifealign_replay_capacity"]) == (0.5, 2)
    assert second["datasets"][0]["path"] == "./data/task2.json"
    assert second["plugins"] == ["axolotl_plugin.LifeAlignPlugin"]


@pytest.mark.parametrize(
    ("chain", "base", "message"),
    [
        ({"base_config": "base.yml", "stages": [{"name": "a"}], "epochs": 3}, {"datasets": [{}]}, "unknown key"),
        ({"base_config": "base.yml", "stages": []}, {}, "non-empty list"),
        ({"stages": [{"name": "a"}]}, None, "give `datasets` or `config`"),
        ({"base_config": "base.yml", "stages": [{"name": "a"}, {"name": "a"}]}, {"datasets": [{}]}, "repeated"),
        ({"base_config": "base.yml", "launcher": "slurm", "stages": [{"name": "a"}]}, {"datasets": [{}]},
         "launcher must be one of"),
        ({"base_config": "base.yml", "launcher": "python", "num_processes": 2, "stages": [{"name": "a"}]},
         {"datasets": [{}]}, "runs one process"),
    ],
)
def test_malformed_chain_files_are_refused(tmp_path, chain, base, message):
    from axolotl_plugin.spec import ChainError, load_chain

    with pytest.raises(ChainError, match=message):
        load_chain(_write(tmp_path, chain, base))


def test_chain_owned_keys_cannot_be_set_by_the_base(tmp_path):
    from axolotl_plugin.spec import ChainError, load_chain, render_stage_config

    path = _write(tmp_path, {"base_config": "base.yml", "stages": [{"name": "a"}]},
                  {"datasets": [{"path": "x.json"}], "lifealign_previous_adapter": "elsewhere"})
    with pytest.raises(ChainError, match="lifealign_previous_adapter"):
        render_stage_config(load_chain(path), 0)


def test_changed_finished_stage_is_an_error(tmp_path):
    """A finished stage whose rendered config changed must not be silently reused."""
    from axolotl_plugin.chain import run_chain, write_state
    from axolotl_plugin.spec import ChainError, load_chain

    path = _write(tmp_path, {"base_config": "base.yml", "stages": [{"name": "a"}]},
                  {"datasets": [{"path": "x.json"}], "rl": "dpo"})
    chain = load_chain(path)
    write_state(chain, {"chain": str(path), "stages": {"a": {"finished": True, "config_fingerprint": "0" * 16}}})
    with pytest.raises(ChainError, match="finished with a different config"):
        run_chain(chain, validate=False, evaluate=False)
