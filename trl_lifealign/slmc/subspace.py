"""SLMC with a subspace memory (GPM-style): per LoRA factor, an orthonormal basis of the directions earlier tasks used.

:mod:`trl_lifealign.slmc.math` remembers the span of the *flattened* consolidated updates: one direction per task, so
a new update only conflicts with an earlier one when it is (partly) the same matrix. Gradient Projection Memory
(Saha et al., 2021) and its LoRA variants remember instead the subspace of the input (or output) space each task's
weights act on, which protects much more: any update that touches those directions conflicts.

Each factor keeps its own basis, the orthonormal columns of an ``(n, k)`` matrix ``Q``: for ``lora_A`` (``r x d_in``)
and ``lora_embedding_A`` (``r x num_embeddings``) of the ROW space (``n = d_in``, in-span part ``U @ Q @ Q.T``), for
``lora_B`` (``d_out x r``) and ``lora_embedding_B`` (``d x r``) of the COLUMN space (``n = d_out``, ``Q @ Q.T @ U``).

At a task boundary (:func:`consolidate_update_subspace`) the update is denoised by energy as in LifeAlign, its in-span
part is scaled by ``overlap_weight`` (lambda), and the row/column space of the result is added to the basis. During
training, :func:`project_step_` removes the in-span part of every optimizer step instead (lambda = 0, GPM).

All math runs in float32 (float64 if an input is float64) whatever the parameter dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_lifealign.slmc.math import DEFAULT_BASIS_REL_TOL, denoise_by_energy

__all__ = [
    "SubspaceConsolidation",
    "consolidate_update_subspace",
    "extend_subspace",
    "factor_side",
    "leading_directions",
    "project_against_subspace",
    "project_step_",
]

_ROW_FACTORS = ("lora_A", "lora_embedding_A")
_COLUMN_FACTORS = ("lora_B", "lora_embedding_B")


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def factor_side(name_or_kind: str) -> str:
    """``"row"`` for a ``lora_A`` / ``lora_embedding_A`` factor, ``"column"`` for ``lora_B`` / ``lora_embedding_B``.

    Accepts a full parameter name (``...q_proj.lora_A.default.weight``, ``...embed_tokens.lora_embedding_B.default``),
    a bare kind (``"lora_A"``), or a side (``"row"`` / ``"column"``, returned as is).
    """
    if name_or_kind in ("row", "column"):
        return name_or_kind
    parts = set(str(name_or_kind).split("."))
    is_row, is_column = bool(parts.intersection(_ROW_FACTORS)), bool(parts.intersection(_COLUMN_FACTORS))
    if is_row == is_column:
        raise ValueError(
            f"name_or_kind {name_or_kind!r} is not a LoRA factor: expected exactly one of "
            f"{_ROW_FACTORS + _COLUMN_FACTORS} as a dotted component, or 'row' / 'column'"
        )
    return "row" if is_row else "column"


def _check_side(side: str, overlap_weight: float = 0.0) -> None:
    if side not in ("row", "column"):
        raise ValueError(f"side must be 'row' or 'column' (see factor_side), got {side!r}")
    if not 0.0 <= overlap_weight <= 1.0:
        raise ValueError(f"overlap_weight must be in [0, 1], got {overlap_weight}")


def _as_matrix(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be a 2-D LoRA factor, got shape {tuple(tensor.shape)}")
    return tensor.detach().to(dtype)


def _side_dim(matrix: torch.Tensor, side: str) -> int:
    return matrix.shape[1] if side == "row" else matrix.shape[0]


def _checked_basis(basis: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The basis as an ``(n, k)`` matrix of ``dtype`` (``(n, 0)`` for None)."""
    if basis is None:
        return torch.zeros((n, 0), dtype=dtype)
    if basis.ndim != 2 or basis.shape[0] != n:
        raise ValueError(f"basis must be (n, k) with n = {n} (columns are basis vectors), got {tuple(basis.shape)}")
    return basis.detach().to(dtype)


