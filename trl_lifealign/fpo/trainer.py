"""`FPOTrainer`: TRL's `DPOTrainer` with the focal preference optimization (FPO) loss of LifeAlign.

The loss lives in `FPOLossMixin._compute_loss`, TRL's override point (same signature in trl 1.9 and 1.16), so any
`DPOTrainer` subclass (e.g. Axolotl's) gets FPO by putting the mixin first in its bases. Everything about the reference
is TRL's own: `compute_ref_log_probs` (explicit `ref_model`, the PEFT adapter-disabled base, the frozen `"ref"`
adapter TRL adds when given an existing `PeftModel`) and the precomputed `ref_chosen_logps` / `ref_rejected_logps`
columns. Only the policy forward differs between trl versions, and it is chosen by feature, not by version string:
newer trl (e.g. 1.16) patches a fused, chunked LM head onto the model (`add_fused_lm_head`: per-token log-probs
without logits); earlier versions (e.g. 1.9) compute log-probs from the logits.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl.trainer import utils as trl_utils

from ..adapters import REF_ADAPTER
from ..callbacks import bind_callbacks
from ..compat import bind_dpo_trainer_arguments, quiet_checkpointing_deprecations, replace_dpo_trainer_argument
from ..defences.base import AuxiliaryLossMixin
from .config import FPOConfig, validate_fpo_args
from .focal import DEFAULT_FOCAL_GAMMA
from .loss import fpo_loss

logger = logging.getLogger(__name__)

# Newer trl (e.g. 1.16): the policy forward returns `log_probs`, `entropy`, `mean_logits`, `is_top1` from a fused
# LM head.
FUSED_LM_HEAD = hasattr(trl_utils, "add_fused_lm_head")

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class FPOLossMixin:
    """FPO's loss for any class deriving from `trl.DPOTrainer` (put the mixin before the DPO trainer in the bases).

    Reads the focal exponent as `getattr(self.args, "focal_gamma", DEFAULT_FOCAL_GAMMA)`, so it works with `FPOConfig`
    and with any
    `DPOConfig` subclass carrying a `focal_gamma` field. Logs every metric `DPOTrainer` logs, plus `fpo/focal_weight`
    (mean focal weight `(1-p)^γ` of the batch's pairs), in train and eval (`eval_fpo/focal_weight`).
    """

    @property
    def focal_gamma(self) -> float:
        """The focal exponent γ in use (from `args.focal_gamma`, default `DEFAULT_FOCAL_GAMMA`)."""
        return float(getattr(self.args, "focal_gamma", DEFAULT_FOCAL_GAMMA))

    def _fpo_policy_forward(self, model, inputs: dict[str, Any], model_kwargs: dict[str, Any]):
        """Policy forward on the `[chosen; rejected]` batch -> `(outputs, per_token_logps, shift_logits)`.

        `per_token_logps` has shape `(2B, T-1)` and is zero outside the completion; `shift_logits` is `None` on the
        fused-head path (no logits are materialized there).
        """
        input_ids = inputs["input_ids"]
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]
        if FUSED_LM_HEAD:
            labels = input_ids.masked_fill(completion_mask == 0, -100)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
            per_token_logps = outputs.log_probs[:, -shift_completion_mask.size(1) :]
            return outputs, per_token_logps, None
        outputs = model(**model_kwargs)
        shift_logits = outputs.logits[..., :-1, :]
        per_token_logps = trl_utils.selective_log_softmax(shift_logits, input_ids[..., 1:])
        per_token_logps = per_token_logps.masked_fill(shift_completion_mask == 0, 0.0)
        return outputs, per_token_logps, shift_logits

    def _fpo_sft_loss(self, inputs, per_token_logps, shift_logits) -> torch.Tensor:
        """Mean negative log-likelihood of the chosen completion tokens (TRL's `"sft"` loss term)."""
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
        if shift_logits is None:
            chosen_per_token_logps, _ = per_token_logps.chunk(2, dim=0)
            return -chosen_per_token_logps[chosen_mask.bool()].mean()
        chosen_logits, _ = shift_logits.chunk(2, dim=0)
        chosen_labels, _ = inputs["input_ids"][..., 1:].chunk(2, dim=0)
        return F.cross_entropy(chosen_logits[chosen_mask.bool()], chosen_labels[chosen_mask.bool()])

    def _fpo_reference_logps(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs exactly as TRL obtains them (precomputed columns or `compute_ref_log_probs`)."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with quiet_checkpointing_deprecations():  # TRL toggles checkpointing by its deprecated names (trl 1.16)
            return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)

    def _fpo_log_token_metrics(self, mode: str, inputs, outputs, shift_logits) -> None:
        """Log `entropy`, `num_tokens`, `logits/*` and `mean_token_accuracy` the way DPOTrainer does."""
        gather = self.accelerator.gather_for_metrics
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        seq_len = shift_completion_mask.size(1)
        chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)
        if shift_logits is None:
            per_token_entropy = outputs.entropy[:, -seq_len:].detach()
            chosen_mean_logits, rejected_mean_logits = outputs.mean_logits[:, -seq_len:].detach().chunk(2, dim=0)
            logit_sums = (
                chosen_mean_logits[chosen_mask.bool()].sum(),
                rejected_mean_logits[rejected_mask.bool()].sum(),
            )
            chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
        else:
            detached = shift_logits.detach()
            per_token_entropy = trl_utils.entropy_from_logits(detached)
            chosen_logits, rejected_logits = detached.chunk(2, dim=0)
            # Vocabulary means only at completion positions (no work spent on prompt and padding).
            logit_sums = (
                chosen_logits[chosen_mask.bool()].mean(-1).sum(),
                rejected_logits[rejected_mask.bool()].mean(-1).sum(),
            )
            chosen_labels, _ = inputs["input_ids"][..., 1:].chunk(2, dim=0)
            chosen_is_top1 = chosen_logits.argmax(dim=-1) == chosen_labels

        entropy_sum = gather((per_token_entropy * shift_completion_mask).sum()).sum()
        total_tokens = gather(shift_completion_mask.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

        if mode == "train":
            num_tokens_in_batch = gather(inputs["attention_mask"].sum()).sum().item()
            # Tensor-parallel ranks see the same batch (newer trl records the TP size; absent means 1).
            self._total_train_tokens += num_tokens_in_batch // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        for name, logit_sum, mask in (
            ("logits/chosen", logit_sums[0], chosen_mask),
            ("logits/rejected", logit_sums[1], rejected_mask),
        ):
            total_logits = gather(logit_sum).sum().item()
            total = gather(mask.sum()).sum().item()
            self._metrics[mode][name].append(total_logits / total if total > 0 else 0.0)

        correct = gather((chosen_is_top1 & chosen_mask.bool()).sum()).sum()
        total = gather(chosen_mask.sum()).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / total).item() if total > 0 else 0.0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        aux_loss_enabled = getattr(self, "aux_loss_enabled", False)
        if aux_loss_enabled:  # MoE: the router logits give the load-balancing loss, as in DPOTrainer
            model_kwargs["output_router_logits"] = True

        outputs, per_token_logps, shift_logits = self._fpo_policy_forward(model, inputs, model_kwargs)
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)  # batch is [chosen; rejected]
        ref_chosen_logps, ref_rejected_logps = self._fpo_reference_logps(inputs)
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps

        loss = 0.0
        focal_weight = None
        for loss_type, loss_weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "fpo":
                per_pair_loss, focal_weight = fpo_loss(
                    chosen_logratios, rejected_logratios, self.beta, self.focal_gamma
                )
            elif loss_type == "sigmoid":
                per_pair_loss = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios))
            elif loss_type == "sft":
                per_pair_loss = self._fpo_sft_loss(inputs, per_token_logps, shift_logits).expand(
                    chosen_logps.size(0)
                )
            else:  # validate_fpo_args refuses these at construction; reaching here means args changed since.
                raise ValueError(f"loss_type {loss_type!r} cannot be combined with 'fpo' in FPOTrainer")
            loss = loss + per_pair_loss.mean() * loss_weight

        if aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._fpo_log_token_metrics(mode, inputs, outputs, shift_logits)
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        gather = self.accelerator.gather
        self._metrics[mode]["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        self._metrics[mode]["rewards/accuracies"].append(gather(accuracies).mean().item())
        self._metrics[mode]["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        self._metrics[mode]["fpo/focal_weight"].append(gather(focal_weight.detach()).mean().item())

        if return_outputs and shift_logits is None:
            # `prediction_step` with `compute_metrics` wants logits, which the fused head never builds.
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
        return (loss, outputs) if return_outputs else loss


class FPOTrainer(AuxiliaryLossMixin, FPOLossMixin, DPOTrainer):
    """Trainer for focalized preference optimization (FPO), a drop-in replacement for `trl.DPOTrainer`.

    Per preference pair, with `z = β·[(log πθ(y_w) − log πref(y_w)) − (log πθ(y_l) − log πref(y_l))]` and `p = σ(z)`,
    the loss is `−(1−p)^γ · log p` (LifeAlign, https://huggingface.co/papers/2509.17183); `γ = 0` is exactly DPO.

    Accepts exactly `DPOTrainer`'s arguments (forwarded unchanged, including extra keyword arguments for subclasses
    such as Axolotl's) and everything `DPOTrainer` does with references: a new PEFT adapter (reference = adapters
    disabled), an existing `PeftModel` (reference = TRL's frozen `"ref"` copy), an explicit `ref_model`, and
    `precompute_ref_log_probs`. Full fine-tuning, LoRA and 4-bit QLoRA all work.

    Example:
    ```python
    from trl_lifealign import FPOConfig, FPOTrainer

    trainer = FPOTrainer(model="Qwen/Qwen2-0.5B-Instruct", args=FPOConfig(output_dir="out", focal_gamma=2.0),
                         train_dataset=dataset)
    trainer.train()
    ```

    The configuration is validated before any model or dataset work: `args` may be an `FPOConfig` or any
    `DPOConfig` (subclass) with an optional `focal_gamma` attribute; its `loss_type` must include `"fpo"`.
    """

    _tag_names = ["trl", "dpo", "fpo", "trl-lifealign"]
    _name = "FPO"

    def __init__(self, *args, **kwargs):
        bound = bind_dpo_trainer_arguments(args, kwargs)
        if bound.get("args") is None:
            # DPOTrainer would build a DPOConfig (loss 'sigmoid'); build the FPO equivalent instead.
            model = bound.get("model")
            if model is None:
                raise ValueError("FPOTrainer needs a `model` (a path, a PreTrainedModel or a PeftModel)")
            model_name = model if isinstance(model, str) else trl_utils.get_config_model_id(model.config)
            args, kwargs = replace_dpo_trainer_argument(args, kwargs, "args",
                                                        FPOConfig(f"{model_name.split('/')[-1]}-FPO"))
            bound = bind_dpo_trainer_arguments(args, kwargs)
        validate_fpo_args(bound["args"])
        _drop_stale_ref_adapter(bound)
        with quiet_checkpointing_deprecations():
            super().__init__(*args, **kwargs)
        bind_callbacks(self)

    def train(self, *args, **kwargs):
        with quiet_checkpointing_deprecations():
            return super().train(*args, **kwargs)

    def add_callback(self, callback):
        super().add_callback(callback)
        bind_callbacks(self)


def _drop_stale_ref_adapter(bound: dict) -> None:
    """Let TRL re-create its frozen `"ref"` adapter when a PeftModel comes back from a previous trainer.

    Given a PeftModel (no `peft_config`, no `ref_model`), TRL adds a `"ref"` adapter copied from `"default"`: the
    reference is the adapter as it is at trainer construction. If the model already carries `"ref"` (a second trainer
    on the same model, e.g. the next task of a lifelong sequence), peft 0.20 silently re-copies it while peft >= 0.21
    raises "Adapter with name 'ref' already exists". Dropping the old copy first gives TRL's documented behaviour on
    both.
    """
    model = bound.get("model")
    peft_configs = getattr(model, "peft_config", None)
    if bound.get("ref_model") is None and bound.get("peft_config") is None and isinstance(peft_configs, dict) \
            and REF_ADAPTER in peft_configs:
        logger.info("Replacing the existing 'ref' adapter with a copy of the current 'default' adapter.")
        model.delete_adapter(REF_ADAPTER)
