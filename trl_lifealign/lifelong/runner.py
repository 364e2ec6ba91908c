"""`run_lifelong`: train a LoRA adapter on a sequence of preference tasks, evaluate after each task, resume on re-run.

Per task i (one trainer per stage, TRL's recommended pattern):

1. seed everything with `seed + i`; training data = the task's sources + the replay buffer;
2. SLMC snapshot (`MemoryConsolidationCallback.begin_task`), so the warm-up counts as part of the task's update;
3. optional SFT warm-up (`stages.sft_warmup`), then the preference stage (`stages.preference_stage`), whose trainer
   consolidates the whole task's update after its last step;
4. evaluation on every eval set (row i of the matrix), generation metrics if asked, replay buffer update;
5. the adapter, memory, replay buffer and optimizer state are saved, then the commit record (`state.RunDirectory`).

Re-running the same configuration on the same `output_dir` resumes after the last committed task and ends with the
same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..adapters import (
    ADAPTER_WEIGHTS,
    adapter_state,
    load_adapter_file,
    load_adapter_state,
    load_base_model,
    save_adapter,
    wrap_lora,
)
from ..atomic import atomic_copytree, atomic_write_json
from .config import LifelongConfig
from .data import PreferenceData, as_conversation, load_preference_data
from .evaluation import EvalSet, evaluate_preferences, initial_policy_logps, preference_scores, prepare_eval_sets
from .generation import build_scorers, evaluate_generation
from .replay import ReplayBuffer
from .report import LifelongReport, TaskRecord, write_report
from .stages import preference_stage, sft_warmup
from .state import RunDirectory, RunStateError, digest, run_fingerprints

__all__ = ["LifelongResult", "load_eval_sets", "run_lifelong"]

logger = logging.getLogger(__name__)


@dataclass
class LifelongResult:
    """What a lifelong run produced. `matrix[i][j]` = preference accuracy on eval set j after task i."""

    run_dir: Path
    task_names: list[str]
    eval_names: list[str]
    matrix: list[list[float]]
    initial_row: list[float]
    margin_matrix: list[list[float]]
    metrics: dict[str, Any]
    seconds: float
    report: LifelongReport
    generation: dict[str, Any] | None = None


def _set_all_seeds(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def uses_chat_template(config: LifelongConfig, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if config.chat_template == "always" and not has_template:
        raise ValueError("chat_template: 'always' but the tokenizer has no chat template")
    return config.chat_template == "always" or (config.chat_template == "auto" and has_template)


def load_eval_sets(config: LifelongConfig, chat: bool = False) -> tuple[list[EvalSet], list[PreferenceData]]:
    """The run's evaluation sets (the matrix columns, `evaluation.max_rows` applied), and their loaded data."""
    eval_sets, loaded = [], []
    for spec in config.resolved_eval_sets():
        data = load_preference_data(spec.source, config.skip_bad_rows)
        rows = data.rows[: config.evaluation.max_rows] if config.evaluation.max_rows else data.rows
        eval_sets.append(EvalSet(spec.name, [as_conversation(r) for r in rows] if chat else rows))
        loaded.append(data)
    return eval_sets, loaded


def _load_model(config: LifelongConfig):
    if config.model is None:
        raise ValueError("no model: set LifelongConfig.model (path, hub id or 'smollm2') or pass model=")
    from ..pretrained import resolve_model_name

    return load_base_model(resolve_model_name(config.model), config.torch_dtype, config.lora.load_in_4bit)


