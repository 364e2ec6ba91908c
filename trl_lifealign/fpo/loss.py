"""The focal preference optimization (FPO) loss: pure tensor math, no trainer in sight.

Reused by `FPOTrainer`, the Axolotl trainer and the benchmarks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-pair focal preference optimization loss (LifeAlign, arXiv 2509.17183).

    With $z = \beta\,[(\log\pi_\theta(y_w) - \log\pi_{ref}(y_w)) - (\log\pi_\theta(y_l) - \log\pi_{ref}(y_l))]$ and
    $p = \sigma(z)$, the loss is $-(1-p)^\gamma \log p$. Pairs the policy already ranks confidently ($p \to 1$) are
    down-weighted, hard pairs keep (nearly) the full DPO gradient.

    Computed in log space for stability: $\log p = \log\sigma(z)$ and $(1-p)^\gamma = \exp(\gamma \log\sigma(-z))$,
    so large $|z|$ never produces `0 * inf`. The focal weight stays in the autograd graph (the true focal gradient,
    as in the paper's code); detach it yourself if you want a weighted-DPO gradient instead. With `gamma == 0` the
    loss is exactly `-F.logsigmoid(z)`, the expression of TRL's `"sigmoid"` (DPO) loss, and the weight is all ones.

    Args:
        chosen_logratios: `log πθ(y_w|x) - log πref(y_w|x)` per pair, shape `(B,)`.
        rejected_logratios: `log πθ(y_l|x) - log πref(y_l|x)` per pair, shape `(B,)`.
        beta: DPO temperature β (> 0).
        gamma: focusing exponent γ (finite, ≥ 0); 0 recovers DPO.

    Returns:
        `(per_pair_loss, focal_weight)`, both of shape `(B,)`; the weight is `(1-p)^γ` and is not detached.
    """
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    z = beta * (chosen_logratios - rejected_logratios)
    log_p = F.logsigmoid(z)
    if gamma == 0:
        # Same expression as TRL's sigmoid loss so γ=0 reproduces DPO bit for bit.
        return -log_p, torch.ones_like(z)
    focal_weight = torch.exp(gamma * F.logsigmoid(-z))
    return -focal_weight * log_p, focal_weight
