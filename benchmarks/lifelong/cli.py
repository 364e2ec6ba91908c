"""The benchmark's command line: ``python benchmarks/lifelong_bench.py`` (or ``python -m benchmarks.lifelong``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .data import DATA_ENV_VAR, data_root_for
from .harness import run_benchmark
from .settings import (
    BASE_METHODS,
    METHODS,
    PAPER_ORDER,
    PRESETS,
    BenchSettings,
    apply_settings,
    parse_sweeps,
    preset_settings,
)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/lifelong_bench.py",
                                     description="Lifelong alignment methods compared on real preference tasks.")
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"folder with <task>/train.json (default: ${DATA_ENV_VAR} or ../shared/data/lifealign)")
    parser.add_argument("--eval-root", type=Path, default=None,
                        help="folder with <task>/<eval-split>.json to score on (default: --data-root)")
    parser.add_argument("--eval-split", default="dev", help="evaluation split file name (default: dev)")
    parser.add_argument("--tasks", type=_csv, default=list(PAPER_ORDER),
                        help="comma-separated task folders (default: the paper's five, in its order)")
    parser.add_argument("--order", type=_csv, default=None,
                        help="task order as a permutation of --tasks (names or 1-based indices), e.g. 5,4,3,2,1")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the setting (default: tiny)")
    parser.add_argument("--quick", action="store_true", help="same as --preset tiny-quick (one seed, minutes)")
    parser.add_argument("--pairs", type=int, default=None, help="train pairs per task")
    parser.add_argument("--eval-pairs", default=None, help="eval pairs per task, or 'all'")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=None,
                        help="comma-separated seeds (default 0,1,2; --quick 0)")
    parser.add_argument("--methods", type=_csv, default=None,
                        help=f"comma-separated methods among {','.join(METHODS)} (default: the paper's seven, "
                             f"{','.join(BASE_METHODS)}; 'all' for every method)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting for every method, e.g. --set reference=base --set lr=1e-3 "
                             "(aliases: theta, lambda, gamma, lr)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one-at-a-time sensitivity sweep of a setting for --sweep-methods, e.g. theta=0.5,0.9,1")
    parser.add_argument("--sweep-methods", type=_csv, default=["lifealign"], help="methods the sweep varies")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs in parallel, each with cpu_count/workers threads (default: min(2, cpus))")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cpus // workers)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-output"),
                        help="where runs, caches, bench.md, bench.json and plots go (default: ./bench-output)")
    parser.add_argument("--name", default="bench", help="base name of the tables and plots in --output-dir")
    parser.add_argument("--fresh", action="store_true", help="re-run runs whose stored settings differ")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the finished runs of this command, listing the missing ones")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    return parser


def resolve_order(tasks: list[str], order: list[str] | None) -> tuple[str, ...]:
    if not order:
        return tuple(tasks)
    resolved = []
    for item in order:
        if item.isdigit():
            index = int(item) - 1
            if not 0 <= index < len(tasks):
                raise ValueError(f"--order index {item} is outside 1..{len(tasks)}")
            resolved.append(tasks[index])
        elif item in tasks:
            resolved.append(item)
        else:
            raise ValueError(f"--order names {item!r}, which is not among --tasks {tasks}")
    if sorted(resolved) != sorted(tasks):
        raise ValueError(f"--order must be a permutation of --tasks {tasks}, got {resolved}")
    return tuple(resolved)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    preset = "tiny-quick" if args.quick else args.preset
    settings = preset_settings(preset, resolve_order(args.tasks, args.order))
    bad = [item for item in args.assignments if "=" not in item]
    if bad:
        raise ValueError(f"--set expects KEY=VALUE, got {bad}")
    explicit = {k: str(v) for k, v in (("pairs", args.pairs), ("eval_pairs", args.eval_pairs)) if v is not None}
    explicit.update(dict(item.split("=", 1) for item in args.assignments))
    return apply_settings(settings, explicit)


def _methods(requested: list[str] | None) -> list[str]:
    if not requested:
        return list(BASE_METHODS)
    return list(METHODS) if requested == ["all"] else requested


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_root = data_root_for("lifelong_bench", args.data_root)
    if data_root is None:
        return 2
    try:
        settings = settings_from_args(args)
        sweeps = parse_sweeps(args.sweep)
    except ValueError as error:
        print(f"lifelong_bench: {error}", file=sys.stderr)
        return 2
    from trl_lifealign.compat import quiet_third_party

    words = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/lifelong_bench.py " + " ".join(shlex.quote(a) for a in words)
    with quiet_third_party():
        _run(args, settings, sweeps, Path(data_root), command)
    return 0


def _run(args: argparse.Namespace, settings: BenchSettings, sweeps: list, data_root: Path, command: str) -> None:
    quick = args.quick or args.preset.endswith(("quick", "cpu"))
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    run_benchmark(settings, data_root=Path(data_root), eval_root=Path(args.eval_root or data_root),
                  eval_split=args.eval_split, methods=_methods(args.methods), seeds=seeds,
                  output_dir=args.output_dir, sweeps=sweeps, sweep_methods=args.sweep_methods, workers=args.workers,
                  threads=args.threads, fresh=args.fresh, report_only=args.report_only, name=args.name,
                  plots=not args.no_plots, title=args.preset if not args.quick else "tiny-quick",
                  command=command.strip(), log=lambda *parts: print(*parts, flush=True))
