"""Lifelong alignment methods compared side by side on the five public LifeAlign tasks (see benchmarks/lifelong/).

    python benchmarks/lifelong_bench.py --quick --output-dir /tmp/bench-quick          # one seed, a few minutes
    python benchmarks/lifelong_bench.py --output-dir /tmp/bench-full                   # the tiny model, 3 seeds
    python benchmarks/lifelong_bench.py --methods lifealign --sweep theta=0.5,0.7,0.9,1 --sweep lambda=0,0.5,1

The data folder defaults to $LIFEALIGN_BENCH_DATA or ../shared/data/lifealign (read in place, never copied).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: `benchmarks` is a package there

from benchmarks.lifelong.cli import main

if __name__ == "__main__":
    sys.exit(main())
