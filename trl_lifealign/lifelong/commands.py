"""`lifealign train RECIPE.yaml`, `lifealign report RUN_DIR` and `lifealign demo` (heavy imports inside handlers)."""

from __future__ import annotations

import argparse
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from .recipe import RecipeError, load_recipe

    try:
        config = load_recipe(args.recipe)
    except (RecipeError, FileNotFoundError) as error:
        print(f"lifealign train: {error}", file=sys.stderr)
        return 2
    if args.output_dir:
        config.output_dir = args.output_dir
    from .runner import run_lifelong

    result = run_lifelong(config)
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"done in {result.seconds:.1f} s: Last {fmt(m['last'])}  AP {fmt(m['ap'])}  BWT {fmt(m['bwt'])}  "
              f"FWT {fmt(m['fwt'])}\nreport: {result.run_dir / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import rerender

    try:
        written = rerender(args.run_dir)
    except FileNotFoundError as error:
        print(f"lifealign report: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .demo import format_comparison, run_demo

    results = run_demo(args.output_dir, train_per_task=args.pairs, epochs=args.epochs)
    print(format_comparison(results))
    return 0


def add_commands(subparsers) -> None:
    """Register `train`, `report` and `demo` on the `lifealign` command line."""
    train = subparsers.add_parser("train", help="run (or resume) a lifelong alignment recipe YAML",
                                  description="Run the task sequence of RECIPE (resumes an interrupted run in the "
                                  "same output_dir). Works under `accelerate launch` (DDP, DeepSpeed ZeRO-3).")
    train.add_argument("recipe", help="recipe YAML (see recipes/lifelong/)")
    train.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    train.set_defaults(func=_train)

    report = subparsers.add_parser("report", help="re-render report.md and the plots of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    demo = subparsers.add_parser("demo", help="offline demo: sequential DPO vs LifeAlign on conflicting toy tasks")
    demo.add_argument("--output-dir", default="lifealign-demo", help="where runs, reports and plots go")
    demo.add_argument("--pairs", type=int, default=24, help="training pairs per task")
    demo.add_argument("--epochs", type=float, default=3.0, help="epochs per task")
    demo.set_defaults(func=_demo)
