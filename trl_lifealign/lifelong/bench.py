"""``lifealign bench``: LifeAlign against sequential DPO, replay, both ablations and multi-task training.

The benchmark runs the lifelong runner (``run_lifelong``) once per (method, seed) on real preference tasks read in
place (default: the five public LifeAlign tasks in the paper's order), with a tiny Llama-architecture model so that the
whole comparison fits a 2-core CPU. Every method starts from the same warmed-up model of its seed, trains on the same
pairs with the same optimiser settings and is scored by the runner's evaluation matrix (preference accuracy against
the initial model pi_0). The result is aggregated over seeds (mean +- std) into tables shaped like the paper's Table 1
(methods) and Table 2 (FPO / SLMC ablation), a JSON file and plots.

Runs are resumable: a finished (method, seed) run is stored with a fingerprint of everything that determines it and is
reused when the same command is run again; a changed setting refuses to mix results unless ``--fresh`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_dir, atomic_write_json, atomic_write_text

# The paper's default order without Capybara-Preferences (absent from the public data snapshot).
PAPER_ORDER = ("HC3", "hh-rlhf-harmless-base", "hh-rlhf-helpful-base", "safe-rlhf", "TruthfulQA")
SHORT_TASK_NAMES = {
    "HC3": "HC3",
    "hh-rlhf-harmless-base": "harmless",
    "hh-rlhf-helpful-base": "helpful",
    "safe-rlhf": "safe",
    "TruthfulQA": "TruthQA",
}
DATA_ENV_VAR = "LIFEALIGN_BENCH_DATA"
FINGERPRINT_VERSION = 2
RESULT_FILE = "bench_run.json"


# ----------------------------------------------------------------------------------------------------------------------
# Methods and settings
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchMethod:
    """One compared method: which LifeAlign parts it switches on.

    ``fpo`` uses the focal exponent of the settings (``focal_gamma``), otherwise the loss is plain DPO (gamma = 0);
    ``consolidation`` runs SLMC at every task boundary; ``replay`` mixes the replay buffer into later tasks;
    ``multi_task`` trains one stage on the union of all tasks (the upper bound).
    """

    name: str
    label: str
    fpo: bool = False
    consolidation: bool = False
    replay: bool = False
    multi_task: bool = False


METHODS: dict[str, BenchMethod] = {
    m.name: m
    for m in (
        BenchMethod("seq-dpo", "Sequential DPO"),
        BenchMethod("replay", "Replay (ER 20%)", replay=True),
        BenchMethod("fpo", "FPO only", fpo=True),
        BenchMethod("slmc", "SLMC only", consolidation=True),
        BenchMethod("lifealign", "LifeAlign (FPO + SLMC)", fpo=True, consolidation=True),
        BenchMethod("lifealign-replay", "LifeAlign + replay", fpo=True, consolidation=True, replay=True),
        BenchMethod("multi-task", "Multi-task (upper bound)", multi_task=True),
    )
}


@dataclass
class BenchSettings:
    """Everything shared by all methods of one benchmark run (model, data sizes, optimisation, LifeAlign knobs)."""

    # data
    tasks: tuple[str, ...] = PAPER_ORDER
    data_seed: int = 0
    pairs: int = 256
    eval_pairs: int | None = None  # None: every usable pair of the eval split
    max_prompt_tokens: int = 48
    max_completion_tokens: int = 48
    # tiny model and tokenizer
    vocab_size: int = 1024
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # causal-LM warm-up shared by every method of a seed
    warmup_steps: int = 300
    warmup_batch_size: int = 16
    warmup_learning_rate: float = 2e-3
    # LoRA (all linear layers)
    lora_r: int = 8
    lora_alpha: int = 16
    # preference optimisation
    learning_rate: float = 2e-3
    epochs: float = 2.0
    batch_size: int = 8
    beta: float = 0.1
    focal_gamma: float = 2.0
    reference: str = "previous_task"
    optimizer: str = "reset"
    lr_scheduler: str = "linear"
    # SLMC
    energy_threshold: float = 0.9
    overlap_weight: float = 0.5
    # replay
    replay_fraction: float = 0.2
    replay_capacity: int = 3000

    @property
    def max_length(self) -> int:
        # +1 for the EOS TRL appends to each completion.
        return self.max_prompt_tokens + self.max_completion_tokens + 1


# ``--set`` / ``--sweep`` keys: short names used in the paper's notation map to settings fields.
SETTING_ALIASES = {"theta": "energy_threshold", "lambda": "overlap_weight", "gamma": "focal_gamma",
                   "lr": "learning_rate"}
CHOICES = {"reference": ("base", "previous_task"), "optimizer": ("reset", "carry"),
           "lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup")}


def _coerce_setting(settings: BenchSettings, key: str, raw: str) -> tuple[str, Any]:
    name = SETTING_ALIASES.get(key, key)
    fields = {f.name: f for f in dataclasses.fields(BenchSettings)}
    if name not in fields or name == "tasks":
        allowed = sorted(set(fields) - {"tasks"} | set(SETTING_ALIASES))
        raise ValueError(f"unknown setting {key!r}; known settings: {', '.join(allowed)}")
    current = getattr(settings, name)
    try:
        if name == "eval_pairs" and raw.lower() in ("none", "all"):
            value: Any = None
        elif isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, int) or name == "eval_pairs":
            value = int(raw)
        elif isinstance(current, float):
            value = float(raw)
        else:
            value = raw
    except ValueError as error:
        raise ValueError(f"setting {key!r}: cannot read {raw!r} as {type(current).__name__}") from error
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"setting {name!r} must be one of {CHOICES[name]}, got {raw!r}")
    return name, value


def apply_settings(settings: BenchSettings, assignments: dict[str, str]) -> BenchSettings:
    """A copy of ``settings`` with ``{"key": "raw value"}`` applied (keys may use the aliases theta, lambda, ...)."""
    changes = dict(_coerce_setting(settings, key, raw) for key, raw in assignments.items())
    return dataclasses.replace(settings, **changes)


def quick_settings(settings: BenchSettings) -> BenchSettings:
    """The ``--quick`` sizes: fewer pairs, fewer eval pairs and a shorter warm-up (one seed is chosen by the CLI)."""
    return dataclasses.replace(settings, pairs=min(settings.pairs, 128), eval_pairs=64, warmup_steps=150)


@dataclass(frozen=True)
class RunSpec:
    """One (method, seed) run, possibly a sweep variant with settings overridden."""

    method: str
    seed: int
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def variant(self) -> str:
        if not self.overrides:
            return self.method
        return self.method + "@" + ",".join(f"{k}={v}" for k, v in self.overrides)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def default_data_root() -> Path | None:
    """``$LIFEALIGN_BENCH_DATA`` or, in a checkout next to ``shared/data/lifealign``, that folder; else ``None``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data" / "lifealign"
    return candidate if candidate.is_dir() else None


