"""Model averaging at a task boundary (Lin et al., "Mitigating the Alignment Tax of RLHF", arXiv 2309.06256).

Interpolating the weights before and after training on a new task, ``start + alpha * (trained - start)``, trades the
new task against the earlier ones far better than early stopping or regularisation, and per-layer ratios (the paper's
heterogeneous model averaging) do better still. For a LoRA adapter two interpolations exist:

- factor by factor (:func:`interpolate` on A and on B): cheap, but ``B(alpha) A(alpha)`` is quadratic in alpha and is
  *not* the interpolation of the weight updates;
- in weight-update space (:func:`interpolate_lowrank_product`): ``(1 - alpha) B0 A0 + alpha B1 A1`` exactly, whose rank
  is up to ``2r``, re-factorised to rank ``r`` with the best (Eckart-Young) approximation, without ever forming the
  ``d_out x d_in`` matrix.

All math runs in float32 (float64 if an input is float64); cast the results back to the parameter dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from trl_lifealign.defences.freezing.math import layer_index

__all__ = ["interpolate", "interpolate_lowrank_product", "layer_alphas"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_alpha(alpha: float, what: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def interpolate(start: torch.Tensor, trained: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``start + alpha * (trained - start)``, exact at both ends (``alpha = 0`` gives ``start``, ``1`` ``trained``).

    Args:
        start: the weights before the task.
        trained: the weights after it (same shape).
        alpha: in [0, 1]; a float, or a tensor broadcastable to ``start``'s shape (e.g. one ratio per output row).
    """
    if start.shape != trained.shape:
        raise ValueError(f"trained has shape {tuple(trained.shape)}, start has {tuple(start.shape)}")
    dtype = _compute_dtype(start, trained)
    if isinstance(alpha, torch.Tensor):
        if torch.broadcast_shapes(alpha.shape, start.shape) != start.shape:
            raise ValueError(f"alpha of shape {tuple(alpha.shape)} does not broadcast to {tuple(start.shape)}")
        alpha = alpha.detach().to(dtype)
        if alpha.numel() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
            raise ValueError("alpha must lie in [0, 1] everywhere")
    else:
        alpha = _check_alpha(alpha)
    # lerp switches to `end - (1 - w) * (end - start)` for w >= 0.5, which makes alpha = 1 exact.
    return torch.lerp(start.detach().to(dtype), trained.detach().to(dtype), alpha)


_RANGE_SPEC = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?$")


def _parse_layer_spec(spec: int | str | range) -> tuple[int, float]:
    """``(first, last)`` inclusive (``last`` may be ``inf``) of an int, ``"i"``, ``"i-j"``, ``"i-"`` or a range."""
    if isinstance(spec, range):
        if spec.step != 1 or len(spec) == 0 or spec.start < 0:
            raise ValueError(f"per_layer key {spec!r}: a range must be non-empty, from >= 0, with step 1")
        return spec.start, spec.stop - 1
    if isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
        return spec, spec
    match = _RANGE_SPEC.match(spec) if isinstance(spec, str) else None
    if match:
        low = int(match.group(1))
        high = low if not match.group(2) else (int(match.group(3)) if match.group(3) else float("inf"))
        if high >= low:
            return low, high
    raise ValueError(f"per_layer key {spec!r} is not a layer index >= 0, 'i', 'i-j' (inclusive), 'i-' or a range")


def layer_alphas(
    names: Iterable[str], alpha: float, per_layer: Mapping[int | str | range, float] | None = None
) -> dict[str, float]:
    """The interpolation ratio of every parameter: ``per_layer``'s for its block, else the global ``alpha``.

    The block index is parsed with :func:`trl_lifealign.defences.freezing.math.layer_index` (``...layers.{i}...`` and
    the like); names without one (embeddings, head) get ``alpha``. ``per_layer`` maps a block index or a range spec
    (``"0-7"`` inclusive, ``"24-"`` open-ended, ``range(0, 8)``) to a ratio in [0, 1]. A single index overrides the
    ranges containing it; two ranges overlapping with different ratios are refused.
    """
    alpha = _check_alpha(alpha)
    exact: dict[int, float] = {}
    ranges: list[tuple[int, float, float, object]] = []
    for spec, value in (per_layer or {}).items():
        value = _check_alpha(value, f"per_layer[{spec!r}]")
        low, high = _parse_layer_spec(spec)
        if low == high and not isinstance(spec, range):
            if exact.get(low, value) != value:
                raise ValueError(f"per_layer gives layer {low} two different ratios")
            exact[low] = value
            continue
        for other_low, other_high, other_value, other_spec in ranges:
            if low <= other_high and other_low <= high and other_value != value:
                raise ValueError(f"per_layer keys {other_spec!r} and {spec!r} overlap with different ratios")
        ranges.append((low, high, value, spec))
    result = {}
    for name in names:
        index = layer_index(name)
        value = alpha
        if index is not None:
            if index in exact:
                value = exact[index]
            else:
                value = next((v for low, high, v, _ in ranges if low <= index <= high), alpha)
        result[name] = value
    return result


