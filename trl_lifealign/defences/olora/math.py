"""O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", arXiv 2310.14152).

Each task trains a fresh LoRA adapter while the earlier tasks' adapters stay frozen, and a penalty keeps the new
adapter's input subspace (the row space of its ``A``) orthogonal to theirs, so the new update reads directions of the
input the earlier tasks do not use: ``sum_i ||A_new A_i^T||_F**2`` in PEFT's layout (``A`` is ``r x d_in``; the paper
writes ``A`` transposed). Only ``A`` is constrained: it alone decides which input directions an adapter reads.

All math runs in float32 (float64 if an input is float64); the earlier factors are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["orthogonality_penalty", "orthogonality_penalty_grad"]


def _stack_earlier(a_new: torch.Tensor, earlier_as: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.dtype]:
    """``(cat(earlier_as) as one (sum r_i, d_in) matrix, compute dtype)``, validating every shape."""
    if a_new.ndim != 2:
        raise ValueError(f"a_new must be (r, d_in), got shape {tuple(a_new.shape)}")
    for index, earlier in enumerate(earlier_as):
        if earlier.ndim != 2 or earlier.shape[1] != a_new.shape[1]:
            raise ValueError(f"earlier_as[{index}] must be (r_i, {a_new.shape[1]}), got {tuple(earlier.shape)}")
    float64 = a_new.dtype == torch.float64 or any(earlier.dtype == torch.float64 for earlier in earlier_as)
    dtype = torch.float64 if float64 else torch.float32
    if not earlier_as:
        return a_new.new_zeros((0, a_new.shape[1]), dtype=dtype), dtype
    return torch.cat([earlier.detach().to(dtype) for earlier in earlier_as], dim=0), dtype


def orthogonality_penalty(a_new: torch.Tensor, earlier_as: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||a_new @ A_i.T||_F**2``: 0 exactly when the row spaces of ``a_new`` and every ``A_i`` are orthogonal.

    Args:
        a_new: the trainable ``lora_A`` of the current task, ``(r, d_in)``.
        earlier_as: the frozen ``lora_A`` of earlier tasks, each ``(r_i, d_in)`` (ranks may differ).

    Returns:
        A 0-d tensor with autograd through ``a_new``. With no earlier factor it is 0 and still part of ``a_new``'s
        graph (its gradient is zero), so a loss that adds it can always call ``backward``.
    """
    stacked, dtype = _stack_earlier(a_new, earlier_as)
    # sum_i ||A A_i^T||^2 = ||A [A_1; ...; A_k]^T||^2: one matmul of r x sum(r_i), never d_in x d_in.
    return (a_new.to(dtype) @ stacked.T).square().sum()


def orthogonality_penalty_grad(a_new: torch.Tensor, earlier_as: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of :func:`orthogonality_penalty` with respect to ``a_new``: ``2 * sum_i (a_new @ A_i.T) @ A_i``
    (no autograd graph), ``(r, d_in)`` in float32 (float64)."""
    stacked, dtype = _stack_earlier(a_new, earlier_as)
    return 2.0 * ((a_new.detach().to(dtype) @ stacked.T) @ stacked)