def task_file(root: Path, task: str, split: str) -> Path:
    """The file of ``task``'s ``split`` under ``root`` (``<root>/<task>/<split>.json``/``.jsonl``/``.parquet``)."""
    for suffix in (".json", ".jsonl", ".parquet"):
        path = root / task / f"{split}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"task {task!r}: no {split}.json/.jsonl/.parquet in {root / task}")


# hh-rlhf responses start with the speaker tag "Assistant:" on both sides; it carries no preference, only tokens.
RESPONSE_PREFIX = "Assistant:"


@dataclass
class TaskData:
    """One task's pairs after validation, skipping, truncation and sampling, and the files the runner reads them from.

    ``train_all`` holds every usable (truncated) training pair: the warm-up corpus. ``train`` / ``eval`` are the
    sampled pairs the methods train and are scored on; ``train_file`` / ``eval_file`` hold them as JSON Lines.
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
    train_file: str = ""
    eval_file: str = ""

    def summary(self) -> dict[str, Any]:
        return {"task": self.name, "source_train": self.source_train, "source_eval": self.source_eval,
                "train_rows_read": self.train_rows_read, "eval_rows_read": self.eval_rows_read,
                "train_usable": len(self.train_all), "train_pairs": len(self.train), "eval_pairs": len(self.eval),
                "train_skipped": self.train_skipped, "eval_skipped": self.eval_skipped}


def load_task_rows(path: Path) -> tuple[list[dict[str, str]], int, dict[str, int]]:
    """Validated rows of one LifeAlign-format file via the runner's loader (bad rows skipped and counted by reason)."""
    from trl_lifealign.lifelong.data import DataSource, load_preference_data

    source = DataSource(path=str(path), columns={"query": "prompt"}, strip_response_prefix=RESPONSE_PREFIX)
    loaded = load_preference_data(source, skip_bad_rows=True)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in loaded.rows]
    return rows, loaded.total_rows, dict(loaded.skipped)


class Truncator:
    """Cuts texts at token boundaries: a prompt keeps its last tokens (the latest turn), a completion its first.

    TRL truncates prompt + completion from the end and drops pairs whose prompt alone fills ``max_length``; with
    hh-rlhf's long multi-turn prompts and HC3's long answers that would leave most pairs without a scored answer.
    """

    def __init__(self, tokenizer, max_prompt_tokens: int, max_completion_tokens: int):
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_completion_tokens = max_completion_tokens

    def _offsets(self, text: str):
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def prompt(self, text: str) -> str:
        offsets = self._offsets(text)
        keep = self.max_prompt_tokens - 1  # one token left for the newline that ends the prompt
        if len(offsets) <= keep:
            return text
        return text[offsets[-keep][0]:].lstrip()

    def completion(self, text: str) -> str:
        offsets = self._offsets(text)
        if len(offsets) <= self.max_completion_tokens:
            return text
        return text[: offsets[self.max_completion_tokens - 1][1]]

    def row(self, row: dict[str, str]) -> dict[str, str] | None:
        """The truncated row, or ``None`` when truncation makes chosen and rejected identical.

        The prompt ends in a newline and the answers start without whitespace, so that TRL (which tokenizes prompt and
        answer apart) and the evaluation (which tokenizes them joined) cut the tokens at the same place.
        """
        prompt = self.prompt(row["prompt"].strip())
        out = {"prompt": prompt + "\n", "chosen": self.completion(row["chosen"].strip()),
               "rejected": self.completion(row["rejected"].strip())}
        return None if out["chosen"] == out["rejected"] else out


def _sample(rows: list[dict[str, str]], count: int | None, seed: int) -> list[dict[str, str]]:
    if count is None or count >= len(rows):
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in picked]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def prepare_task_data(
    settings: BenchSettings,
    tokenizer,
    data_root: Path,
    eval_root: Path,
    eval_split: str,
    work_dir: Path,
    train_split: str = "train",
) -> list[TaskData]:
    """Load, validate (bad rows skipped and counted), truncate and sample every task's train and eval pairs.

    The sources are read in place; the truncated samples the runner trains and scores on are written as JSON Lines
    under ``work_dir`` (the benchmark's output folder, never the repository). Pairs that truncation makes identical
    are skipped and counted as ``identical after truncation``. The samples are fixed by ``settings.data_seed``:
    every method and every seed sees the same pairs, so differences between seeds come from the model only.
    """
    truncator = Truncator(tokenizer, settings.max_prompt_tokens, settings.max_completion_tokens)
    tasks = []
    for index, task in enumerate(settings.tasks):
        train_path, eval_path = task_file(data_root, task, train_split), task_file(eval_root, task, eval_split)
        splits = {}
        for role, path in (("train", train_path), ("eval", eval_path)):
            rows, read, skipped = load_task_rows(path)
            kept = []
            for row in rows:
                cut = truncator.row(row)
                if cut is None:
                    skipped["identical after truncation"] = skipped.get("identical after truncation", 0) + 1
                else:
                    kept.append(cut)
            if not kept:
                raise ValueError(f"task {task!r}: no usable pairs left in {path} (skipped {skipped})")
            count = settings.pairs if role == "train" else settings.eval_pairs
            splits[role] = (kept, _sample(kept, count, settings.data_seed * 1000 + index), read, skipped)
        data = TaskData(name=task, train_all=splits["train"][0], train=splits["train"][1], eval=splits["eval"][1],
                        source_train=str(train_path), source_eval=str(eval_path),
                        train_rows_read=splits["train"][2], eval_rows_read=splits["eval"][2],
                        train_skipped=splits["train"][3], eval_skipped=splits["eval"][3])
        key = _fingerprint([data.train, data.eval])
        data.train_file = str(work_dir / f"{task}-{key}" / "train.jsonl")
        data.eval_file = str(work_dir / f"{task}-{key}" / f"{eval_split}.jsonl")
        if not Path(data.eval_file).is_file():
            _write_jsonl(Path(data.train_file), data.train)
            _write_jsonl(Path(data.eval_file), data.eval)
        tasks.append(data)
    return tasks


