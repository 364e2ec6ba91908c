"""The benchmark's Markdown tables (shaped like the paper's Tables 1 and 2) and its optional plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .aggregate import recommendation, verdict
from .settings import SETTING_ALIASES, SHORT_TASK_NAMES, BenchSettings


def _fmt(stat: dict[str, Any] | None) -> str:
    if stat is None or stat["mean"] is None or math.isnan(stat["mean"]):
        return "–"
    sign = "+" if stat.get("signed") else ""
    if len([v for v in stat.get("per_seed", [None, None]) if v is not None]) == 1:
        return f"{stat['mean']:{sign}.2f}"  # one seed: no spread to show
    return f"{stat['mean']:{sign}.2f} ± {stat['std']:.2f}"


def _signed(stat: dict[str, Any]) -> dict[str, Any]:
    return {**stat, "signed": True}


def _method_cells(summary: dict[str, Any], variant: str, last_only: bool = False) -> list[str]:
    """BWT, Last, AP, FWT, seconds per run and number of seeds of one variant, formatted for the tables."""
    entry = summary[variant]
    if last_only:
        cells = ["–", _fmt(entry["last"]), "–", "–"]
    else:
        cells = [_fmt(_signed(entry["bwt"])), _fmt(entry["last"]), _fmt(entry["ap"]), _fmt(_signed(entry["fwt"]))]
    return cells + [f"{entry['seconds']['mean']:.0f}", str(len(entry["seeds"]))]


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


TABLE1 = (("seq-dpo", "Sequential DPO (SeqFT)"), ("replay", "Replay (ER, 20%)"),
          ("lifealign", "**LifeAlign** (FPO + SLMC)"), ("lifealign-replay", "LifeAlign + replay"),
          ("multi-task", "Multi-task (MTL, upper bound)"))
TABLE2 = (("seq-dpo", "✗", "✗"), ("slmc", "✓", "✗"), ("fpo", "✗", "✓"), ("lifealign", "✓", "✓"))
HEADER = "| BWT | Last | AP | FWT | s / run | seeds |\n"
RULE = "|---|---|---|---|---|---|"


def _checks_table(title: str, checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    lines = ["", f"## {title}", "", "| check | result | measured |", "|---|---|---|"]
    for check in checks:
        mark = "n/a (needs ≥ 2 seeds)" if check["passed"] is None else "pass" if check["passed"] else "**fail**"
        lines.append(f"| {check['check']} | {mark} | {check['detail']} |")
    return lines


def _generation_table(summary: dict[str, Any]) -> list[str]:
    names = sorted({n for entry in summary.values() for n in entry.get("generation", {})})
    if not names:
        return []
    head = " | ".join(f"{n} BWT | {n} Last" for n in names)
    lines = ["", "## Generation metrics (greedy answers against `chosen`, 0-100)", "", f"| variant | {head} |",
             "|---" * (2 * len(names) + 1) + "|"]
    for variant, entry in summary.items():
        cells = []
        for name in names:
            stats = entry.get("generation", {}).get(name, {})
            cells += [_fmt(_signed(stats["bwt"])) if "bwt" in stats else "–",
                      _fmt(stats["last"]) if "last" in stats else "–"]
        lines.append(_table_row([f"`{variant}`", *cells]))
    return lines


def _time_table(summary: dict[str, Any]) -> list[str]:
    """Where each run's time goes (mean over seeds, summed over tasks), for the runs that recorded it."""
    split = {v: e["time_split"] for v, e in summary.items() if e.get("time_split")}
    if not split:
        return []
    parts = list(dict.fromkeys(p for s in split.values() for p in s))
    lines = ["", "## Where the time goes (s per run, summed over tasks; π₀'s scoring is not included)", "",
             "| variant | " + " | ".join(p.replace("_", " ") for p in parts) + " | total |",
             "|---" * (len(parts) + 2) + "|"]
    for variant, seconds in split.items():
        lines.append(_table_row([f"`{variant}`", *(f"{seconds.get(p, 0.0):.0f}" for p in parts),
                                 f"{summary[variant]['seconds']['mean']:.0f}"]))
    return lines


