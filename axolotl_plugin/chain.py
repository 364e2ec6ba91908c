"""`lifealign axolotl-chain CHAIN.yml`: run a chain of Axolotl FPO stages, each continuing from the previous one.

A chain file names a base Axolotl YAML and the ordered stages (their datasets, or their own YAML files):

    base_config: base.yml          # an Axolotl YAML (rl: dpo, adapter: lora|qlora, ...)
    output_dir: outputs/chain      # stage k writes to output_dir/<stage name>
    launcher: accelerate           # accelerate | torchrun | python (single process)
    num_processes: 1               # passed to the launcher after `--`
    launcher_args: []              # more launcher arguments (e.g. [--main_process_port, "29501"])
    overrides: {}                  # Axolotl/lifealign keys applied to every stage
    replay: {fraction: 0.0, capacity: null, seed: 0}
    stages:
      - name: task1
        datasets: [{path: data/task1.json, type: chat_template.default, field_messages: prompt, ...}]
      - name: task2
        config: stage2.yml         # optional: merged over base_config (top-level keys replace)
        overrides: {num_epochs: 2}
    evaluation:                    # optional: score every stage with the lifelong runner's evaluation matrix
      eval_sets: [...]             # DataSources of trl_lifealign.lifelong (default: none -> no evaluation)

Relative paths are relative to the chain file's directory, and every stage runs with that directory as its working
directory (so the base YAML's relative paths mean the same as when it is run there with `axolotl train`).

Each stage gets `lifealign_previous_adapter` = the previous stage's output dir and its own copy of the memory
(`<stage>/memory`, copied from the previous stage's when the stage starts, so a crashed attempt never leaves a
half-consolidated memory behind). A stage counts as finished only when its process exited cleanly, its adapter
is on disk and its memory holds one more consolidation than it started with; that fact is recorded atomically in
`output_dir/chain_state.json`. Re-running the same command resumes at the first unfinished stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trl_lifealign.atomic import atomic_write_json, sha256_file

from .args import PLUGIN_PATH, TRAINER_PATH

STATE_FILE = "chain_state.json"
STAGE_CONFIG_FILE = "lifealign_stage.yml"
STAGE_LOG_FILE = "lifealign_train.log"
MEMORY_SUBDIR = "memory"
LAUNCHERS = ("accelerate", "torchrun", "python")
# Keys the chain sets for every stage; a base/stage config must not set them itself.
CHAIN_OWNED_KEYS = ("output_dir", "lifealign_memory_dir", "lifealign_previous_adapter", "lifealign_replay_datasets")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ChainError(RuntimeError):
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
        name = str(entry.get("name") or f"stage{index + 1}")
        if name in names or "/" in name or name in (".", "..", MEMORY_SUBDIR):
            raise ChainError(f"{where}: stage name {name!r} is repeated or not a valid directory name")
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
    if index > 0:
        config["lifealign_previous_adapter"] = str(stage_dir(chain, index - 1))
    elif chain.initial_adapter is not None:
        config["lifealign_previous_adapter"] = str(chain.initial_adapter)
    replay_fraction = chain.replay.get("fraction", 0.0)
    if replay_fraction and index > 0:
        earlier = []
        for earlier_index in range(index):
            earlier.extend(render_stage_datasets(chain, earlier_index))
        config["lifealign_replay_datasets"] = earlier
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


# ----------------------------------------------------------------------------------------------------------- state


def read_state(chain: ChainSpec) -> dict[str, Any]:
    path = chain.output_dir / STATE_FILE
    if not path.is_file():
        return {"chain": str(chain.path), "stages": {}}
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise ChainError(f"{path} is not a chain state file (expected a mapping with 'stages')")
    return state


def write_state(chain: ChainSpec, state: dict[str, Any]) -> None:
    """Write the state atomically (temp file in the same directory, fsync, os.replace)."""
    atomic_write_json(chain.output_dir / STATE_FILE, state, sort_keys=True)


def memory_consolidations(memory_dir: Path) -> int:
    """How many task boundaries the memory in `memory_dir` has consolidated (0 if it holds none yet).

    Loading checks the manifest and the data file's size and checksum, so a half-written memory raises here.
    """
    from trl_lifealign.slmc.memory import LongTermMemory

    if not LongTermMemory.exists(memory_dir):
        return 0
    return LongTermMemory.load(memory_dir).task_count


def _check_stage_outputs(directory: Path, consolidate: bool, expected_consolidations: int) -> dict[str, Any]:
    """The record of a finished stage; raise `ChainError` if its adapter or memory is incomplete."""
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise ChainError(f"stage output {directory} lacks {missing}: the adapter was not saved")
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
        if not list(handle.keys()):
            raise ChainError(f"{directory / 'adapter_model.safetensors'} holds no tensors")
    record: dict[str, Any] = {"adapter_sha256": sha256_file(directory / "adapter_model.safetensors")}
    if consolidate:
        count = memory_consolidations(directory / MEMORY_SUBDIR)
        if count != expected_consolidations:
            raise ChainError(
                f"memory {directory / MEMORY_SUBDIR} records {count} consolidation(s), expected "
                f"{expected_consolidations}: the stage did not consolidate at its end"
            )
        record["consolidations"] = count
    return record


# ------------------------------------------------------------------------------------------------------ launching


def launch_command(chain: ChainSpec, config_path: Path) -> list[str]:
    """`axolotl train` for one stage, with the chain's launcher and process count."""
    command = [sys.executable, "-m", "axolotl.cli.main", "train", str(config_path), "--launcher", chain.launcher]
    if chain.launcher == "accelerate":
        port_args = []
        if chain.num_processes > 1 and not {"--main_process_port", "--num_machines"} & set(chain.launcher_args):
            # One machine: take a free port instead of accelerate's fixed 29500 (another job may hold it).
            port_args = ["--main_process_port", str(_free_port())]
        command += ["--", "--num_processes", str(chain.num_processes), *port_args, *chain.launcher_args]
    elif chain.launcher == "torchrun":
        port_args = []
        if chain.num_processes > 1 and not {"--master_port", "--rdzv_endpoint", "--nnodes"} & set(chain.launcher_args):
            port_args = ["--master_port", str(_free_port())]
        command += ["--", "--nproc_per_node", str(chain.num_processes), *port_args, *chain.launcher_args]
    return command


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_stage_process(command: list[str], cwd: Path, log_path: Path) -> int:
    env = dict(os.environ)
    # `axolotl train` execs `accelerate` / `torchrun` by name: make this interpreter's scripts come first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")  # stream the stage's log as it happens
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
        return process.wait()


