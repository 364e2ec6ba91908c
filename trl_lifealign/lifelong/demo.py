"""`lifealign demo`: a fully offline lifelong-alignment run on synthetic tasks whose preferences conflict.

It builds a tiny Llama and a tokenizer (trl_lifealign.tiny), generates three preference tasks over the same questions
(prefer concise answers, then polite ones, then detailed ones: the third undoes the first), and runs the sequence
twice: sequential DPO (FPO with γ=0, no consolidation) and LifeAlign (FPO γ=2 + SLMC). It prints both accuracy
matrices and Last / AP / BWT / FWT side by side, and writes each run's report and plots.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

SUBJECTS = ["the sky", "a cat", "the sea", "a tree", "the moon", "a river", "bread", "a clock", "snow", "a bird",
            "the sun", "a book", "rain", "a train", "coffee", "a garden", "the wind", "a bridge", "honey", "a lamp"]
FACTS = ["is blue", "has four legs", "is salty", "grows leaves", "shines at night", "flows downhill", "is baked",
         "tells time", "is cold", "can fly", "is hot", "has pages", "falls down", "runs on rails", "is bitter",
         "has flowers", "moves air", "spans water", "is sweet", "gives light"]
DETAILS = ["as everyone can see", "in most cases", "according to many people", "which is well known",
           "and that is worth noting", "for several reasons"]

DEMO_TASKS = ("concise", "polite", "detailed")


def _answers(rng: random.Random, subject: str, fact: str) -> dict[str, str]:
    core = f"{subject.capitalize()} {fact}."
    extra = " ".join(f"{subject.capitalize()} {fact} {d}." for d in rng.sample(DETAILS, 3))
    return {
        "short": core,
        "long": f"{core} {extra}",
        "polite": f"Thank you for asking, kindly note that {subject} {fact}.",
        "rude": f"Obviously {subject} {fact}, stop asking.",
    }


def make_demo_tasks(train_per_task: int = 24, eval_per_task: int = 12, seed: int = 0) -> dict[str, dict[str, list]]:
    """Three conflicting synthetic preference tasks: {name: {"train": rows, "eval": rows}} (prompt/chosen/rejected).

    concise: short ≻ long; polite: polite ≻ rude; detailed: long ≻ short (the opposite of concise).
    Train and eval prompts are disjoint questions built from `SUBJECTS` × `FACTS`.
    """
    rng = random.Random(seed)
    questions = [(s, f) for s in SUBJECTS for f in FACTS]
    rng.shuffle(questions)
    needed = train_per_task + eval_per_task
    if 3 * needed > len(questions):
        raise ValueError(f"at most {len(questions) // 3} rows per task")
    tasks: dict[str, dict[str, list]] = {}
    for task_index, name in enumerate(DEMO_TASKS):
        block = questions[task_index * needed:(task_index + 1) * needed]
        rows = []
        for subject, fact in block:
            answers = _answers(rng, subject, fact)
            prompt = f"Question: is it true that {subject} {fact}? Answer:"
            chosen, rejected = {"concise": ("short", "long"), "polite": ("polite", "rude"),
                                "detailed": ("long", "short")}[name]
            rows.append({"prompt": prompt, "chosen": " " + answers[chosen], "rejected": " " + answers[rejected]})
        tasks[name] = {"train": rows[:train_per_task], "eval": rows[train_per_task:]}
    return tasks


def write_demo_data(directory: str | Path, train_per_task: int = 24, eval_per_task: int = 12, seed: int = 0,
                    query_column: bool = True) -> dict[str, dict[str, Path]]:
    """Write the demo tasks as JSON files (`query`/`chosen`/`rejected`, like the paper's files) under `directory`."""
    directory = Path(directory)
    paths: dict[str, dict[str, Path]] = {}
    for name, splits in make_demo_tasks(train_per_task, eval_per_task, seed).items():
        paths[name] = {}
        for split, rows in splits.items():
            path = directory / name / f"{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            if query_column:
                rows = [{"query": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
            path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
            paths[name][split] = path
    return paths


def demo_texts(tasks: dict[str, dict[str, list]]) -> list[str]:
    return [row[k] for splits in tasks.values() for rows in splits.values() for row in rows for k in row]


def demo_config(output_dir: str | Path, data_paths: dict[str, dict[str, Path]], method: str = "lifealign",
                epochs: float = 3.0, **overrides: Any):
    """The demo's `LifelongConfig` for `method` "lifealign" (FPO γ=2 + SLMC) or "dpo" (γ=0, no consolidation)."""
    from .data import DataSource
    from .recipe import LifelongConfig, MemorySettings, TaskSpec

    if method not in ("lifealign", "dpo"):
        raise ValueError(f"method must be 'lifealign' or 'dpo', got {method!r}")
    columns = {"query": "prompt"}
    tasks = [TaskSpec(name=name, train=DataSource(path=str(paths["train"]), columns=columns),
                      eval=DataSource(path=str(paths["eval"]), columns=columns)) for name, paths in data_paths.items()]
    training = {"learning_rate": 1e-2, "num_train_epochs": epochs, "per_device_train_batch_size": 8, "beta": 0.1,
                "focal_gamma": 2.0 if method == "lifealign" else 0.0, "max_length": 96, "logging_steps": 50,
                "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True}
    values: dict[str, Any] = dict(output_dir=str(output_dir), tasks=tasks, training=training,
                                  memory=MemorySettings(enabled=method == "lifealign"), seed=0)
    values.update(overrides)
    return LifelongConfig(**values)


def run_demo(output_dir: str | Path, train_per_task: int = 24, eval_per_task: int = 12, epochs: float = 3.0,
             quiet: bool = False) -> dict[str, Any]:
    """Run both methods on the demo tasks; returns {"dpo": LifelongResult, "lifealign": LifelongResult, "seconds"}."""
    from trl_lifealign.tiny import build_tiny_llama, train_tokenizer

    from .runner import run_lifelong

    started = time.perf_counter()
    output_dir = Path(output_dir)
    tasks = make_demo_tasks(train_per_task, eval_per_task)
    data_paths = write_demo_data(output_dir / "data", train_per_task, eval_per_task)
    tokenizer = train_tokenizer(demo_texts(tasks), vocab_size=400)
    results = {}
    for method in ("dpo", "lifealign"):
        model = build_tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, seed=0)
        config = demo_config(output_dir / method, data_paths, method, epochs)
        if not quiet:
            print(f"== {method}: {' -> '.join(tasks)} ({train_per_task} pairs per task, {epochs:g} epochs)")
        results[method] = run_lifelong(config, model=model, tokenizer=tokenizer)
    results["seconds"] = time.perf_counter() - started
    return results


def format_comparison(results: dict[str, Any]) -> str:
    """Both accuracy matrices and Last / AP / BWT / FWT side by side."""
    from .report import matrix_markdown

    lines = []
    for method, title in (("dpo", "Sequential DPO"), ("lifealign", "LifeAlign (FPO + SLMC)")):
        result = results[method]
        lines += [f"{title}: preference accuracy after each task (rows) on each task's eval set (columns)",
                  matrix_markdown(result.matrix, result.task_names, result.eval_names, result.initial_row), ""]
    lines.append("| metric | Sequential DPO | LifeAlign |")
    lines.append("|---|---|---|")
    for key, label in (("last", "Last"), ("ap", "AP"), ("bwt", "BWT"), ("fwt", "FWT")):
        values = [results[m].metrics[key] for m in ("dpo", "lifealign")]
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |")
    lines.append("")
    for method in ("dpo", "lifealign"):
        lines.append(f"{method}: report {results[method].run_dir / 'report.md'}, plots "
                     f"{results[method].run_dir / 'matrix_accuracy.png'}, "
                     f"{results[method].run_dir / 'accuracy_curves.png'}")
    lines.append(f"total wall time: {results['seconds']:.1f} s")
    return "\n".join(lines)