def tokenizer_corpus(data_root: Path, tasks: Sequence[str], split: str = "train") -> list[str]:
    """Every prompt, chosen and rejected string of the tasks' train splits (the tokenizer's training corpus)."""
    texts = []
    for task in tasks:
        rows, _, _ = load_task_rows(task_file(data_root, task, split))
        for row in rows:
            texts.extend((row["prompt"], row["chosen"], row["rejected"]))
    return texts


# ----------------------------------------------------------------------------------------------------------------------
# Model: tokenizer, tiny Llama, shared warm-up (cached per seed)
# ----------------------------------------------------------------------------------------------------------------------


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_tokenizer(output_dir: Path, corpus: list[str], settings: BenchSettings):
    """Train (or load the cached) BPE tokenizer on the train splits."""
    from transformers import AutoTokenizer

    from trl_lifealign.tiny import train_tokenizer

    key = _fingerprint({"v": FINGERPRINT_VERSION, "vocab": settings.vocab_size, "tasks": settings.tasks,
                        "corpus": len(corpus), "chars": sum(len(t) for t in corpus)})
    path = output_dir / "cache" / f"tokenizer-{key}"
    if not path.is_dir():
        # The limit only feeds a warning: a prompt and its answer tokenized jointly can be a token longer than apart.
        tokenizer = train_tokenizer(corpus, vocab_size=settings.vocab_size, model_max_length=2 * settings.max_length)
        atomic_write_dir(path, tokenizer.save_pretrained)
    return AutoTokenizer.from_pretrained(path), path


def _warmup_texts(tasks: list[TaskData], tokenizer) -> list[str]:
    texts = []
    for task in tasks:
        for row in task.train_all:
            texts.append(row["prompt"] + row["chosen"] + tokenizer.eos_token)
            texts.append(row["prompt"] + row["rejected"] + tokenizer.eos_token)
    return texts


def warm_up_model(model, tokenizer, texts: list[str], settings: BenchSettings, seed: int) -> dict[str, float]:
    """Plain causal-LM training of the whole tiny model on ``texts`` (prompt + chosen / prompt + rejected).

    This is the "pre-trained model" every method of a seed starts from: without it the random model's log-probs are
    noise and preference learning has nothing to build on. Chosen and rejected are both used so the warm model has no
    built-in preference.
    """
    import torch

    generator = random.Random(seed)
    encoded = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=settings.max_length)["input_ids"]
    encoded = [ids for ids in encoded if len(ids) > 1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.warmup_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.0, 1 - step / max(1, settings.warmup_steps))
    )
    model.train()
    losses = []
    order: list[int] = []
    for _ in range(settings.warmup_steps):
        if len(order) < settings.warmup_batch_size:
            extra = list(range(len(encoded)))
            generator.shuffle(extra)
            order.extend(extra)
        batch = [encoded[i] for i in order[: settings.warmup_batch_size]]
        del order[: settings.warmup_batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return {"first_loss": losses[0] if losses else float("nan"), "final_loss": sum(tail) / max(1, len(tail))}


def warm_model_path(output_dir: Path, tokenizer_dir: Path, tasks: list[TaskData], settings: BenchSettings,
                    seed: int) -> Path:
    """Where the seed's warmed-up tiny Llama is cached (the name is a fingerprint of what determines it)."""
    key = _fingerprint({
        "v": FINGERPRINT_VERSION, "tokenizer": tokenizer_dir.name, "seed": seed,
        "model": [settings.hidden_size, settings.num_hidden_layers, settings.num_attention_heads],
        "warmup": [settings.warmup_steps, settings.warmup_batch_size, settings.warmup_learning_rate,
                   settings.max_length],
        "data": [(t.name, len(t.train_all), _fingerprint(t.train_all)) for t in tasks],
    })
    return output_dir / "cache" / f"warm-seed{seed}-{key}"


def build_warm_model(path: str, tokenizer_dir: str, texts: list[str], settings: dict[str, Any], seed: int,
                     threads: int | None = None) -> dict[str, float]:
    """Build the seed's tiny Llama, warm it up on ``texts`` and save it (with the tokenizer) atomically at ``path``.

    Runs in the main process or in a worker (hence plain arguments). Returns the warm-up statistics.
    """
    import torch
    from transformers import AutoTokenizer

    from trl_lifealign.tiny import build_tiny_llama

    if threads:
        torch.set_num_threads(threads)
    settings_obj = BenchSettings(**{**settings, "tasks": tuple(settings["tasks"])})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_tiny_llama(tokenizer, hidden_size=settings_obj.hidden_size,
                             num_hidden_layers=settings_obj.num_hidden_layers,
                             num_attention_heads=settings_obj.num_attention_heads,
                             max_position_embeddings=max(512, settings_obj.max_length), seed=seed)
    start = time.perf_counter()
    stats = warm_up_model(model, tokenizer, texts, settings_obj, seed)
    stats["seconds"] = time.perf_counter() - start
    stats["seed"] = seed

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "warmup.json").write_text(json.dumps(stats, indent=2) + "\n")

    atomic_write_dir(path, write)
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# One run on the lifelong runner
# ----------------------------------------------------------------------------------------------------------------------