def prepare_memory(chain: ChainSpec, index: int) -> int:
    """Give stage `index` a fresh copy of the latest earlier stage's memory; return its consolidation count."""
    memory = stage_dir(chain, index) / MEMORY_SUBDIR
    if memory.exists():
        shutil.rmtree(memory)  # left by an interrupted attempt of this stage (its state was never recorded)
    # The latest earlier stage that kept a memory (a stage may run with lifealign_consolidate: false).
    for earlier in range(index - 1, -1, -1):
        previous = stage_dir(chain, earlier) / MEMORY_SUBDIR
        if previous.exists():
            shutil.copytree(previous, memory)
            return memory_consolidations(memory)
    memory.mkdir(parents=True)
    return 0


def validate_chain(chain: ChainSpec) -> list[dict[str, Any]]:
    """Render every stage and validate it with Axolotl before anything is launched."""
    from .validation import validate_stage_config

    configs = []
    cwd = os.getcwd()
    os.chdir(chain.root)  # relative paths (base_model, datasets) resolve as in the stage processes
    try:
        for index, stage in enumerate(chain.stages):
            config = render_stage_config(chain, index)
            try:
                validate_stage_config(config, where=f"stage {stage.name!r}", normalize=False,
                                      **_validation_capabilities(chain))
            except ChainError:
                raise
            except Exception as error:
                raise ChainError(f"stage {stage.name!r} does not validate: {error}") from error
            configs.append(config)
    finally:
        os.chdir(cwd)
    return configs


def _validation_capabilities(chain: ChainSpec) -> dict[str, Any]:
    from axolotl.cli.config import gpu_capabilities

    capabilities, env_capabilities = gpu_capabilities()
    capabilities["n_gpu"] = chain.num_processes
    return {"capabilities": capabilities, "env_capabilities": env_capabilities}


