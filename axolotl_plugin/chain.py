"""`lifealign axolotl-chain CHAIN.yml`: run a chain of Axolotl FPO stages, each continuing from the previous one.

A chain file names a base Axolotl YAML and the ordered stages (their datasets, or their own YAML files):

    base_config: base.yml          # an Axolotl YAML (rl: dpo, adapter: lora|qlora, ...)
    output_dir: outputs/chain      # stage k writes to output_dir/<stage name>
    launcher: accelerate           # accelerate | torchrun | python (single process)
    num_processes: 1               # passed to the launcher after `--`
    launcher_args: []              # more launcher arguments (e.g. [--main_process_port, "29501"])
    overrides: {}                  # Axolotl/lifealign keys applied to every stage
    replay: {fraction: 0.0, capacity: 1000, seed: 0}   # as `lifealign train`'s replay: a random fraction of
                                   # each finished stage's rows enters a FIFO buffer of `capacity` rows
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
`output_dir/chain_state.json`. Re-running the same command resumes at the first unfinished stage. The chain file
itself (its keys, names and files) is read by `axolotl_plugin.spec`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from trl_lifealign.atomic import atomic_write_json, sha256_file

from .spec import (
    ADAPTER_FILES,
    DEFENCES_SUBDIR,
    MEMORY_SUBDIR,
    STAGE_CONFIG_FILE,
    STAGE_LOG_FILE,
    STATE_FILE,
    ChainError,
    ChainSpec,
    config_fingerprint,
    render_stage_config,
    stage_dir,
)

# ----------------------------------------------------------------------------------------------------------- state


def read_state(chain: ChainSpec) -> dict[str, Any]:
    path = chain.output_dir / STATE_FILE
    if not path.is_file():
        return {"chain": str(chain.path), "stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ChainError(f"{path} is truncated or corrupt ({error}); delete it to retrain every stage") from None
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
    """Give stage `index` fresh copies of the latest earlier stage's memory and defences' state; return the memory's
    consolidation count. A crashed attempt of this stage never leaves half-updated state behind."""
    for subdir in (MEMORY_SUBDIR, DEFENCES_SUBDIR):
        target = stage_dir(chain, index) / subdir
        if target.exists():
            shutil.rmtree(target)  # left by an interrupted attempt of this stage (its state was never recorded)
        # The latest earlier stage that kept one (a stage may run with lifealign_consolidate: false).
        previous = next((stage_dir(chain, i) / subdir for i in range(index - 1, -1, -1)
                         if (stage_dir(chain, i) / subdir).exists()), None)
        if previous is not None:
            shutil.copytree(previous, target)
        else:
            target.mkdir(parents=True)
    return memory_consolidations(stage_dir(chain, index) / MEMORY_SUBDIR)


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
    """Run (or resume) every unfinished stage of `chain`; return the final state. The chain's output directory is
    locked meanwhile (a second chain process on it fails at once) and cleared of crashed writes' leftovers."""
    from trl_lifealign.atomic import remove_temporaries
    from trl_lifealign.lifelong.state import RunDirectory

    directory = RunDirectory(chain.output_dir)
    with directory.locked():
        remove_temporaries(chain.output_dir)
        return _run_stages(chain, validate, evaluate)


def _run_stages(chain: ChainSpec, validate: bool, evaluate: bool) -> dict[str, Any]:
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
            before = prepare_memory(chain, index)  # memory and defences state, fresh copies
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




if __name__ == "__main__":  # `python -m axolotl_plugin.chain CHAIN.yml` = `lifealign axolotl-chain CHAIN.yml`
    from trl_lifealign.cli import main

    sys.exit(main(["axolotl-chain", *sys.argv[1:]]))
