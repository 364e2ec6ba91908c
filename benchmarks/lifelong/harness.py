"""Orchestration: prepare data and models, run every (method, seed) that has no stored result (in a process pool),
aggregate, and write ``<name>.md`` / ``<name>.json`` / plots. Finished runs are reused; interrupted ones resume."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from trl_lifealign.atomic import atomic_write_json, atomic_write_text

from .aggregate import METRIC_KEYS, aggregate, verdict
from .data import TaskData, fingerprint, prepare_task_data, tokenizer_corpus
from .models import FINGERPRINT_VERSION, build_tokenizer, build_warm_model, warm_model_path, warmup_texts
from .render import render_markdown, write_plots
from .runs import RESULT_FILE, run_one
from .settings import METHODS, BenchSettings, RunSpec, apply_settings, coerce_setting, plan_runs

# Settings added after stored runs exist (see _key_settings).
ADDED_SETTINGS = ("bf16_autocast",)


@dataclasses.dataclass
class Models:
    """Per seed, the folder of the model every method of that seed starts from, and which still need building."""

    dirs: dict[int, Path]
    cold: list[int]
    tokenizer_dir: Path | None = None
    warm_texts: list[str] = dataclasses.field(default_factory=list)


def prepare_models(settings: BenchSettings, data_root: Path, eval_root: Path, eval_split: str, output_dir: Path,
                   seeds: list[int], log) -> tuple[list[TaskData], Models]:
    """The tasks' data and, per seed, the starting model: the seed's warmed-up tiny Llama (built if missing) or the
    pretrained model's folder (the same for every seed)."""
    from transformers import AutoTokenizer

    if settings.model == "tiny":
        log(f"[bench] tokenizer on the train splits of {len(settings.tasks)} tasks")
        tokenizer, tokenizer_dir = build_tokenizer(output_dir, tokenizer_corpus(data_root, settings.tasks), settings)
    else:
        from trl_lifealign.pretrained import pretrained_model_path

        tokenizer_dir = pretrained_model_path(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tasks = prepare_task_data(settings, tokenizer, data_root, eval_root, eval_split, output_dir / "data")
    for task in tasks:
        log(f"[bench] {task.name}: {len(task.train)} train / {len(task.eval)} eval pairs (read "
            f"{task.train_rows_read}/{task.eval_rows_read}; skipped train {task.train_skipped or 0}, eval "
            f"{task.eval_skipped or 0})")
    if settings.model != "tiny":
        return tasks, Models(dirs=dict.fromkeys(seeds, tokenizer_dir), cold=[])
    dirs = {seed: warm_model_path(output_dir, tokenizer_dir, tasks, settings, seed) for seed in seeds}
    cold = sorted(seed for seed, path in dirs.items() if not (path / "warmup.json").is_file())
    return tasks, Models(dirs, cold, tokenizer_dir, warmup_texts(tasks, tokenizer.eos_token) if cold else [])


def _key_settings(settings: BenchSettings) -> dict:
    """The settings a run's cache key holds: a field added after a run was stored enters the key only when it is
    set away from its default, so that adding a knob keeps every stored run reusable."""
    defaults = BenchSettings(tasks=settings.tasks)
    return {k: v for k, v in dataclasses.asdict(settings).items()
            if not (k in ADDED_SETTINGS and v == getattr(defaults, k))}


def _plan_jobs(settings, specs: list[RunSpec], models: Models, tasks: list[TaskData], output_dir: Path,
               threads: int, fresh: bool) -> tuple[list[dict], list[dict]]:
    """Stored records to reuse and jobs to run; a stored run of other settings is refused unless ``fresh``."""
    payload = [{"name": t.name, "train_file": t.train_file, "eval_file": t.eval_file, "monitor_file": t.monitor_file}
               for t in tasks]
    jobs, records = [], []
    for spec in specs:
        run_settings = apply_settings(settings, dict(spec.overrides))
        key = fingerprint({"v": FINGERPRINT_VERSION, "settings": _key_settings(run_settings),
                           "method": dataclasses.asdict(METHODS[spec.method]), "seed": spec.seed,
                           "model": models.dirs[spec.seed].name,
                           "data": [(t.name, fingerprint(t.train), fingerprint(t.eval), fingerprint(t.monitor))
                                    for t in tasks]})
        run_dir = output_dir / "runs" / spec.variant / f"seed{spec.seed}"
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            record = json.loads(result_path.read_text(encoding="utf-8"))
            if record.get("fingerprint") == key:
                records.append(record)
                continue
            if not fresh:
                raise RuntimeError(f"{result_path} was produced with different settings; use another --output-dir or "
                                   "pass --fresh to re-run it")
            import shutil

            shutil.rmtree(run_dir)
        jobs.append({"fingerprint": key, "variant": spec.variant, "method": spec.method, "seed": spec.seed,
                     "overrides": dict(spec.overrides), "settings": dataclasses.asdict(run_settings),
                     "tasks": payload, "model_dir": str(models.dirs[spec.seed]), "run_dir": str(run_dir),
                     "threads": threads})
    return records, jobs


def _execute(jobs: list[dict], models: Models, settings: BenchSettings, workers: int, threads: int, log,
             done) -> None:
    """Build the cold warm models, then run the jobs: in this process, or in a spawn pool of ``workers``."""
    plain = dataclasses.asdict(settings)

    def warm_done(seed: int, stats: dict[str, float]) -> None:
        log(f"[bench] warm model seed {seed}: LM loss {stats['first_loss']:.2f} -> {stats['final_loss']:.2f} "
            f"({stats['seconds']:.0f} s)")

    warm_args = {seed: (str(models.dirs[seed]), str(models.tokenizer_dir), models.warm_texts, plain, seed, threads)
                 for seed in models.cold}
    if workers <= 1 or not jobs:
        for seed, args in warm_args.items():
            warm_done(seed, build_warm_model(*args))
        for job in jobs:
            done(run_one(job))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Any, tuple[str, Any]] = {pool.submit(build_warm_model, *a): ("warm", s)
                                               for s, a in warm_args.items()}
        for job in jobs:  # seeds already warm start at once; the others when their warm-up is done
            if job["seed"] not in warm_args:
                pending[pool.submit(run_one, job)] = ("run", job)
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in finished:
                kind, item = pending.pop(future)
                if kind == "warm":
                    warm_done(item, future.result())
                    for job in (j for j in jobs if j["seed"] == item):
                        pending[pool.submit(run_one, job)] = ("run", job)
                else:
                    done(future.result())


