"""`run_lifelong`: train a LoRA adapter on a sequence of preference tasks with FPO + SLMC, evaluate after each task.

Per task i (one `FPOTrainer` per task, TRL's recommended pattern):

1. seed everything with `seed + i`; training data = the task's sources + the replay buffer;
2. SLMC snapshot (`MemoryConsolidationCallback.begin_task`);
3. optional SFT warm-up on prompt -> chosen (a plain causal-LM `transformers.Trainer`);
4. the preference stage (`FPOTrainer`); reference `base` = the adapter disabled (TRL's automatic frozen `"ref"` copy
   of an existing adapter is deleted right after the trainer is built), `previous_task` = that `"ref"` copy, i.e. the
   policy as the task starts;
5. SLMC consolidation of the whole task's update (warm-up + preference stage), then the consolidated adapter is saved;
6. evaluation on every eval set (row i of the matrix), replay buffer update, and an atomic commit of the run state.

Each trainer's in-place leftovers on the model (autocast forward wrapper, gradient checkpointing, ...) are undone when
its stage ends (`_trainer_stage`), so a stage runs the same on a model that went through earlier tasks in this process
as on the freshly built model of a resumed run.

Re-running the same configuration on the same `output_dir` resumes after the last committed task and ends with the
same weights and metrics as an uninterrupted run (adapter, SLMC memory, replay buffer and optimizer state are restored
from the last committed task; every task is seeded by its index).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_copytree, atomic_write_json
from ..distributed import cpu_process_group_defaults
from .data import PreferenceData, load_preference_data
from .evaluation import SCORERS, EvalSet, evaluate_generation, evaluate_preferences, preference_scores, reference_logps
from .recipe import LifelongConfig
from .replay import ReplayBuffer

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1


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
    generation: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _set_all_seeds(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


class _Ranks:
    """Rank 0 / barrier without touching accelerate's shared state before the first trainer configures it (a
    `PartialState()` made here would freeze the world size before TrainingArguments picks the backend)."""

    @property
    def is_main_process(self) -> bool:
        return int(os.environ.get("RANK", "0")) == 0

    def wait_for_everyone(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def _state() -> _Ranks:
    return _Ranks()


def config_fingerprint(config: LifelongConfig, model_given: bool) -> str:
    """Hash of everything that decides the run's result (a resumed run must match it)."""
    data = config.to_dict()
    data["_model"] = "<in-memory>" if model_given else data.get("model")
    data.pop("evaluation", None)  # re-rendering / extra metrics do not change the trained weights
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _task_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "tasks" / f"{index + 1:02d}-{name}"


def _uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter], modify: bool = False):
    """Full values of (possibly ZeRO-3 partitioned) parameters on every rank (a collective under ZeRO-3).

    With `modify`, rank 0's writes are broadcast and kept when the context exits.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
            yield
    else:
        yield


def _adapter_params(model, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The `default` adapter's weights (full, float32, CPU), PEFT state-dict names (gathered under ZeRO-3)."""
    from peft import get_peft_model_state_dict

    params = list(_adapter_params(model).values())
    with _gathered(params):
        state = get_peft_model_state_dict(model, adapter_name="default")
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Write `state` (from `adapter_state` / an adapter file) into the `default` adapter; every rank must call it."""
    from peft import set_peft_model_state_dict

    params = list(_adapter_params(model).values())
    with _gathered(params, modify=True):
        if not any(hasattr(p, "ds_id") for p in params) or torch.distributed.get_rank() == 0:
            result = set_peft_model_state_dict(model, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise RuntimeError(f"adapter state does not match the model: unexpected keys {unexpected[:3]}")


def _rebuild_for_new_engine(config: LifelongConfig, model):
    """A fresh model + LoRA from `config.model` carrying `model`'s current adapter values (every rank calls it)."""
    import gc

    weights = adapter_state(model)
    del model
    gc.collect()
    fresh = wrap_lora(config, _load_model(config))
    load_adapter_state(fresh, weights)
    return fresh


def _drop_ref_adapter(model) -> None:
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


# Instance attributes a trainer's accelerate `prepare` leaves on modules: the mixed-precision forward wrapper
# (`forward` / `_original_forward`, e.g. bf16 autocast from FPOConfig's bf16 default) and the "already prepared" flag,
# which makes the next trainer's accelerate skip preparing the model (so it would not apply its own precision).
_TRAINER_MODULE_ATTRS = ("forward", "_original_forward", "_is_accelerate_prepared")


