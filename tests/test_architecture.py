"""The codebase's shape and the seams between its layers: cheap CLI start, module and function sizes, no import
cycles, one config per concept, arguments bound by signature, quiet upstream deprecations, no process-wide side
effects, one replay rule, metrics that reach the trainer's loggers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "trl_lifealign", REPO / "axolotl_plugin", REPO / "benchmarks" / "lifelong"]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 520, 85


def _python_files():
    for root in SOURCES:
        yield from sorted(root.rglob("*.py"))


def test_cli_help_imports_no_torch():
    script = "import sys, trl_lifealign.cli as c; c.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_modules_and_functions_stay_small():
    too_long = []
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports at module level or inside functions."""
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n for n in [target, *names] if n.startswith(package))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(package))
    return found


@pytest.mark.parametrize("package", ["axolotl_plugin", "trl_lifealign.lifelong", "trl_lifealign.slmc"])
def test_no_import_cycles(package):
    root = REPO.joinpath(*package.split("."))
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in root.glob("*.py")
               if p.name != "__init__.py"}
    graph = {name: {m for m in _imports(path, package) if m in modules and m != name}
             for name, path in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles


def test_slmc_settings_have_one_home():
    """The recipe's memory section, the Axolotl keys and the callback all take SLMCConfig's defaults and ranges."""
    from trl_lifealign.lifelong.config import MemorySettings
    from trl_lifealign.lifelong.training_values import RecipeError
    from trl_lifealign.slmc import SLMCConfig

    assert issubclass(MemorySettings, SLMCConfig)
    defaults = SLMCConfig()
    assert (MemorySettings().energy_threshold, MemorySettings().overlap_weight) == (defaults.energy_threshold,
                                                                                     defaults.overlap_weight)
    for bad in ({"energy_threshold": 1.5}, {"overlap_weight": -0.1}, {"basis_rel_tol": 0}):
        with pytest.raises(ValueError):
            SLMCConfig(**bad)
        with pytest.raises(RecipeError, match=f"memory.{next(iter(bad))}"):
            MemorySettings(**bad)
    SLMCConfig(energy_threshold=0.0)  # θ = 0 keeps rank 1: valid on every path


def test_dpo_trainer_arguments_are_bound_by_signature():
    from trl_lifealign.compat import bind_dpo_trainer_arguments, replace_dpo_trainer_argument

    positional = tuple(f"value{i}" for i in range(12))
    bound = bind_dpo_trainer_arguments(positional, {"dataset_tags": ["x"]})
    assert bound["model"] == "value0" and bound["args"] == "value2" and bound["peft_config"] == "value11"
    args, kwargs = replace_dpo_trainer_argument(positional, {}, "peft_config", None)
    assert args[11] is None and kwargs == {}
    args, kwargs = replace_dpo_trainer_argument(("model",), {}, "peft_config", "p")
    assert kwargs == {"peft_config": "p"}


def test_fpo_trainer_reads_a_positional_peft_config(tiny_tokenizer, preference_rows, tmp_path):
    """A PeftModel with a stale "ref" adapter plus a positional peft_config (index 11): FPOTrainer must see the
    peft_config (so it leaves "ref" alone) instead of reading past the end of the arguments."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from trl_lifealign.fpo import FPOConfig, FPOTrainer
    from trl_lifealign.fpo.trainer import _drop_stale_ref_adapter
    from trl_lifealign.tiny import build_tiny_llama

    model = get_peft_model(build_tiny_llama(tiny_tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("ref", LoraConfig(r=2, target_modules=["q_proj"]))
    from trl_lifealign.compat import bind_dpo_trainer_arguments

    peft_config = LoraConfig(r=2, target_modules=["v_proj"])
    bound = bind_dpo_trainer_arguments((model, None, None, None, None, None, None, None, None, (None, None), None,
                                        peft_config), {})
    _drop_stale_ref_adapter(bound)
    assert "ref" in model.peft_config  # a peft_config was given: TRL adds no "ref", so nothing is dropped
    bound["peft_config"] = None
    _drop_stale_ref_adapter(bound)
    assert "ref" not in model.peft_config
    args = FPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], max_steps=1)
    trainer = FPOTrainer(build_tiny_llama(tiny_tokenizer), None, args, None, Dataset.from_list(preference_rows), None,
                         tiny_tokenizer, None, None, (None, None), None, LoraConfig(r=2, target_modules=["q_proj"]))
    assert "default" in trainer.model.peft_config


def test_fpo_config_and_training_show_no_checkpointing_deprecation(tiny_tokenizer, preference_rows, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig

    from trl_lifealign.fpo import FPOConfig, FPOTrainer
    from trl_lifealign.tiny import build_tiny_llama

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.* is deprecated", category=FutureWarning)
        args = FPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], max_steps=1,
                         per_device_train_batch_size=4, gradient_checkpointing=True)
        trainer = FPOTrainer(build_tiny_llama(tiny_tokenizer), args=args,
                             train_dataset=Dataset.from_list(preference_rows),
                             processing_class=tiny_tokenizer, peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
        trainer.train()
    assert args.gradient_checkpointing is True


def test_lifelong_config_has_no_process_side_effects(tmp_path):
    from trl_lifealign.lifelong.config import LifelongConfig, TaskSpec
    from trl_lifealign.lifelong.data import DataSource

    before = dict(os.environ)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        LifelongConfig(output_dir=str(tmp_path), tasks=[TaskSpec("a", train=DataSource(path="a.json"),
                                                                 eval=DataSource(path="b.json"))],
                       training={"learning_rate": 1e-3, "bf16": False})
        assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"
    finally:
        os.environ.clear()
        os.environ.update(before)


def test_replay_means_the_same_for_the_runner_and_the_axolotl_plugin():
    from trl_lifealign.lifelong.replay import ReplayBuffer, replay_plan

    sizes = [10, 7, 12]
    buffer = ReplayBuffer(fraction=0.4, capacity=6, seed=3)
    for task, size in enumerate(sizes):
        buffer.add_task(f"t{task}", task, [{"task": task, "row": row} for row in range(size)])
    held = [(entry["row"]["task"], entry["row"]["row"]) for entry in buffer.entries]
    assert held == replay_plan(sizes, 0.4, 6, 3) and len(held) == 6


def test_axolotl_args_take_the_library_defaults():
    pytest.importorskip("pydantic")
    from axolotl_plugin.args import LifeAlignArgs
    from trl_lifealign.fpo.focal import DEFAULT_FOCAL_GAMMA
    from trl_lifealign.lifelong.replay import DEFAULT_REPLAY_CAPACITY
    from trl_lifealign.slmc import SLMCConfig

    fields = LifeAlignArgs.model_fields
    assert fields["lifealign_focal_gamma"].default == DEFAULT_FOCAL_GAMMA
    assert fields["lifealign_energy_threshold"].default == SLMCConfig().energy_threshold
    assert fields["lifealign_replay_capacity"].default == DEFAULT_REPLAY_CAPACITY
    base = {"rl": "dpo", "adapter": "lora", "lifealign_memory_dir": "m"}
    LifeAlignArgs.model_validate({**base, "lifealign_energy_threshold": 0.0})
    with pytest.raises(ValueError, match="lifealign_overlap_weight: must be a number in"):
        LifeAlignArgs.model_validate({**base, "lifealign_overlap_weight": 1.5})
