"""``ForgettingBudgetCallback``: after each task, pull the adapter back toward the task's start just enough that no
earlier task's monitor score drops by more than the budget (the search is in ``math``).

Plumbing: the default adapter is snapshotted when training begins; after the last optimizer step the current and
earlier tasks' *monitor* pairs are scored (implicit-reward preference accuracy against π₀, in points: accuracy × 100,
see :mod:`trl_lifealign.lifelong.evaluation`); if an earlier task dropped by more than ``budget`` points below its
reference (its own monitor score right after its training, stored in ``state_dir/references.json`` by this callback
at that task's end), :func:`~trl_lifealign.defences.budget.math.largest_step_within_budget` searches the step α, each
evaluation writing ``start + α·(trained − start)`` (as model averaging does, ``space`` product or factors) and scoring
the earlier monitor sets. The adapter is left at the chosen α and this task's own score there becomes its reference.

List it LAST among the boundary callbacks (the driver does): it must judge the adapter the task really ends with,
after averaging, consolidation or merging have acted. It checks this when bound to its trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ... import distributed as dist
from ...adapters import DEFAULT_ADAPTER
from ...atomic import atomic_write_json
from ...lifelong.evaluation import PreparedEvalSet, evaluate_preferences
from ..averaging.callback import check_lora_adapter, interpolate_adapter, lora_pairs
from ..base import TaskBoundaryCallback, is_last_step, read_factors, write_factors
from ..config import ForgettingBudgetConfig
from .math import largest_step_within_budget

__all__ = ["ForgettingBudgetCallback", "monitor_scores"]

REFERENCES_FILE = "references.json"


def monitor_scores(model, monitor_sets: Sequence[PreparedEvalSet], initial_logps: dict, batch_size: int = 8
                   ) -> list[float]:
    """Preference accuracy in points (× 100) of ``model`` on each monitor set, against π₀'s cached log-probs."""
    return [100.0 * row["accuracy"] for row in evaluate_preferences(model, monitor_sets, initial_logps, batch_size)]


