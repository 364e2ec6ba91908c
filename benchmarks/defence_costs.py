"""What each defence against forgetting costs, measured side by side in one process against sequential DPO.

Every method of the lifelong benchmark (``benchmarks/lifelong``) runs the same short task sequence from the same
starting model, one after another in this process (same threads, same data, same seed), through ``run_lifelong``
exactly as ``lifealign train`` would, in ``--rounds`` interleaved repetitions of the whole list (so that machine noise
hits every method alike; the medians over the rounds are reported). For each method this records:

- **s / step**: the median wall time of one optimizer step on tasks 2.. (when the defences are active), timed from
  one ``on_step_begin`` to the next by a callback, so a defence's per-step work (a penalty, a projection) is inside;
- **task s**: the median wall time of one task from 2 on (training, boundary work such as a Fisher estimate, a
  merge or a budget search, evaluation and the commit): what a defence adds once per task;
- **state**: what the method keeps between tasks, the bytes of the run directory's ``memory/`` and ``defences/``
  after the last task, also as a multiple of one LoRA adapter (so it carries over to a larger model); O-LoRA's
  frozen per-task adapters count there too (they live in ``defences/olora``).

    python benchmarks/defence_costs.py --output-dir /tmp/defence-costs                   # tiny model, 3 tasks
    python benchmarks/defence_costs.py --output-dir /tmp/costs --methods seq-dpo,ewc,olora --tasks 4 --pairs 128
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lifelong.data import data_root_for
from benchmarks.lifelong.harness import prepare_models
from benchmarks.lifelong.models import build_warm_model
from benchmarks.lifelong.runs import build_recipe
from benchmarks.lifelong.settings import METHODS, PAPER_ORDER, preset_settings
from trl_lifealign.atomic import atomic_write_json, atomic_write_text

DEFAULT_METHODS = ("seq-dpo", "replay", "lifealign", "slmc-subspace", "slmc-gpm", "averaging", "ewc", "kl-anchor",
                   "freeze", "olora", "merging", "budget")


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds between consecutive ``on_step_begin`` calls, per trainer (= per task)."""

        def __init__(self):
            self.tasks: list[list[float]] = []
            self._last = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.tasks.append([])
            self._last = None

        def on_step_begin(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self._last is not None:
                self.tasks[-1].append(now - self._last)
            self._last = now

    return StepTimer()


def _bytes_under(*folders: Path) -> int:
    return sum(f.stat().st_size for folder in folders if folder.is_dir() for f in folder.rglob("*") if f.is_file())


def measure(method: str, settings, tasks, model_dir: Path, run_dir: Path, seed: int) -> dict:
    from trl_lifealign.lifelong import LifelongConfig, run_lifelong
    from trl_lifealign.lifelong.recipe import from_dict

    payload = [{"name": t.name, "train_file": t.train_file, "eval_file": t.eval_file, "monitor_file": t.monitor_file}
               for t in tasks]
    recipe = build_recipe(METHODS[method], settings, payload, run_dir, seed)
    recipe["model"] = str(model_dir)
    timer = _step_timer()
    started = time.perf_counter()
    result = run_lifelong(from_dict(LifelongConfig, recipe), callbacks=[timer], show_progress=False)
    seconds = time.perf_counter() - started
    later_steps = [s for task in timer.tasks[1:] for s in task]
    adapter = next(run_dir.glob("tasks/*/adapter/adapter_model.safetensors"))
    return {"method": method, "seconds": seconds, "step_seconds": statistics.median(later_steps),
            "steps": len(later_steps), "task_seconds": statistics.median(t.seconds for t in result.report.tasks[1:]),
            "state_bytes": _bytes_under(run_dir / "memory", run_dir / "defences"),
            "adapter_bytes": adapter.stat().st_size, "bwt": result.report.metrics.get("bwt")}


def render(rows: list[dict], header: str) -> str:
    base = next(r for r in rows if r["method"] == "seq-dpo")
    lines = [header, "", "| method | s / step | × seq-dpo | task s | × seq-dpo | state kept | × adapter |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['method']}` | {r['step_seconds']:.3f} | {r['step_seconds'] / base['step_seconds']:.2f} | "
                     f"{r['task_seconds']:.1f} | {r['task_seconds'] / base['task_seconds']:.2f} | "
                     f"{r['state_bytes'] / 1024:.0f} KiB | {r['state_bytes'] / r['adapter_bytes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=None, help="default: ../shared/data/lifealign")
    parser.add_argument("--preset", default="tiny", help="benchmark preset (model and sizes); default tiny")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated; seq-dpo is added")
    parser.add_argument("--tasks", type=int, default=3, help="first N tasks of the paper's order (default 3)")
    parser.add_argument("--pairs", type=int, default=128, help="train pairs per task (default 128)")
    parser.add_argument("--eval-pairs", type=int, default=64, help="eval pairs per task (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    args = parser.parse_args(argv)

    import torch

    from trl_lifealign.compat import quiet_third_party

    torch.set_num_threads(args.threads)
    methods = ["seq-dpo"] + [m for m in args.methods.split(",") if m and m != "seq-dpo"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    data_root = data_root_for("defence_costs", args.data_root)
    if data_root is None:
        return 2
    settings = dataclasses.replace(preset_settings(args.preset, PAPER_ORDER[:args.tasks]), pairs=args.pairs,
                                   eval_pairs=args.eval_pairs, epochs=1.0)
    out = args.output_dir
    with quiet_third_party():
        tasks, models = prepare_models(settings, data_root, data_root, "dev", out, [args.seed], print)
        for seed in models.cold:
            build_warm_model(str(models.dirs[seed]), str(models.tokenizer_dir), models.warm_texts,
                             dataclasses.asdict(settings), seed, args.threads)
        rounds: dict[str, list[dict]] = {m: [] for m in methods}
        for round_index in range(args.rounds):  # interleaved, so that machine noise hits every method alike
            for method in methods:
                run_dir = out / "runs" / method
                if run_dir.exists():  # a fresh run: a resumed one would not time its earlier tasks
                    shutil.rmtree(run_dir)
                row = measure(method, settings, tasks, models.dirs[args.seed], run_dir, args.seed)
                rounds[method].append(row)
                print(f"[costs] round {round_index + 1} {method}: {row['step_seconds']:.3f} s/step, task "
                      f"{row['task_seconds']:.1f} s, state {row['state_bytes']} B", flush=True)
        rows = [{**runs[-1], "step_seconds": statistics.median(r["step_seconds"] for r in runs),
                 "task_seconds": statistics.median(r["task_seconds"] for r in runs),
                 "step_seconds_rounds": [r["step_seconds"] for r in runs]} for runs in rounds.values()]
    header = (f"Defence costs: preset `{args.preset}`, {args.tasks} tasks x {args.pairs} pairs x 1 epoch (batch "
              f"{settings.batch_size}), {args.eval_pairs} eval pairs per task, {args.threads} thread(s), one process, "
              f"median of {args.rounds} interleaved rounds. "
              f"Command: `python benchmarks/defence_costs.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    table = render(rows, header)
    atomic_write_text(out / "defence_costs.md", table)
    atomic_write_json(out / "defence_costs.json", rows, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