def run_chain(chain: ChainSpec, validate: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Run (or resume) every unfinished stage of `chain`; return the final state."""
    configs = validate_chain(chain) if validate else [render_stage_config(chain, i) for i in range(len(chain.stages))]
    if evaluate and chain.evaluation:
        from .chain_eval import check_evaluation

        check_evaluation(chain)  # bad eval data fails now, not after the first (long) stage
    state = read_state(chain)
    for index, stage in enumerate(chain.stages):
        config = configs[index]
        fingerprint = config_fingerprint(config)
        record = state["stages"].get(stage.name)
        if record and record.get("finished"):
            if record.get("config_fingerprint") != fingerprint:
                raise ChainError(
                    f"stage {stage.name!r} finished with a different config than the chain file now renders; use a "
                    f"new output_dir (or delete {chain.output_dir / STATE_FILE} to retrain everything)"
                )
            print(f"[lifealign] stage {index + 1}/{len(chain.stages)} {stage.name!r}: finished earlier, skipping")
        else:
            directory = stage_dir(chain, index)
            directory.mkdir(parents=True, exist_ok=True)
            consolidate = bool(config.get("lifealign_consolidate", True))
            before = prepare_memory(chain, index) if consolidate else 0
            config_path = directory / STAGE_CONFIG_FILE
            with open(config_path, "w", encoding="utf-8") as handle:
                yaml.safe_dump(config, handle, sort_keys=False)
            command = launch_command(chain, config_path)
            print(f"[lifealign] stage {index + 1}/{len(chain.stages)} {stage.name!r}: {' '.join(command)}")
            started = time.time()
            code = _run_stage_process(command, chain.root, directory / STAGE_LOG_FILE)
            if code != 0:
                raise ChainError(
                    f"stage {stage.name!r} failed (exit code {code}); see {directory / STAGE_LOG_FILE}. Re-run the "
                    "same command to resume at this stage."
                )
            record = _check_stage_outputs(directory, consolidate, before + 1)
            record.update(finished=True, config_fingerprint=fingerprint, seconds=round(time.time() - started, 1),
                          output_dir=str(directory))
            state["stages"][stage.name] = record
            write_state(chain, state)
            print(f"[lifealign] stage {stage.name!r} finished and recorded in {chain.output_dir / STATE_FILE}")
        if evaluate and chain.evaluation and "evaluation" not in state["stages"][stage.name]:
            from .chain_eval import evaluate_stage

            state["stages"][stage.name]["evaluation"] = evaluate_stage(chain, index, config)
            write_state(chain, state)
    if evaluate and chain.evaluation:
        from .chain_eval import write_chain_report

        state["report"] = write_chain_report(chain, state)
        write_state(chain, state)
    return state


# ------------------------------------------------------------------------------------------------------------ CLI


def _command(args) -> int:
    import importlib.util

    if importlib.util.find_spec("axolotl") is None:
        print("lifealign axolotl-chain: error: Axolotl is not installed in this environment: "
              "pip install 'trl-lifealign[axolotl]'", file=sys.stderr)
        return 1
    try:
        chain = load_chain(args.chain)
        if args.dry_run:
            configs = validate_chain(chain) if not args.no_validate else [
                render_stage_config(chain, i) for i in range(len(chain.stages))]
            for index, (stage, config) in enumerate(zip(chain.stages, configs)):
                print(f"# stage {stage.name}: {' '.join(launch_command(chain, stage_dir(chain, index) / STAGE_CONFIG_FILE))}")
                print(yaml.safe_dump(config, sort_keys=False))
            return 0
        state = run_chain(chain, validate=not args.no_validate, evaluate=not args.no_eval)
    except ChainError as error:
        print(f"lifealign axolotl-chain: error: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "axolotl":
            print("lifealign axolotl-chain: error: Axolotl is not installed: pip install 'trl-lifealign[axolotl]'",
                  file=sys.stderr)
            return 1
        raise
    finished = sum(1 for record in state["stages"].values() if record.get("finished"))
    print(f"[lifealign] chain done: {finished}/{len(chain.stages)} stages in {chain.output_dir}")
    return 0


def add_commands(subparsers) -> None:
    """Register `lifealign axolotl-chain`."""
    parser = subparsers.add_parser(
        "axolotl-chain",
        help="run a chain of Axolotl FPO stages with memory consolidation (resumes an interrupted chain)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("chain", help="chain YAML file (base Axolotl YAML + ordered stages)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print every stage's config, run nothing")
    parser.add_argument("--no-validate", action="store_true", help="skip the in-process Axolotl validation")
    parser.add_argument("--no-eval", action="store_true", help="skip the per-stage evaluation even if configured")
    parser.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m axolotl_plugin.chain CHAIN.yml` (same as `lifealign axolotl-chain CHAIN.yml`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m axolotl_plugin.chain")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["axolotl-chain", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
