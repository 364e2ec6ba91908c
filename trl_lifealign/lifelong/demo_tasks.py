"""The demo's data and settings: three synthetic preference tasks whose preferences conflict (concise answers, then
polite ones, then detailed ones: the third undoes the first), written like the paper's files, and the demo recipe.
Shared by the tiny demo and the SmolLM2 demo."""

from __future__ import annotations

import json
import random
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


def make_demo_tasks(train_per_task: int = 24, eval_per_task: int = 12, seed: int = 0,
                    names: tuple[str, ...] = DEMO_TASKS) -> dict[str, dict[str, list]]:
    """Conflicting synthetic preference tasks: {name: {"train": rows, "eval": rows}} (prompt/chosen/rejected).

    concise: short ≻ long; polite: polite ≻ rude; detailed: long ≻ short (the opposite of concise). ``names`` picks
    a subsequence of `DEMO_TASKS` (each task keeps its own questions and answers whichever others are picked).
    Train and eval prompts are disjoint questions built from `SUBJECTS` × `FACTS`.
    """
    if not names or any(name not in DEMO_TASKS for name in names) or len(set(names)) != len(names):
        raise ValueError(f"names must be distinct demo tasks out of {DEMO_TASKS}, got {names!r}")
    rng = random.Random(seed)
    questions = [(s, f) for s in SUBJECTS for f in FACTS]
    rng.shuffle(questions)
    needed = train_per_task + eval_per_task
    if 3 * needed > len(questions):
        from ..errors import LifeAlignError

        raise LifeAlignError(f"the demo has {len(questions) // 3} questions per task: at most "
                             f"{len(questions) // 3 - eval_per_task} training pairs (--pairs)")
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
    return {name: tasks[name] for name in names}


def write_demo_data(directory: str | Path, train_per_task: int = 24, eval_per_task: int = 12, seed: int = 0,
                    query_column: bool = True, names: tuple[str, ...] = DEMO_TASKS) -> dict[str, dict[str, Path]]:
    """Write the demo tasks as JSON files (`query`/`chosen`/`rejected`, like the paper's files) under `directory`."""
    directory = Path(directory)
    paths: dict[str, dict[str, Path]] = {}
    for name, splits in make_demo_tasks(train_per_task, eval_per_task, seed, names).items():
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
    """The demo's `LifelongConfig` for `method` "lifealign" (FPO γ=2 + SLMC) or "dpo" (γ=0, no consolidation).

    fp32 and no activation checkpointing: on a CPU, bf16 autocast and recomputation only cost time for a tiny model.
    """
    from .config import LifelongConfig, MemorySettings, TaskSpec
    from .data import DataSource

    if method not in ("lifealign", "dpo"):
        raise ValueError(f"method must be 'lifealign' or 'dpo', got {method!r}")
    columns = {"query": "prompt"}
    tasks = [TaskSpec(name=name, train=DataSource(path=str(paths["train"]), columns=columns),
                      eval=DataSource(path=str(paths["eval"]), columns=columns)) for name, paths in data_paths.items()]
    training = {"learning_rate": 1e-2, "num_train_epochs": epochs, "per_device_train_batch_size": 8, "beta": 0.1,
                "focal_gamma": 2.0 if method == "lifealign" else 0.0, "max_length": 96, "logging_steps": 50,
                "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "dataloader_num_workers": 0,
                "disable_tqdm": True}
    values: dict[str, Any] = dict(output_dir=str(output_dir), tasks=tasks, training=training, chat_template="never",
                                  memory=MemorySettings(enabled=method == "lifealign"), seed=0)
    values.update(overrides)
    return LifelongConfig(**values)


DEMO_MARKER = ".lifealign-demo"


def prepare_demo_dir(output_dir: Path) -> None:
    """Start from an empty demo folder: a previous demo there is replaced; any other non-empty folder is refused (the
    demo never deletes what it did not create)."""
    import shutil

    from ..errors import LifeAlignError

    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / DEMO_MARKER).is_file():
            raise LifeAlignError(f"{output_dir} is not empty and holds no earlier demo; pick another --output-dir")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / DEMO_MARKER).write_text("written by `lifealign demo`; the next demo here replaces this folder\n")
