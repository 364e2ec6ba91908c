"""Run reports: `report.json`, `report.md` (matrix + Last/AP/BWT/FWT) and PNG plots, re-renderable from a run dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

from .metrics import continual_metrics

REPORT_JSON = "report.json"
HEATMAP_PNG = "matrix_accuracy.png"
CURVES_PNG = "accuracy_curves.png"


def build_report(config, completed: list[dict], initial_row: list[dict], eval_names: list[str],
                 eval_summaries: list[dict], initial_generation: list[dict] | None, seconds: float) -> dict[str, Any]:
    """Assemble the report dictionary from the committed task records."""
    accuracy = [[cell["accuracy"] for cell in task["row"]] for task in completed]
    margin = [[cell["margin"] for cell in task["row"]] for task in completed]
    initial_accuracy = [cell["accuracy"] for cell in initial_row]
    initial_margin = [cell["margin"] for cell in initial_row]
    report: dict[str, Any] = {
        "task_names": [task["name"] for task in completed],
        "eval_names": eval_names,
        "matrix": {"accuracy": accuracy, "margin": margin},
        "initial_row": {"accuracy": initial_accuracy, "margin": initial_margin},
        "metrics": continual_metrics(accuracy, initial_accuracy),
        "margin_metrics": continual_metrics(margin, initial_margin),
        "seconds": seconds,
        "settings": {
            "reference": config.reference, "focal_gamma": config.training.get("focal_gamma", 2.0),
            "memory": vars(config.memory), "replay": vars(config.replay), "sft_warmup": config.sft_warmup.enabled,
            "optimizer": config.optimizer, "skip_bad_rows": config.skip_bad_rows,
        },
        "eval_data": eval_summaries,
        "tasks": [{k: v for k, v in task.items() if k != "row"} for task in completed],
        "skipped_rows_total": sum(d["skipped_total"] for task in completed for d in task["data"])
        + sum(e["skipped_total"] for e in eval_summaries),
    }
    if completed and "generation" in completed[0]:
        generation: dict[str, Any] = {}
        for name in completed[0]["generation"][0]:
            matrix = [[cell[name] for cell in task["generation"]] for task in completed]
            initial = [cell[name] for cell in initial_generation] if initial_generation else None
            generation[name] = {"matrix": matrix, "initial_row": initial, "metrics": continual_metrics(matrix, initial)}
        report["generation"] = generation
    return report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}" if value < 0 else f"{value:.{digits}f}"


def matrix_markdown(matrix: list[list[float]], task_names: list[str], eval_names: list[str],
                    initial_row: list[float] | None = None) -> str:
    """A Markdown table: rows = after task i, columns = eval set j."""
    lines = ["| after \\ eval | " + " | ".join(eval_names) + " |", "|---" * (len(eval_names) + 1) + "|"]
    if initial_row is not None:
        lines.append("| (start) | " + " | ".join(f"{v:.3f}" for v in initial_row) + " |")
    for name, row in zip(task_names, matrix):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    parts = [
        "# Lifelong alignment report", "",
        f"Tasks: {' → '.join(report['task_names'])}  ",
        f"Settings: {json.dumps(report['settings'])}  ",
        f"Wall time: {report['seconds']:.1f} s", "",
        "## Preference accuracy matrix", "",
        "Entry (i, j): share of eval-set-j pairs whose implicit reward margin "
        "(log π/π₀ of chosen minus rejected) is positive after task i (ties count ½; π₀ = model before task 1).", "",
        matrix_markdown(report["matrix"]["accuracy"], report["task_names"], report["eval_names"],
                        report["initial_row"]["accuracy"]), "",
        "| Last | AP | BWT | FWT |", "|---|---|---|---|",
        f"| {_fmt(m['last'])} | {_fmt(m['ap'])} | {_fmt(m['bwt'])} | {_fmt(m['fwt'])} |", "",
        "## Mean reward margin matrix", "",
        matrix_markdown(report["matrix"]["margin"], report["task_names"], report["eval_names"]), "",
    ]
    for name, data in (report.get("generation") or {}).items():
        g = data["metrics"]
        parts += [f"## Generation: {name}", "", matrix_markdown(data["matrix"], report["task_names"],
                                                                 report["eval_names"], data["initial_row"]), "",
                  "| Last | AP | BWT | FWT |", "|---|---|---|---|",
                  f"| {_fmt(g['last'], 2)} | {_fmt(g['ap'], 2)} | {_fmt(g['bwt'], 2)} | {_fmt(g['fwt'], 2)} |", ""]
    parts += ["## Per task", "", "| task | pairs | replayed | skipped rows | train loss | SLMC kept energy | "
              "SLMC conflict | seconds |", "|---|---|---|---|---|---|---|---|"]
    for task in report["tasks"]:
        consolidation = task.get("consolidation") or {}
        skipped = sum(d["skipped_total"] for d in task["data"])
        parts.append(f"| {task['name']} | {task['train_pairs']} | {task['replayed_pairs']} | {skipped} | "
                     f"{task['train']['train_loss']:.4f} | {_fmt(consolidation.get('kept_energy'))} | "
                     f"{_fmt(consolidation.get('conflict'))} | {task['seconds']:.1f} |")
    parts += ["", f"![accuracy matrix]({HEATMAP_PNG})", "", f"![accuracy curves]({CURVES_PNG})", ""]
    return "\n".join(parts)


def plot_report(report: dict[str, Any], run_dir: Path) -> list[Path]:
    """Write the accuracy-matrix heatmap and the per-eval-set accuracy curves as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = report["matrix"]["accuracy"]
    tasks, evals = report["task_names"], report["eval_names"]
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
    heatmap = run_dir / HEATMAP_PNG
    fig.savefig(heatmap, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(len(tasks) + 1))
    for j, name in enumerate(evals):
        ax.plot(xs, [report["initial_row"]["accuracy"][j]] + [row[j] for row in matrix], marker="o", label=name)
    ax.set_xticks(xs, ["start"] + tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("preference accuracy")
    ax.set_title("Accuracy on each eval set across the sequence")
    ax.legend(fontsize="small")
    fig.tight_layout()
    curves = run_dir / CURVES_PNG
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    return [heatmap, curves]


def write_report(run_dir: str | Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and the PNG plots into `run_dir` (atomically per file)."""
    run_dir = Path(run_dir)
    written = []
    for name, text in ((REPORT_JSON, json.dumps(report, indent=2, default=str)), ("report.md", render_markdown(report))):
        atomic_write_text(run_dir / name, text)
        written.append(run_dir / name)
    return written + plot_report(report, run_dir)


def rerender(run_dir: str | Path) -> list[Path]:
    """Re-render report.md and the plots from `run_dir/report.json` (or from the committed task records)."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished lifelong run directory?")
    with open(path, encoding="utf-8") as handle:
        report = json.load(handle)
    return write_report(run_dir, report)
