"""`FPOConfig`: TRL's `DPOConfig` plus the focal exponent, validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from .focal import DEFAULT_FOCAL_GAMMA, check_focal_gamma

# Loss types FPO can be combined with through `loss_weights`: both are computed from the same policy forward and the
# same chosen/rejected log-ratios, so the weighted sum matches TRL's own combination exactly.
FPO_COMBINABLE_LOSS_TYPES = ("sigmoid", "sft")


def _trl_has_liger_loss_path() -> bool:
    # trl <= 1.9 routes `use_liger_kernel=True` to a fused DPO loss that bypasses `_compute_loss` (and so FPO);
    # later versions only apply Liger's layer kernels and always go through `_compute_loss`.
    from trl import DPOTrainer

    return hasattr(DPOTrainer, "_compute_loss_liger")


def validate_fpo_args(args: Any) -> None:
    """Raise `ValueError` (naming the field) if `args` asks FPO for something it cannot honour.

    Works on `FPOConfig` and on any `DPOConfig` (subclass) carrying an optional `focal_gamma` attribute, such as
    Axolotl's DPO config with the LifeAlign mixin; a missing `focal_gamma` means `DEFAULT_FOCAL_GAMMA`.
    """
    check_focal_gamma(getattr(args, "focal_gamma", DEFAULT_FOCAL_GAMMA))

    loss_types = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if "fpo" not in loss_types:
        raise ValueError(
            f"loss_type must include 'fpo' for FPOTrainer, got {loss_types}. Use trl.DPOTrainer for the other losses, "
            "or set loss_type=['fpo'] (optionally with 'sigmoid'/'sft' and loss_weights)."
        )
    if loss_types.count("fpo") > 1:
        raise ValueError(f"loss_type lists 'fpo' more than once: {loss_types}; weight it with loss_weights instead.")
    unsupported = [t for t in loss_types if t != "fpo" and t not in FPO_COMBINABLE_LOSS_TYPES]
    if unsupported:
        raise ValueError(
            f"loss_type {unsupported} cannot be combined with 'fpo': FPOTrainer combines 'fpo' only with "
            f"{list(FPO_COMBINABLE_LOSS_TYPES)} (through loss_weights). Got loss_type={loss_types}."
        )
    loss_weights = args.loss_weights
    if loss_weights is not None:
        if len(loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights has {len(loss_weights)} values but loss_type has {len(loss_types)} ({loss_types})."
            )
        bad = [w for w in loss_weights if not math.isfinite(float(w))]
        if bad:
            raise ValueError(f"loss_weights must be finite numbers, got {loss_weights}.")

    if args.ld_alpha is not None:
        raise ValueError(
            "ld_alpha is not supported by FPOTrainer: TRL applies the length-desensitized weighting to the policy "
            "log-probs inside its own loss, which FPO replaces. Leave ld_alpha=None."
        )
    if args.use_weighting:
        raise ValueError(
            "use_weighting (WPO) is not supported by FPOTrainer: FPO already re-weights pairs with its focal term "
            "(1-p)^focal_gamma. Set use_weighting=False."
        )
    if getattr(args.f_divergence_type, "value", args.f_divergence_type) != "reverse_kl":
        raise ValueError(
            f"f_divergence_type={args.f_divergence_type!r} is not supported by FPOTrainer: the focal loss is defined "
            "on the reverse-KL (DPO) reward difference. Use f_divergence_type='reverse_kl'."
        )
    if args.label_smoothing:
        raise ValueError(
            f"label_smoothing={args.label_smoothing} has no effect on FPO (it only applies to TRL's robust, exo_pair "
            "and aot losses); set label_smoothing=0.0 rather than have it silently ignored."
        )
    if getattr(args, "use_liger_kernel", False) and _trl_has_liger_loss_path():
        raise ValueError(
            "use_liger_kernel=True is not supported by FPOTrainer with this trl version: trl's DPOTrainer then "
            "computes its own fused DPO loss and never calls the FPO loss. Set use_liger_kernel=False "
            "(trl versions without that path, e.g. 1.16, apply only Liger's layer kernels and work with FPO)."
        )


@dataclass
class FPOConfig(DPOConfig):
    r"""
    Configuration class for the [`FPOTrainer`]: focalized preference optimization, LifeAlign (arXiv 2509.17183).

    Every [`~trl.DPOConfig`] parameter is accepted; only the ones below are new or have a different default. For a
    preference pair with $z = \beta\,[\log\frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} -
    \log\frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}]$ and $p=\sigma(z)$ the FPO loss is $-(1-p)^\gamma\log p$.

    Parameters:
        focal_gamma (`float`, *optional*, defaults to `2.0`):
            Focusing exponent γ of the focal weight $(1-p)^\gamma$. Must be finite and ≥ 0; `0.0` gives exactly DPO's
            sigmoid loss. Larger values shift the gradient to pairs the policy still ranks wrongly or uncertainly.
        loss_type (`list[str]`, *optional*, defaults to `["fpo"]`):
            Must contain `"fpo"`. It may be combined with `"sigmoid"` (DPO) and `"sft"` (negative log-likelihood of
            the chosen completion, as in RPO), weighted by `loss_weights` exactly like TRL combines its losses:
            `loss = Σ_i loss_weights[i] · mean(loss_i)`.

    Options FPO cannot honour are refused at construction with a `ValueError` naming the field: other loss types
    mixed with `"fpo"`, `ld_alpha`, `use_weighting`, a non-default `f_divergence_type`, a non-zero
    `label_smoothing`, and `use_liger_kernel=True` on trl versions whose Liger path bypasses the trainer's loss.
    """

    focal_gamma: float = field(
        default=DEFAULT_FOCAL_GAMMA,
        metadata={
            "help": "Focusing exponent γ of the FPO weight (1-p)^γ, p = σ(β·reward margin). Finite and >= 0; 0 is "
            "exactly DPO's sigmoid loss."
        },
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["fpo"],
        metadata={
            "help": "Loss type(s). Must include 'fpo'; it may be combined with 'sigmoid' and 'sft' through "
            "`loss_weights` (weighted sum of the per-type mean losses)."
        },
    )

    def __post_init__(self):
        # Validate first: FPO's own errors are the most specific, and they need no device set-up.
        validate_fpo_args(self)
        # transformers >= 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` and warns when only the
        # old name is set, which DPOConfig's own default (True) always does: carry the value over to the new name.
        if _HAS_ACTIVATION_CHECKPOINTING and self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
            if self.gradient_checkpointing_kwargs is not None and self.activation_checkpointing_kwargs is None:
                self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        super().__post_init__()


_HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(DPOConfig)}
