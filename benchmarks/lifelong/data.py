"""The benchmark's data: the tasks' files read in place, validated by the runner's loader, fitted to the model's
context, sampled, and written as JSON Lines into the benchmark's output folder (never into the repository)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_lifealign.atomic import atomic_write_text

from .settings import BenchSettings

DATA_ENV_VAR = "LIFEALIGN_BENCH_DATA"
# hh-rlhf responses start with the speaker tag "Assistant:" on both sides; it carries no preference, only tokens.
RESPONSE_PREFIX = "Assistant:"


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_data_root() -> Path | None:
    """``$LIFEALIGN_BENCH_DATA`` or, in a checkout next to ``shared/data/lifealign``, that folder; else ``None``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data" / "lifealign"
    return candidate if candidate.is_dir() else None


def data_root_for(program: str, given: Path | None) -> Path | None:
    """``given`` or the default data folder; ``None`` after telling the user (as ``program``) how to name one."""
    root = given or default_data_root()
    if root is None:
        print(f"{program}: no data; pass --data-root (a folder with <task>/train.json) or set {DATA_ENV_VAR}",
              file=sys.stderr)
    return root


def task_file(root: Path, task: str, split: str) -> Path:
    """The file of ``task``'s ``split`` under ``root`` (``<root>/<task>/<split>.json``/``.jsonl``/``.parquet``)."""
    for suffix in (".json", ".jsonl", ".parquet"):
        path = root / task / f"{split}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"task {task!r}: no {split}.json/.jsonl/.parquet in {root / task}")


def load_task_rows(path: Path) -> tuple[list[dict[str, str]], int, dict[str, int]]:
    """Validated rows of one LifeAlign-format file via the runner's loader (bad rows skipped and counted by reason)."""
    from trl_lifealign.lifelong.data import DataSource, load_preference_data

    source = DataSource(path=str(path), columns={"query": "prompt"}, strip_response_prefix=RESPONSE_PREFIX)
    loaded = load_preference_data(source, skip_bad_rows=True)
    return [dict(r) for r in loaded.rows], loaded.total_rows, dict(loaded.skipped)


class ContextFitter:
    """Cuts texts at token boundaries so a pair fits a small context: a prompt keeps its last tokens (the latest
    turn), an answer its first. TRL would otherwise drop pairs whose prompt alone fills ``max_length`` (hh-rlhf's long
    transcripts) or keep only the start of HC3's long answers; this keeps a scored answer for every pair."""

    def __init__(self, tokenizer, max_prompt_tokens: int, max_completion_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens

    def _offsets(self, text: str):
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def prompt(self, text: str) -> str:
        offsets = self._offsets(text)
        if len(offsets) <= self.max_prompt_tokens:
            return text
        return text[offsets[-self.max_prompt_tokens][0]:].lstrip()

    def completion(self, text: str) -> str:
        offsets = self._offsets(text)
        if len(offsets) <= self.max_completion_tokens:
            return text
        return text[: offsets[self.max_completion_tokens - 1][1]]

    def row(self, row: dict[str, str]) -> dict[str, str] | None:
        """The fitted row, or ``None`` when fitting makes chosen and rejected identical."""
        out = {"prompt": self.prompt(row["prompt"].strip()), "chosen": self.completion(row["chosen"].strip()),
               "rejected": self.completion(row["rejected"].strip())}
        return None if out["chosen"] == out["rejected"] else out


@dataclass
class TaskData:
    """One task's pairs after validation, skipping, fitting and sampling, and the files the runner reads them from.

    ``train_all`` holds every usable (fitted) training pair: the warm-up corpus. ``train`` / ``eval`` are the sampled
    pairs the methods train and are scored on. ``monitor`` are training-split pairs no method trains on, which the
    forgetting budget watches: disjoint from both the training pairs and the scored dev pairs, so the matrix shows how
    far a budget tuned on them carries over. The ``*_file`` attributes hold them as JSON Lines.
    """

    name: str
    train_all: list[dict[str, str]]
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    source_train: str
    source_eval: str
    train_rows_read: int
    eval_rows_read: int
    train_skipped: dict[str, int] = field(default_factory=dict)
    eval_skipped: dict[str, int] = field(default_factory=dict)
    monitor: list[dict[str, str]] = field(default_factory=list)
    train_file: str = ""
    eval_file: str = ""
    monitor_file: str = ""

    def summary(self) -> dict[str, Any]:
        return {"task": self.name, "source_train": self.source_train, "source_eval": self.source_eval,
                "train_rows_read": self.train_rows_read, "eval_rows_read": self.eval_rows_read,
                "train_usable": len(self.train_all), "train_pairs": len(self.train), "eval_pairs": len(self.eval),
                "train_skipped": self.train_skipped, "eval_skipped": self.eval_skipped}


def _sample(rows: list[dict[str, str]], count: int | None, seed: int) -> list[dict[str, str]]:
    if count is None or count >= len(rows):
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in picked]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _fitted(path: Path, fitter: ContextFitter) -> tuple[list[dict[str, str]], int, dict[str, int]]:
    rows, read, skipped = load_task_rows(path)
    kept = []
    for row in rows:
        fitted = fitter.row(row)
        if fitted is None:
            skipped["identical after fitting"] = skipped.get("identical after fitting", 0) + 1
        else:
            kept.append(fitted)
    if not kept:
        raise ValueError(f"no usable pairs left in {path} (skipped {skipped})")
    return kept, read, skipped


