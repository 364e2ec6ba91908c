"""The flagship combination: SLMC on a 4-bit (bitsandbytes NF4, bf16 quant storage) QLoRA base under real DeepSpeed
ZeRO-3 on 2 CPU ranks (gloo), against the same run on 1 rank.

This file is also the worker (``accelerate launch ... tests/test_qlora_zero3.py OUT MODEL NAME=CONFIG...``): one
DPO run per DeepSpeed config, with SLMC boundaries after step 2 and step 4 (on demand, inside training) and at the end
of training (step 5); after the step-4 boundary the learning rate is 0, so the 5th optimizer step must leave the
consolidated weights as they are (a stale fp32 master copy would restore the trained ones).

Data: optimizer step ``s`` trains on preference pair ``s`` on every rank (sequential sampling, the pair repeated once
per rank), so the averaged gradient of 2 ranks equals the gradient of 1 rank and the runs agree to the last bit. The
reference is ZeRO-3 on 1 rank, not a run without DeepSpeed: TRL casts a 4-bit model's trainable LoRA factors to bf16,
and DeepSpeed then keeps an fp32 master copy that a plain torch optimizer does not have (different arithmetic).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # run as a script by accelerate launch
    sys.path.insert(0, str(TESTS))

from _slmc_utils import reference_sequence, rel_err  # noqa: E402

pytestmark = [pytest.mark.deepspeed, pytest.mark.bnb, pytest.mark.slow]

THETA, LAMBDA = 0.6, 0.3
STEPS = 5
REPO = TESTS.parent
# name -> (the shipped DeepSpeed recipe, TrainingArguments.bf16): DeepSpeed's bf16 mode off ("auto" follows bf16=False)
# and on (with use_cpu, which transformers requires for bf16 without a GPU).
CONFIGS = {
    "zero3": (REPO / "recipes" / "deepspeed" / "zero3.json", False),
    "zero3_bf16": (REPO / "recipes" / "deepspeed" / "zero3_bf16.json", True),
}


# ------------------------------------------------------------------------------------------------------ worker


def _factor_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A.default." in n or ".lora_B.default." in n]


def _gathered(model, names, with_master: bool = False):
    """Full float32 CPU copies of the named parameters (ZeRO-3 gathered), and of DeepSpeed's fp32 master copy."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(model.named_parameters())
    values, masters = {}, {}
    for name in names:
        param = params[name]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
            values[name] = param.detach().float().cpu().clone()
        if with_master:
            masters[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone().reshape(values[name].shape)
    return (values, masters) if with_master else values


def _quantized_bits(model) -> dict[str, torch.Tensor]:
    """The raw bytes of every 4-bit base weight (gathered): frozen, they must never change."""
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        if type(param).__name__ == "Params4bit":
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
                out[name] = param.detach().cpu().contiguous().view(torch.uint8).clone()
    return out


def _boundaries(slmc, names):
    from transformers import TrainerCallback

    class Boundaries(TrainerCallback):
        """Records module values (bf16) and DeepSpeed's fp32 master copy (what SLMC reads and writes) at every
        boundary: ``begin`` / ``pre`` (trained) / ``post`` (consolidated), and ``<key>_master``."""

        def __init__(self):
            self.record = {key: [] for key in ("begin", "pre", "post", "begin_master", "pre_master", "post_master")}
            self.record["after_lr0_step"] = None

        def add(self, key, model):
            values, masters = _gathered(model, names, with_master=True)
            self.record[key].append(values)
            self.record[f"{key}_master"].append(masters)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.add("begin", model)
            self.record["quantized_before"] = _quantized_bits(model)

        def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            if state.global_step in (2, 4):
                self.add("pre", model)
                slmc.consolidate(model)
                self.add("post", model)
                slmc.begin_task(model)
                self.add("begin", model)
            if state.global_step == 4:
                for group in optimizer.param_groups:
                    group["lr"] = 0.0
                lr_scheduler.base_lrs = [0.0 for _ in lr_scheduler.base_lrs]
            if state.global_step == 5:
                self.record["after_lr0_step"], self.record["after_lr0_step_master"] = _gathered(
                    model, names, with_master=True)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.add("pre", model)  # listed before the SLMC callback: pre-consolidation

    return Boundaries()


def worker_run(model_dir: Path, name: str, ds_config: str, out_dir: Path) -> None:
    from types import SimpleNamespace

    from _slmc_utils import dpo_config
    from conftest import PREFERENCE_ROWS
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from trl_lifealign.adapters import load_base_model, wrap_lora
    from trl_lifealign.slmc import MemoryConsolidationCallback

    # Several DeepSpeed configs in one launch: TrainingArguments builds its DeepSpeedPlugin from this variable.
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds_config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load_base_model(str(model_dir), torch.bfloat16, load_in_4bit=True)
    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], load_in_4bit=True)
    model = wrap_lora(base, lora, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B randomised so both factors get gradients from the first step
        for pname, param in model.named_parameters():
            if ".lora_B." in pname:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    names = _factor_names(model)
    # Step s: pair s on every rank (sequential sampling; accelerate deals batch i to rank i % world).
    rows = [dict(PREFERENCE_ROWS[step % len(PREFERENCE_ROWS)]) for step in range(STEPS) for _ in range(world)]
    slmc = MemoryConsolidationCallback(out_dir / "memory", energy_threshold=THETA, overlap_weight=LAMBDA)
    boundaries = _boundaries(slmc, names)
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(out_dir / "out", per_device_train_batch_size=1, max_steps=STEPS, learning_rate=2e-2,
                        lr_scheduler_type="constant", train_sampling_strategy="sequential", ddp_backend="gloo",
                        bf16=CONFIGS[name][1], use_cpu=CONFIGS[name][1]),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[boundaries, slmc],
    )
    trainer.train()
    record = boundaries.record
    model = trainer.model
    values, masters = _gathered(model, names, with_master=True)
    record["post"].append(values)
    record["post_master"].append(masters)
    record["quantized_after"] = _quantized_bits(model)
    params = dict(model.named_parameters())
    record.update(
        reports=[report.metrics() for report in slmc.reports],
        sharded=[report.sharded for report in slmc.reports],
        world_size=world,
        zero_stage=trainer.accelerator.state.deepspeed_plugin.zero_stage,
        ds_bf16=bool(trainer.model_wrapped.bfloat16_enabled()),
        factor_dtypes=sorted({str(params[n].dtype) for n in names}),
        factors_partitioned=all(hasattr(params[n], "ds_id") for n in names),
        quantized_types=sorted({type(p).__name__ for p in params.values() if not p.requires_grad}),
        quantized_partitioned=[hasattr(p, "ds_id") for p in params.values() if type(p).__name__ == "Params4bit"],
        layer_type=type(model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__name__,
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    )
    torch.save(record, out_dir / f"rank{rank}.pt")


def worker_main() -> None:
    """argv: OUT_DIR MODEL_DIR NAME=CONFIG [NAME=CONFIG ...]; each run goes to OUT_DIR/NAME."""
    out_root, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    for item in sys.argv[3:]:
        name, config = item.split("=", 1)
        (out_root / name).mkdir(parents=True, exist_ok=True)
        worker_run(model_dir, name, config, out_root / name)


# -------------------------------------------------------------------------------------------------------- test


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # other DeepSpeed launches may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc: int, out_dir: Path, model_dir: Path, configs: dict[str, Path], env: dict) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    first = next(iter(configs.values()))
    command = [str(accelerate), "launch", "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--use_deepspeed", "--deepspeed_config_file", str(first),
               "--main_process_port", str(_free_port()), str(Path(__file__).resolve()), str(out_dir), str(model_dir),
               *(f"{name}={path}" for name, path in configs.items())]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    deepspeed = pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    from conftest import PREFERENCE_ROWS

    from trl_lifealign.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("qlora_zero3")
    model_dir = save_tiny_model(root / "model", [t for row in PREFERENCE_ROWS for t in row.values()], seed=0)
    configs = {name: path for name, (path, _) in CONFIGS.items()}
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trl-lifealign" / "torch_extensions"
                                               / f"deepspeed-{deepspeed.__version__}"))
    _launch(2, root / "two", model_dir, configs, env)
    _launch(1, root / "one", model_dir, configs, env)
    load = lambda path: torch.load(path, weights_only=False)
    return {name: {"two": [load(root / "two" / name / f"rank{r}.pt") for r in (0, 1)],
                   "one": load(root / "one" / name / "rank0.pt"),
                   "memory_two": root / "two" / name / "memory", "memory_one": root / "one" / name / "memory"}
            for name in CONFIGS}


