"""A KL anchor to the model before the task, Learning-without-Forgetting style (Li & Hoiem, 2016).

While training task ``t``, the frozen model from the end of task ``t - 1`` (the reference) is run on the same batch
and the policy is pulled towards its token distributions with ``KL(pi_ref || pi_theta)`` over the full vocabulary:
a distillation term that keeps the earlier behaviour without storing any earlier data. The forward direction (the
reference's expectation) is the one distillation uses: it penalises the policy for dropping tokens the reference
found likely, and it is the cross-entropy to the reference's soft labels up to a constant.

The log-softmaxes run in float32 (float64 for float64 inputs) whatever the logits' dtype: a bf16 log-softmax over a
large vocabulary loses most of the small KL. ``chunk_size`` bounds the extra memory: each chunk of positions is
recomputed in the backward pass (activation checkpointing) instead of keeping its full-vocabulary float32 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["token_kl"]


def _per_token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))`` for every position: ``(B, t, V) -> (B, t)``."""
    log_policy = F.log_softmax(policy_logits.to(dtype), dim=-1)
    log_reference = F.log_softmax(reference_logits.to(dtype), dim=-1)
    reference = log_reference.exp()
    terms = reference * (log_reference - log_policy)
    # A token the reference rules out (logit -inf) contributes 0, not 0 * inf = NaN.
    return torch.where(reference > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


def token_kl(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL ``KL(pi_ref || pi_theta)`` per token, averaged over the masked tokens.

    Args:
        policy_logits: ``(B, T, V)``, the model being trained; the only input the gradient flows to.
        reference_logits: ``(B, T, V)``, the frozen earlier model (detached here).
        mask: ``(B, T)`` bool or int, nonzero for the tokens to anchor (e.g. completion tokens).
        chunk_size: positions per chunk along ``T`` (None: all at once); the result is the same.

    Returns:
        ``(mean_kl, per_sequence_kl)``: the mean over all masked tokens of the batch (a 0-d tensor), and each
        sequence's mean over its own masked tokens (``(B,)``). Sequences without masked tokens give 0, as does a
        batch without any (never NaN). Both are float32 (float64 for float64 inputs).
    """
    if policy_logits.ndim != 3 or reference_logits.shape != policy_logits.shape:
        raise ValueError(f"policy_logits and reference_logits must both be (B, T, V), got "
                         f"{tuple(policy_logits.shape)} and {tuple(reference_logits.shape)}")
    if mask.shape != policy_logits.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(policy_logits.shape[:2])}, got {tuple(mask.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    float64 = torch.float64 in (policy_logits.dtype, reference_logits.dtype)
    dtype = torch.float64 if float64 else torch.float32
    reference_logits = reference_logits.detach()
    length = policy_logits.shape[1]
    if chunk_size is None or chunk_size >= length:
        per_token = _per_token_kl(policy_logits, reference_logits, dtype)
    else:
        recompute = torch.is_grad_enabled() and policy_logits.requires_grad
        chunks = []
        for start in range(0, length, chunk_size):
            policy_chunk = policy_logits[:, start : start + chunk_size]
            reference_chunk = reference_logits[:, start : start + chunk_size]
            if recompute:
                chunks.append(checkpoint(_per_token_kl, policy_chunk, reference_chunk, dtype, use_reentrant=False))
            else:
                chunks.append(_per_token_kl(policy_chunk, reference_chunk, dtype))
        per_token = torch.cat(chunks, dim=1)
    weights = (mask != 0).to(dtype)
    # torch.where, not a product: a masked-out position may hold inf (e.g. padding logits) and 0 * inf is NaN.
    masked = torch.where(weights > 0, per_token, torch.zeros_like(per_token))
    per_sequence = masked.sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    mean = masked.sum() / weights.sum().clamp_min(1.0)
    return mean, per_sequence