def _in_span(matrix: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """``matrix @ Q @ Q.T`` (row) or ``Q @ Q.T @ matrix`` (column), multiplied in the cheap order."""
    if side == "row":
        return (matrix @ basis) @ basis.T
    return basis @ (basis.T @ matrix)


def leading_directions(update: torch.Tensor, side: str, energy_threshold: float) -> torch.Tensor:
    """Orthonormal ``(n, k)`` columns: the fewest leading singular vectors of ``update`` whose share of
    ``sum(sigma**2)`` reaches ``energy_threshold``.

    Right singular vectors (``n = update.shape[1]``) for ``side="row"``, left ones (``n = update.shape[0]``) for
    ``"column"``. ``energy_threshold >= 1`` keeps every numerically nonzero direction (singular values above
    ``sigma_max * max(shape) * eps``, numpy's ``matrix_rank`` tolerance); no threshold ever keeps more than that.
    A zero update gives an ``(n, 0)`` matrix.
    """
    _check_side(side)
    if not energy_threshold >= 0.0:
        raise ValueError(f"energy_threshold must be >= 0, got {energy_threshold}")
    matrix = _as_matrix(update, "update", _compute_dtype(update))
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("update contains NaN or Inf")
    n = _side_dim(matrix, side)
    if matrix.numel() == 0:
        return matrix.new_zeros((n, 0))
    left, sigma, right_t = torch.linalg.svd(matrix, full_matrices=False)
    vectors = right_t.T if side == "row" else left
    tolerance = float(sigma[0]) * max(matrix.shape) * torch.finfo(matrix.dtype).eps
    rank = int((sigma > tolerance).sum())
    if rank == 0:
        return matrix.new_zeros((n, 0))
    kept = rank
    if energy_threshold < 1.0:
        energy = sigma.to(torch.float64) ** 2
        share = torch.cumsum(energy, 0) / energy.sum()
        kept = min(int((share < energy_threshold).sum()) + 1, rank)
    return vectors[:, :kept].contiguous()


def project_against_subspace(
    update: torch.Tensor, basis: torch.Tensor | None, side: str, overlap_weight: float
) -> tuple[torch.Tensor, float]:
    """``(update - (1 - overlap_weight) * in_span, ||in_span|| / ||update||)``.

    ``in_span`` is the part of ``update`` acting on the stored subspace: ``update @ Q @ Q.T`` for ``side="row"``,
    ``Q @ Q.T @ update`` for ``"column"``. ``overlap_weight = 1`` keeps the update, ``0`` keeps only the part
    orthogonal to every earlier task's subspace. The share is 0 for a zero update. An empty (or None) basis returns a
    copy of the update.

    Args:
        update: a 2-D factor update.
        basis: ``(n, k)`` orthonormal columns (``n`` the side's dimension), or None.
        side: ``"row"`` or ``"column"`` (see :func:`factor_side`).
        overlap_weight: lambda in [0, 1].
    """
    _check_side(side, overlap_weight)
    dtype = _compute_dtype(update, basis)
    matrix = _as_matrix(update, "update", dtype)
    basis = _checked_basis(basis, _side_dim(matrix, side), dtype)
    if basis.shape[1] == 0:
        return matrix.clone(), 0.0
    in_span = _in_span(matrix, basis, side)
    norm = float(matrix.norm())
    share = float(in_span.norm()) / norm if norm > 0.0 else 0.0
    return torch.add(matrix, in_span, alpha=-(1.0 - overlap_weight)), share


def extend_subspace(
    basis: torch.Tensor | None, directions: torch.Tensor, rel_tol: float = 1e-6, max_rank: int | None = None
) -> torch.Tensor:
    """Append to ``basis`` the normalised parts of ``directions`` (columns, in order) orthogonal to it.

    Each direction is orthogonalised against the basis and the directions already added, twice (classical
    Gram-Schmidt, "twice is enough"), and dropped when what is left is at most ``rel_tol`` of its norm (zero or
    dependent directions). The basis never exceeds ``n`` columns, nor ``max_rank`` (an existing basis that already
    does is returned as is, not truncated). Float32 rounding leaves residuals of up to ~1e-6 (more for large ``n``)
    in dependent directions: in float32 pass a larger ``rel_tol``, e.g. ``DEFAULT_BASIS_REL_TOL`` (1e-4).

    Args:
        basis: ``(n, k)`` orthonormal columns, or None for an empty basis.
        directions: ``(n, m)`` candidate directions as columns (a 1-D tensor is one direction).
        rel_tol: relative residual norm at or below which a direction is dropped, >= 0.
        max_rank: most columns the result may have (None: ``n``).

    Returns:
        A new ``(n, k')`` tensor with orthonormal columns (to working precision), ``k <= k' <= k + m``.
    """
    if not rel_tol >= 0.0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 0):
        raise ValueError(f"max_rank must be None or an int >= 0, got {max_rank!r}")
    dtype = _compute_dtype(basis, directions)
    if directions.ndim == 1:
        directions = directions.unsqueeze(1)
    candidates = _as_matrix(directions, "directions", dtype)
    if not bool(torch.isfinite(candidates).all()):
        raise ValueError("directions contain NaN or Inf")
    n = candidates.shape[0]
    basis = _checked_basis(basis, n, dtype)
    limit = n if max_rank is None else min(n, max_rank)
    columns = basis.shape[1]
    out = basis.new_empty((n, max(columns, min(limit, columns + candidates.shape[1]))))
    out[:, :columns] = basis
    for j in range(candidates.shape[1]):
        if columns >= limit:
            break
        vector = candidates[:, j]
        reference = float(vector.norm())
        for _ in range(2):
            current = out[:, :columns]
            vector = vector - current @ (current.T @ vector)
        residual = float(vector.norm())
        if reference == 0.0 or residual <= rel_tol * reference:
            continue
        out[:, columns] = vector / residual
        columns += 1
    return out[:, :columns].clone()