def _max_rel(a, b) -> float:
    return max(rel_err(x[n].double().numpy(), y[n].double().numpy()) for x, y in zip(a, b, strict=True) for n in x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qlora_zero3_consolidation_matches_one_rank(runs, name):
    rank0, rank1 = runs[name]["two"]
    single = runs[name]["one"]
    # Really the flagship combination: a bitsandbytes 4-bit base, partitioned by ZeRO-3, bf16 LoRA factors.
    for record, world in ((rank0, 2), (single, 1)):
        assert record["world_size"] == world and record["zero_stage"] == 3
        assert record["ds_bf16"] == CONFIGS[name][1]
        assert record["layer_type"] == "Linear4bit" and "Params4bit" in record["quantized_types"]
        assert record["quantized_partitioned"] and all(record["quantized_partitioned"])
        assert record["factors_partitioned"] and record["factor_dtypes"] == ["torch.bfloat16"]
        assert record["sharded"] == [True] * 3
    keys = ("begin", "pre", "post", "begin_master", "pre_master", "post_master")
    for key in keys:
        assert len(rank0[key]) == 3, key
    # All ranks end bit-identical and report the same statistics.
    for key in keys:
        for mine, theirs in zip(rank0[key], rank1[key], strict=True):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[n], theirs[n]) for n in mine), key
    assert rank0["reports"] == rank1["reports"] and len(rank0["reports"]) == 3

    # 2 ranks = 1 rank (the same gradients on every rank; measured bit-identical).
    for key in keys:
        assert _max_rel(rank0[key], single[key]) < 1e-5, key
    assert rank0["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for mine, theirs in zip(rank0["reports"], single["reports"], strict=True):
        for key in ("slmc/task", "slmc/kept_rank_mean", "slmc/kept_energy", "slmc/conflict", "slmc/update_norm",
                    "slmc/consolidated_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key

    names = list(rank0["post"][0])
    assert len(names) == 8
    for factor in names:
        # SLMC reads and writes DeepSpeed's fp32 master copy: the paper's construction holds there exactly ...
        updates = [(rank0["pre_master"][t][factor] - rank0["begin_master"][t][factor]).double().numpy()
                   for t in range(3)]
        betas = reference_sequence(updates, THETA, LAMBDA)
        for task in range(3):
            expected = rank0["begin_master"][task][factor].double().numpy() + betas[task]
            assert rel_err(rank0["post_master"][task][factor].numpy(), expected) < 1e-5, (factor, task)
            # ... the bf16 module weights hold its bf16 rounding ...
            assert torch.equal(rank0["post_master"][task][factor].bfloat16().float(), rank0["post"][task][factor])
        for task in range(2):
            # Consolidation really changed the trained weights (task 3 is the single learning-rate-0 step: no update).
            assert rel_err(rank0["pre_master"][task][factor].numpy(),
                           rank0["post_master"][task][factor].numpy()) > 1e-3, (factor, task)
            # The next task starts from the consolidated values.
            assert torch.equal(rank0["begin_master"][task + 1][factor], rank0["post_master"][task][factor])
    # The next optimizer step (learning rate 0) starts from the consolidated weights, not the trained ones.
    for key in ("", "_master"):
        after = rank0[f"after_lr0_step{key}"]
        assert all(torch.equal(after[n], rank0[f"post{key}"][1][n]) for n in names), key
        assert not any(torch.equal(after[n], rank0[f"pre{key}"][1][n]) for n in names), key
    # The 4-bit base is untouched.
    before, after_q = rank0["quantized_before"], rank0["quantized_after"]
    assert before and before.keys() == after_q.keys()
    assert all(torch.equal(before[n], after_q[n]) for n in before)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qlora_zero3_memory_matches_one_rank(runs, name):
    from trl_lifealign.slmc.memory import LongTermMemory

    two = LongTermMemory.load(runs[name]["memory_two"])
    one = LongTermMemory.load(runs[name]["memory_one"])
    assert two.task_count == one.task_count == 3 and two.spec == one.spec
    assert two.basis_ranks() == one.basis_ranks()
    for factor in two.spec.factors:
        assert rel_err(two.basis(factor).numpy(), one.basis(factor).numpy()) < 1e-5, factor
    assert [entry["sharded"] for entry in two.history] == [True] * 3


if __name__ == "__main__":
    worker_main()
