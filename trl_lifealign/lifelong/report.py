"""The one report of a lifelong sequence: ``LifelongReport``, written as JSON, Markdown and (optional) PNG plots.

Produced by the lifelong runner, the Axolotl chain and the benchmark alike, and re-renderable from ``report.json``
(``lifealign report RUN_DIR``). Plots need matplotlib (the ``eval`` extra); without it every other output is written
and one line says how to get the plots.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .metrics import continual_metrics

__all__ = ["LifelongReport", "TaskRecord", "matrix_markdown", "rerender", "write_report"]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
HEATMAP_PNG = "matrix_accuracy.png"
CURVES_PNG = "accuracy_curves.png"
_HINT_SHOWN = False  # the hint is printed once per process
PLOTS_HINT = "plots skipped: matplotlib is not installed (pip install 'trl-lifealign[eval]' for PNG plots)"


@dataclass
class TaskRecord:
    """What one task (or Axolotl stage) did and how every eval set scored after it."""

    name: str
    row: list[dict[str, Any]] = field(metadata={"help": "Per eval set: accuracy, margin, pairs, dropped."})
    train_pairs: int = 0
    replayed_pairs: int = 0
    dropped_pairs: int = field(default=0, metadata={"help": "Training pairs TRL dropped (prompt fills max_length)."})
    skipped_rows: int = 0
    seconds: float = 0.0
    time_split: dict[str, float] = field(default_factory=dict, metadata={
        "help": "Seconds of the task's parts: sft_warmup, training (boundary work of callbacks included), "
                "evaluation (preference scoring), generation (greedy answers and their scorers)."})
    dir: str | None = None
    train_loss: float | None = None
    steps: int | None = None
    replay_by_task: dict[str, int] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)
    sft_warmup: dict[str, Any] | None = None
    consolidation: dict[str, Any] | None = None
    defences: dict[str, Any] = field(default_factory=dict)
    generation: list[dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LifelongReport:
    """The evaluation matrix of a sequence, its continual-learning metrics and what each task did."""

    task_names: list[str]
    eval_names: list[str]
    tasks: list[TaskRecord]
    initial_cells: list[dict[str, Any]] = field(metadata={"help": "π₀'s cell per eval set (accuracy ½, margin 0)."})
    settings: dict[str, Any] = field(default_factory=dict)
    eval_data: list[dict[str, Any]] = field(default_factory=list)
    initial_generation: list[dict[str, Any]] | None = None
    seconds: float = 0.0

    def matrix(self, key: str = "accuracy") -> list[list[float]]:
        """R[i][j]: preference ``key`` (accuracy or margin) on eval set j after task i."""
        return [[cell[key] for cell in task.row] for task in self.tasks]

    def initial(self, key: str = "accuracy") -> list[float]:
        return [cell[key] for cell in self.initial_cells]

    @property
    def metrics(self) -> dict[str, float | None]:
        """Last, AP, BWT, FWT of the accuracy matrix."""
        return continual_metrics(self.matrix(), self.initial())

    def generation_metrics(self) -> dict[str, dict[str, Any]]:
        """Per generation scorer: its matrix, initial row and Last/AP/BWT/FWT (None where a value is missing)."""
        cells = [cell for task in self.tasks for cell in (task.generation or [])]
        names = sorted({k for cell in cells for k in cell if k not in _GENERATION_EXTRAS})
        out = {}
        for name in names:
            matrix = [[cell.get(name) for cell in task.generation] for task in self.tasks]
            initial = [cell.get(name) for cell in self.initial_generation] if self.initial_generation else None
            out[name] = {"matrix": matrix, "initial_row": initial, "metrics": continual_metrics(matrix, initial)}
        return out

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["matrix"] = {"accuracy": self.matrix(), "margin": self.matrix("margin")}
        data["initial_row"] = {"accuracy": self.initial(), "margin": self.initial("margin")}
        data["metrics"] = self.metrics
        data["margin_metrics"] = continual_metrics(self.matrix("margin"), self.initial("margin"))
        data["generation"] = self.generation_metrics() or None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LifelongReport:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["tasks"] = [TaskRecord.from_dict(t) for t in data["tasks"]]
        return cls(**values)


def _time_split(split: dict[str, float]) -> str:
    return ", ".join(f"{part.replace('_', ' ')} {seconds:.1f}" for part, seconds in split.items()) or "–"


_GENERATION_EXTRAS = ("empty_answers", "answers", "judge_summary")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}" if value < 0 else f"{value:.{digits}f}"


def matrix_markdown(matrix: list[list[float | None]], task_names: list[str], eval_names: list[str],
                    initial_row: list[float | None] | None = None) -> str:
    """A Markdown table: rows = after task i, columns = eval set j."""
    cell = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = ["| after \\ eval | " + " | ".join(eval_names) + " |", "|---" * (len(eval_names) + 1) + "|"]
    if initial_row is not None:
        lines.append("| (start) | " + " | ".join(cell(v) for v in initial_row) + " |")
    for name, row in zip(task_names, matrix):
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _metrics_table(m: dict[str, float | None], digits: int = 3) -> list[str]:
    return ["| Last | AP | BWT | FWT |", "|---|---|---|---|",
            f"| {_fmt(m['last'], digits)} | {_fmt(m['ap'], digits)} | {_fmt(m['bwt'], digits)} | "
            f"{_fmt(m['fwt'], digits)} |", ""]


def render_markdown(report: LifelongReport, plots: list[str]) -> str:
    parts = ["# Lifelong alignment report", "", f"Tasks: {' → '.join(report.task_names)}  ",
             f"Settings: {json.dumps(report.settings, default=str)}  ", f"Wall time: {report.seconds:.1f} s", "",
             "## Preference accuracy matrix", "",
             "Entry (i, j): share of eval-set-j pairs whose implicit reward margin (log π/π₀ of chosen minus rejected) "
             "is positive after task i (ties count ½; π₀ = model before task 1).", "",
             matrix_markdown(report.matrix(), report.task_names, report.eval_names, report.initial()), "",
             *_metrics_table(report.metrics),
             "## Mean reward margin matrix", "",
             matrix_markdown(report.matrix("margin"), report.task_names, report.eval_names), ""]
    for name, data in report.generation_metrics().items():
        parts += [f"## Generation: {name}", "",
                  matrix_markdown(data["matrix"], report.task_names, report.eval_names, data["initial_row"]), "",
                  *_metrics_table(data["metrics"], 2)]
    parts += ["## Per task", "", "| task | pairs | replayed | dropped (too long) | skipped rows | train loss | "
              "SLMC kept energy | SLMC conflict | seconds | of which |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task in report.tasks:
        consolidation = task.consolidation or {}
        parts.append(f"| {task.name} | {task.train_pairs} | {task.replayed_pairs} | {task.dropped_pairs} | "
                     f"{task.skipped_rows} | {_fmt(task.train_loss, 4)} | {_fmt(consolidation.get('kept_energy'))} | "
                     f"{_fmt(consolidation.get('conflict'))} | {task.seconds:.1f} | {_time_split(task.time_split)} |")
    parts.append("")
    parts += [f"![{Path(p).stem}]({p})" for p in plots] or [PLOTS_HINT]
    return "\n".join(parts) + "\n"


def plot_report(report: LifelongReport, run_dir: Path) -> list[Path]:
    """Write the accuracy-matrix heatmap and the per-eval-set accuracy curves as PNGs; [] without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, tasks, evals = report.matrix(), report.task_names, report.eval_names
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(evals), 1.0 + 0.8 * len(tasks)))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(evals)), evals, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_title("Preference accuracy")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(run_dir / HEATMAP_PNG, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(len(tasks) + 1))
    for j, name in enumerate(evals):
        ax.plot(xs, [report.initial()[j]] + [row[j] for row in matrix], marker="o", label=name)
    ax.set_xticks(xs, ["start"] + tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("preference accuracy")
    ax.set_title("Accuracy on each eval set across the sequence")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(run_dir / CURVES_PNG, dpi=100)
    plt.close(fig)
    return [run_dir / HEATMAP_PNG, run_dir / CURVES_PNG]


def write_report(run_dir: str | Path, report: LifelongReport, plots: bool = True) -> list[Path]:
    """Write report.json, report.md and (when matplotlib is there) the PNG plots into ``run_dir``; returns the files.

    Without matplotlib a single line on stderr says how to get the plots.
    """
    import sys

    global _HINT_SHOWN
    run_dir = Path(run_dir)
    pngs = plot_report(report, run_dir) if plots else []
    if plots and not pngs and not _HINT_SHOWN:
        print(f"lifealign: {PLOTS_HINT}", file=sys.stderr)
        _HINT_SHOWN = True
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    atomic_write_text(run_dir / REPORT_MD, render_markdown(report, [p.name for p in pngs]))
    return [run_dir / REPORT_JSON, run_dir / REPORT_MD, *pngs]


def load_report(run_dir: str | Path) -> LifelongReport:
    """The report of a finished run directory (``report.json``), with a clear error when there is none."""
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished lifelong run directory?")
    try:
        return LifelongReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is truncated or not a lifelong report: {error}") from None


def rerender(run_dir: str | Path) -> list[Path]:
    """Re-render report.md and the plots from ``run_dir/report.json``."""
    return write_report(run_dir, load_report(run_dir))
