"""A forgetting budget: the largest step towards the newly trained adapter that keeps every earlier task.

After training task ``t`` the adapter moved from ``start`` to ``trained``. Rather than keeping the whole move, keep
``start + alpha * (trained - start)`` with the largest ``alpha`` in [0, 1] whose scores on the earlier tasks stay
within ``budget`` of what each scored right after its own training: ``score_j(alpha) >= reference_j - budget`` for
all ``j``. Every evaluation runs the earlier tasks' benchmarks, so the search is a short bisection with a hard cap on
calls and never evaluates the same ``alpha`` twice.

Scores are "higher is better" (negate a loss). A NaN score counts as a violation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["BudgetSearch", "largest_step_within_budget"]


@dataclass
class BudgetSearch:
    """Output of :func:`largest_step_within_budget`.

    Attributes:
        alpha: the chosen step in [0, 1] (0 when even ``alpha = 0`` breaks the budget).
        reachable: False when ``alpha = 0`` itself breaks the budget (the earlier tasks were already lost before
            this task: no step can restore them).
        evaluations: every ``(alpha, scores)`` evaluated, in call order.
        drops: ``reference_j - score_j(alpha)`` at the chosen alpha, per earlier task (positive = forgotten).
    """

    alpha: float
    reachable: bool
    evaluations: list[tuple[float, list[float]]] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)


def largest_step_within_budget(
    evaluate: Callable[[float], Sequence[float]],
    reference_scores: Sequence[float],
    budget: float,
    max_evaluations: int = 6,
) -> BudgetSearch:
    """The largest feasible ``alpha`` found by: ``alpha = 1`` (kept if feasible, one call), else ``alpha = 0`` (if
    infeasible: ``alpha = 0``, ``reachable=False``), else bisection on ``[0, 1]`` with the remaining calls.

    Bisection keeps the invariant "``low`` feasible, ``high`` not", so ``low`` is always the largest feasible alpha
    found, and it is returned. For a monotone trade-off it is within ``2**-(max_evaluations - 2)`` of the true
    boundary; for a non-monotone one it is still feasible, at a feasible/infeasible boundary, though not necessarily
    the largest. With no earlier task nothing can be forgotten: ``alpha = 1`` is returned without any call.

    Args:
        evaluate: ``alpha -> scores`` of every earlier task (``len(reference_scores)`` numbers).
        reference_scores: task ``j``'s score right after its own training.
        budget: the largest drop allowed on any task, >= 0.
        max_evaluations: cap on calls to ``evaluate``, >= 2.
    """
    if not budget >= 0.0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 2:
        raise ValueError(f"max_evaluations must be an int >= 2, got {max_evaluations!r}")
    references = [float(score) for score in reference_scores]
    if not references:
        return BudgetSearch(alpha=1.0, reachable=True)
    evaluations: list[tuple[float, list[float]]] = []
    cache: dict[float, list[float]] = {}

    def feasible(alpha: float) -> bool:
        if alpha not in cache:
            scores = [float(score) for score in evaluate(alpha)]
            if len(scores) != len(references):
                raise ValueError(f"evaluate({alpha}) returned {len(scores)} scores for {len(references)} earlier tasks")
            cache[alpha] = scores
            evaluations.append((alpha, scores))
        # `>=` is False for NaN: an unscorable task breaks the budget.
        return all(score >= reference - budget for score, reference in zip(cache[alpha], references))

    def result(alpha: float, reachable: bool) -> BudgetSearch:
        drops = [reference - score for score, reference in zip(cache[alpha], references)]
        return BudgetSearch(alpha=alpha, reachable=reachable, evaluations=evaluations, drops=drops)

    if feasible(1.0):
        return result(1.0, True)
    if not feasible(0.0):
        return result(0.0, False)
    low, high = 0.0, 1.0
    while len(evaluations) < max_evaluations:
        middle = (low + high) / 2.0
        if middle in cache or middle in (low, high):  # float resolution exhausted
            break
        if feasible(middle):
            low = middle
        else:
            high = middle
    return result(low, True)