def _set_activation_checkpointing(model, enabled: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers >= 5.23 renamed gradient checkpointing to activation checkpointing (old names warn).
    name = ("activation_checkpointing" if hasattr(base, "activation_checkpointing_disable")
            else "gradient_checkpointing")
    getattr(base, f"{name}_{'enable' if enabled else 'disable'}")()


@contextlib.contextmanager
def _trainer_stage(model):
    """Undo, when the block exits, what a `Trainer` / `FPOTrainer` built inside it changed on `model` in place.

    Trainers leave state on the model they trained: accelerate's (bf16 autocast) forward wrapper and its "prepared"
    flag, gradient checkpointing and input-require-grads hooks switched on by TRL (its default
    `gradient_checkpointing=True`, one more hook per trainer), `config.use_cache` and the generation config. Left in
    place, the next stage (e.g. the next task's SFT warm-up) would run differently in an uninterrupted run than in a
    resumed one, whose model is freshly built; and the evaluation would run under the last trainer's autocast while
    π₀'s log-probs were computed without it. Every stage therefore starts from, and hands back, the model as the
    runner holds it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_attrs = {id(m): (m, {k: m.__dict__[k] for k in _TRAINER_MODULE_ATTRS if k in m.__dict__})
                   for m in model.modules()}
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embedding_hooks = set(embeddings._forward_hooks) if embeddings is not None else set()
    require_grads_attrs = {k: base.__dict__[k] for k in ("_require_grads_hook", "_require_grads_hooks")
                           if k in base.__dict__}
    use_cache = getattr(base.config, "use_cache", None)
    generation_config = copy.deepcopy(getattr(base, "generation_config", None))
    try:
        yield
    finally:
        if not checkpointing and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            _set_activation_checkpointing(model, False)
        if embeddings is not None:
            for key in set(embeddings._forward_hooks) - embedding_hooks:
                hook = embeddings._forward_hooks[key]
                if "make_inputs_require_grads" in getattr(hook, "__qualname__", ""):
                    for hooks in (embeddings._forward_hooks, embeddings._forward_hooks_with_kwargs,
                                  embeddings._forward_hooks_always_called):
                        hooks.pop(key, None)
        for key in ("_require_grads_hook", "_require_grads_hooks"):
            base.__dict__.pop(key, None)
        base.__dict__.update(require_grads_attrs)
        for module in model.modules():
            before = saved_attrs.get(id(module), (module, {}))[1]
            for key in _TRAINER_MODULE_ATTRS:
                if key in before:
                    module.__dict__[key] = before[key]
                else:
                    module.__dict__.pop(key, None)
        if use_cache is not None:
            base.config.use_cache = use_cache
        if generation_config is not None:
            base.generation_config = generation_config


# ----------------------------------------------------------------------------------------------------------------
# model set-up


def _load_model(config: LifelongConfig):
    """The base model from `config.model` (4-bit NF4 when `lora.load_in_4bit`)."""
    from transformers import AutoModelForCausalLM

    if config.model is None:
        raise ValueError("no model: set LifelongConfig.model (path or hub id) or pass model= to run_lifelong")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, config.torch_dtype)}
    if config.lora.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"],
            bnb_4bit_use_double_quant=True,
        )
    return AutoModelForCausalLM.from_pretrained(config.model, **kwargs)


def _load_model_and_tokenizer(config: LifelongConfig, model, tokenizer):
    from transformers import AutoTokenizer

    if model is None:
        model = _load_model(config)
    elif config.lora.load_in_4bit:
        raise ValueError("lora.load_in_4bit needs the model to be loaded by the runner (set `model`, pass no model=)")
    if tokenizer is None:
        source = config.tokenizer or config.model
        if source is None:
            raise ValueError("no tokenizer: set LifelongConfig.tokenizer / model or pass tokenizer= to run_lifelong")
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def wrap_lora(config: LifelongConfig, model):
    """`model` with the run's LoRA adapter, initialised from `config.seed` (a `PeftModel` is checked and kept)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        if "default" not in model.peft_config:
            raise ValueError(f"the PeftModel passed to run_lifelong needs a 'default' adapter, has "
                             f"{sorted(model.peft_config)}")
        _drop_ref_adapter(model)
        return model
    if config.lora.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the adapter's initial A is the same in every run of this config
        return get_peft_model(model, lora)


# ----------------------------------------------------------------------------------------------------------------
# stages


def _training_args(config: LifelongConfig, task_index: int, output_dir: Path):
    from trl_lifealign.fpo import FPOConfig

    values: dict[str, Any] = {"report_to": [], "save_strategy": "no", "logging_steps": 10,
                              "per_device_train_batch_size": 4}
    values.update(config.training)
    values.update(config.tasks[task_index].overrides)
    values.update(output_dir=str(output_dir), seed=config.seed + task_index)
    return FPOConfig(**cpu_process_group_defaults(values))


def _sft_warmup(config: LifelongConfig, model, tokenizer, rows: list[dict], task_index: int, output_dir: Path,
                show_progress: bool) -> dict:
    """Causal-LM warm-up on prompt -> chosen (prompt tokens masked) with a plain `transformers.Trainer`."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from .evaluation import _render

    settings = config.sft_warmup
    examples = []
    for row in rows:
        ids, prefix = _render(tokenizer, row["prompt"], row["chosen"])
        ids = ids[: settings.max_length]
        labels = [-100] * min(prefix, len(ids)) + ids[prefix:]
        if any(label != -100 for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise ValueError(f"task {config.tasks[task_index].name!r}: no SFT warm-up example has a response left "
                         f"within sft_warmup.max_length={settings.max_length}")
    pad_id = tokenizer.pad_token_id

    def collate(batch):
        width = max(len(e["input_ids"]) for e in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
            attention[i, : len(e["input_ids"])] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    shared = {k: v for k, v in config.training.items() if k in ("bf16", "fp16", "gradient_checkpointing",
                                                                "gradient_accumulation_steps", "use_cpu",
                                                                "ddp_backend")}
    shared = cpu_process_group_defaults(shared)
    args = TrainingArguments(
        output_dir=str(output_dir), learning_rate=settings.learning_rate, num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.per_device_train_batch_size, seed=config.seed + task_index,
        report_to=[], save_strategy="no", logging_steps=10, remove_unused_columns=False,
        disable_tqdm=not show_progress, **shared,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples), data_collator=collate)
    output = trainer.train()
    return {"examples": len(examples), "train_loss": output.training_loss, "steps": output.global_step}


# ----------------------------------------------------------------------------------------------------------------
# the run


def load_eval_sets(config: LifelongConfig) -> tuple[list[EvalSet], list[dict[str, Any]]]:
    """The run's evaluation sets (the matrix columns, `evaluation.max_rows` applied) and a summary of each."""
    eval_sets, eval_summaries = [], []
    for spec in config.resolved_eval_sets():
        data = load_preference_data(spec.source, config.skip_bad_rows)
        rows = data.rows[: config.evaluation.max_rows] if config.evaluation.max_rows else data.rows
        eval_sets.append(EvalSet(spec.name, rows))
        eval_summaries.append({"name": spec.name, **data.summary(), "rows_evaluated": len(rows)})
    return eval_sets, eval_summaries


def _load_all_data(config: LifelongConfig):
    task_data: list[list[PreferenceData]] = []
    for task in config.tasks:
        task_data.append([load_preference_data(source, config.skip_bad_rows) for source in task.train_sources()])
    return (task_data, *load_eval_sets(config))


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

    Works in one process and under `accelerate launch` (DDP or DeepSpeed ZeRO-3): every rank runs the loop, rank 0
    writes the files.
    """
    from trl_lifealign.fpo import FPOTrainer
    from trl_lifealign.slmc import MemoryConsolidationCallback

    started = time.perf_counter()
    state = _state()
    main = state.is_main_process
    if config.optimizer == "carry" and _uses_deepspeed():
        raise ValueError("optimizer: 'carry' is not supported under DeepSpeed (its optimizer state is partitioned "
                         "inside the engine of each task's trainer); use optimizer: reset")
    run_dir = Path(config.output_dir)
    fingerprint = config_fingerprint(config, model is not None)
    state_path = run_dir / STATE_FILE
    run_state: dict[str, Any] = {"version": STATE_VERSION, "fingerprint": fingerprint, "completed": []}
    if state_path.exists():
        with open(state_path, encoding="utf-8") as handle:
            run_state = json.load(handle)
        if run_state.get("fingerprint") != fingerprint:
            raise ValueError(f"{run_dir} holds a run of a different configuration (fingerprint "
                             f"{run_state.get('fingerprint')} != {fingerprint}); use another output_dir or delete it")
    completed: list[dict] = run_state["completed"]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {"fingerprint": fingerprint, **config.to_dict()}, default=str)
    state.wait_for_everyone()

    task_data, eval_sets, eval_summaries = _load_all_data(config)
    # DeepSpeed wraps the model in an engine per trainer; a model already partitioned by one engine cannot be handed
    # to the next, so under DeepSpeed every stage gets a freshly loaded model carrying the adapter's current values.
    deepspeed_rebuild = _uses_deepspeed()
    if deepspeed_rebuild and model is not None:
        raise ValueError("under DeepSpeed the runner reloads the model for every stage: set `model` (a path or hub "
                         "id) instead of passing an in-memory model")
    model, tokenizer = _load_model_and_tokenizer(config, model, tokenizer)
    model = wrap_lora(config, model)
    completed_at_start = list(completed)
    show = main if show_progress is None else (main and show_progress)

    # π₀ log-probs: once, before the first task (a resumed run reads them back).
    evaluation = config.evaluation
    ref_path = run_dir / "reference_logps.json"
    if ref_path.exists():
        with open(ref_path, encoding="utf-8") as handle:
            reference = json.load(handle)
    else:
        if completed:
            raise RuntimeError(f"{ref_path} is missing but {len(completed)} task(s) are committed; cannot resume")
        reference = reference_logps(model, tokenizer, eval_sets, evaluation.batch_size, evaluation.max_length, show)
        if main:
            atomic_write_json(ref_path, reference, default=str)
    initial_row = [preference_scores(reference[s.name], reference[s.name]) for s in eval_sets]
    scorers = [SCORERS[name]() for name in evaluation.scorers] if evaluation.generation else []
    if scorers and "initial_generation" not in run_state:
        run_state["initial_generation"] = evaluate_generation(model, tokenizer, eval_sets, scorers,
                                                              evaluation.generation_rows, evaluation.max_new_tokens,
                                                              evaluation.batch_size)

    memory_dir = run_dir / "memory"
    replay = ReplayBuffer(config.replay.fraction, config.replay.capacity, config.replay.seed)
    optimizer_state = None
    if completed:  # resume: restore everything from the last committed task
        last_dir = run_dir / completed[-1]["dir"]
        from safetensors.torch import load_file

        load_adapter_state(model, load_file(str(last_dir / "adapter" / "adapter_model.safetensors")))
        if main and config.memory.enabled:
            atomic_copytree(last_dir / "memory", memory_dir)
        replay = ReplayBuffer.load(last_dir / "replay.json")
        if config.optimizer == "carry":
            optimizer_state = torch.load(last_dir / "optimizer.pt", weights_only=False)
        logger.info("resuming %s after task %d/%d (%s)", run_dir, len(completed), len(config.tasks),
                    completed[-1]["name"])
    elif main and memory_dir.exists():
        shutil.rmtree(memory_dir)  # a crash before the first commit: start the memory afresh
    state.wait_for_everyone()
    memory = (MemoryConsolidationCallback(memory_dir, config.memory.energy_threshold, config.memory.overlap_weight,
                                          adapter_names=["default"], consolidate_on_train_end=False)
              if config.memory.enabled else None)

    from tqdm.auto import tqdm

    progress = tqdm(total=len(config.tasks), initial=len(completed), desc="tasks", disable=not show)
    for index in range(len(completed), len(config.tasks)):
        task = config.tasks[index]
        task_started = time.perf_counter()
        progress.set_postfix_str(task.name)
        task_dir = _task_dir(run_dir, index, task.name)
        if main:
            shutil.rmtree(task_dir, ignore_errors=True)  # leftovers of an interrupted attempt
            task_dir.mkdir(parents=True)
        state.wait_for_everyone()
        _set_all_seeds(config.seed + index)
        own_rows = [row for data in task_data[index] for row in data.rows]
        train_rows = own_rows + replay.rows()
        task_record: dict[str, Any] = {"name": task.name, "dir": str(task_dir.relative_to(run_dir)),
                                       "train_pairs": len(own_rows), "replayed_pairs": len(train_rows) - len(own_rows),
                                       "replay_by_task": replay.counts_by_task(),
                                       "data": [d.summary() for d in task_data[index]]}
        if deepspeed_rebuild and index > len(completed_at_start):
            model = _rebuild_for_new_engine(config, model)
        if memory is not None:
            memory.begin_task(model)
        if config.sft_warmup.enabled:
            with _trainer_stage(model):
                task_record["sft_warmup"] = _sft_warmup(config, model, tokenizer, train_rows, index,
                                                        task_dir / "sft_trainer", show)
            _set_all_seeds(config.seed + index)

        from datasets import Dataset

        if deepspeed_rebuild and config.sft_warmup.enabled:
            model = _rebuild_for_new_engine(config, model)
        _drop_ref_adapter(model)
        with _trainer_stage(model):
            args = _training_args(config, index, task_dir / "trainer")
            args.disable_tqdm = args.disable_tqdm or not show
            trainer = FPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                 processing_class=tokenizer, callbacks=list(callbacks or []))
            if args.disable_tqdm:  # no per-step bars: do not print every log dict either (kept in metrics.json)
                from transformers.trainer_callback import PrinterCallback

                trainer.remove_callback(PrinterCallback)
            if config.reference == "base":
                _drop_ref_adapter(model)  # TRL then runs the reference with the adapter disabled
            elif "ref" not in model.peft_config:
                raise RuntimeError("reference 'previous_task' needs TRL's frozen 'ref' adapter, which this trl "
                                   "version did not create")
            if config.optimizer == "carry" and optimizer_state is not None:
                trainer.create_optimizer()
                trainer.optimizer.load_state_dict(optimizer_state)
            output = trainer.train()
            task_record["train"] = {"train_loss": output.training_loss, "steps": output.global_step,
                                    "log": [e for e in trainer.state.log_history if "loss" in e][-1:]}
            if config.optimizer == "carry":
                optimizer_state = trainer.optimizer.state_dict()
                # accelerate wraps the optimizer; its state dict is the torch one.
            _drop_ref_adapter(model)
        if memory is not None:
            report = memory.consolidate(model)
            task_record["consolidation"] = {k: v for k, v in dataclasses.asdict(report).items() if k != "factors"}
        del trainer

        weights = adapter_state(model)
        row = evaluate_preferences(model, tokenizer, eval_sets, reference, evaluation.batch_size,
                                   evaluation.max_length, show)
        task_record["row"] = row
        if scorers:
            task_record["generation"] = evaluate_generation(model, tokenizer, eval_sets, scorers,
                                                            evaluation.generation_rows, evaluation.max_new_tokens,
                                                            evaluation.batch_size)
        replay.add_task(task.name, index, own_rows)
        task_record["seconds"] = time.perf_counter() - task_started
        if main:
            from safetensors.torch import save_file

            adapter_dir = task_dir / "adapter"
            adapter_dir.mkdir()
            save_file(weights, str(adapter_dir / "adapter_model.safetensors"))
            model.peft_config["default"].save_pretrained(str(adapter_dir))
            tokenizer.save_pretrained(str(adapter_dir))
            if memory is not None:
                atomic_copytree(memory_dir, task_dir / "memory")
            replay.save(task_dir / "replay.json")
            if config.optimizer == "carry":
                torch.save(optimizer_state, task_dir / "optimizer.pt")
            atomic_write_json(task_dir / "metrics.json", task_record, default=str)
            completed.append(task_record)
            atomic_write_json(state_path, {**run_state, "completed": completed}, default=str)  # the commit point
        else:
            completed.append(task_record)
        state.wait_for_everyone()
        progress.update(1)
    progress.close()

    from .report import build_report, write_report

    report = build_report(config, completed, initial_row, [s.name for s in eval_sets], eval_summaries,
                          run_state.get("initial_generation"), seconds=time.perf_counter() - started)
    if main:
        write_report(run_dir, report)
    state.wait_for_everyone()
    return LifelongResult(
        run_dir=run_dir, task_names=[t.name for t in config.tasks], eval_names=[s.name for s in eval_sets],
        matrix=report["matrix"]["accuracy"], initial_row=report["initial_row"]["accuracy"],
        margin_matrix=report["matrix"]["margin"], metrics=report["metrics"], seconds=report["seconds"],
        generation=report.get("generation"), report=report,
    )
