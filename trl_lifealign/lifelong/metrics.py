"""Continual-learning metrics on an evaluation matrix (pure math, no model in sight).

`R[i][j]` is the score on evaluation set j after training task i (0-based here; the formulas in the docstrings use
the paper's 1-based k, j, N). `R0[j]` is the score of the model before the first task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Margins whose magnitude is at most this count as ties: the untrained policy reproduces π₀'s log-probs up to
# floating-point noise from batching, and must score exactly 0.5.
TIE_TOLERANCE = 1e-5


def preference_accuracy(margins: Sequence[float], tie_tolerance: float = TIE_TOLERANCE) -> float:
    """Share of pairs with a positive implicit reward margin; ties (|margin| <= tie_tolerance) count one half."""
    if len(margins) == 0:
        raise ValueError("preference_accuracy needs at least one margin")
    score = 0.0
    for margin in margins:
        if not math.isfinite(margin):
            raise ValueError(f"non-finite reward margin {margin!r}")
        score += 1.0 if margin > tie_tolerance else 0.5 if margin >= -tie_tolerance else 0.0
    return score / len(margins)


def _check_matrix(matrix: Sequence[Sequence[float]], initial_row: Sequence[float] | None) -> int:
    n_rows = len(matrix)
    if n_rows == 0:
        raise ValueError("the evaluation matrix has no rows")
    n_cols = len(matrix[0])
    for index, row in enumerate(matrix):
        if len(row) != n_cols:
            raise ValueError(f"evaluation matrix row {index} has {len(row)} entries, row 0 has {n_cols}")
    if n_cols < n_rows:
        raise ValueError(f"evaluation matrix has {n_rows} task rows but only {n_cols} evaluation columns; column j "
                         "must be task j's evaluation set")
    if initial_row is not None and len(initial_row) != n_cols:
        raise ValueError(f"initial_row has {len(initial_row)} entries, the matrix has {n_cols} columns")
    return n_rows


def continual_metrics(matrix: Sequence[Sequence[float | None]],
                      initial_row: Sequence[float | None] | None = None) -> dict:
    """Last, AP, BWT and FWT of an N×M evaluation matrix (M ≥ N, column j = task j's evaluation set).

    - Last = mean of the final row (over all M columns).
    - AP   = (1/N) Σ_k mean(R[k][1..k])   (average performance on the tasks seen so far, averaged over time).
    - BWT  = (1/(N−1)) Σ_{j<N} (R[N][j] − R[j][j])   (negative = forgetting); None if N = 1.
    - FWT  = (1/(N−1)) Σ_{j>1} (R[j−1][j] − R0[j])   (zero-shot gain on the next task); None if N = 1 or no
      `initial_row`.

    A cell may be None (not evaluated, e.g. generation metrics scored on the diagonal and the last row only): a
    metric that needs a missing cell is None.
    """
    n = _check_matrix(matrix, initial_row)

    def known(*cells) -> bool:
        return all(cell is not None for cell in cells)

    last = sum(matrix[-1]) / len(matrix[-1]) if known(*matrix[-1]) else None
    seen = [matrix[k][: k + 1] for k in range(n)]
    ap = sum(sum(row) / len(row) for row in seen) / n if all(known(*row) for row in seen) else None
    bwt_cells = [(matrix[n - 1][j], matrix[j][j]) for j in range(n - 1)]
    bwt = (sum(a - b for a, b in bwt_cells) / (n - 1)
           if n > 1 and all(known(a, b) for a, b in bwt_cells) else None)
    fwt = None
    if n > 1 and initial_row is not None:
        fwt_cells = [(matrix[j - 1][j], initial_row[j]) for j in range(1, n)]
        if all(known(a, b) for a, b in fwt_cells):
            fwt = sum(a - b for a, b in fwt_cells) / (n - 1)
    return {"last": last, "ap": ap, "bwt": bwt, "fwt": fwt}
