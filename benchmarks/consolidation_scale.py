"""SLMC consolidation at Llama-3-70B scale: ours (incremental basis) vs naive (SVD of the stacked history), one run.

Factors are shaped like rank-16 LoRA on all seven linear projections of Llama-3-70B (hidden 8192, MLP 28672, 8 KV
heads of 128, 80 layers): 207,093,760 LoRA parameters. For each history size (1 and 5 earlier tasks) a task update is
consolidated:

- ours: exactly the callback's rank-0 path (``trl_lifealign.slmc.callback.consolidate_factor``): updates =
  current - snapshot for all factors, the NaN/Inf check, then per factor Gram-based energy denoising, projection
  against the stored orthonormal basis, basis extended in place, factor = snapshot + result;
- naive: the paper's construction as the official code does it: ``torch.linalg.svd`` of the update for denoising,
  then an SVD of the stacked raw history at every boundary, projection on all its right singular vectors, history
  appended.

Prints seconds (wall, and process CPU), the ratio, the load average, and peak extra RSS (sampled every 2 ms) next to
the memory size and one task update.
Naive is slow: by default it runs on ``--naive-layers`` of the 80 layers and its time is extrapolated linearly
(every layer has the same shapes); the output says so. Pass ``--naive-layers 80`` to time it in full.

    OMP_NUM_THREADS=2 python benchmarks/consolidation_scale.py            # full size, naive on 8 layers
    python benchmarks/consolidation_scale.py --layers 4 --naive-layers 4  # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from trl_lifealign.slmc import SLMCConfig, denoise_by_energy
from trl_lifealign.slmc.callback import all_finite, consolidate_factor
from trl_lifealign.slmc.memory import LongTermMemory, ModelSpec

HIDDEN, MLP, KV, RANK = 8192, 28672, 1024, 16
PROJECTIONS = {  # name: (in_features, out_features)
    "q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV), "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP), "down_proj": (MLP, HIDDEN),
}


def factor_shapes(layers: int) -> dict[str, list[int]]:
    shapes = {}
    for layer in range(layers):
        for proj, (fan_in, fan_out) in PROJECTIONS.items():
            prefix = f"model.layers.{layer}.{proj}"
            shapes[f"{prefix}.lora_A.default.weight"] = [RANK, fan_in]
            shapes[f"{prefix}.lora_B.default.weight"] = [fan_out, RANK]
    return shapes


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the level at entry, sampled by a background thread."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def low_rank_update(shape, generator) -> torch.Tensor:
    """A task update of one factor: a few strong directions plus noise (what training produces, roughly)."""
    rows, cols = shape
    signal = torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator)
    return 1e-3 * (signal + 0.3 * torch.randn(rows, cols, generator=generator))


def build_state(shapes, earlier: int, seed: int):
    """snapshot, trained factors, and `earlier` raw past consolidated updates per factor (for naive) + our basis."""
    generator = torch.Generator().manual_seed(seed)
    snapshot, current, history = {}, {}, {}
    spec = ModelSpec(adapters={"default": {"rank": RANK, "target_modules": sorted(PROJECTIONS)}}, factors=shapes)
    memory = LongTermMemory(memory_dir=None, spec=spec)
    for name, shape in shapes.items():
        snapshot[name] = 0.01 * torch.randn(shape, generator=generator)
        current[name] = snapshot[name] + low_rank_update(shape, generator)
        past = torch.stack([low_rank_update(shape, generator).reshape(-1) for _ in range(earlier)])
        history[name] = list(past)
        basis = torch.linalg.qr(past.T.double()).Q.T.float().contiguous()  # orthonormal rows, same span
        for row in basis:
            memory.append_direction(name, row)
    return snapshot, current, history, memory


def ours(snapshot, current, memory, theta, lam):
    """The callback's rank-0 path: raw updates, the all-factors finiteness check, then ``consolidate_factor``."""
    config = SLMCConfig(energy_threshold=theta, overlap_weight=lam)
    updates = {name: current[name] - snapshot[name] for name in current}
    bad = [name for name, update in updates.items() if not all_finite(update)]
    if bad:
        raise ValueError(f"non-finite update {bad[0]}")
    for name in current:
        # the new factor value replaces the raw update (bounded memory), then is written back into the factor
        updates[name], _, _ = consolidate_factor(memory, name, updates[name], snapshot[name], config)
        current[name] = updates.pop(name)