def run_benchmark(settings: BenchSettings, *, data_root: Path, eval_root: Path, eval_split: str, methods: list[str],
                  seeds: list[int], output_dir: Path, sweeps: list[tuple[str, list[str]]] = (),
                  sweep_methods: list[str] = ("lifealign",), workers: int = 1, threads: int | None = None,
                  fresh: bool = False, report_only: bool = False, plots: bool = True, name: str = "bench",
                  title: str = "full", command: str = "", log=print) -> dict[str, Any]:
    """Run every (method, seed) (and sweep variant), aggregate, and write <name>.md / <name>.json / plots.

    Returns the JSON payload (also written to ``output_dir/<name>.json``).
    """
    unknown = [m for m in list(methods) + list(sweep_methods) if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for key, values in sweeps:
        for value in values:
            coerce_setting(settings, key, value)  # fail before any training
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks, models = prepare_models(settings, data_root, eval_root, eval_split, output_dir, list(seeds), log)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    records, jobs = _plan_jobs(settings, plan_runs(methods, seeds, sweeps, sweep_methods), models, tasks, output_dir,
                               threads, fresh)
    missing = [{"variant": j["variant"], "seed": j["seed"]} for j in jobs] if report_only else []
    jobs = [] if report_only else jobs
    log(f"[bench] {len(records)} run(s) reused, {len(jobs)} to run ({len(models.cold)} warm-up(s) first) with "
        f"{workers} worker(s) x {threads} thread(s)" + (f"; report only, {len(missing)} missing" if missing else ""))

    def done(record: dict[str, Any]) -> None:
        records.append(record)
        metrics = record["report"]["metrics"]
        parts = " ".join(f"{k}={100 * metrics[k]:.1f}" for k in METRIC_KEYS if metrics.get(k) is not None)
        log(f"[bench] {record['variant']} seed {record['seed']}: {parts} ({record['seconds']:.0f} s)")

    _execute(jobs, models, settings, workers, threads, log, done)
    return _write_outputs(settings, records, tasks, missing, output_dir, name, title, command, workers, threads,
                          plots, started, eval_split, list(seeds), log)


def _write_outputs(settings, records, tasks, missing, output_dir, name, title, command, workers, threads, plots,
                   started, eval_split, seeds, log) -> dict[str, Any]:
    summary = aggregate(records)
    meta = {"title": title, "command": command, "tasks": list(settings.tasks), "eval_split": eval_split,
            "seeds": seeds, "missing": missing, "setup": setup_line(settings, workers, threads),
            "data_note": "Skipped rows (bad in the source or identical after fitting to the context): " + "; ".join(
                f"{t.name} train {sum(t.train_skipped.values())}, eval {sum(t.eval_skipped.values())}"
                for t in tasks)}
    payload = {"meta": meta, "settings": dataclasses.asdict(settings), "data": [t.summary() for t in tasks],
               "summary": summary, "verdict": verdict(summary),
               "runs": sorted(records, key=lambda r: (r["variant"], r["seed"])),
               "seconds_total": time.perf_counter() - started}
    if plots and summary:
        written = write_plots(summary, output_dir / ("plots" if name == "bench" else f"plots-{name}"), settings)
        if not written:
            log("[bench] plots skipped: matplotlib is not installed (pip install 'trl-lifealign[eval]')")
        payload["plots"] = [str(p.relative_to(output_dir)) for p in written]
    atomic_write_json(output_dir / f"{name}.json", payload, sort_keys=True, default=str)
    markdown = render_markdown(summary, meta)
    atomic_write_text(output_dir / f"{name}.md", markdown)
    log(markdown)
    return payload


def setup_line(settings: BenchSettings, workers: int, threads: int) -> str:
    """One sentence describing the setting, for the report."""
    if settings.model == "tiny":
        model = (f"Tiny Llama (hidden {settings.hidden_size}, {settings.num_hidden_layers} layers, vocab "
                 f"{settings.vocab_size}) warmed up {settings.warmup_steps} LM steps")
    else:
        model = f"Pretrained `{settings.model}` ({settings.dtype}), chat template `{settings.chat_template}`"
    if settings.bf16_autocast:
        model += ", trained under bf16 autocast (scored in the model's own dtype)"
    return (f"{model}; LoRA r={settings.lora_r} on all linear layers; {settings.pairs} train pairs/task, "
            f"{settings.epochs:g} epochs, batch {settings.batch_size}, lr {settings.learning_rate:g}, "
            f"β={settings.beta:g}, FPO γ={settings.focal_gamma:g}, θ={settings.energy_threshold:g}, "
            f"λ={settings.overlap_weight:g}, reference `{settings.reference}`, replay {settings.replay_fraction:g}; "
            f"prompts cut to their last {settings.max_prompt_tokens} tokens, answers to their first "
            f"{settings.max_completion_tokens}. Wall time per run with {workers} run(s) in parallel x {threads} "
            "thread(s) on this machine.")
