"""MemoryConsolidationCallback on real tiny LoRA models with TRL's DPOTrainer (single process, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _slmc_utils import (
    FactorRecorder,
    dpo_config,
    drop_ref_adapter,
    lora_factors,
    reference_sequence,
    rel_err,
    task_dataset,
    tiny_lora_model,
)

from trl_lifealign.slmc import (
    LongTermMemory,
    MemoryConsolidationCallback,
    MemoryFormatError,
    MemoryMismatchError,
    NonFiniteUpdateError,
)

THETA, LAMBDA = 0.6, 0.3


def test_three_task_dpo_run_matches_reference(tmp_path, tiny_tokenizer, preference_rows):
    from trl import DPOTrainer

    model = tiny_lora_model(tiny_tokenizer)
    memory_dir = tmp_path / "memory"
    slmc = MemoryConsolidationCallback(memory_dir, energy_threshold=THETA, overlap_weight=LAMBDA)
    recorder = FactorRecorder()
    ref_before = None
    for task in range(3):
        drop_ref_adapter(model)
        trainer = DPOTrainer(
            model=model,
            args=dpo_config(tmp_path / f"out{task}"),
            train_dataset=task_dataset(preference_rows, task),
            processing_class=tiny_tokenizer,
            callbacks=[recorder, slmc],
        )
        if task == 2:
            ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
        trainer.train()
        metrics = [entry for entry in trainer.state.log_history if "slmc/seconds" in entry]
        assert len(metrics) == 1 and metrics[0]["slmc/task"] == task
        assert slmc.last_report.task_index == task

    final = lora_factors(model)
    assert set(final) == set(recorder.begin[0]) and len(final) == 8  # 2 layers x (q, v) x (A, B); no 'ref'
    for name in final:
        updates = [(recorder.end[t][name] - recorder.begin[t][name]).double().numpy() for t in range(3)]
        assert all(np.abs(u).max() > 1e-4 for u in updates), f"{name} did not train"
        betas = reference_sequence(updates, THETA, LAMBDA)
        for task in range(3):
            consolidated = recorder.begin[task + 1][name] if task < 2 else final[name]
            expected = recorder.begin[task][name].double().numpy() + betas[task]
            assert rel_err(consolidated.numpy(), expected) < 1e-5, (name, task)
            # The consolidation really changed something (otherwise the test could not fail).
            assert rel_err(recorder.end[task][name].numpy(), expected) > 1e-4, (name, task)
    # TRL's frozen reference adapter is never touched.
    for name, value in ref_before.items():
        assert torch.equal(value, model.get_parameter(name))

    report = slmc.last_report
    assert 0.0 < report.conflict < 1.0 and 0.0 < report.kept_energy <= 1.0 and report.seconds > 0
    assert report.memory_disk_bytes > (memory_dir / "manifest.json").stat().st_size
    assert report.memory_ram_bytes == sum(f["basis_rank"] * final[n].numel() * 4 for n, f in report.factors.items())
    assert all(f["basis_rank"] == 3 for f in report.factors.values())
    manifest = json.loads((memory_dir / "manifest.json").read_text())
    assert manifest["task_count"] == 3 and manifest["adapters"] == {
        "default": {"rank": 4, "target_modules": ["q_proj", "v_proj"]}
    }
    assert len(list(memory_dir.glob("basis-*.safetensors"))) == 1
    # A new callback on the same directory continues the sequence.
    again = MemoryConsolidationCallback(memory_dir)
    again.begin_task(model)
    assert again.memory.task_count == 3 and again.memory.basis_ranks() == slmc.memory.basis_ranks()


def test_on_demand_boundaries_and_identity_settings(tmp_path, tiny_tokenizer):
    """theta = 1 and lambda = 1 leave the trained weights unchanged; on-demand begin_task/consolidate."""
    model = tiny_lora_model(tiny_tokenizer)
    slmc = MemoryConsolidationCallback(tmp_path / "m", energy_threshold=1.0, overlap_weight=1.0)
    generator = torch.Generator().manual_seed(0)
    for task in range(3):
        slmc.begin_task(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        trained = lora_factors(model)
        report = slmc.consolidate(model)
        assert report.task_index == task
        for name, value in lora_factors(model).items():
            assert torch.equal(value, trained[name])
    assert slmc.memory.task_count == 3 and max(slmc.memory.basis_ranks().values()) == 3


def test_lambda_zero_is_orthogonal_to_earlier_tasks(tmp_path, tiny_tokenizer):
    model = tiny_lora_model(tiny_tokenizer)
    slmc = MemoryConsolidationCallback(tmp_path / "m", energy_threshold=1.0, overlap_weight=0.0)
    generator = torch.Generator().manual_seed(1)
    betas = []
    for _ in range(3):
        slmc.begin_task(model)
        start = lora_factors(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name and ".default." in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        slmc.consolidate(model)
        betas.append({n: v - start[n] for n, v in lora_factors(model).items()})
    for name in betas[0]:
        for earlier in range(2):
            dot = float(betas[2][name].reshape(-1) @ betas[earlier][name].reshape(-1))
            assert abs(dot) < 1e-5 * float(betas[2][name].norm() * betas[earlier][name].norm()), name


def test_errors_are_loud(tmp_path, tiny_tokenizer):
    from trl_lifealign.tiny import build_tiny_llama

    with pytest.raises(ValueError, match="needs a PEFT LoRA model"):
        MemoryConsolidationCallback(tmp_path / "x").begin_task(build_tiny_llama(tiny_tokenizer))
    with pytest.raises(ValueError, match="frozen reference"):
        MemoryConsolidationCallback(tmp_path / "x", adapter_names=["ref"])

    model = tiny_lora_model(tiny_tokenizer)
    memory_dir = tmp_path / "m"
    slmc = MemoryConsolidationCallback(memory_dir)
    slmc.begin_task(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.add_(0.1)
    slmc.consolidate(model)
    # NaN in an update: refused, nothing written back, memory unchanged.
    manifest_before = (memory_dir / "manifest.json").read_bytes()
    slmc.begin_task(model)
    target = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    with torch.no_grad():
        model.get_parameter(target)[0, 0] = float("nan")
        model.get_parameter(target.replace("layers.1", "layers.0"))[0, 0] += 1.0
    trained = {n: v.clone() for n, v in lora_factors(model).items()}
    with pytest.raises(NonFiniteUpdateError, match="layers.1.self_attn.v_proj.lora_B"):
        slmc.consolidate(model)
    for name, value in lora_factors(model).items():
        assert torch.equal(value, trained[name]) or (name == target and torch.isnan(value).sum() == 1)
    assert (memory_dir / "manifest.json").read_bytes() == manifest_before

    # A memory built for another LoRA layout is refused, naming the first mismatch.
    with pytest.raises(MemoryMismatchError, match="rank 4 in memory but 2"):
        MemoryConsolidationCallback(memory_dir).begin_task(tiny_lora_model(tiny_tokenizer, rank=2))
    with pytest.raises(MemoryMismatchError, match="target_modules"):
        MemoryConsolidationCallback(memory_dir).begin_task(tiny_lora_model(tiny_tokenizer, targets=["q_proj"]))
    manifest = json.loads(manifest_before)
    first = next(iter(manifest["factors"]))
    manifest["factors"][first]["shape"] = [5, 32]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / manifest["data_file"]).write_bytes((memory_dir / manifest["data_file"]).read_bytes())
    (bad_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryMismatchError, match=f"parameter {first} has shape"):
        MemoryConsolidationCallback(bad_dir).begin_task(model)

    # Truncated / corrupt files are refused with a clear message.
    data = memory_dir / manifest["data_file"]
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MemoryFormatError, match="truncated"):
        LongTermMemory.load(memory_dir)
    data.write_bytes(blob[:-8] + b"\x00" * 8)
    with pytest.raises(MemoryFormatError, match="corrupt"):
        LongTermMemory.load(memory_dir)
    (memory_dir / "manifest.json").write_bytes(manifest_before[:40])
    with pytest.raises(MemoryFormatError, match="truncated or corrupt"):
        LongTermMemory.load(memory_dir)
