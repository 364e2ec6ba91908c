"""The chain file: `ChainSpec` / `StageSpec`, loading and checking it, and rendering each stage's Axolotl config.

A leaf module (YAML and the standard library only): the chain runner, its evaluation and the command line import it,
it imports none of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trl_lifealign.errors import LifeAlignError
from trl_lifealign.lifelong.config import TASK_NAME_PATTERN

PLUGIN_PATH = "axolotl_plugin.LifeAlignPlugin"
TRAINER_PATH = "axolotl_plugin.trainer.AxolotlFPOTrainer"
STATE_FILE = "chain_state.json"
STAGE_CONFIG_FILE = "lifealign_stage.yml"
STAGE_LOG_FILE = "lifealign_train.log"
MEMORY_SUBDIR = "memory"
LAUNCHERS = ("accelerate", "torchrun", "python")
# Keys the chain sets for every stage; a base/stage config must not set them itself.
CHAIN_OWNED_KEYS = ("output_dir", "lifealign_memory_dir", "lifealign_previous_adapter", "lifealign_replay_stages",
                    "lifealign_replay_datasets", "lifealign_defences_dir", "lifealign_task_index")
DEFENCES_SUBDIR = "defences"
STAGE_SUMMARY_FILE = "lifealign_stage_summary.json"
REPORT_FILES = ("report.json", "report.md", "matrix_accuracy.png", "accuracy_curves.png")
EVAL_CACHE_FILE = "chain_eval_initial_logps.json"
LOCK_FILE = ".lifealign.lock"
# Names a stage directory may not take: the chain's own files live beside the stage directories.
RESERVED_NAMES = (STATE_FILE, MEMORY_SUBDIR, DEFENCES_SUBDIR, EVAL_CACHE_FILE, LOCK_FILE, *REPORT_FILES)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ChainError(LifeAlignError, RuntimeError):
    """The chain file is invalid, a stage failed, or the recorded state does not match the chain."""


@dataclass
class StageSpec:
    """One stage of a chain, after reading the chain file."""

    name: str
    datasets: list[dict[str, Any]] | None = None
    config: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChainSpec:
    """A parsed chain file (paths resolved against the chain file's directory)."""

    path: Path
    root: Path
    base_config: Path | None
    output_dir: Path
    stages: list[StageSpec]
    launcher: str = "accelerate"
    num_processes: int = 1
    launcher_args: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    replay: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    initial_adapter: Path | None = None


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ChainError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ChainError(f"{what} {path} must hold a YAML mapping, got {type(data).__name__}")
    return data


def load_chain(path: str | Path) -> ChainSpec:
    """Read and check a chain file; raise `ChainError` naming the offending field."""
    path = Path(path).resolve()
    data = _read_yaml(path, "chain file")
    root = path.parent
    known = {"base_config", "output_dir", "stages", "launcher", "num_processes", "launcher_args", "overrides",
             "replay", "evaluation", "initial_adapter"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ChainError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    stages_data = data.get("stages")
    if not isinstance(stages_data, list) or not stages_data:
        raise ChainError(f"{path}: `stages` must be a non-empty list")
    base_config = root / data["base_config"] if data.get("base_config") else None
    stages, names = [], set()
    for index, entry in enumerate(stages_data):
        where = f"{path}: stages[{index}]"
        if not isinstance(entry, dict):
            raise ChainError(f"{where} must be a mapping with `name` and `datasets` or `config`")
        unknown = sorted(set(entry) - {"name", "datasets", "config", "overrides"})
        if unknown:
            raise ChainError(f"{where}: unknown key(s) {unknown}")
        name = entry.get("name") or f"stage{index + 1}"
        if not isinstance(name, str) or not TASK_NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
            raise ChainError(f"{where}: stage name {name!r} must be 1-100 letters, digits or ._+- (starting with a "
                             f"letter or digit) and not one of the chain's own files {list(RESERVED_NAMES)}")
        if name in names:
            raise ChainError(f"{where}: stage name {name!r} is repeated")
        names.add(name)
        datasets = entry.get("datasets")
        if datasets is not None and (not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets)):
            raise ChainError(f"{where}: `datasets` must be a list of Axolotl dataset entries (mappings)")
        config = root / entry["config"] if entry.get("config") else None
        if datasets is None and config is None and base_config is None:
            raise ChainError(f"{where}: give `datasets` or `config` (there is no base_config)")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ChainError(f"{where}: `overrides` must be a mapping")
        stages.append(StageSpec(name=name, datasets=datasets, config=config, overrides=overrides))
    launcher = data.get("launcher", "accelerate")
    if launcher not in LAUNCHERS:
        raise ChainError(f"{path}: launcher must be one of {LAUNCHERS}, got {launcher!r}")
    num_processes = data.get("num_processes", 1)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ChainError(f"{path}: num_processes must be an integer >= 1, got {num_processes!r}")
    if launcher == "python" and num_processes != 1:
        raise ChainError(f"{path}: launcher 'python' runs one process; use accelerate or torchrun for {num_processes}")
    launcher_args = data.get("launcher_args") or []
    if not isinstance(launcher_args, list):
        raise ChainError(f"{path}: launcher_args must be a list of strings")
    replay = data.get("replay") or {}
    if not isinstance(replay, dict) or set(replay) - {"fraction", "capacity", "seed"}:
        raise ChainError(f"{path}: replay must be a mapping with fraction, capacity, seed; got {replay!r}")
    evaluation = data.get("evaluation")
    if evaluation is not None and not isinstance(evaluation, dict):
        raise ChainError(f"{path}: evaluation must be a mapping")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ChainError(f"{path}: overrides must be a mapping")
    return ChainSpec(
        path=path,
        root=root,
        base_config=base_config,
        output_dir=root / data.get("output_dir", "outputs"),
        stages=stages,
        launcher=launcher,
        num_processes=num_processes,
        launcher_args=[str(a) for a in launcher_args],
        overrides=overrides,
        replay=replay,
        evaluation=evaluation,
        initial_adapter=root / data["initial_adapter"] if data.get("initial_adapter") else None,
    )


def stage_dir(chain: ChainSpec, index: int) -> Path:
    return chain.output_dir / chain.stages[index].name


def render_stage_config(chain: ChainSpec, index: int) -> dict[str, Any]:
    """The complete Axolotl config of stage `index` (base, stage file, datasets, overrides, chain-owned keys)."""
    stage = chain.stages[index]
    config: dict[str, Any] = {}
    sources = []
    if chain.base_config is not None:
        config.update(_read_yaml(chain.base_config, "base_config"))
        sources.append(str(chain.base_config))
    if stage.config is not None:
        config.update(_read_yaml(stage.config, f"stage {stage.name!r} config"))
        sources.append(str(stage.config))
    for source_keys, what in ((config, " / ".join(sources)), (chain.overrides, "chain overrides"),
                              (stage.overrides, f"stage {stage.name!r} overrides")):
        owned = [key for key in CHAIN_OWNED_KEYS if key in source_keys]
        if owned:
            raise ChainError(f"{what} set {owned}: the chain sets these for every stage; remove them")
    config.update(copy.deepcopy(chain.overrides))
    if stage.datasets is not None:
        config["datasets"] = copy.deepcopy(stage.datasets)
    config.update(copy.deepcopy(stage.overrides))
    if not config.get("datasets"):
        raise ChainError(f"stage {stage.name!r} has no datasets")

    plugins = list(config.get("plugins") or [])
    if PLUGIN_PATH not in plugins:
        plugins.append(PLUGIN_PATH)
    config["plugins"] = plugins
    config.setdefault("trainer_cls", TRAINER_PATH)  # a misspelled plugin then fails loudly in the trainer too
    config["output_dir"] = str(stage_dir(chain, index))
    if config.get("lifealign_consolidate", True):
        config["lifealign_memory_dir"] = str(stage_dir(chain, index) / MEMORY_SUBDIR)
    config["lifealign_defences_dir"] = str(stage_dir(chain, index) / DEFENCES_SUBDIR)
    config["lifealign_task_index"] = index
    if index > 0:
        config["lifealign_previous_adapter"] = str(stage_dir(chain, index - 1))
    elif chain.initial_adapter is not None:
        config["lifealign_previous_adapter"] = str(chain.initial_adapter)
    replay_fraction = chain.replay.get("fraction", 0.0)
    if replay_fraction and index > 0:
        config["lifealign_replay_stages"] = [
            {"name": chain.stages[i].name, "datasets": render_stage_datasets(chain, i)} for i in range(index)]
        config["lifealign_replay_fraction"] = replay_fraction
        if chain.replay.get("capacity") is not None:
            config["lifealign_replay_capacity"] = chain.replay["capacity"]
        config["lifealign_replay_seed"] = chain.replay.get("seed", 0)
    return config


def render_stage_datasets(chain: ChainSpec, index: int) -> list[dict[str, Any]]:
    stage = chain.stages[index]
    if stage.datasets is not None:
        return copy.deepcopy(stage.datasets)
    config: dict[str, Any] = {}
    if chain.base_config is not None:
        config.update(_read_yaml(chain.base_config, "base_config"))
    if stage.config is not None:
        config.update(_read_yaml(stage.config, "stage config"))
    config.update(chain.overrides)
    config.update(stage.overrides)
    return copy.deepcopy(config.get("datasets") or [])


def config_fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


