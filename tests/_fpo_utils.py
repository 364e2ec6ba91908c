"""Helpers shared by the FPO tests: tiny configs, one collated batch, and log-probs computed by hand."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset

TRAINER_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


def dataset(rows) -> Dataset:
    return Dataset.from_list([dict(row) for row in rows])


def config(tmp_path, config_cls=None, **overrides):
    """A CPU-friendly FPOConfig (or `config_cls`): fp32, no reports, tiny batches, no shuffling surprises."""
    if config_cls is None:
        from trl_lifealign.fpo import FPOConfig

        config_cls = FPOConfig
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        bf16=False,  # DPOConfig defaults bf16=True even on CPU; autocast would change the last digits
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        beta=0.5,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return config_cls(**kwargs)


def batch(trainer, n: int = 4) -> dict:
    """The collated `[chosen; rejected]` batch of the first `n` prepared training rows, on the trainer's device."""
    ds = trainer.train_dataset
    columns = [c for c in TRAINER_COLUMNS if c in ds.column_names]
    rows = [{c: ds[i][c] for c in columns} for i in range(n)]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def sequence_logps(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, from plain logits (independent of TRL's code paths)."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = inputs["input_ids"][:, 1:]
    token_logps = torch.gather(logprobs, 2, targets.unsqueeze(-1)).squeeze(-1)
    mask = inputs["completion_mask"][:, 1:].float()
    return (token_logps * mask).sum(1).chunk(2)


def focal_reference(chosen_logratios, rejected_logratios, beta, gamma):
    """Plain-PyTorch focal loss per pair: -(1-p)^γ log p, p = σ(β Δ), written the obvious (unstable) way."""
    p = torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    return -((1 - p) ** gamma) * torch.log(p)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def perturb_(module, prefix_filter: str, seed: int, scale: float = 0.2) -> None:
    """Overwrite every parameter whose name contains `prefix_filter` with seeded noise (to move adapters off zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if prefix_filter in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def snapshot_params(module, name_filter: str) -> dict[str, torch.Tensor]:
    """Copies of the parameters whose name contains `name_filter` (a deepcopy is not a snapshot once TRL has
    patched the instance's forward: the patched closure still points at the live model)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if name_filter in n}


class swapped_params:
    """Context manager: temporarily load `saved` parameter values into `module`, restore them on exit."""

    def __init__(self, module, saved: dict[str, torch.Tensor]):
        self.module, self.saved, self.current = module, saved, {}

    def __enter__(self):
        with torch.no_grad():
            for name, value in self.saved.items():
                param = self.module.get_parameter(name)
                self.current[name] = param.detach().clone()
                param.copy_(value)
        return self.module

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, value in self.current.items():
                self.module.get_parameter(name).copy_(value)
        return False