class ForgettingBudgetCallback(TaskBoundaryCallback):
    """Keep every earlier task within ``config.budget`` points of the score it had right after its own training.

    Args:
        config: budget (points), ``max_evaluations`` of the search, interpolation ``space``.
        monitor_sets: one prepared set of monitor pairs per task, set ``j`` belonging to task ``j`` (sets of later
            tasks may already be present and are ignored until their task).
        initial_logps: π₀'s log-probs for the monitor sets (``initial_policy_logps``, computed once by the driver).
        state_dir: where ``references.json`` (each task's reference score and what the search did) lives.
        batch_size: evaluation batch size.

    The driver calls ``start_task(t)`` before each task. ``last_summary`` = ``{"alpha", "reachable", "drops" (points
    per earlier task at the chosen α, positive = forgotten), "evaluations" (monitor evaluations of the search)}``;
    ``budget/alpha`` and ``budget/max_drop`` are logged.

    The budget holds on the monitor sets it was tuned on, not necessarily on other data from the same tasks: keep the
    monitor pairs apart from the evaluation pairs and expect some slack elsewhere. Every search evaluation costs one
    forward pass over the earlier monitor sets, so keep them small.
    """

    name = "budget"

    def __init__(self, config: ForgettingBudgetConfig, monitor_sets: list[PreparedEvalSet], initial_logps: dict,
                 state_dir, batch_size: int = 8):
        if state_dir is None:
            raise ValueError("ForgettingBudgetCallback needs a state_dir for the reference scores")
        super().__init__(state_dir)
        self.config = config
        self.monitor_sets = list(monitor_sets)
        self.initial_logps = initial_logps
        self.batch_size = batch_size
        missing = [s.name for s in self.monitor_sets if s.name not in initial_logps]
        if missing:
            raise ValueError(f"initial_logps has no π₀ log-probs for monitor set(s) {missing}")
        self._start = None

    # ------------------------------------------------------------------------------------------------ state files
    def _read_state(self) -> dict:
        """The reference file's content, read on rank 0 and broadcast (a collective; empty before any boundary)."""
        path = self.state_dir / REFERENCES_FILE
        content = {"references": {}, "history": []}
        if dist.is_main_process() and path.is_file():
            try:
                content = json.loads(path.read_text())
                content["references"] = {int(k): float(v) for k, v in content["references"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                content = ValueError(f"{path} is not a forgetting-budget reference file: {error}")
        content = dist.broadcast_object(content)
        if isinstance(content, ValueError):
            raise content
        return content

    def references(self) -> dict[int, float]:
        """``{task: reference score}`` stored so far (every rank must call it)."""
        return dict(self._read_state()["references"])

    def _store(self, task: int, score: float, summary: dict) -> None:
        content = self._read_state()
        references = {**content["references"], task: score}
        history = [h for h in content.get("history", []) if h.get("task") != task]
        if dist.is_main_process():
            atomic_write_json(self.state_dir / REFERENCES_FILE,
                              {"references": {str(k): v for k, v in sorted(references.items())},
                               "history": [*history, {**summary, "own_score": score}]})
        dist.barrier()

    # ------------------------------------------------------------------------------------------------ the boundary
    def _task_index(self) -> int:
        if self.task_index is None:
            raise RuntimeError("ForgettingBudgetCallback: call start_task(task_index) before each task's training")
        if self.task_index >= len(self.monitor_sets):
            raise ValueError(f"ForgettingBudgetCallback: task {self.task_index} has no monitor set (only "
                             f"{len(self.monitor_sets)} given; set j belongs to task j)")
        return self.task_index

    def _scores(self, model, sets) -> list[float]:
        return monitor_scores(model, sets, self.initial_logps, self.batch_size)

    def enforce(self, model) -> dict:
        """Score, search and set the adapter at the task's end (every rank must call it); returns the summary."""
        task = self._task_index()
        if self._start is None:
            raise RuntimeError("ForgettingBudgetCallback.enforce() called without begin_task(): no snapshot")
        start, self._start = self._start, None
        earlier_sets, own_set = self.monitor_sets[:task], self.monitor_sets[task]
        stored = self.references()
        absent = [j for j in range(task) if j not in stored]
        if absent:
            raise RuntimeError(f"no reference score for earlier task(s) {absent} in {self.state_dir / REFERENCES_FILE}"
                               ": the budget callback must run at the end of every task")
        reference = [stored[j] for j in range(task)]
        trained = read_factors(model)
        pairs = lora_pairs(trained)
        scores = self._scores(model, [*earlier_sets, own_set])
        at_one, own = scores[:-1], scores[-1]

        def evaluate(alpha: float) -> list[float]:
            if alpha == 1.0:
                return at_one
            write_factors(model, interpolate_adapter(start, trained, alpha, self.config.space, pairs)[0])
            return self._scores(model, earlier_sets)

        search = largest_step_within_budget(evaluate, reference, self.config.budget, self.config.max_evaluations)
        if search.alpha != 1.0:
            write_factors(model, interpolate_adapter(start, trained, search.alpha, self.config.space, pairs)[0])
            own = self._scores(model, [own_set])[0]
        self.last_summary = {"task": task, "alpha": search.alpha, "reachable": search.reachable,
                             "drops": list(search.drops), "evaluations": len(search.evaluations)}
        self._store(task, own, self.last_summary)
        return self.summary()

    # ---------------------------------------------------------------------------------------------- trainer events
    def _check_last(self) -> None:
        handler = getattr(self.trainer, "callback_handler", None)
        callbacks = list(getattr(handler, "callbacks", []))
        if self not in callbacks:
            return
        from ...slmc.callback import MemoryConsolidationCallback

        after = [type(c).__name__ for c in callbacks[callbacks.index(self) + 1:]
                 if isinstance(c, (TaskBoundaryCallback, MemoryConsolidationCallback))]
        if after:
            raise ValueError(f"ForgettingBudgetCallback must be the last boundary callback, but {after} follow it: "
                             "list it last so it judges the adapter the task really ends with")

    def start_task(self, task_index: int, train_rows: list[dict] | None = None) -> None:
        super().start_task(task_index, train_rows)
        self._start = None  # a snapshot left by a task that failed midway is stale

    def begin_task(self, model) -> None:
        """Snapshot the default adapter as the task's start (every rank must call it; ``on_train_begin`` does)."""
        self._task_index()
        check_lora_adapter(model, DEFAULT_ADAPTER, "ForgettingBudgetCallback")
        self._start = read_factors(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("ForgettingBudgetCallback received no model from the trainer")
        self._check_last()
        if self._start is None:  # unless begun by hand (e.g. before an SFT warm-up)
            self.begin_task(model)

    def _finish(self, model, state) -> None:
        summary = self.enforce(model)
        self.log_metrics({"budget/alpha": float(summary["alpha"]),
                          "budget/max_drop": float(max(summary["drops"], default=0.0))}, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._start is not None and is_last_step(state):
            self._finish(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._start is not None:  # training stopped before its last step
            self._finish(model, state)
