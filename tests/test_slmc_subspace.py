"""SLMC with a subspace memory: the callback against a float64 reference, the versioned memory format, and gradient
projection during training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _slmc_utils import lora_factors, tiny_lora_model

from trl_lifealign.slmc import LongTermMemory, MemoryConsolidationCallback, SLMCConfig
from trl_lifealign.slmc.memory import MemoryMismatchError

THETA, LAMBDA = 0.8, 0.25


def _reference(updates: list[np.ndarray], side: str) -> list[np.ndarray]:
    """The subspace construction in float64: denoise by energy, scale the in-subspace part by λ, extend the basis."""
    basis = np.zeros((updates[0].shape[1] if side == "row" else updates[0].shape[0], 0))
    betas = []
    for update in updates:
        u, s, vt = np.linalg.svd(update, full_matrices=False)
        energy = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(energy >= THETA)) + 1
        denoised = (u[:, :k] * s[:k]) @ vt[:k]
        projector = basis @ basis.T
        in_span = denoised @ projector if side == "row" else projector @ denoised
        beta = denoised - (1 - LAMBDA) * in_span
        betas.append(beta)
        directions = np.linalg.svd(beta, full_matrices=False)
        space = directions[2][:k].T if side == "row" else directions[0][:, :k]
        for column in space.T:
            for _ in range(2):
                column = column - basis @ (basis.T @ column)
            if np.linalg.norm(column) > 1e-6:
                basis = np.concatenate([basis, (column / np.linalg.norm(column))[:, None]], axis=1)
    return betas


def test_subspace_consolidation_matches_the_float64_construction(tmp_path, tiny_tokenizer):
    model = tiny_lora_model(tiny_tokenizer)
    slmc = MemoryConsolidationCallback(tmp_path / "m", SLMCConfig(THETA, LAMBDA, memory_kind="subspace"))
    generator = torch.Generator().manual_seed(0)
    raw: dict[str, list[np.ndarray]] = {}
    consolidated: dict[str, list[np.ndarray]] = {}
    for _ in range(3):
        slmc.begin_task(model)
        start = lora_factors(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_" in name and ".default." in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        trained = lora_factors(model)
        report = slmc.consolidate(model)
        for name, value in lora_factors(model).items():
            raw.setdefault(name, []).append((trained[name] - start[name]).double().numpy())
            consolidated.setdefault(name, []).append((value - start[name]).double().numpy())
        assert report.factors and all(0.0 <= f["conflict"] <= 1.0 for f in report.factors.values())
    for name in raw:
        side = "row" if ".lora_A." in name else "column"
        for got, expected in zip(consolidated[name], _reference(raw[name], side)):
            assert np.allclose(got, expected, atol=1e-5, rtol=1e-4), name
        # λ < 1 and overlapping random updates: the consolidation really changed something.
        assert not np.allclose(consolidated[name][2], raw[name][2], atol=1e-4)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["memory_kind"] == "subspace"
    loaded = LongTermMemory.load(tmp_path / "m")
    name = next(iter(raw))
    assert loaded.kind == "subspace" and torch.equal(loaded.basis(name), slmc.memory.basis(name))
    basis = loaded.basis(name)
    assert torch.allclose(basis @ basis.T, torch.eye(basis.shape[0]), atol=1e-5)
    with pytest.raises(MemoryMismatchError, match="is a 'subspace' memory"):
        MemoryConsolidationCallback(tmp_path / "m").begin_task(model)


def test_version_1_paper_memories_still_load(tmp_path, tiny_tokenizer):
    model = tiny_lora_model(tiny_tokenizer)
    slmc = MemoryConsolidationCallback(tmp_path / "m")
    slmc.begin_task(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B.default." in name:
                param.add_(0.1)
    slmc.consolidate(model)
    manifest_path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    manifest.pop("memory_kind")
    manifest_path.write_text(json.dumps(manifest))
    old = LongTermMemory.load(tmp_path / "m")
    assert old.kind == "paper" and old.task_count == 1


def test_projected_steps_stay_outside_the_stored_subspace(tmp_path, tiny_tokenizer, preference_rows):
    """Task 2 with project_steps: every factor's change over the task is orthogonal to the subspace task 1 stored."""
    from datasets import Dataset

    from trl_lifealign.fpo import FPOConfig, FPOTrainer

    model = tiny_lora_model(tiny_tokenizer)
    config = SLMCConfig(0.9, 0.5, memory_kind="subspace", project_steps=True)
    slmc = MemoryConsolidationCallback(tmp_path / "m", config)
    bases = None
    for task in range(2):
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        args = FPOConfig(output_dir=str(tmp_path / f"t{task}"), bf16=False, use_cpu=True, report_to=[],
                         max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2, max_length=64,
                         logging_steps=1, gradient_checkpointing=False)
        trainer = FPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_rows),
                             processing_class=tiny_tokenizer, callbacks=[slmc])
        start = lora_factors(model)
        if task == 1:
            bases = {name: slmc.memory.basis(name) for name in start}
        trainer.train()
    logged = [e for e in trainer.state.log_history if "slmc/step_projected_norm" in e]
    assert logged and any(e["slmc/step_projected_norm"] > 0 for e in logged)
    for name, value in lora_factors(model).items():
        delta = (value - start[name]).double()
        basis = bases[name].double()
        if basis.shape[0] == 0:
            continue
        inside = delta @ basis.T if ".lora_A." in name else basis @ delta
        # Every step's change was projected out of the subspace, and the boundary's denoising keeps the update's row
        # (column) space: nothing of task 2's change lies in task 1's subspace.
        assert inside.norm() <= 1e-4 * delta.norm() + 1e-7, name
