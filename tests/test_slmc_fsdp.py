"""SLMC under real PyTorch FSDP2 (``fully_shard``) on 2 CPU ranks (gloo), and FSDP1 refused.

One 2-rank launch runs three FSDP2 variants (fp32 params, bf16 compute via ``MixedPrecisionPolicy`` over fp32 params,
bf16 params) and the FSDP1 refusal check (tests/_slmc_fsdp_worker.py); the references are the same runs in one process
without FSDP (fp32, bf16 params) and, for mixed precision, the same FSDP2 run on 1 rank. Every rank sees the same
batches, so the averaged gradient equals the single-process gradient and the runs must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _slmc_utils import reference_sequence, rel_err

pytestmark = pytest.mark.fsdp

TESTS = Path(__file__).resolve().parent
FSDP_MODES = ("fp32", "bf16mp", "bf16")
# mode -> (launch holding the reference, mode there)
REFERENCES = {"fp32": ("plain", "plain-fp32"), "bf16mp": ("one", "bf16mp"), "bf16": ("plain", "plain-bf16")}
FACTOR_DTYPES = {"fp32": torch.float32, "bf16mp": torch.float32, "bf16": torch.bfloat16}
THETA, LAMBDA = 0.6, 0.3


def _launch(nproc: int, out_dir: Path, modes: list[str], env: dict) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(TESTS / "_slmc_fsdp_worker.py"), str(out_dir), *modes]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{launch: {mode: [rank records]}} for the 2-rank and 1-rank launches and the in-process plain runs."""
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    root = tmp_path_factory.mktemp("slmc_fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    _launch(2, root / "two", [*FSDP_MODES, "fsdp1"], env)
    _launch(1, root / "one", ["bf16mp"], env)

    import _slmc_fsdp_worker

    _slmc_fsdp_worker.run(root / "plain", ["plain-fp32", "plain-bf16"])
    load = lambda path: torch.load(path, weights_only=False)
    records = {"two": {mode: [load(root / "two" / mode / f"rank{r}.pt") for r in (0, 1)]
                       for mode in (*FSDP_MODES, "fsdp1")},
               "one": {"bf16mp": [load(root / "one" / "bf16mp" / "rank0.pt")]},
               "plain": {mode: [load(root / "plain" / mode / "rank0.pt")] for mode in ("plain-fp32", "plain-bf16")}}
    return {"records": records, "root": root}


def _max_rel(a: list[dict], b: list[dict]) -> float:
    return max(rel_err(x[n].double().numpy(), y[n].double().numpy()) for x, y in zip(a, b, strict=True) for n in x)


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp2_consolidation_is_exact_and_sticks(runs, mode):
    rank0, rank1 = runs["records"]["two"][mode]
    launch, reference_mode = REFERENCES[mode]
    single = runs["records"][launch][reference_mode][0]
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert rank0["param_types"] == ["DTensor"], "fully_shard did not shard the LoRA factors"
    assert rank0["param_dtypes"] == [str(FACTOR_DTYPES[mode])]

    # (3) All ranks see bit-identical full values, losses and reports.
    for key in ("begin", "pre", "post"):
        assert len(rank0[key]) == 3
        for mine, theirs in zip(rank0[key], rank1[key], strict=True):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[n], theirs[n]) for n in mine), key
    assert rank0["losses"] == rank1["losses"] and rank0["final_loss"] == rank1["final_loss"]
    assert rank0["reports"] == rank1["reports"] and len(rank0["reports"]) == 3

    # (1) The 2-rank run equals the same run on one rank (measured: bit-identical).
    for key in ("begin", "pre", "post"):
        assert _max_rel(rank0[key], single[key]) < 1e-5, key
    for mine, theirs in zip(rank0["losses"] + [rank0["final_loss"]], single["losses"] + [single["final_loss"]],
                            strict=True):
        assert abs(mine - theirs) <= 1e-5 * abs(theirs)
    for mine, theirs in zip(rank0["reports"], single["reports"], strict=True):
        for key in ("slmc/task", "slmc/kept_rank_mean", "slmc/kept_energy", "slmc/conflict", "slmc/update_norm",
                    "slmc/consolidated_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key

    # The consolidated values are the paper's construction (independent float64 reference) ...
    names = list(rank0["post"][0])
    assert len(names) == 8
    tolerance = 1e-5 if FACTOR_DTYPES[mode] == torch.float32 else 8e-3  # bf16: one rounding of the write-back
    for name in names:
        updates = [(rank0["pre"][t][name] - rank0["begin"][t][name]).double().numpy() for t in range(3)]
        betas = reference_sequence(updates, THETA, LAMBDA)
        for task in range(3):
            expected = rank0["begin"][task][name].double().numpy() + betas[task]
            assert rel_err(rank0["post"][task][name].numpy(), expected) < tolerance, (name, task)
            # (2) ... and consolidation really changed the trained weights.
            assert rel_err(rank0["pre"][task][name].numpy(), rank0["post"][task][name].numpy()) > 1e-3, (name, task)
        # The next task starts from the consolidated values.
        for task in range(2):
            assert torch.equal(rank0["begin"][task + 1][name], rank0["post"][task][name])

    # (3) The sharded parameters (what the optimizer updates) hold the consolidated values: the ranks' local shards
    # put together are the consolidated full value ...
    for task in range(3):
        for name in names:
            local = torch.cat([rank0["post_local"][task][name], rank1["post_local"][task][name]], dim=0)
            assert local.dtype == FACTOR_DTYPES[mode]
            assert torch.equal(local.float(), rank0["post"][task][name]), (name, task)
    # ... so an optimizer step with learning rate 0 leaves them exactly as consolidated (not as trained).
    for rank_record in (rank0, rank1):
        after = rank_record["after_lr0_step"]
        assert all(torch.equal(after[n], rank0["post"][1][n]) for n in names)
        assert not any(torch.equal(after[n], rank0["pre"][1][n]) for n in names)
        assert all(torch.equal(rank_record["after_lr0_step_local"][n], rank_record["post_local"][1][n]) for n in names)
    assert rank0["sharded"] == [True] * 3
    assert single["sharded"] == [launch == "one"] * 3


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp2_memory_matches_one_rank(runs, mode):
    """(4) The memory rank 0 wrote equals the memory of the 1-rank run."""
    from trl_lifealign.slmc.memory import LongTermMemory

    launch, reference_mode = REFERENCES[mode]
    two = LongTermMemory.load(runs["root"] / "two" / mode / "memory")
    one = LongTermMemory.load(runs["root"] / launch / reference_mode / "memory")
    assert two.task_count == one.task_count == 3
    assert two.spec == one.spec
    assert (two.energy_threshold, two.overlap_weight) == (one.energy_threshold, one.overlap_weight) == (THETA, LAMBDA)
    assert two.basis_ranks() == one.basis_ranks() and set(two.basis_ranks().values()) == {3}
    for name in two.spec.factors:
        assert rel_err(two.basis(name).numpy(), one.basis(name).numpy()) < 1e-5, name
    assert [entry["sharded"] for entry in two.history] == [True] * 3
    for mine, theirs in zip(two.history, one.history, strict=True):
        for key in ("task_index", "kept_rank_mean", "kept_energy", "conflict", "update_norm", "consolidated_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key


def test_fsdp1_is_refused(runs):
    """FSDP1 (FullyShardedDataParallel, use_orig_params=True) is refused on both ranks, for the wrapper and for the
    PeftModel inside it (root-only and per-decoder-layer wrapping)."""
    from trl_lifealign.distributed import UnsupportedShardingError

    for record in runs["records"]["two"]["fsdp1"]:
        assert set(record) == {"root_only/wrapper", "root_only/inner", "per_layer/wrapper", "per_layer/inner"}
        for where, error in record.items():
            assert error is not None, f"{where}: begin_task accepted an FSDP1 model"
            assert error["type"] == UnsupportedShardingError.__name__, (where, error)
            assert "FSDP1" in error["message"] and "MemoryConsolidationCallback" in error["message"], where
    assert not any((runs["root"] / "two" / "fsdp1").glob("memory-*/manifest.json"))
