"""Resuming an SLMC sequence across processes, and crashes during a memory save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _slmc_resume_worker as worker
import pytest
import torch

from trl_lifealign.slmc import LongTermMemory, MemoryConsolidationCallback, MemoryFormatError
from trl_lifealign.slmc import memory as memory_module

WORKER = str(Path(__file__).resolve().parent / "_slmc_resume_worker.py")
# Workers use this process's thread count: the same reduction order makes resumed and one-process runs bit-equal.
ENV = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))


def _factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def test_three_processes_equal_one(tmp_path):
    """Tasks 0 and 1 in two worker processes, task 2 in this one (a new callback on the same memory_dir)."""
    from safetensors.torch import load_file

    memory_dir, state = tmp_path / "split", tmp_path / "state.safetensors"
    for task in range(2):
        subprocess.run([sys.executable, WORKER, "task", str(memory_dir), str(state), str(task)], env=ENV, check=True,
                       timeout=300)
    third = worker.build_model()
    third.load_state_dict(load_file(state), strict=False)
    continued = MemoryConsolidationCallback(memory_dir, energy_threshold=worker.THETA, overlap_weight=worker.LAMBDA)
    assert worker.run_task(third, continued, 2).task_index == 2
    split = _factors(third)
    model = worker.build_model()
    slmc = MemoryConsolidationCallback(tmp_path / "one", energy_threshold=worker.THETA, overlap_weight=worker.LAMBDA)
    reports = [worker.run_task(model, slmc, task) for task in range(3)]
    assert reports[-1].conflict > 0.1  # the tasks overlap, so the projection matters
    one = _factors(model)
    assert split.keys() == one.keys()
    for name in one:
        assert torch.allclose(split[name], one[name], rtol=0, atol=1e-7), name
    resumed = LongTermMemory.load(memory_dir)
    assert resumed.task_count == 3 and resumed.history == slmc.memory.history
    for name in resumed.spec.factors:
        assert torch.allclose(resumed.basis(name), slmc.memory.basis(name), atol=1e-7), name


def test_crash_between_data_and_manifest_keeps_previous_state(tmp_path, monkeypatch):
    model = worker.build_model()
    slmc = MemoryConsolidationCallback(tmp_path / "m")
    worker.run_task(model, slmc, 0)
    before = (tmp_path / "m" / "manifest.json").read_bytes()

    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt("simulated kill before the manifest is replaced")
        return real_replace(src, dst)

    monkeypatch.setattr(memory_module.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        worker.run_task(model, slmc, 1)
    monkeypatch.undo()
    assert (tmp_path / "m" / "manifest.json").read_bytes() == before
    loaded = LongTermMemory.load(tmp_path / "m")
    assert loaded.task_count == 1

    def crash_mid_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("simulated kill while writing the data file")

    monkeypatch.setattr("safetensors.torch.save_file", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        worker.run_task(worker.build_model(), MemoryConsolidationCallback(tmp_path / "m"), 1)
    assert LongTermMemory.load(tmp_path / "m").task_count == 1


def test_sigkill_during_saves_leaves_loadable_memory(tmp_path):
    """Kill a process that consolidates + saves in a loop at arbitrary moments; the memory must always load."""
    memory_dir = tmp_path / "m"
    last_count = 0
    for delay in (0.05, 0.23):
        process = subprocess.Popen([sys.executable, WORKER, "hammer", str(memory_dir)], env=ENV,
                                   stdout=subprocess.PIPE, text=True)
        try:
            first = process.stdout.readline()  # a first save of this process has completed
            assert first.strip(), "worker died before its first save"
            time.sleep(delay)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        loaded = LongTermMemory.load(memory_dir)  # never a MemoryFormatError
        assert loaded.task_count > last_count
        last_count = loaded.task_count
        assert len(list(memory_dir.glob("basis-*.safetensors"))) <= 2  # at most one orphan, cleaned at next save
    # A later process continues the sequence from the surviving state.
    model = worker.build_model()
    slmc = MemoryConsolidationCallback(memory_dir)
    assert worker.run_task(model, slmc, 99).task_index == last_count
    assert len(list(memory_dir.glob("basis-*.safetensors"))) == 1
    with pytest.raises(MemoryFormatError):
        (memory_dir / "manifest.json").write_text("{}")
        LongTermMemory.load(memory_dir)