def render_markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """Tables 1 and 2 in the paper's shape (preference accuracy in points), the defences, the bars, the sweeps."""
    lines = [f"# Lifelong alignment benchmark: {meta['title']}", "", f"Command: `{meta['command']}`", "",
             f"Tasks (in order): {' → '.join(meta['tasks'])}; eval split `{meta['eval_split']}`. "
             f"Metric: preference accuracy against the initial model π₀ in points (50 = no preference), "
             f"mean ± std over seeds {meta['seeds']}. {meta['setup']}", ""]
    if meta.get("missing"):
        runs = ", ".join(f"{m['variant']} seed {m['seed']}" for m in meta["missing"])
        lines += [f"**Partial result**: {len(meta['missing'])} planned run(s) did not run: {runs}. The `seeds` column "
                  "says how many seeds each row averages.", ""]
    lines += ["## Table 1: methods", "", "| Method " + HEADER.rstrip("\n"), "|---" + RULE]
    for variant, label in TABLE1:
        if variant in summary:
            last_only = summary[variant]["method"] == "multi-task"
            lines.append(_table_row([label, *_method_cells(summary, variant, last_only)]))
    lines += ["", "## Table 2: ablation (no replay)", "", "| SLMC | FPO " + HEADER.rstrip("\n"), "|---|---" + RULE]
    for variant, slmc, fpo in TABLE2:
        if variant in summary:
            lines.append(_table_row([slmc, fpo, *_method_cells(summary, variant)]))
    shown = {v for v, _ in TABLE1} | {v for v, _, _ in TABLE2}
    others = [v for v in summary if v not in shown and "@" not in v]
    if others:
        lines += ["", "## Defences and combinations", "", "| variant " + HEADER.rstrip("\n"), "|---" + RULE]
        lines += [_table_row([f"`{v}`", *_method_cells(summary, v)]) for v in others]
    lines += _generation_table(summary)
    lines += _time_table(summary)
    lines += _checks_table("The bar: LifeAlign", verdict(summary))
    lines += _checks_table("The bar: the recommended recipes", recommendation(summary))
    lines += _sweep_lines(summary)
    lines += ["", "## Final-row accuracy per task (mean over seeds)", ""]
    evals = next(iter(summary.values()))["eval_names"]
    lines += ["| method | π₀ | " + " | ".join(SHORT_TASK_NAMES.get(e, e) for e in evals) + " |",
              "|---" * (len(evals) + 2) + "|"]
    for variant, entry in summary.items():
        lines.append(f"| `{variant}` | {statistics.fmean(entry['initial_row']):.1f} | "
                     + " | ".join(f"{v:.1f}" for v in entry["matrix"][-1]) + " |")
    lines += ["", meta.get("data_note", ""), ""]
    return "\n".join(lines)


def _sweep_lines(summary: dict[str, Any]) -> list[str]:
    sweep = [v for v in summary if "@" in v]
    if not sweep:
        return []
    lines = ["", "## Sensitivity (one knob at a time, others at their defaults)", "",
             "| variant " + HEADER.rstrip("\n"), "|---" + RULE]
    for method in sorted({v.split("@", 1)[0] for v in sweep}):
        if method in summary:
            lines.append(_table_row([f"`{method}` (defaults)", *_method_cells(summary, method)]))
    for variant in sorted(sweep, key=_sweep_sort_key):
        lines.append(_table_row([f"`{variant}`", *_method_cells(summary, variant)]))
    return lines


def _sweep_sort_key(variant: str):
    method, _, rest = variant.partition("@")
    key, _, value = rest.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.inf
    return (method, key, number, value)