def _load_tokenizer(config: LifelongConfig, tokenizer):
    if tokenizer is None:
        from transformers import AutoTokenizer

        from ..pretrained import resolve_model_name

        source = config.tokenizer or config.model
        if source is None:
            raise ValueError("no tokenizer: set LifelongConfig.tokenizer / model or pass tokenizer= to run_lifelong")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _LifelongRun:
    """The state one `run_lifelong` call carries from task to task."""

    def __init__(self, config: LifelongConfig, model, tokenizer, callbacks, show_progress: bool | None):
        self.config, self.callbacks = config, list(callbacks or [])
        self.main = dist.is_main_process()
        self.show = self.main if show_progress is None else (self.main and show_progress)
        self.directory = RunDirectory(config.output_dir)
        self.model_given = model is not None
        self.model, self.tokenizer = model, _load_tokenizer(config, tokenizer)
        self.rebuild_per_stage = dist.uses_deepspeed()  # a DeepSpeed engine cannot be handed a partitioned model
        if self.rebuild_per_stage and self.model_given:
            raise ValueError("under DeepSpeed the runner reloads the model for every stage: set `model` (a path or "
                             "hub id) instead of passing an in-memory model")
        if config.optimizer == "carry" and self.rebuild_per_stage:
            raise ValueError("optimizer: 'carry' is not supported under DeepSpeed (its optimizer state is partitioned "
                             "inside the engine of each task's trainer); use optimizer: reset")
        if model is not None and config.lora.load_in_4bit:
            raise ValueError("lora.load_in_4bit needs the model to be loaded by the runner (set `model`, pass no "
                             "model=)")
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------------------- set-up
    def prepare(self) -> None:
        """Data, fingerprints and commit record, model, π₀, and (on resume) the last committed task's state."""
        config = self.config
        chat = uses_chat_template(config, self.tokenizer)
        self.task_data = [[load_preference_data(s, config.skip_bad_rows) for s in task.train_sources()]
                          for task in config.tasks]
        self.task_rows = [[as_conversation(r) if chat else r for d in data for r in d.rows] for data in self.task_data]
        self.eval_sets, eval_data = load_eval_sets(config, chat)
        self.eval_summaries = [{"name": s.name, **d.summary(), "rows_evaluated": len(s.rows)}
                               for s, d in zip(self.eval_sets, eval_data)]
        fingerprints = run_fingerprints(config, self.model, [[d.digest() for d in data] for data in self.task_data],
                                        [d.digest() for d in eval_data])
        fingerprints["chat_template"] = digest(chat)
        self.monitor_sets = self._load_monitor_sets(chat)
        if self.monitor_sets:  # the budget's pull-back depends on what it monitors
            fingerprints["monitor"] = digest([d for _, d in self.monitor_sets])
        self._open_state(fingerprints)
        if self.model is None:
            self.model = _load_model(config)
        self.model = wrap_lora(self.model, config.lora, config.seed)
        self.prepared = prepare_eval_sets(self.tokenizer, self.eval_sets, config.evaluation.max_length)
        self.prepared_monitor = prepare_eval_sets(self.tokenizer, [s for s, _ in self.monitor_sets],
                                                  config.evaluation.max_length)
        self._initial_scores(fingerprints)
        self._restore()

    def _load_monitor_sets(self, chat: bool) -> list[tuple[EvalSet, str]]:
        """The forgetting budget's monitor sets (one per task) and their content digests."""
        budget = self.config.defences.forgetting_budget
        if budget is None:
            return []
        loaded = []
        for spec in budget.monitor_sets:
            data = load_preference_data(spec.source, self.config.skip_bad_rows)
            rows = [as_conversation(r) for r in data.rows] if chat else data.rows
            loaded.append((EvalSet(f"monitor/{spec.name}", rows), data.digest()))  # apart from the matrix columns
        return loaded

    def _open_state(self, fingerprints: dict[str, str]) -> None:
        state = self.directory.read_state()
        if state is not None and state["fingerprints"] != fingerprints and not state["completed"]:
            if self.main:
                print(f"[lifealign] {self.directory.path}: no task committed yet and the configuration changed; "
                      "starting afresh")
                self.directory.discard_partial_run()
            state = None
        if state is not None:
            self.directory.check_resumable(state, fingerprints)
        self.state = state or {"fingerprints": fingerprints, "completed": []}
        self.completed: list[dict[str, Any]] = self.state["completed"]
        if self.main:
            self.directory.commit(self.state)  # the fingerprint is on record before anything is trained
            atomic_write_json(self.directory.path / "config.json", {"fingerprints": fingerprints,
                                                                   **self.config.to_dict()}, default=str)
        dist.barrier()

    def _initial_scores(self, fingerprints: dict[str, str]) -> None:
        """π₀'s log-probs (cached under a key of everything they depend on) and, if asked, its generation scores."""
        evaluation = self.config.evaluation
        key = digest([fingerprints[k] for k in ("model", "tokenizer", "evaluation", "chat_template")])
        # How the weights are loaded changes π₀ too; the key alone decides whether a cache (possibly copied from
        # another run of the same model, as the benchmark does) is reused.
        key = digest([key, fingerprints.get("monitor"), self.config.torch_dtype, self.config.lora.load_in_4bit])
        everything = self.prepared + self.prepared_monitor
        cached = self.directory.read_initial_logps(key)
        if cached is None or set(cached) != {s.name for s in everything}:
            cached = initial_policy_logps(self.model, everything, evaluation.batch_size, self.show)
            if self.main:
                self.directory.write_initial_logps(key, cached)
        self.initial_logps = cached
        self.initial_row = [{**preference_scores(cached[s.name], cached[s.name]), "dropped": s.dropped}
                            for s in self.prepared]
        self.scorers = build_scorers(evaluation.scorers, evaluation.judge) if evaluation.generation else []
        if self.scorers and "initial_generation" not in self.state:
            results = self._generate(self.model)
            self.state["initial_generation"] = [r.summary() for r in results]
            if self.main:  # π₀'s answers, readable next to every task's generations.json
                atomic_write_json(self.directory.path / "initial_generations.json",
                                  self._generation_records(results), default=str)

    def _restore(self) -> None:
        """The adapter, SLMC memory, replay buffer and optimizer state of the last committed task."""
        config, directory = self.config, self.directory
        self.memory_dir, self.defences_dir = directory.path / "memory", directory.path / "defences"
        self.last_committed = None
        self.replay = ReplayBuffer(config.replay.fraction, config.replay.capacity, config.replay.seed)
        self.optimizer_state = None
        if self.completed:
            index = len(self.completed) - 1
            if self.completed[index]["name"] != config.tasks[index].name:
                raise RunStateError(f"{directory.path}: committed task {index + 1} is "
                                    f"{self.completed[index]['name']!r}, the configuration names "
                                    f"{config.tasks[index].name!r}")
            last = directory.committed_task_dir(index, self.completed[index])
            self.last_committed = last
            load_adapter_state(self.model, load_adapter_file(last / "adapter" / ADAPTER_WEIGHTS))
            if self.main and config.memory.enabled:
                atomic_copytree(last / "memory", self.memory_dir)
            if self.main and (last / "defences").is_dir():
                atomic_copytree(last / "defences", self.defences_dir)
            self.replay = ReplayBuffer.load(last / "replay.json")
            if config.optimizer == "carry":
                self.optimizer_state = _load_optimizer_state(last / "optimizer.pt")
            logger.info("resuming %s after task %d/%d", directory.path, len(self.completed), len(config.tasks))
        elif self.main:  # a crash before the first commit: start the memory and the defences afresh
            for folder in (self.memory_dir, self.defences_dir):
                if folder.exists():
                    shutil.rmtree(folder)
        dist.barrier()
        self._build_defences()
        self.memory = None
        if config.memory.enabled:
            from trl_lifealign.slmc import MemoryConsolidationCallback, SLMCConfig

            settings = {k: v for k, v in asdict(config.memory).items() if k != "enabled"}
            self.memory = MemoryConsolidationCallback(self.memory_dir, SLMCConfig(**settings),
                                                      adapter_names=["default"])

    def _build_defences(self) -> None:
        from trl_lifealign.defences.factory import build_defences

        self.defences = build_defences(
            self.config.defences, self.defences_dir, lora_config=self.model.peft_config["default"],
            seed=self.config.seed, monitor_sets=self.prepared_monitor,
            monitor_logps={s.name: self.initial_logps[s.name] for s in self.prepared_monitor},
            batch_size=self.config.evaluation.batch_size)
        if "olora" in self.defences and self.last_committed is not None:
            self.defences["olora"].load(self.model, self.last_committed / "adapter")

    # -------------------------------------------------------------------------------------------------- tasks
    def _rebuilt(self):
        """Under DeepSpeed: a freshly loaded model carrying the adapter's current values (every rank calls it)."""
        import gc

        weights = adapter_state(self.model)
        self.model = None
        gc.collect()
        model = wrap_lora(_load_model(self.config), self.config.lora, self.config.seed)
        load_adapter_state(model, weights)
        return model

    def run_task(self, index: int) -> None:
        config, task = self.config, self.config.tasks[index]
        started = time.perf_counter()
        task_dir = self.directory.task_dir(index, task.name)
        if self.main:
            shutil.rmtree(task_dir, ignore_errors=True)  # leftovers of an interrupted attempt
            task_dir.mkdir(parents=True)
        dist.barrier()
        _set_all_seeds(config.seed + index)
        own_rows = self.task_rows[index]
        rows = own_rows + self.replay.rows()
        record = TaskRecord(name=task.name, row=[], dir=str(task_dir.relative_to(self.directory.path)),
                            train_pairs=len(own_rows), replayed_pairs=len(rows) - len(own_rows),
                            replay_by_task=self.replay.counts_by_task(),
                            data=[d.summary() for d in self.task_data[index]],
                            skipped_rows=sum(d.summary()["skipped_total"] for d in self.task_data[index]))
        if self.rebuild_per_stage and index > 0:
            self.model = self._rebuilt()
        if self.memory is not None:
            self.memory.begin_task(self.model)
        if config.sft_warmup.enabled:
            warmup_started = time.perf_counter()
            record.sft_warmup = sft_warmup(config, self.model, self.tokenizer, rows, index, task_dir / "sft_trainer",
                                           self.show)
            _set_all_seeds(config.seed + index)
            if self.rebuild_per_stage:
                self.model = self._rebuilt()
            record.time_split["sft_warmup"] = time.perf_counter() - warmup_started
        from trl_lifealign.defences.factory import ordered_callbacks

        for defence in self.defences.values():
            defence.start_task(index, rows)
        if "olora" in self.defences:
            self.defences["olora"].prepare_model(self.model, index)
        callbacks = self.callbacks + ordered_callbacks(self.defences, self.memory)
        training_started = time.perf_counter()
        stage = preference_stage(config, self.model, self.tokenizer, rows, index, task_dir / "trainer", callbacks,
                                 self.show, self.optimizer_state)
        self.optimizer_state = stage.optimizer_state
        record.time_split["training"] = time.perf_counter() - training_started
        record.train_loss, record.steps, record.dropped_pairs = stage.train_loss, stage.steps, stage.dropped_pairs
        if self.memory is not None:
            record.consolidation = {k: v for k, v in asdict(self.memory.last_report).items() if k != "factors"}
        record.defences = {name: defence.summary() for name, defence in self.defences.items()}
        self._evaluate_and_commit(index, record, task_dir, own_rows, started)

    def _generate(self, model, task_index: int | None = None):
        """Generation results per eval set (None for a cell the schedule skips: with ``diagonal_and_last`` only the
        task's own set is generated for, and every set after the last task)."""
        evaluation = self.config.evaluation
        columns = range(len(self.eval_sets))
        if evaluation.generation_cells == "diagonal_and_last" and task_index is not None \
                and task_index < len(self.config.tasks) - 1:
            columns = [task_index] if task_index < len(self.eval_sets) else []
        results = evaluate_generation(model, self.tokenizer, [self.eval_sets[j] for j in columns], self.scorers,
                                      evaluation.generation_rows, evaluation.max_new_tokens, evaluation.batch_size)
        by_column = dict(zip(columns, results))
        return [by_column.get(j) for j in range(len(self.eval_sets))]

    def _generation_records(self, generations) -> list[dict]:
        return [{"eval_set": s.name, "prompts": g.prompts, "answers": g.answers, "references": g.references}
                for s, g in zip(self.eval_sets, generations) if g is not None]

    def _evaluate_and_commit(self, index: int, record: TaskRecord, task_dir: Path, own_rows: list, started: float):
        weights = adapter_state(self.model)
        if "olora" in self.defences:  # every task adapter, as one loadable folder (a collective: all ranks)
            self.defences["olora"].save(self.model, task_dir / "adapter")
        evaluation_started = time.perf_counter()
        record.row = evaluate_preferences(self.model, self.prepared, self.initial_logps,
                                          self.config.evaluation.batch_size, self.show)
        record.time_split["evaluation"] = time.perf_counter() - evaluation_started
        generation_started = time.perf_counter()
        generations = self._generate(self.model, index) if self.scorers else []
        if self.scorers:
            record.time_split["generation"] = time.perf_counter() - generation_started
        record.generation = [g.summary() if g is not None else {} for g in generations] or None
        self.replay.add_task(record.name, index, own_rows)
        record.seconds = time.perf_counter() - started
        if self.main:
            if "olora" not in self.defences:
                save_adapter(task_dir / "adapter", weights, self.model.peft_config["default"], self.tokenizer)
            if self.memory is not None:
                atomic_copytree(self.memory_dir, task_dir / "memory")
            if self.defences_dir.is_dir():
                atomic_copytree(self.defences_dir, task_dir / "defences")
            self.replay.save(task_dir / "replay.json")
            if self.config.optimizer == "carry":
                torch.save(self.optimizer_state, task_dir / "optimizer.pt")
            if any(g is not None for g in generations):
                atomic_write_json(task_dir / "generations.json", self._generation_records(generations), default=str)
            atomic_write_json(task_dir / "metrics.json", asdict(record), default=str)
        self.completed.append(asdict(record))
        if self.main:
            self.directory.commit(self.state)  # the commit point
        dist.barrier()

    # ------------------------------------------------------------------------------------------------- finish
    def finish(self) -> LifelongResult:
        config = self.config
        report = LifelongReport(
            task_names=[t["name"] for t in self.completed], eval_names=[s.name for s in self.eval_sets],
            tasks=[TaskRecord.from_dict(t) for t in self.completed], initial_cells=self.initial_row,
            settings=_settings(config), eval_data=self.eval_summaries,
            initial_generation=self.state.get("initial_generation"), seconds=time.perf_counter() - self.started)
        if self.main:
            write_report(self.directory.path, report)
        dist.barrier()
        return LifelongResult(
            run_dir=self.directory.path, task_names=report.task_names, eval_names=report.eval_names,
            matrix=report.matrix(), initial_row=report.initial(), margin_matrix=report.matrix("margin"),
            metrics=report.metrics, seconds=report.seconds, report=report,
            generation=report.generation_metrics() or None)


