"""Helpers for the Axolotl tests: a copy of the tiny CPU chain recipe with its tiny model, and subprocess runners."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "axolotl"
TINY_RECIPE = RECIPES / "tiny"


def axolotl_env() -> dict[str, str]:
    """Environment for Axolotl subprocesses: offline, no telemetry, one thread, this interpreter's scripts on PATH."""
    env = dict(os.environ)
    env.update(
        AXOLOTL_DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def copy_tiny_recipe(target: Path) -> Path:
    """Copy recipes/axolotl/tiny to `target` and build its tiny model there (via the recipe's own script)."""
    shutil.copytree(TINY_RECIPE, target, ignore=shutil.ignore_patterns("outputs", "tiny-llama"))
    subprocess.run([sys.executable, str(target / "make_tiny_model.py")], check=True, cwd=target,
                   env=axolotl_env(), capture_output=True, text=True)
    return target


def run(command: list[str], cwd: Path, timeout: float = 240, extra_env: dict[str, str] | None = None):
    """Run a command, returning the CompletedProcess with stdout+stderr merged into `.stdout`."""
    env = axolotl_env()
    env.update(extra_env or {})
    return subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def run_chain(chain_file: Path, *args: str, timeout: float = 240, extra_env: dict[str, str] | None = None):
    """`lifealign axolotl-chain CHAIN.yml` through this interpreter."""
    return run([sys.executable, "-m", "axolotl_plugin.chain", str(chain_file), *args], cwd=chain_file.parent,
               timeout=timeout, extra_env=extra_env)


def axolotl_train(config_file: Path, timeout: float = 180):
    """`axolotl train CONFIG --launcher python` (one process) through this interpreter."""
    return run([sys.executable, "-m", "axolotl.cli.main", "train", str(config_file), "--launcher", "python"],
               cwd=config_file.parent, timeout=timeout)


def assert_first_stage_saved_consolidated(stage_dir: Path, factors: int = 4) -> None:
    """The first stage's LoRA B started at zero, so its saved value is the whole task update: it must equal the single
    consolidated direction the memory stored (a raw, un-denoised rank-4 update would not)."""
    import torch
    from safetensors.torch import load_file

    from trl_lifealign.slmc import LongTermMemory

    saved = load_file(str(stage_dir / "adapter_model.safetensors"))
    memory = LongTermMemory.load(stage_dir / "memory")
    checked = 0
    for name, tensor in saved.items():
        if ".lora_B." not in name:
            continue
        basis = memory.basis(name.replace(".lora_B.weight", ".lora_B.default.weight"))
        assert basis.shape[0] == 1
        update = tensor.double().flatten()
        direction = basis[0].double()
        cosine = torch.dot(update, direction) / (update.norm() * direction.norm())
        assert abs(cosine.item()) > 1 - 1e-6, f"{name}: saved adapter is not the consolidated update"
        checked += 1
    assert checked == factors
