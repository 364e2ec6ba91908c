"""Pure tensor math of short-to-long memory consolidation (SLMC), one LoRA factor at a time.

No model, trainer or file in sight: these functions are shared by the callback, the Axolotl plugin and the benchmark.

Per factor (a ``lora_A`` or ``lora_B`` weight) and task boundary, with ``u = current - snapshot``:

1. ``denoise_by_energy``: keep the fewest leading singular directions of ``u`` whose share of the energy
   ``sum(sigma**2)`` reaches ``energy_threshold``.
2. ``split_by_span``: split the flattened denoised update into its part inside the span of the earlier consolidated
   updates (an orthonormal basis, one row per direction) and the orthogonal rest.
3. keep ``rest + overlap_weight * in_span`` (LifeAlign's lambda).
4. ``extend_basis``: add the new consolidated update's direction to the basis.

The paper (and the official code) rebuilds the basis from an SVD of the whole stacked history at every boundary. The
span of the history is all the projection needs, so we keep an orthonormal basis of it incrementally (classical
Gram-Schmidt with one re-orthogonalisation pass, "twice is enough"); the projection is identical, the cost is linear
in the basis size and the history itself never has to be stored. Directions whose residual is below ``rel_tol`` of
the update's norm are not added: that is the "near-zero singular values dropped" of a tolerant SVD, and it avoids the
spurious directions the official code adds for zero or dependent updates.

All math runs in float32 (or float64 if the inputs are float64) whatever the parameter dtype: SVD-type kernels do not
exist for bf16/fp16, and the official code silently skipped consolidation there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import DEFAULT_BASIS_REL_TOL

__all__ = [
    "ConsolidationResult",
    "DenoiseResult",
    "consolidate_update",
    "denoise_by_energy",
    "extend_basis",
    "split_by_span",
]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@dataclass
class DenoiseResult:
    """Output of :func:`denoise_by_energy`.

    Attributes:
        update: the denoised update (same shape as the input, float32 or float64).
        kept_rank: number of singular directions kept (0 for an all-zero update).
        full_rank: ``min(rows, cols)`` of the update, the most that could be kept.
        energy: total energy ``sum(sigma**2)`` (= squared Frobenius norm) of the input.
        kept_energy: share of the energy kept, in [0, 1] (1.0 for an all-zero update).
    """

    update: torch.Tensor
    kept_rank: int
    full_rank: int
    energy: float
    kept_energy: float


def denoise_by_energy(update: torch.Tensor, energy_threshold: float) -> DenoiseResult:
    """Truncated SVD of ``update`` keeping the fewest leading singular values whose share of ``sum(sigma**2)`` is at
    least ``energy_threshold``.

    ``energy_threshold >= 1`` keeps everything (the update is returned unchanged, bit for bit), ``0`` keeps rank 1.
    An all-zero update stays zero. A LoRA factor has one dimension equal to the LoRA rank r, so the SVD is computed
    from the r x r Gram matrix (eigendecomposition in float64), which is exact for the kept leading directions and
    orders of magnitude faster than a general SVD of an r x n matrix.

    Args:
        update: a 2-D tensor (1-D tensors are treated as one row).
        energy_threshold: theta in [0, 1].
    """
    if not 0.0 <= energy_threshold <= 1.0:
        raise ValueError(f"energy_threshold must be in [0, 1], got {energy_threshold}")
    dtype = _compute_dtype(update)
    matrix = update.detach().to(dtype)
    if matrix.ndim == 1:
        matrix = matrix.unsqueeze(0)
    if matrix.ndim != 2:
        raise ValueError(f"denoise_by_energy expects a 2-D update, got shape {tuple(update.shape)}")
    rows, cols = matrix.shape
    full_rank = min(rows, cols)
    wide = rows <= cols
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float64))
    eigenvalues = eigenvalues.flip(0).clamp_min(0.0)  # descending sigma**2
    eigenvectors = eigenvectors.flip(1)
    energy = float(eigenvalues.sum())
    if energy == 0.0:
        return DenoiseResult(torch.zeros_like(matrix).reshape(update.shape), 0, full_rank, 0.0, 1.0)
    if energy_threshold >= 1.0:
        kept_rank = full_rank
    else:
        cumulative = torch.cumsum(eigenvalues, 0) / energy
        reached = torch.nonzero(cumulative >= energy_threshold)
        kept_rank = int(reached[0]) + 1 if len(reached) else full_rank
    kept_energy = float(eigenvalues[:kept_rank].sum()) / energy
    if kept_rank >= full_rank:
        return DenoiseResult(matrix.clone().reshape(update.shape), full_rank, full_rank, energy, 1.0)
    leading = eigenvectors[:, :kept_rank].to(dtype)
    # Projection onto the top singular subspace: U_k U_k^T u (wide) or u V_k V_k^T (tall) = the rank-k truncated SVD.
    denoised = leading @ (leading.T @ matrix) if wide else (matrix @ leading) @ leading.T
    return DenoiseResult(denoised.reshape(update.shape), kept_rank, full_rank, energy, kept_energy)


def split_by_span(vector: torch.Tensor, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``vector`` (flattened) into ``(in_span, orthogonal)`` with respect to the row space of ``basis``.

    Args:
        vector: any shape; it is flattened.
        basis: ``(k, n)`` with orthonormal rows (``n == vector.numel()``), or None / ``k == 0`` for an empty span.

    Returns:
        Two flat tensors summing to the flattened vector. The orthogonal part is re-orthogonalised against the basis
        when the first pass cancelled much of the vector (classical Gram-Schmidt twice, "twice is enough"), so it stays
        orthogonal to working precision.
    """
    flat = vector.detach().reshape(-1).to(_compute_dtype(vector))
    orthogonal = _orthogonal_part(flat, basis)[0]
    return flat - orthogonal, orthogonal