def naive(snapshot, current, history, names, theta, lam):
    for name in names:
        update = current[name] - snapshot[name]
        u, s, vt = torch.linalg.svd(update, full_matrices=False)
        energy = s.pow(2)
        share = torch.cumsum(energy, 0) / energy.sum()
        k = int(torch.nonzero(share >= theta)[0]) + 1 if theta < 1 else len(s)
        a = ((u[:, :k] * s[:k]) @ vt[:k]).reshape(-1)
        _, sh, vh = torch.linalg.svd(torch.stack(history[name]), full_matrices=False)
        vh = vh[sh > 1e-6 * sh.max()]
        beta = a - (1 - lam) * (vh.T @ (vh @ a))
        history[name].append(beta)
        current[name] = snapshot[name] + beta.reshape(update.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--naive-layers", type=int, default=8, help="layers timed for naive (extrapolated to --layers)")
    parser.add_argument("--earlier", type=int, nargs="+", default=[1, 5], help="numbers of earlier tasks")
    parser.add_argument("--theta", type=float, default=0.9)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # other jobs on the machine slow both variants alike (they run interleaved)
    shapes = factor_shapes(args.layers)
    numel = sum(a * b for a, b in shapes.values())
    update_bytes = numel * 4
    print(f"Llama-3-70B-shaped LoRA r={RANK} on {len(PROJECTIONS)} projections x {args.layers} layers: "
          f"{len(shapes)} factors, {numel:,} parameters, one fp32 task update = {update_bytes / 2**30:.2f} GiB; "
          f"torch threads {args.threads}")
    # Warm up kernels outside the timed regions.
    denoise_by_energy(torch.randn(RANK, 64), 0.9)
    torch.linalg.svd(torch.randn(RANK, 64), full_matrices=False)
    rows, cpu = [], []
    for earlier in args.earlier:
        snapshot, current, history, memory = build_state(shapes, earlier, seed=earlier)
        naive_current = dict(current)
        memory_bytes = memory.ram_bytes
        with PeakRss() as rss:
            started, cpu_started = time.perf_counter(), time.process_time()
            ours(snapshot, current, memory, args.theta, args.lam)
            ours_seconds = time.perf_counter() - started
            ours_cpu = time.process_time() - cpu_started
        ours_extra = rss.extra
        naive_names = [n for n in shapes if int(n.split(".")[2]) < args.naive_layers]
        naive_numel = sum(a * b for n in naive_names for a, b in [shapes[n]])
        with PeakRss() as rss:
            started, cpu_started = time.perf_counter(), time.process_time()
            naive(snapshot, naive_current, history, naive_names, args.theta, args.lam)
            naive_measured = time.perf_counter() - started
            naive_cpu = (time.process_time() - cpu_started) * numel / naive_numel
        naive_seconds = naive_measured * numel / naive_numel
        worst = max(
            float((current[n] - naive_current[n]).norm() / (naive_current[n] - snapshot[n]).norm()) for n in naive_names
        )
        cpu.append((ours_cpu, naive_cpu))
        rows.append((earlier, ours_seconds, naive_seconds, naive_measured, ours_extra, memory_bytes, memory.ram_bytes,
                     update_bytes, worst, len(naive_names) == len(shapes)))
        del snapshot, current, history, memory, naive_current
    print()
    header = (f"{'earlier':>7} | {'ours s':>7} | {'naive s':>8} | {'speed-up':>8} | {'ours peak extra RSS':>19} | "
              f"{'memory before/after':>19} | {'budget mem+2*upd':>16} | {'max rel diff':>12}")
    print(header)
    print("-" * len(header))
    for earlier, ours_s, naive_s, _naive_m, extra, mem_before, mem_after, upd, worst, full in rows:
        naive_label = f"{naive_s:7.1f}{'' if full else '*'}"
        print(f"{earlier:>7} | {ours_s:7.2f} | {naive_label:>8} | {naive_s / ours_s:7.1f}x | "
              f"{extra / 2**30:15.2f} GiB | "
              f"{mem_before / 2**30:7.2f}/{mem_after / 2**30:5.2f} GiB | {(mem_after + 2 * upd) / 2**30:12.2f} GiB | "
              f"{worst:12.1e}")
    print("CPU seconds of the process (less sensitive to other jobs than wall time): " + ", ".join(
        f"{row[0]} earlier: ours {ours_c:.2f} s, naive {naive_c:.1f} s ({naive_c / ours_c:.1f}x)"
        for row, (ours_c, naive_c) in zip(rows, cpu)))
    if not all(row[-1] for row in rows):
        print(f"* naive timed on {args.naive_layers} of {args.layers} layers ({rows[0][3]:.1f}s for "
              f"{args.earlier[0]} earlier) and extrapolated linearly (all layers have the same shapes).")
    print(f"peak RSS of the process: {rss_peak_process() / 2**30:.2f} GiB")
    print("load average (1/5/15 min) at start {} and end {}; {} CPUs".format(
        "/".join(f"{x:.2f}" for x in load_at_start), "/".join(f"{x:.2f}" for x in os.getloadavg()), os.cpu_count()))


def rss_peak_process() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