def prepare_task_data(settings: BenchSettings, tokenizer, data_root: Path, eval_root: Path, eval_split: str,
                      work_dir: Path, train_split: str = "train") -> list[TaskData]:
    """Load, validate (bad rows skipped and counted), fit and sample every task's train and eval pairs.

    The samples are fixed by ``settings.data_seed``: every method and every seed sees the same pairs, so differences
    between seeds come from the model only.
    """
    fitter = ContextFitter(tokenizer, settings.max_prompt_tokens, settings.max_completion_tokens)
    tasks = []
    for index, task in enumerate(settings.tasks):
        train_path, eval_path = task_file(data_root, task, train_split), task_file(eval_root, task, eval_split)
        train_all, train_read, train_skipped = _fitted(train_path, fitter)
        eval_all, eval_read, eval_skipped = _fitted(eval_path, fitter)
        seed = settings.data_seed * 1000 + index
        train = _sample(train_all, settings.pairs, seed)
        unused = [row for row in train_all if row not in train]
        data = TaskData(name=task, train_all=train_all, train=train,
                        eval=_sample(eval_all, settings.eval_pairs, seed), source_train=str(train_path),
                        source_eval=str(eval_path), train_rows_read=train_read, eval_rows_read=eval_read,
                        train_skipped=train_skipped, eval_skipped=eval_skipped,
                        monitor=_sample(unused, settings.monitor_pairs, seed + 1))
        folder = work_dir / f"{task}-{fingerprint([data.train, data.eval, data.monitor])}"
        data.train_file, data.eval_file = str(folder / "train.jsonl"), str(folder / f"{eval_split}.jsonl")
        data.monitor_file = str(folder / "monitor.jsonl")
        if not Path(data.monitor_file).is_file():
            _write_jsonl(Path(data.train_file), data.train)
            _write_jsonl(Path(data.eval_file), data.eval)
            _write_jsonl(Path(data.monitor_file), data.monitor)
        tasks.append(data)
    return tasks


def tokenizer_corpus(data_root: Path, tasks: tuple[str, ...], split: str = "train") -> list[str]:
    """Every prompt, chosen and rejected string of the tasks' train splits (the tiny tokenizer's training corpus)."""
    texts = []
    for task in tasks:
        rows, _, _ = load_task_rows(task_file(data_root, task, split))
        for row in rows:
            texts.extend((row["prompt"], row["chosen"], row["rejected"]))
    return texts


def write_holdout_split(data_root: Path, output_dir: Path, fraction: float = 0.2, max_pairs: int = 300,
                        seed: int = 12345) -> dict[str, tuple[int, int]]:
    """Split every task's ``train.json`` under ``data_root`` into ``output_dir/<task>/train.json`` and
    ``heldout.json``: a fixed shuffle holds out ``fraction`` of the rows (at most ``max_pairs``), the rest stay for
    training, both in source order. Scoring on ``--eval-split heldout`` checks knobs picked on dev on data they were
    not picked on. Returns ``{task: (train rows, held-out rows)}``."""
    if not 0 < fraction < 1 or max_pairs < 1:
        raise ValueError(f"holdout split: fraction must be in (0, 1) and max_pairs >= 1, got {fraction}, {max_pairs}")
    counts = {}
    for task_dir in sorted(p for p in Path(data_root).iterdir() if (p / "train.json").is_file()):
        source = task_dir / "train.json"
        rows = json.loads(source.read_text(encoding="utf-8-sig"))
        if not isinstance(rows, list):
            raise ValueError(f"{source}: expected a JSON list of records")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[:min(max_pairs, int(len(rows) * fraction + 1e-9))])
        parts = {"heldout": [r for i, r in enumerate(rows) if i in held],
                 "train": [r for i, r in enumerate(rows) if i not in held]}
        for split, part in parts.items():
            atomic_write_text(Path(output_dir) / task_dir.name / f"{split}.json", json.dumps(part))
        counts[task_dir.name] = (len(parts["train"]), len(parts["heldout"]))
    if not counts:
        raise FileNotFoundError(f"holdout split: no <task>/train.json under {data_root}")
    return counts