def sweep_curves(summary: dict[str, Any], base_settings: BenchSettings | None) -> dict[tuple[str, str], list]:
    """``{(method, knob): [(value, entry), ...]}`` for numeric sweeps, the method's default run included at its
    default value (from ``base_settings``), sorted by value."""
    curves: dict[tuple[str, str], list] = {}
    for variant, entry in summary.items():
        if "@" not in variant:
            continue
        method, _, rest = variant.partition("@")
        knob, _, value = rest.partition("=")
        try:
            curves.setdefault((method, knob), []).append((float(value), entry))
        except ValueError:
            continue
    for (method, knob), points in curves.items():
        name = SETTING_ALIASES.get(knob, knob)
        default = getattr(base_settings, name, None) if base_settings is not None else None
        if method in summary and isinstance(default, (int, float)) and all(x != default for x, _ in points):
            points.append((float(default), summary[method]))
        points.sort(key=lambda p: p[0])
    return {key: points for key, points in curves.items() if len(points) > 1}


def write_plots(summary: dict[str, Any], out_dir: Path, base_settings: BenchSettings | None = None) -> list[Path]:
    """One heatmap per method (mean matrix, π₀ row on top), a bar chart of BWT and Last per method and, for numeric
    sweeps, Last / BWT against each swept knob (the method's default run included). [] without matplotlib."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_heatmap(plt, variant, entry, out_dir) for variant, entry in summary.items() if "@" not in variant]
    base = [v for v in summary if "@" not in v]
    if base:
        written.append(_bars(plt, summary, base, out_dir))
    curves = sweep_curves(summary, base_settings)
    if curves:
        written.append(_sensitivity(plt, curves, out_dir))
    return written


def _heatmap(plt, variant: str, entry: dict[str, Any], out_dir: Path) -> Path:
    matrix = [entry["initial_row"]] + entry["matrix"]
    rows = ["π₀"] + [SHORT_TASK_NAMES.get(t, t) for t in entry["task_names"]]
    cols = [SHORT_TASK_NAMES.get(e, e) for e in entry["eval_names"]]
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.6 * len(rows) + 1.5))
    image = ax.imshow(matrix, cmap="viridis", vmin=30, vmax=100)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w" if value < 70 else "k", fontsize=8)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    ax.set_title(f"{variant}: preference accuracy (%)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = out_dir / f"heatmap_{variant}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bars(plt, summary: dict[str, Any], base: list[str], out_dir: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in zip(axes, ("bwt", "last")):
        means = [summary[v][key]["mean"] if summary[v][key]["mean"] is not None else float("nan") for v in base]
        stds = [summary[v][key]["std"] or 0.0 for v in base]
        ax.bar(range(len(base)), [0 if math.isnan(m) else m for m in means], yerr=stds, capsize=3,
               color=["tab:red" if key == "bwt" and m < 0 else "tab:blue" for m in means])
        ax.set_xticks(range(len(base)), base, rotation=30, ha="right")
        ax.set_title(key.upper() + " (points, mean ± std over seeds)")
        ax.axhline(0 if key == "bwt" else 50, color="k", lw=0.8)
        if key == "last":
            ax.set_ylim(min(45, *[m - 5 for m in means if not math.isnan(m)]), None)
    fig.tight_layout()
    path = out_dir / "bars_bwt_last.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _sensitivity(plt, curves: dict[tuple[str, str], list], out_dir: Path) -> Path:
    knobs = sorted({knob for _, knob in curves})
    # Last on top, BWT below, each on its own scale (a few points of change would vanish on a shared axis).
    fig, axes = plt.subplots(2, len(knobs), figsize=(3.6 * len(knobs), 5.4), squeeze=False, sharex="col")
    for column, knob in enumerate(knobs):
        for row, key in enumerate(("last", "bwt")):
            ax = axes[row][column]
            for (method, curve_knob), points in sorted(curves.items()):
                if curve_knob == knob:
                    ax.errorbar([x for x, _ in points], [e[key]["mean"] for _, e in points],
                                yerr=[e[key]["std"] for _, e in points], fmt="o-", capsize=3, label=method)
            if knob in ("lr", "learning_rate"):
                ax.set_xscale("log")
            if key == "bwt":
                ax.axhline(0, color="k", lw=0.6)
                ax.set_xlabel(knob)
            ax.set_ylabel(f"{'Last' if key == 'last' else 'BWT'} (points)")
            if row == 0:
                ax.set_title(f"sensitivity to {knob}")
                ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "sensitivity.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