# Kahan-Parlett criterion: a second Gram-Schmidt pass is only needed when the first removed a large share of the norm.
_REORTHOGONALIZE_BELOW = 0.5 ** 0.5


def _orthogonal_part(
    flat: torch.Tensor, basis: torch.Tensor | None, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, float]:
    """``(orthogonal, ||flat||, ||orthogonal||)``, each norm computed once; the orthogonal part is written into
    ``out`` when given (a flat buffer of flat's dtype and size aliasing neither ``flat`` nor ``basis``)."""
    if out is not None and (out.dtype != flat.dtype or out.shape != flat.shape):
        out = None
    flat_norm = float(flat.norm())
    if basis is None or basis.shape[0] == 0:
        orthogonal = flat.clone() if out is None else out.copy_(flat)
        return orthogonal, flat_norm, flat_norm
    if basis.ndim != 2 or basis.shape[1] != flat.numel():
        raise ValueError(f"basis of shape {tuple(basis.shape)} does not match a vector of {flat.numel()} elements")
    basis = basis.to(flat.dtype)
    orthogonal = torch.addmv(flat, basis.T, basis @ flat, alpha=-1.0, out=out)
    orthogonal_norm = float(orthogonal.norm())
    if orthogonal_norm < _REORTHOGONALIZE_BELOW * flat_norm:
        orthogonal.addmv_(basis.T, basis @ orthogonal, alpha=-1.0)
        orthogonal_norm = float(orthogonal.norm())
    return orthogonal, flat_norm, orthogonal_norm


def extend_basis(
    basis: torch.Tensor | None, vector: torch.Tensor, rel_tol: float = DEFAULT_BASIS_REL_TOL
) -> torch.Tensor:
    """Return ``basis`` with the normalised component of ``vector`` orthogonal to it appended as a new row.

    Nothing is added when that component's norm is at most ``rel_tol * ||vector||`` (zero or dependent updates), so
    the basis spans exactly the history, like an SVD of the stacked history with near-zero singular values dropped.

    Args:
        basis: ``(k, n)`` orthonormal rows, or None for an empty basis.
        vector: the new consolidated update (any shape, flattened to ``n``).
        rel_tol: relative residual tolerance.
    """
    flat = vector.detach().reshape(-1).to(_compute_dtype(vector))
    if basis is None:
        basis = flat.new_zeros((0, flat.numel()))
    _, residual = split_by_span(flat, basis)
    direction = _normalised_new_direction(residual, float(flat.norm()), rel_tol)
    if direction is None:
        return basis
    return torch.cat([basis.to(flat.dtype), direction.unsqueeze(0)], dim=0)


def _normalised_new_direction(residual: torch.Tensor, reference_norm: float, rel_tol: float) -> torch.Tensor | None:
    residual_norm = float(residual.norm())
    if reference_norm == 0.0 or residual_norm <= rel_tol * reference_norm:
        return None
    return residual / residual_norm