def build_lifelong_config(method: BenchMethod, settings: BenchSettings, tasks: Sequence[dict[str, str]],
                          run_dir: Path, seed: int):
    """The runner configuration of one method: the same data, steps and seed for every method.

    ``tasks`` are ``{"name", "train_file", "eval_file"}`` (the prepared JSON Lines files).
    """
    from trl_lifealign.lifelong.data import DataSource
    from trl_lifealign.lifelong.recipe import (
        EvalSpec,
        EvaluationSettings,
        LifelongConfig,
        LoraSettings,
        MemorySettings,
        ReplaySettings,
        TaskSpec,
    )

    eval_sets = [EvalSpec(name=t["name"], source=DataSource(path=t["eval_file"])) for t in tasks]
    if method.multi_task:
        stages = [TaskSpec(name="all-tasks", train=[DataSource(path=t["train_file"]) for t in tasks])]
    else:
        stages = [TaskSpec(name=t["name"], train=DataSource(path=t["train_file"])) for t in tasks]
    training = {
        "learning_rate": settings.learning_rate,
        "num_train_epochs": settings.epochs,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "beta": settings.beta,
        "focal_gamma": settings.focal_gamma if method.fpo else 0.0,
        "max_length": settings.max_length,
        "lr_scheduler_type": settings.lr_scheduler,
        "warmup_steps": 0.1,
        "logging_steps": 10_000,
        "bf16": False,  # TRL defaults to bf16 and gradient checkpointing; a tiny fp32 model on CPU wants neither
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
    }
    return LifelongConfig(
        output_dir=str(run_dir),
        tasks=stages,
        eval_sets=eval_sets,
        lora=LoraSettings(r=settings.lora_r, alpha=settings.lora_alpha, target_modules="all-linear"),
        training=training,
        memory=MemorySettings(enabled=method.consolidation, energy_threshold=settings.energy_threshold,
                              overlap_weight=settings.overlap_weight),
        reference=settings.reference,
        replay=ReplaySettings(fraction=settings.replay_fraction if method.replay else 0.0,
                              capacity=settings.replay_capacity, seed=seed),
        optimizer=settings.optimizer,
        evaluation=EvaluationSettings(batch_size=16, max_length=settings.max_length),
        seed=seed,
    )


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point: run one (method, seed) on the runner and store its result (atomically) in its run dir."""
    import torch

    torch.set_num_threads(job["threads"])
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    datasets.disable_progress_bars()  # TRL's tokenization bars, per task and worker, would drown the bench's lines

    from trl_lifealign.lifelong import run_lifelong

    settings = BenchSettings(**{**job["settings"], "tasks": tuple(job["settings"]["tasks"])})
    method = METHODS[job["method"]]
    run_dir = Path(job["run_dir"])
    if run_dir.exists():  # a crashed earlier attempt: start over (its result file was never written)
        shutil.rmtree(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    config = build_lifelong_config(method, settings, job["tasks"], run_dir / "runner", job["seed"])
    start = time.perf_counter()
    # Runs share the terminal with other workers: no progress bars, only the benchmark's own lines.
    result = run_lifelong(config, model=model, tokenizer=tokenizer, show_progress=False)
    seconds = time.perf_counter() - start
    record = {
        "fingerprint": job["fingerprint"],
        "variant": job["variant"],
        "method": method.name,
        "seed": job["seed"],
        "overrides": job["overrides"],
        "task_names": list(result.task_names),
        "eval_names": list(result.eval_names),
        "matrix": [[float(v) for v in row] for row in result.matrix],
        "initial_row": [float(v) for v in result.initial_row],
        "metrics": {k: (None if result.metrics.get(k) is None else float(result.metrics[k])) for k in METRIC_KEYS},
        "seconds": seconds,
        "runner_seconds": result.seconds,
        "threads": job["threads"],
    }
    atomic_write_json(run_dir / RESULT_FILE, record, sort_keys=True, default=str)
    return record


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation, tables, verdict, plots
# ----------------------------------------------------------------------------------------------------------------------

METRIC_KEYS = ("last", "ap", "bwt", "fwt")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: metrics in points (x100) as mean/std over seeds, mean matrix, seeds and wall time."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], []).append(record)
    summary = {}
    for variant, runs in by_variant.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        entry: dict[str, Any] = {"method": runs[0]["method"], "overrides": runs[0]["overrides"],
                                 "seeds": [r["seed"] for r in runs]}
        for key in METRIC_KEYS:
            values = [None if r["metrics"].get(key) is None else 100 * r["metrics"][key] for r in runs]
            entry[key] = dict(zip(("mean", "std"), _mean_std(values)))
            entry[key]["per_seed"] = values
        entry["seconds"] = dict(zip(("mean", "std"), _mean_std([r["seconds"] for r in runs])))
        rows = len(runs[0]["matrix"])
        cols = len(runs[0]["matrix"][0])
        entry["matrix"] = [[statistics.fmean(100 * r["matrix"][i][j] for r in runs) for j in range(cols)]
                           for i in range(rows)]
        entry["initial_row"] = [statistics.fmean(100 * r["initial_row"][j] for r in runs) for j in range(cols)]
        entry["task_names"] = runs[0]["task_names"]
        entry["eval_names"] = runs[0]["eval_names"]
        summary[variant] = entry
    return summary


def _fmt(stat: dict[str, Any] | None) -> str:
    if stat is None or stat["mean"] is None or math.isnan(stat["mean"]):
        return "–"
    sign = "+" if stat.get("signed") else ""
    if len([v for v in stat.get("per_seed", [None, None]) if v is not None]) == 1:
        return f"{stat['mean']:{sign}.2f}"  # one seed: no spread to show
    return f"{stat['mean']:{sign}.2f} ± {stat['std']:.2f}"


def _signed(stat: dict[str, Any]) -> dict[str, Any]:
    return {**stat, "signed": True}


def paired_gap(summary: dict[str, Any], a: str, b: str, key: str) -> dict[str, Any] | None:
    """a − b on ``key`` over the seeds both ran (same seed = same warm model and data): mean, std, all-same-sign."""
    if a not in summary or b not in summary:
        return None
    sa = dict(zip(summary[a]["seeds"], summary[a][key]["per_seed"]))
    sb = dict(zip(summary[b]["seeds"], summary[b][key]["per_seed"]))
    diffs = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb)) if sa[s] is not None and sb[s] is not None]
    if not diffs:
        return None
    mean, std = _mean_std(diffs)
    return {"mean": mean, "std": std, "n": len(diffs), "diffs": diffs,
            "consistent": all(d > 0 for d in diffs) or all(d < 0 for d in diffs)}


def verdict(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bar, checked on the measured numbers (each check with the numbers that decide it).

    Gaps are paired by seed (same warm model, same data). "Beyond seed spread" means the mean paired gap exceeds the
    standard deviation of the paired gaps and every seed agrees on its sign; it needs at least two seeds (``passed``
    is ``None`` otherwise).
    """
    checks = []
    life = summary.get("lifealign")

    def add(name: str, passed: bool | None, detail: str) -> None:
        checks.append({"check": name, "passed": passed, "detail": detail})

    if life is None:
        return checks
    bwt = life["bwt"]
    add("LifeAlign BWT ≥ 0", bwt["mean"] >= 0, f"BWT {bwt['mean']:+.2f} ± {bwt['std']:.2f}")
    gap = paired_gap(summary, "lifealign", "seq-dpo", "bwt")
    if gap:
        add("BWT ≥ 5 points above sequential DPO, beyond seed spread",
            None if gap["n"] < 2 else gap["mean"] >= 5 and gap["mean"] > gap["std"] and gap["consistent"],
            f"paired gap {gap['mean']:+.2f} ± {gap['std']:.2f} over {gap['n']} seeds")
    if "multi-task" in summary:
        last_gap = paired_gap(summary, "lifealign", "multi-task", "last")
        if last_gap:
            add("Last within 2 points of multi-task", last_gap["mean"] >= -2,
                f"Last gap to multi-task {last_gap['mean']:+.2f} ± {last_gap['std']:.2f}")
    for key in ("bwt", "last"):
        gap = paired_gap(summary, "lifealign", "replay", key)
        if gap:
            add(f"ahead of replay on {'BWT' if key == 'bwt' else 'Last'}, beyond seed spread",
                None if gap["n"] < 2 else gap["mean"] > 0 and gap["mean"] > gap["std"] and gap["consistent"],
                f"paired gap {gap['mean']:+.2f} ± {gap['std']:.2f} over {gap['n']} seeds")
    return checks


