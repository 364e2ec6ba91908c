"""LifeAlign vs sequential DPO, replay, both ablations and multi-task training on the five public LifeAlign tasks.

A thin wrapper around ``lifealign bench`` (trl_lifealign/lifelong/bench.py); every option is the command's, e.g.

    python benchmarks/lifelong_bench.py --quick --output-dir /tmp/bench-quick          # ~5 min, one seed
    python benchmarks/lifelong_bench.py --output-dir /tmp/bench-full                   # 3 seeds x 7 methods
    python benchmarks/lifelong_bench.py --methods lifealign --sweep theta=0.5,0.7,0.9,1 --sweep lambda=0,0.5,1

The data folder defaults to $LIFEALIGN_BENCH_DATA or ../shared/data/lifealign (read in place, never copied).
"""

from __future__ import annotations

import sys

from trl_lifealign.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