@dataclass
class ConsolidationResult:
    """Output of :func:`consolidate_update` for one factor.

    Attributes:
        update: consolidated update beta, same shape as the input update (float32/float64). Add it to the snapshot.
        new_direction: unit row appended to the basis (None when beta adds no new direction).
        previous_basis: the basis the update was projected against (``(k, n)``, possibly empty).
        kept_rank / full_rank / energy / kept_energy: from the denoising step.
        conflict: ``||in-span part|| / ||denoised update||``, the share of the denoised update's norm lying in the span
            of earlier tasks' consolidated updates (0 with no history or a zero update).
        unchanged: True when beta equals the raw update exactly (theta keeps everything and lambda = 1, or no
            history): writing it back would only add rounding noise, so callers may skip the write.
    """

    update: torch.Tensor
    new_direction: torch.Tensor | None
    previous_basis: torch.Tensor
    kept_rank: int
    full_rank: int
    energy: float
    kept_energy: float
    conflict: float
    unchanged: bool

    @property
    def basis(self) -> torch.Tensor:
        """The basis after this update: ``previous_basis`` plus ``new_direction`` (a new tensor)."""
        if self.new_direction is None:
            return self.previous_basis
        return torch.cat([self.previous_basis, self.new_direction.unsqueeze(0).to(self.previous_basis.dtype)], dim=0)


def consolidate_update(
    update: torch.Tensor,
    basis: torch.Tensor | None,
    energy_threshold: float = 0.9,
    overlap_weight: float = 0.5,
    rel_tol: float = DEFAULT_BASIS_REL_TOL,
    direction_out: torch.Tensor | None = None,
    check_finite: bool = True,
) -> ConsolidationResult:
    """Denoise a task's update of one LoRA factor and reconcile it with the span of earlier consolidated updates.

    ``beta = orthogonal + overlap_weight * in_span`` where ``in_span``/``orthogonal`` split the energy-denoised update
    against ``basis``. ``overlap_weight = 1`` keeps the denoised update, ``0`` keeps only the part orthogonal to every
    earlier task. Steps 3-4 of LifeAlign's SLMC; the new basis direction is computed in the same pass.

    Args:
        update: the raw task update ``current - snapshot`` of one factor.
        basis: ``(k, numel)`` orthonormal rows spanning earlier consolidated updates of this factor, or None.
        energy_threshold: theta, see :func:`denoise_by_energy`.
        overlap_weight: lambda in [0, 1].
        rel_tol: see :func:`extend_basis`.
        direction_out: optional flat buffer (``numel`` elements of the compute dtype) receiving the new basis
            direction, e.g. ``LongTermMemory.next_direction_buffer(name)``: the direction is then written once,
            straight into the memory, with no extra full-size copy. Its content is scratch when no direction is added.
        check_finite: refuse NaN/Inf in ``update`` (a ``ValueError``); False skips that pass for a caller that
            has already checked (the callback checks every factor before touching any).
    """
    if not 0.0 <= overlap_weight <= 1.0:
        raise ValueError(f"overlap_weight must be in [0, 1], got {overlap_weight}")
    # One reduction instead of an elementwise isfinite pass: any NaN/Inf makes the sum non-finite.
    # (A non-finite sum from overflowing finite values is re-checked element by element.)
    if check_finite and not bool(torch.isfinite(update.sum())) and not bool(torch.isfinite(update).all()):
        raise ValueError("update contains NaN or Inf; refusing to consolidate it")
    denoised = denoise_by_energy(update, energy_threshold)
    flat = denoised.update.reshape(-1)
    if basis is None:
        basis = flat.new_zeros((0, flat.numel()))
    out = direction_out.reshape(-1) if direction_out is not None else None
    orthogonal, flat_norm, orthogonal_norm = _orthogonal_part(flat, basis, out=out)
    # in_span and orthogonal are orthogonal: ||in_span||^2 = ||flat||^2 - ||orthogonal||^2 (no extra pass).
    conflict = (max(flat_norm**2 - orthogonal_norm**2, 0.0) ** 0.5) / flat_norm if flat_norm > 0.0 else 0.0
    keeps_denoised = overlap_weight == 1.0 or basis.shape[0] == 0
    if keeps_denoised:
        beta = flat
    else:
        # orthogonal + lambda * (flat - orthogonal), one pass, written over `flat` (a new tensor of ours, no longer
        # needed): no fresh full-size temporary.
        beta = torch.lerp(orthogonal, flat, overlap_weight, out=flat)
    # beta's component outside the span is exactly `orthogonal`, so it gives the new basis direction directly. The
    # tolerance is relative to the denoised update: with lambda = 0 an update lying in the span leaves only rounding
    # noise as beta, which must not become a direction.
    direction = None
    if flat_norm > 0.0 and orthogonal_norm > rel_tol * flat_norm:
        direction = orthogonal.div_(orthogonal_norm)  # beta never aliases `orthogonal` (it lives in `flat`)
    unchanged = denoised.kept_rank == denoised.full_rank and keeps_denoised
    return ConsolidationResult(
        update=beta.reshape(update.shape),
        new_direction=direction,
        previous_basis=basis,
        kept_rank=denoised.kept_rank,
        full_rank=denoised.full_rank,
        energy=denoised.energy,
        kept_energy=denoised.kept_energy,
        conflict=conflict,
        unchanged=unchanged,
    )