def _check_pair(a: torch.Tensor, b: torch.Tensor, which: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"a{which} must be (r, d_in) and b{which} (d_out, r), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def interpolate_lowrank_product(
    a0: torch.Tensor,
    b0: torch.Tensor,
    a1: torch.Tensor,
    b1: torch.Tensor,
    alpha: float,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors ``(a, b)`` of rank ``rank`` best approximating ``(1 - alpha) * b0 @ a0 + alpha * b1 @ a1``.

    The interpolation is ``[b0, b1] @ diag((1 - alpha) I, alpha I) @ [a0; a1]``. With reduced QRs ``[b0, b1] = Qb Rb``
    and ``[a0; a1]^T = Qa Ra`` it equals ``Qb (Rb D Ra^T) Qa^T``; the SVD of the small core ``Rb D Ra^T = U S V^T``
    gives the exact SVD of the interpolation, truncated to the top ``rank`` and split evenly:
    ``b = Qb U sqrt(S)``, ``a = sqrt(S) V^T Qa^T``. Cost ``O((d_out + d_in) r^2)``, no ``d_out x d_in`` matrix.
    The LoRA scaling is a common factor of both products and can be ignored (pre-scale B if they differ). When the
    interpolation has rank below ``rank`` the factors are padded with zero rows/columns.

    Args:
        a0, b0: the adapter before the task (``r0 x d_in``, ``d_out x r0``), zeros for a fresh adapter.
        a1, b1: the trained adapter (``r1 x d_in``, ``d_out x r1``).
        alpha: in [0, 1].
        rank: rank of the result, default ``r1 = a1.shape[0]``.

    Returns:
        ``(a, b, rel_error)``: ``a`` is ``rank x d_in``, ``b`` is ``d_out x rank``, and ``rel_error`` the Frobenius
        norm of the dropped part over that of the exact interpolation (0 when exact or zero).
    """
    alpha = _check_alpha(alpha)
    _check_pair(a0, b0, "0")
    _check_pair(a1, b1, "1")
    if a0.shape[1] != a1.shape[1] or b0.shape[0] != b1.shape[0]:
        raise ValueError(f"start ({tuple(b0.shape)} @ {tuple(a0.shape)}) and trained "
                         f"({tuple(b1.shape)} @ {tuple(a1.shape)}) products differ in shape")
    rank = a1.shape[0] if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    dtype = _compute_dtype(a0, b0, a1, b1)
    a_stack = torch.cat([a0.detach().to(dtype), a1.detach().to(dtype)], dim=0)
    b_stack = torch.cat([b0.detach().to(dtype), b1.detach().to(dtype)], dim=1)
    weights = torch.cat([a0.new_full((a0.shape[0],), 1.0 - alpha, dtype=dtype),
                         a1.new_full((a1.shape[0],), alpha, dtype=dtype)])
    q_b, r_b = torch.linalg.qr(b_stack)  # (d_out, m_b), (m_b, r0 + r1)
    q_a, r_a = torch.linalg.qr(a_stack.T)  # (d_in, m_a), (m_a, r0 + r1)
    core = (r_b * weights) @ r_a.T
    u, sigma, v_t = torch.linalg.svd(core, full_matrices=False)
    kept = min(rank, sigma.shape[0])
    root = sigma[:kept].sqrt()
    b = torch.zeros((b_stack.shape[0], rank), dtype=dtype)
    a = torch.zeros((rank, a_stack.shape[1]), dtype=dtype)
    b[:, :kept] = q_b @ (u[:, :kept] * root)
    a[:kept] = (root.unsqueeze(1) * v_t[:kept]) @ q_a.T
    energy = float((sigma.to(torch.float64) ** 2).sum())
    dropped = float((sigma[kept:].to(torch.float64) ** 2).sum())
    rel_error = (dropped / energy) ** 0.5 if energy > 0.0 else 0.0
    return a, b, rel_error
