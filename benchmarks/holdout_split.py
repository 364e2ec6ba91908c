"""Hold out part of every task's train split, to score the benchmark on data no knob was picked on.

    python benchmarks/holdout_split.py --output-dir heldout
    python benchmarks/lifelong_bench.py --data-root heldout --eval-split heldout --methods seq-dpo,ewc-10k,multi-task

Writes ``<output-dir>/<task>/train.json`` (what remains for training) and ``heldout.json`` (at most 300 pairs, 20%
by default); the source data is read in place and never copied into the repository.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: `benchmarks` is a package there

from benchmarks.lifelong.data import DATA_ENV_VAR, data_root_for, write_holdout_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"folder with <task>/train.json (default: ${DATA_ENV_VAR} or ../shared/data/lifealign)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of each task's rows held out")
    parser.add_argument("--max-pairs", type=int, default=300, help="held-out rows per task at most")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the shuffle that picks the held-out rows")
    args = parser.parse_args(argv)
    root = data_root_for("holdout_split", args.data_root)
    if root is None:
        return 2
    try:
        counts = write_holdout_split(root, args.output_dir, args.fraction, args.max_pairs, args.seed)
    except (OSError, ValueError) as error:
        print(f"holdout_split: {error}", file=sys.stderr)
        return 2
    for task, (train, held) in counts.items():
        print(f"{task}: {train} train, {held} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