def project_step_(delta: torch.Tensor, basis: torch.Tensor | None, side: str) -> torch.Tensor:
    """Remove, in place, the part of one optimizer step's parameter change lying in the stored subspace.

    The during-training variant (GPM / OGPSA): call it after ``optimizer.step()`` with ``delta = after - before`` of a
    factor, then write ``before + delta`` back. Projecting the parameter *change* rather than the gradient is exact
    for Adam(W): Adam rescales each coordinate by its own second-moment estimate, which rotates a projected gradient
    back into the protected subspace, whereas the projected change is orthogonal to it by construction, whatever the
    optimizer. :func:`project_against_subspace` with ``overlap_weight = 0``, computed in float32 (float64) and
    written back in ``delta``'s dtype; an empty (or None) basis leaves ``delta`` untouched. Returns ``delta``.
    """
    _check_side(side)
    dtype = _compute_dtype(delta, basis)
    if delta.ndim != 2:
        raise ValueError(f"delta must be a 2-D LoRA factor change, got shape {tuple(delta.shape)}")
    basis = _checked_basis(basis, _side_dim(delta, side), dtype)
    if basis.shape[1] == 0:
        return delta
    with torch.no_grad():
        work = delta.to(dtype)
        in_span = _in_span(work, basis, side)
        if work is delta:
            delta.sub_(in_span)
        else:
            delta.copy_(work.sub_(in_span))
    return delta


@dataclass
class SubspaceConsolidation:
    """Output of :func:`consolidate_update_subspace` for one factor: the consolidated ``update`` (float32/float64, to
    add to the snapshot), the ``basis`` after this task (a new ``(n, k')`` tensor), the ``kept_rank`` of the energy
    denoising, the ``added_rank = k' - k`` and the ``in_span_share`` ``||in_span|| / ||denoised update||`` (0 with no
    history or a zero update)."""

    update: torch.Tensor
    basis: torch.Tensor
    kept_rank: int
    added_rank: int
    in_span_share: float
    energy: float = 0.0
    kept_energy: float = 1.0


def consolidate_update_subspace(
    update: torch.Tensor,
    basis: torch.Tensor | None,
    side: str,
    energy_threshold: float = 0.9,
    overlap_weight: float = 0.5,
    rel_tol: float = DEFAULT_BASIS_REL_TOL,
) -> SubspaceConsolidation:
    """Denoise a task's update of one factor, scale its part in the earlier tasks' subspace by lambda, and add the
    row (column) space of the result to the basis.

    ``beta = orthogonal + overlap_weight * in_span`` of the energy-denoised update (:func:`denoise_by_energy`), split
    as in :func:`project_against_subspace`. The basis then gains every direction of ``beta``'s row / column space (at
    most ``kept_rank`` of them: ``beta`` has no more) not already in it, so it spans exactly the subspaces of all
    consolidated updates. When the part of the denoised update outside the span is at most ``rel_tol`` of its norm
    (an update inside the earlier subspace), nothing is added: what is left is rounding noise.

    Args:
        update: the raw task update ``current - snapshot`` (2-D).
        basis: ``(n, k)`` orthonormal columns for this factor, or None.
        side: ``"row"`` (lora_A) or ``"column"`` (lora_B), see :func:`factor_side`.
        energy_threshold: theta in [0, 1] of the denoising.
        overlap_weight: lambda in [0, 1].
        rel_tol: see above and :func:`extend_subspace`.
    """
    _check_side(side, overlap_weight)
    dtype = _compute_dtype(update, basis)
    matrix = _as_matrix(update, "update", dtype)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("update contains NaN or Inf; refusing to consolidate it")
    denoised = denoise_by_energy(matrix, energy_threshold)
    work = denoised.update
    basis = _checked_basis(basis, _side_dim(work, side), dtype)
    norm = float(work.norm())
    if basis.shape[1] == 0:
        beta, orthogonal_norm, share = work, norm, 0.0
    else:
        in_span = _in_span(work, basis, side)
        orthogonal = work - in_span
        orthogonal_norm = float(orthogonal.norm())
        share = float(in_span.norm()) / norm if norm > 0.0 else 0.0
        beta = torch.lerp(orthogonal, work, overlap_weight)
    new_basis = basis.clone()
    if norm > 0.0 and orthogonal_norm > rel_tol * norm:
        directions = leading_directions(beta, side, 1.0)[:, : denoised.kept_rank]
        new_basis = extend_subspace(basis, directions, rel_tol)
    return SubspaceConsolidation(
        update=beta,
        basis=new_basis,
        kept_rank=denoised.kept_rank,
        added_rank=new_basis.shape[1] - basis.shape[1],
        in_span_share=share,
        energy=denoised.energy,
        kept_energy=denoised.kept_energy,
    )