def _method_cells(summary: dict[str, Any], variant: str, last_only: bool = False) -> list[str]:
    """BWT, Last, AP, FWT, seconds per run and number of seeds of one variant, formatted for the tables."""
    entry = summary[variant]
    if last_only:
        cells = ["–", _fmt(entry["last"]), "–", "–"]
    else:
        cells = [_fmt(_signed(entry["bwt"])), _fmt(entry["last"]), _fmt(entry["ap"]), _fmt(_signed(entry["fwt"]))]
    return cells + [f"{entry['seconds']['mean']:.0f}", str(len(entry["seeds"]))]


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


TABLE1 = (("seq-dpo", "Sequential DPO (SeqFT)"), ("replay", "Replay (ER, 20%)"),
          ("lifealign", "**LifeAlign** (FPO + SLMC)"), ("lifealign-replay", "LifeAlign + replay"),
          ("multi-task", "Multi-task (MTL, upper bound)"))
TABLE2 = (("seq-dpo", "✗", "✗"), ("slmc", "✓", "✗"), ("fpo", "✗", "✓"), ("lifealign", "✓", "✓"))
HEADER = "| BWT | Last | AP | FWT | s / run | seeds |\n"
RULE = "|---|---|---|---|---|---|"


def render_markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """Tables 1 and 2 in the paper's shape (preference accuracy in points), the bar verdict and the sweep."""
    lines = [f"# LifeAlign benchmark: {meta['title']}", "",
             f"Command: `{meta['command']}`", "",
             f"Tasks (in order): {' → '.join(meta['tasks'])}; eval split `{meta['eval_split']}`. "
             f"Metric: preference accuracy against the initial model π₀ in points (50 = no preference), "
             f"mean ± std over seeds {meta['seeds']}. {meta['setup']}", ""]
    if meta.get("missing"):
        runs = ", ".join(f"{m['variant']} seed {m['seed']}" for m in meta["missing"])
        lines += [f"**Partial result**: {len(meta['missing'])} planned run(s) did not run: {runs}. The `seeds` column "
                  "says how many seeds each row averages.", ""]
    lines += ["## Table 1: methods", "", "| Method " + HEADER.rstrip("\n"), "|---" + RULE]
    for variant, label in TABLE1:
        if variant in summary:
            last_only = summary[variant]["method"] == "multi-task"
            lines.append(_table_row([label, *_method_cells(summary, variant, last_only)]))
    lines += ["", "## Table 2: ablation (no replay)", "", "| SLMC | FPO " + HEADER.rstrip("\n"), "|---|---" + RULE]
    for variant, slmc, fpo in TABLE2:
        if variant in summary:
            lines.append(_table_row([slmc, fpo, *_method_cells(summary, variant)]))
    checks = verdict(summary)
    if checks:
        lines += ["", "## The bar (issue 6)", "", "| check | result | measured |", "|---|---|---|"]
        for check in checks:
            mark = "n/a (needs ≥ 2 seeds)" if check["passed"] is None else "pass" if check["passed"] else "**fail**"
            lines.append(f"| {check['check']} | {mark} | {check['detail']} |")
    sweep = [v for v in summary if "@" in v]
    if sweep:
        lines += ["", "## Sensitivity (one knob at a time, others at their defaults)", "",
                  "| variant " + HEADER.rstrip("\n"), "|---" + RULE]
        for method in sorted({v.split("@", 1)[0] for v in sweep}):
            if method in summary:
                lines.append(_table_row([f"`{method}` (defaults)", *_method_cells(summary, method)]))
        for variant in sorted(sweep, key=_sweep_sort_key):
            lines.append(_table_row([f"`{variant}`", *_method_cells(summary, variant)]))
    lines += ["", "## Final-row accuracy per task (mean over seeds)", ""]
    evals = next(iter(summary.values()))["eval_names"]
    lines += ["| method | π₀ | " + " | ".join(SHORT_TASK_NAMES.get(e, e) for e in evals) + " |",
              "|---" * (len(evals) + 2) + "|"]
    for variant, entry in summary.items():
        lines.append(f"| `{variant}` | {statistics.fmean(entry['initial_row']):.1f} | "
                     + " | ".join(f"{v:.1f}" for v in entry["matrix"][-1]) + " |")
    lines += ["", meta.get("data_note", ""), ""]
    return "\n".join(lines)


