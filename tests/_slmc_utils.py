"""Helpers for the SLMC tests: an independent float64 numpy reference of the paper's construction, tiny LoRA models."""

from __future__ import annotations

import numpy as np
import torch

LORA_TARGETS = ["q_proj", "v_proj"]
LORA_RANK = 4


def reference_denoise(update: np.ndarray, energy_threshold: float) -> np.ndarray:
    """Truncated SVD keeping the fewest leading singular values with share of sum(s**2) >= theta (paper, float64)."""
    u, s, vt = np.linalg.svd(update.astype(np.float64), full_matrices=False)
    energy = float((s**2).sum())
    if energy == 0.0:
        return np.zeros_like(update, dtype=np.float64)
    if energy_threshold >= 1.0:
        k = len(s)
    else:
        share = np.cumsum(s**2) / energy
        k = int(np.argmax(share >= energy_threshold)) + 1
    return (u[:, :k] * s[:k]) @ vt[:k]


def reference_sequence(updates, energy_threshold, overlap_weight, sv_rel_tol=1e-6):
    """Paper's SLMC for one factor over a task sequence: denoise, then project against the right singular vectors of
    the stacked history of consolidated updates (singular values <= sv_rel_tol * max dropped). Returns the betas."""
    history, betas = [], []
    for update in updates:
        a = reference_denoise(np.asarray(update, dtype=np.float64), energy_threshold).ravel()
        if history:
            _, s, vt = np.linalg.svd(np.stack(history), full_matrices=False)
            v = vt[s > sv_rel_tol * s.max()] if s.max() > 0 else vt[:0]
            in_span = v.T @ (v @ a)
            beta = a - (1.0 - overlap_weight) * in_span
        else:
            beta = a
        history.append(beta)
        betas.append(beta.reshape(np.shape(update)))
    return betas


def rel_err(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.linalg.norm(expected), 1e-30)
    return float(np.linalg.norm(actual - expected) / scale)


def tiny_lora_model(tokenizer, seed: int = 0, rank: int = LORA_RANK, targets=None, init_b_nonzero: bool = True):
    """Tiny Llama + LoRA (q_proj, v_proj). B is randomised so both factors get gradients from the first step."""
    from peft import LoraConfig, get_peft_model

    from trl_lifealign.tiny import build_tiny_llama

    base = build_tiny_llama(tokenizer, seed=seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets or LORA_TARGETS), lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A is initialised from the global RNG
        model = get_peft_model(base, config)
    if init_b_nonzero:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def lora_factors(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of the adapter's lora_A / lora_B weights."""
    return {
        name: param.detach().float().cpu().clone()
        for name, param in model.named_parameters()
        if (f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name)
    }


TASK_ROWS_SPLIT = [(0, 4), (4, 8), (2, 6)]


def task_dataset(rows, task: int, swap: bool = False):
    """Task `task` of a 3-task sequence over the shared preference rows (task 2 swaps chosen/rejected: a conflict)."""
    from datasets import Dataset

    start, stop = TASK_ROWS_SPLIT[task]
    picked = [dict(row) for row in rows[start:stop]] * 2
    if swap or task == 2:
        picked = [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in picked]
    return Dataset.from_list(picked)


def dpo_config(output_dir, **overrides):
    from trl import DPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        beta=0.5,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        max_length=64,
    )
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def drop_ref_adapter(model) -> None:
    """TRL adds a frozen 'ref' copy of the adapter per trainer; peft 0.21 refuses to add it twice."""
    if "ref" in model.peft_config:
        model.delete_adapter("ref")


class FactorRecorder:
    """A TrainerCallback (listed before the SLMC callback) recording factors at train begin and after the last
    optimizer step, before the SLMC callback consolidates them."""

    def __new__(cls, *args, **kwargs):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.begin, self.end = [], []

            def on_train_begin(self, args, state, control, model=None, **kw):
                self.begin.append(lora_factors(model))

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step >= state.max_steps:
                    self.end.append(lora_factors(model))

        return _Recorder()
