"""Aggregation over seeds, seed-paired gaps and the bar's verdict, on the runs' stored reports."""

from __future__ import annotations

import math
import statistics
from typing import Any

METRIC_KEYS = ("last", "ap", "bwt", "fwt")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_view(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one stored run, read from its ``LifelongReport``: matrix, π₀ row, metrics, names, wall time
    (the sum of its tasks' times, so a run resumed across invocations counts every task once)."""
    from trl_lifealign.lifelong.report import LifelongReport

    report = LifelongReport.from_dict(record["report"])
    generation = {name: data["metrics"] for name, data in report.generation_metrics().items()}
    return {"matrix": report.matrix(), "initial_row": report.initial(), "metrics": report.metrics,
            "task_names": report.task_names, "eval_names": report.eval_names, "generation": generation,
            "seconds": sum(task.seconds for task in report.tasks), "time_split": _time_split(report.tasks)}


def _time_split(tasks) -> dict[str, float] | None:
    """Seconds per part (training, evaluation, generation, ...) summed over tasks; None if a task lacks them."""
    if not tasks or not all(task.time_split for task in tasks):
        return None
    parts: dict[str, float] = {}
    for task in tasks:
        for part, seconds in task.time_split.items():
            parts[part] = parts.get(part, 0.0) + seconds
    return parts


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: metrics in points (x100) as mean/std over seeds, mean matrix, seeds and wall time; generation
    metrics (already on 0-100) likewise."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], []).append(record)
    summary = {}
    for variant, runs in by_variant.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        views = [run_view(r) for r in runs]
        entry: dict[str, Any] = {"method": runs[0]["method"], "overrides": runs[0]["overrides"],
                                 "seeds": [r["seed"] for r in runs]}
        for key in METRIC_KEYS:
            values = [None if v["metrics"].get(key) is None else 100 * v["metrics"][key] for v in views]
            entry[key] = {**dict(zip(("mean", "std"), _mean_std(values))), "per_seed": values}
        entry["generation"] = {}
        for name in views[0]["generation"]:
            entry["generation"][name] = {}
            for key in METRIC_KEYS:
                values = [v["generation"][name].get(key) for v in views]
                entry["generation"][name][key] = {**dict(zip(("mean", "std"), _mean_std(values))), "per_seed": values}
        entry["seconds"] = dict(zip(("mean", "std"), _mean_std([v["seconds"] for v in views])))
        splits = [v["time_split"] for v in views if v["time_split"]]
        entry["time_split"] = ({part: statistics.fmean(s.get(part, 0.0) for s in splits) for part in splits[0]}
                               if splits else None)
        rows, cols = len(views[0]["matrix"]), len(views[0]["matrix"][0])
        entry["matrix"] = [[statistics.fmean(100 * v["matrix"][i][j] for v in views) for j in range(cols)]
                           for i in range(rows)]
        entry["initial_row"] = [statistics.fmean(100 * v["initial_row"][j] for v in views) for j in range(cols)]
        entry["task_names"], entry["eval_names"] = views[0]["task_names"], views[0]["eval_names"]
        summary[variant] = entry
    return summary


def paired_gap(summary: dict[str, Any], a: str, b: str, key: str) -> dict[str, Any] | None:
    """a − b on ``key`` over the seeds both ran (same seed = same warm model and data): mean, std, all-same-sign."""
    if a not in summary or b not in summary:
        return None
    sa = dict(zip(summary[a]["seeds"], summary[a][key]["per_seed"]))
    sb = dict(zip(summary[b]["seeds"], summary[b][key]["per_seed"]))
    diffs = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb)) if sa[s] is not None and sb[s] is not None]
    if not diffs:
        return None
    mean, std = _mean_std(diffs)
    return {"mean": mean, "std": std, "n": len(diffs), "diffs": diffs,
            "consistent": all(d > 0 for d in diffs) or all(d < 0 for d in diffs)}


def verdict(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The bar, checked on the measured numbers (each check with the numbers that decide it).

    Gaps are paired by seed (same warm model, same data). "Beyond seed spread" means the mean paired gap exceeds the
    standard deviation of the paired gaps and every seed agrees on its sign; it needs at least two seeds (``passed``
    is ``None`` otherwise).
    """
    checks = []
    life = summary.get("lifealign")

    def add(name: str, passed: bool | None, detail: str) -> None:
        checks.append({"check": name, "passed": passed, "detail": detail})

    if life is None:
        return checks
    bwt = life["bwt"]
    add("LifeAlign BWT ≥ 0", bwt["mean"] >= 0, f"BWT {bwt['mean']:+.2f} ± {bwt['std']:.2f}")
    gap = paired_gap(summary, "lifealign", "seq-dpo", "bwt")
    if gap:
        add("BWT ≥ 5 points above sequential DPO, beyond seed spread",
            None if gap["n"] < 2 else gap["mean"] >= 5 and gap["mean"] > gap["std"] and gap["consistent"],
            f"paired gap {gap['mean']:+.2f} ± {gap['std']:.2f} over {gap['n']} seeds")
    if "multi-task" in summary:
        last_gap = paired_gap(summary, "lifealign", "multi-task", "last")
        if last_gap:
            add("Last within 2 points of multi-task", last_gap["mean"] >= -2,
                f"Last gap to multi-task {last_gap['mean']:+.2f} ± {last_gap['std']:.2f}")
    for key in ("bwt", "last"):
        gap = paired_gap(summary, "lifealign", "replay", key)
        if gap:
            add(f"ahead of replay on {'BWT' if key == 'bwt' else 'Last'}, beyond seed spread",
                None if gap["n"] < 2 else gap["mean"] > 0 and gap["mean"] > gap["std"] and gap["consistent"],
                f"paired gap {gap['mean']:+.2f} ± {gap['std']:.2f} over {gap['n']} seeds")
    return checks


def recommendation(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The defences' bar, judged on the methods the recipe presets give (``trl_lifealign.lifelong.presets``): the
    data-free one (no earlier preference pairs kept) must reach BWT ≥ 0 and Last within 2 points of multi-task, the
    replay one Last ≥ multi-task's, on seed-paired gaps."""
    from trl_lifealign.lifelong.presets import BENCHMARK_METHOD

    if "multi-task" not in summary:
        return []
    checks = []
    free, replay = BENCHMARK_METHOD["recommended"], BENCHMARK_METHOD["recommended-replay"]
    if free in summary:
        bwt, last_gap = summary[free]["bwt"], paired_gap(summary, free, "multi-task", "last")
        checks.append({"check": f"`preset: recommended` (`{free}`, data-free): BWT ≥ 0", "passed": bwt["mean"] >= 0,
                       "detail": f"BWT {bwt['mean']:+.2f} ± {bwt['std']:.2f} (per seed "
                                 f"{', '.join(f'{v:+.2f}' for v in bwt['per_seed'])})"})
        if last_gap:
            checks.append({"check": f"`preset: recommended` (`{free}`): Last within 2 points of multi-task",
                           "passed": last_gap["mean"] >= -2,
                           "detail": f"paired gap {last_gap['mean']:+.2f} ± {last_gap['std']:.2f}"})
    if replay in summary:
        gap = paired_gap(summary, replay, "multi-task", "last")
        if gap:
            checks.append({"check": f"`preset: recommended-replay` (`{replay}`): Last ≥ multi-task",
                           "passed": gap["mean"] >= 0,
                           "detail": f"paired gap {gap['mean']:+.2f} ± {gap['std']:.2f} over {gap['n']} seeds"})
    return checks