def _sweep_sort_key(variant: str):
    method, _, rest = variant.partition("@")
    key, _, value = rest.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.inf
    return (method, key, number, value)


def sweep_curves(summary: dict[str, Any], base_settings: BenchSettings | None) -> dict[tuple[str, str], list]:
    """``{(method, knob): [(value, entry), ...]}`` for numeric sweeps, the method's default run included at its
    default value (from ``base_settings``), sorted by value."""
    curves: dict[tuple[str, str], list] = {}
    for variant, entry in summary.items():
        if "@" not in variant:
            continue
        method, _, rest = variant.partition("@")
        knob, _, value = rest.partition("=")
        try:
            curves.setdefault((method, knob), []).append((float(value), entry))
        except ValueError:
            continue
    for (method, knob), points in curves.items():
        name = SETTING_ALIASES.get(knob, knob)
        default = getattr(base_settings, name, None) if base_settings is not None else None
        if method in summary and isinstance(default, (int, float)) and all(x != default for x, _ in points):
            points.append((float(default), summary[method]))
        points.sort(key=lambda p: p[0])
    return {key: points for key, points in curves.items() if len(points) > 1}


def write_plots(summary: dict[str, Any], out_dir: Path, base_settings: BenchSettings | None = None) -> list[Path]:
    """One heatmap per method (mean matrix, π₀ row on top), a bar chart of BWT and Last per method and, for numeric
    sweeps, Last / BWT against each swept knob (the method's default run included)."""
    try:
        import matplotlib
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the benchmark plots need matplotlib: pip install 'trl-lifealign[eval]' (or pass --no-plots)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for variant, entry in summary.items():
        if "@" in variant:
            continue
        matrix = [entry["initial_row"]] + entry["matrix"]
        rows = ["π₀"] + [SHORT_TASK_NAMES.get(t, t) for t in entry["task_names"]]
        cols = [SHORT_TASK_NAMES.get(e, e) for e in entry["eval_names"]]
        fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.6 * len(rows) + 1.5))
        image = ax.imshow(matrix, cmap="viridis", vmin=30, vmax=100)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w" if value < 70 else "k",
                        fontsize=8)
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("after training on")
        ax.set_title(f"{variant}: preference accuracy (%)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out_dir / f"heatmap_{variant}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    base = [v for v in summary if "@" not in v]
    if base:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for ax, key in zip(axes, ("bwt", "last")):
            means = [summary[v][key]["mean"] if summary[v][key]["mean"] is not None else float("nan") for v in base]
            stds = [summary[v][key]["std"] or 0.0 for v in base]
            ax.bar(range(len(base)), [0 if math.isnan(m) else m for m in means], yerr=stds, capsize=3,
                   color=["tab:red" if key == "bwt" and m < 0 else "tab:blue" for m in means])
            ax.set_xticks(range(len(base)), base, rotation=30, ha="right")
            ax.set_title(key.upper() + " (points, mean ± std over seeds)")
            ax.axhline(0 if key == "bwt" else 50, color="k", lw=0.8)
            if key == "last":
                ax.set_ylim(min(45, *[m - 5 for m in means if not math.isnan(m)]), None)
        fig.tight_layout()
        path = out_dir / "bars_bwt_last.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    curves = sweep_curves(summary, base_settings)
    if curves:
        knobs = sorted({knob for _, knob in curves})
        # Last on top, BWT below, each on its own scale (a few points of change would vanish on a shared axis).
        fig, axes = plt.subplots(2, len(knobs), figsize=(3.6 * len(knobs), 5.4), squeeze=False, sharex="col")
        for column, knob in enumerate(knobs):
            for row, key in enumerate(("last", "bwt")):
                ax = axes[row][column]
                for (method, curve_knob), points in sorted(curves.items()):
                    if curve_knob != knob:
                        continue
                    ax.errorbar([x for x, _ in points], [e[key]["mean"] for _, e in points],
                                yerr=[e[key]["std"] for _, e in points], fmt="o-", capsize=3, label=method)
                if knob in ("lr", "learning_rate"):
                    ax.set_xscale("log")
                if key == "bwt":
                    ax.axhline(0, color="k", lw=0.6)
                    ax.set_xlabel(knob)
                ax.set_ylabel(f"{'Last' if key == 'last' else 'BWT'} (points)")
                if row == 0:
                    ax.set_title(f"sensitivity to {knob}")
                    ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "sensitivity.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------------


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["theta=0.5,0.9", "lambda=0,1"]`` -> ``[("theta", ["0.5", "0.9"]), ("lambda", ["0", "1"])]``."""
    sweeps = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        sweeps.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    return sweeps


def plan_runs(methods: Sequence[str], seeds: Sequence[int], sweeps: Sequence[tuple[str, list[str]]],
              sweep_methods: Sequence[str]) -> list[RunSpec]:
    """Seed-major order, so an interrupted run leaves complete seeds behind."""
    specs = []
    for seed in seeds:
        specs += [RunSpec(m, seed) for m in methods]
        for key, values in sweeps:
            for value in values:
                specs += [RunSpec(m, seed, ((key, value),)) for m in sweep_methods]
    return specs


def run_benchmark(
    settings: BenchSettings,
    *,
    data_root: Path,
    eval_root: Path,
    eval_split: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    output_dir: Path,
    sweeps: Sequence[tuple[str, list[str]]] = (),
    sweep_methods: Sequence[str] = ("lifealign",),
    workers: int = 1,
    threads: int | None = None,
    fresh: bool = False,
    report_only: bool = False,
    plots: bool = True,
    name: str = "bench",
    title: str = "full",
    command: str = "",
    log=print,
) -> dict[str, Any]:
    """Run every (method, seed) (and sweep variant), aggregate, and write <name>.md / <name>.json / plots.

    Returns the JSON payload (also written to ``output_dir/<name>.json``).
    """
    from transformers import AutoTokenizer

    unknown = [m for m in list(methods) + list(sweep_methods) if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    for key, values in sweeps:
        for value in values:
            _coerce_setting(settings, key, value)  # fail before any training
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    log(f"[bench] tokenizer on the train splits of {len(settings.tasks)} tasks")
    corpus = tokenizer_corpus(data_root, settings.tasks)
    tokenizer, tokenizer_dir = build_tokenizer(output_dir, corpus, settings)
    tasks = prepare_task_data(settings, tokenizer, data_root, eval_root, eval_split, output_dir / "data")
    for task in tasks:
        log(f"[bench] {task.name}: {len(task.train)} train / {len(task.eval)} eval pairs "
            f"(read {task.train_rows_read}/{task.eval_rows_read}; skipped train {task.train_skipped or 0}, "
            f"eval {task.eval_skipped or 0})")

    specs = plan_runs(methods, seeds, sweeps, sweep_methods)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    warm_dirs = {seed: warm_model_path(output_dir, tokenizer_dir, tasks, settings, seed) for seed in seeds}
    task_payload = [{"name": t.name, "train_file": t.train_file, "eval_file": t.eval_file} for t in tasks]
    jobs, records, missing = [], [], []
    for spec in specs:
        run_settings = apply_settings(settings, dict(spec.overrides))
        fingerprint = _fingerprint({"v": FINGERPRINT_VERSION, "settings": dataclasses.asdict(run_settings),
                                    "method": dataclasses.asdict(METHODS[spec.method]), "seed": spec.seed,
                                    "model": warm_dirs[spec.seed].name,
                                    "data": [(t.name, _fingerprint(t.train), _fingerprint(t.eval)) for t in tasks]})
        run_dir = output_dir / "runs" / spec.variant / f"seed{spec.seed}"
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            record = json.loads(result_path.read_text())
            if record.get("fingerprint") == fingerprint:
                records.append(record)
                continue
            if not fresh:
                raise RuntimeError(
                    f"{result_path} was produced with different settings; use another --output-dir or pass --fresh "
                    "to re-run it"
                )
        if report_only:
            missing.append({"variant": spec.variant, "seed": spec.seed})
            continue
        jobs.append({"fingerprint": fingerprint, "variant": spec.variant, "method": spec.method, "seed": spec.seed,
                     "overrides": dict(spec.overrides), "settings": dataclasses.asdict(run_settings),
                     "tasks": task_payload, "model_dir": str(warm_dirs[spec.seed]), "run_dir": str(run_dir),
                     "threads": threads})
    cold = sorted({job["seed"] for job in jobs if not (warm_dirs[job["seed"]] / "warmup.json").is_file()})
    log(f"[bench] {len(records)} run(s) reused, {len(jobs)} to run ({len(cold)} warm-up(s) first) with {workers} "
        f"worker(s) x {threads} thread(s)" + (f"; report only, {len(missing)} run(s) missing" if report_only else ""))

    warm_texts = _warmup_texts(tasks, tokenizer) if cold else []
    plain_settings = dataclasses.asdict(settings)

    def warm_done(seed: int, stats: dict[str, float]) -> None:
        log(f"[bench] warm model seed {seed}: LM loss {stats['first_loss']:.2f} -> {stats['final_loss']:.2f} "
            f"({stats['seconds']:.0f} s)")

    def done(record: dict[str, Any]) -> None:
        records.append(record)
        m = record["metrics"]
        parts = " ".join(f"{k}={100 * m[k]:.1f}" for k in METRIC_KEYS if m.get(k) is not None)
        log(f"[bench] {record['variant']} seed {record['seed']}: {parts} ({record['seconds']:.0f} s)")

    if workers <= 1:
        for seed in cold:
            warm_done(seed, build_warm_model(str(warm_dirs[seed]), str(tokenizer_dir), warm_texts, plain_settings,
                                             seed, threads))
        for job in jobs:
            done(run_one(job))
    elif jobs:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending: dict[Any, tuple[str, Any]] = {}
            for seed in cold:
                future = pool.submit(build_warm_model, str(warm_dirs[seed]), str(tokenizer_dir), warm_texts,
                                     plain_settings, seed, threads)
                pending[future] = ("warm", seed)
            for job in jobs:  # seeds already warm start at once; the others when their warm-up is done
                if job["seed"] not in cold:
                    pending[pool.submit(run_one, job)] = ("run", job)
            while pending:
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    kind, item = pending.pop(future)
                    if kind == "warm":
                        warm_done(item, future.result())
                        for job in jobs:
                            if job["seed"] == item:
                                pending[pool.submit(run_one, job)] = ("run", job)
                    else:
                        done(future.result())

    summary = aggregate(records)
    meta = {
        "title": title,
        "command": command,
        "tasks": list(settings.tasks),
        "eval_split": eval_split,
        "seeds": list(seeds),
        "missing": missing,
        "setup": (f"Tiny Llama (hidden {settings.hidden_size}, {settings.num_hidden_layers} layers, vocab "
                  f"{settings.vocab_size}) warmed up {settings.warmup_steps} LM steps; LoRA r={settings.lora_r} on all "
                  f"linear layers; {settings.pairs} train pairs/task, {settings.epochs:g} epochs, batch "
                  f"{settings.batch_size}, lr {settings.learning_rate:g}, β={settings.beta:g}, FPO γ="
                  f"{settings.focal_gamma:g}, θ={settings.energy_threshold:g}, λ={settings.overlap_weight:g}, "
                  f"reference `{settings.reference}`, replay {settings.replay_fraction:g}; prompts cut to their last "
                  f"{settings.max_prompt_tokens} tokens, answers to their first {settings.max_completion_tokens}. "
                  f"Wall time per run with {workers} run(s) in parallel x {threads} thread(s) on this machine."),
        "data_note": "Skipped rows (bad in the source or identical after truncation): " + "; ".join(
            f"{t.name} train {sum(t.train_skipped.values())}, eval {sum(t.eval_skipped.values())}" for t in tasks),
    }
    payload = {
        "meta": meta,
        "settings": dataclasses.asdict(settings),
        "data": [t.summary() for t in tasks],
        "summary": summary,
        "verdict": verdict(summary),
        "runs": sorted(records, key=lambda r: (r["variant"], r["seed"])),
        "seconds_total": time.perf_counter() - started,
    }
    if plots and summary:
        plot_dir = output_dir / ("plots" if name == "bench" else f"plots-{name}")
        payload["plots"] = [str(p.relative_to(output_dir)) for p in write_plots(summary, plot_dir, settings)]
    atomic_write_json(output_dir / f"{name}.json", payload, sort_keys=True, default=str)
    markdown = render_markdown(summary, meta)
    atomic_write_text(output_dir / f"{name}.md", markdown)
    log(markdown)
    return payload


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, default=None,
                        help=f"folder with <task>/train.json (default: ${DATA_ENV_VAR} or ../shared/data/lifealign)")
    parser.add_argument("--eval-root", type=Path, default=None,
                        help="folder with <task>/<eval-split>.json to score on (default: --data-root)")
    parser.add_argument("--eval-split", default="dev", help="evaluation split file name (default: dev)")
    parser.add_argument("--tasks", type=_csv, default=list(PAPER_ORDER),
                        help="comma-separated task folders (default: the paper's five, in its order)")
    parser.add_argument("--order", type=_csv, default=None,
                        help="task order as a permutation of --tasks (names or 1-based indices), e.g. 5,4,3,2,1")
    parser.add_argument("--pairs", type=int, default=None, help="train pairs per task (default 256; --quick 128)")
    parser.add_argument("--eval-pairs", default=None, help="eval pairs per task, or 'all' (default all; --quick 64)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], default=None,
                        help="comma-separated seeds (default 0,1,2; --quick 0)")
    parser.add_argument("--methods", type=_csv, default=list(METHODS),
                        help=f"comma-separated methods among {','.join(METHODS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer pairs, shorter warm-up, one seed (a few minutes)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting for every method, e.g. --set reference=previous_task --set lr=1e-3 "
                             "(aliases: theta, lambda, gamma, lr)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one-at-a-time sensitivity sweep of a setting for --sweep-methods, e.g. theta=0.5,0.9,1")
    parser.add_argument("--sweep-methods", type=_csv, default=["lifealign"],
                        help="methods the sweep varies (default: lifealign)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs in parallel, each with cpu_count/workers threads (default: min(2, cpus))")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: cpu_count // workers)")
    parser.add_argument("--output-dir", type=Path, default=Path("bench-output"),
                        help="where runs, caches, bench.md, bench.json and plots go (default: ./bench-output)")
    parser.add_argument("--name", default="bench",
                        help="base name of the tables and plots in --output-dir (default: bench -> bench.md, "
                             "bench.json, plots/); runs and caches are shared by every name")
    parser.add_argument("--fresh", action="store_true", help="re-run runs whose stored settings differ")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the finished runs of this command, listing the missing ones")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def _resolve_order(tasks: list[str], order: list[str] | None) -> tuple[str, ...]:
    if not order:
        return tuple(tasks)
    resolved = []
    for item in order:
        if item.isdigit():
            index = int(item) - 1
            if not 0 <= index < len(tasks):
                raise ValueError(f"--order index {item} is outside 1..{len(tasks)}")
            resolved.append(tasks[index])
        elif item in tasks:
            resolved.append(item)
        else:
            raise ValueError(f"--order names {item!r}, which is not among --tasks {tasks}")
    if sorted(resolved) != sorted(tasks):
        raise ValueError(f"--order must be a permutation of --tasks {tasks}, got {resolved}")
    return tuple(resolved)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    settings = BenchSettings(tasks=_resolve_order(args.tasks, args.order))
    if args.quick:
        settings = quick_settings(settings)
    explicit = {}
    if args.pairs is not None:
        explicit["pairs"] = str(args.pairs)
    if args.eval_pairs is not None:
        explicit["eval_pairs"] = str(args.eval_pairs)
    explicit.update(dict(item.split("=", 1) for item in args.assignments if "=" in item))
    bad = [item for item in args.assignments if "=" not in item]
    if bad:
        raise ValueError(f"--set expects KEY=VALUE, got {bad}")
    return apply_settings(settings, explicit)


def _command_line() -> str:
    """How this process was started, for the report (the wrapper script or the ``lifealign`` console script)."""
    import shlex

    program = Path(sys.argv[0]).name
    rest = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if program == "lifelong_bench.py":
        return f"python benchmarks/lifelong_bench.py {rest}".strip()
    return f"lifealign {rest}".strip()


def bench_command(args: argparse.Namespace) -> int:
    data_root = args.data_root or default_data_root()
    if data_root is None:
        print(f"lifealign bench: no data; pass --data-root (a folder with <task>/train.json) or set {DATA_ENV_VAR}",
              file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        sweeps = parse_sweeps(args.sweep)
    except ValueError as error:
        print(f"lifealign bench: {error}", file=sys.stderr)
        return 2
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    command = _command_line()
    run_benchmark(
        settings, data_root=Path(data_root), eval_root=Path(args.eval_root or data_root), eval_split=args.eval_split,
        methods=args.methods, seeds=seeds, output_dir=args.output_dir, sweeps=sweeps,
        sweep_methods=args.sweep_methods, workers=args.workers, threads=args.threads, fresh=args.fresh,
        report_only=args.report_only, name=args.name,
        plots=not args.no_plots,
        title="quick" if args.quick else "full", command=command, log=lambda *parts: print(*parts, flush=True),
    )
    return 0


def add_commands(subparsers) -> None:
    """Register ``lifealign bench`` on the CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "bench", help="benchmark LifeAlign against sequential DPO, replay, ablations and multi-task on real tasks",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=bench_command)