def _settings(config: LifelongConfig) -> dict[str, Any]:
    from ..fpo.focal import DEFAULT_FOCAL_GAMMA

    return {"reference": config.reference, "focal_gamma": config.training.get("focal_gamma", DEFAULT_FOCAL_GAMMA),
            "memory": asdict(config.memory), "replay": asdict(config.replay), "sft_warmup": config.sft_warmup.enabled,
            "optimizer": config.optimizer, "chat_template": config.chat_template,
            "defences": {name: value for name, value in asdict(config.defences).items() if value is not None},
            "skip_bad_rows": config.skip_bad_rows}


def _load_optimizer_state(path: Path) -> dict[str, Any]:
    """A saved AdamW state, loaded without executing code (``weights_only``): a received run directory is data."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise RunStateError(f"optimizer state {path} is missing (optimizer: carry)") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise RunStateError(f"optimizer state {path} is not a plain tensor file or is corrupt; refusing to load it: "
                            f"{str(error).splitlines()[0]}") from None


def run_lifelong(config: LifelongConfig, model=None, tokenizer=None, callbacks: list | None = None,
                 show_progress: bool | None = None) -> LifelongResult:
    """Run (or resume) the task sequence of `config`; returns the evaluation matrix, metrics and the run directory.

    Args:
        config: the run configuration (see `LifelongConfig`; `load_recipe` reads one from YAML).
        model: an in-memory causal LM (or a `PeftModel` with a `default` LoRA adapter) instead of `config.model`.
        tokenizer: its tokenizer (default: loaded from `config.tokenizer` / `config.model`).
        callbacks: extra `transformers.TrainerCallback`s added to every task's preference trainer (logging, ...).
        show_progress: progress bars for tasks, training and evaluation (default: on the main process only; False
            e.g. when several runs share one terminal).

    Works in one process and under `accelerate launch` (DDP, DeepSpeed ZeRO-3, FSDP2): every rank runs the loop,
    rank 0 writes the files and holds the run directory's lock.
    """
    import contextlib

    from tqdm.auto import tqdm

    run = _LifelongRun(config, model, tokenizer, callbacks, show_progress)
    lock = run.directory.locked() if run.main else contextlib.nullcontext()
    with lock:
        if run.main:
            run.directory.remove_temporaries()
        run.prepare()
        progress = tqdm(total=len(config.tasks), initial=len(run.completed), desc="tasks", disable=not run.show)
        for index in range(len(run.completed), len(config.tasks)):
            progress.set_postfix_str(config.tasks[index].name)
            run.run_task(index)
            progress.update(1)
        progress.close()
        return run.finish()

