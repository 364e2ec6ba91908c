"""Everything that reaches into TRL / transformers / accelerate internals, in one place.

Each function says which upstream versions need it. The rest of the package calls these instead of touching private
attributes, so an upstream change is fixed here once.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch

__all__ = [
    "bind_dpo_trainer_arguments",
    "prepare_trainer_inputs",
    "trainer_metrics_kept",
    "handed_back_as_received",
    "quiet_checkpointing_deprecations",
    "quiet_dataset_progress",
    "quiet_third_party",
    "record_trainer_metric",
    "set_activation_checkpointing",
    "tokenize_preference_rows",
]


# ----------------------------------------------------------------------------------------- DPOTrainer arguments


def bind_dpo_trainer_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{parameter name: value}`` of a ``DPOTrainer.__init__(*args, **kwargs)`` call, bound by its signature.

    Keyword arguments that are not ``DPOTrainer`` parameters (e.g. Axolotl's ``dataset_tags``, consumed by a
    subclass) are left out. Raises ``TypeError`` if the call does not fit the signature (e.g. too many positionals).
    """
    from trl import DPOTrainer

    signature = inspect.signature(DPOTrainer.__init__)
    known = {key: value for key, value in kwargs.items() if key in signature.parameters}
    bound = signature.bind_partial(None, *args, **known)  # None stands for `self`
    bound.arguments.pop(next(iter(signature.parameters)))
    return dict(bound.arguments)


def replace_dpo_trainer_argument(args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the same call with parameter ``name`` set to ``value`` (positional stays positional)."""
    from trl import DPOTrainer

    names = list(inspect.signature(DPOTrainer.__init__).parameters)[1:]
    index = names.index(name)
    if index < len(args):
        args = (*args[:index], value, *args[index + 1:])
    else:
        kwargs = {**kwargs, name: value}
    return args, kwargs


# ------------------------------------------------------------------------------------------ trainer metrics


def record_trainer_metric(trainer, name: str, value: float) -> None:
    """Append ``value`` to TRL's per-mode metric lists (``trainer._metrics``, trl 1.9–1.16): ``DPOTrainer.log`` /
    ``SFTTrainer.log`` average them into the next log, so they reach every ``report_to`` logger."""
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode][name].append(float(value))


def prepare_trainer_inputs(trainer, inputs):
    """``Trainer._prepare_inputs`` (transformers 5.16 and 5.23): a batch moved to the device as training does."""
    return trainer._prepare_inputs(inputs)


@contextlib.contextmanager
def trainer_metrics_kept(trainer) -> Iterator[None]:
    """Restore TRL's metric store (``trainer._metrics``, trl 1.9–1.16) and FPO's token count
    (``_total_train_tokens``) on exit: forward passes outside training must not reach the next log."""
    saved = {key: copy.deepcopy(getattr(trainer, key)) for key in ("_metrics", "_total_train_tokens")
             if hasattr(trainer, key)}
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(trainer, key, value)


# ------------------------------------------------------------------------------------ quiet third-party output

_CHECKPOINTING_DEPRECATIONS = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"


@contextlib.contextmanager
def quiet_checkpointing_deprecations() -> Iterator[None]:
    """Silence transformers >= 5.23's ``gradient_checkpointing*`` FutureWarnings raised by calls *inside* TRL and PEFT
    (trl 1.16 ``disable_gradient_checkpointing``, peft 0.21 ``PeftModel.__init__``), which a user cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CHECKPOINTING_DEPRECATIONS, category=FutureWarning)
        yield


@contextlib.contextmanager
def quiet_dataset_progress(enabled: bool = True) -> Iterator[None]:
    """Hide ``datasets``' map/filter progress bars (TRL's "Tokenizing ..." bars) inside the block and restore the
    user's global setting afterwards; a no-op with ``enabled=False``."""
    if not enabled:
        yield
        return
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


# Loggers of libraries whose warnings and notices a command-line user cannot act on ("Setting accelerator to CPU",
# bitsandbytes' optional-kernel notice, TRL's "use_reentrant" hints, ...). DeepSpeed sets its logger's level when it is
# imported, so a filter (which survives `setLevel`) is used there too.
# "torch" covers its children that keep the inherited level (torchao's import makes torch.utils._pytree warn about
# `register_constant` on Enums, torch 2.13).
_THIRD_PARTY_LOGGERS = ("transformers", "datasets", "accelerate", "peft", "trl", "DeepSpeed", "deepspeed",
                        "bitsandbytes", "torchao", "torch", "torch.distributed", "huggingface_hub", "axolotl")
_THIRD_PARTY_MODULES = r"(transformers|trl|peft|accelerate|datasets|deepspeed|bitsandbytes|torchao|torch)(\.|$)"


class _BelowError:
    @staticmethod
    def filter(record) -> bool:
        return record.levelno >= 40  # logging.ERROR


@contextlib.contextmanager
def quiet_third_party(enabled: bool = True) -> Iterator[None]:
    """Only errors from third-party libraries inside the block (their warnings, notices and dataset progress bars are
    hidden); every logger, filter and the warnings state are restored afterwards. The command line uses it unless
    ``--verbose``; our own progress bars and messages are unaffected."""
    if not enabled:
        yield
        return
    import logging

    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in _THIRD_PARTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    bars = transformers_logging.is_progress_bar_enabled()  # "Loading weights" and hub download bars
    for logger in loggers:
        logger.setLevel(logging.ERROR)
        logger.addFilter(_BelowError)
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), quiet_dataset_progress():
            warnings.filterwarnings("ignore", module=_THIRD_PARTY_MODULES)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
            logger.removeFilter(_BelowError)
        if bars:
            transformers_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------ activation checkpointing


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Switch activation (gradient) checkpointing on the base model, by the name this transformers version uses
    (5.23 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``; the old names warn)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "activation_checkpointing" if hasattr(base, "activation_checkpointing_disable") else "gradient_checkpointing"
    getattr(base, f"{name}_{'enable' if enabled else 'disable'}")()


def _checkpointing_enabled(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ------------------------------------------------------------------------------------ trainer state on a model

# Instance attributes accelerate's `prepare` leaves on modules (accelerate 1.13–1.15): the mixed-precision forward
# wrapper (`forward` / `_original_forward`, e.g. bf16 autocast) and the "already prepared" flag, which makes the next
# trainer skip preparing the model (so it would not apply its own precision).
_ACCELERATE_MODULE_ATTRS = ("forward", "_original_forward", "_is_accelerate_prepared")
# transformers 5.x `enable_input_require_grads` hooks, stored under one of these names depending on the version.
_REQUIRE_GRADS_ATTRS = ("_require_grads_hook", "_require_grads_hooks")


@contextlib.contextmanager
def handed_back_as_received(model) -> Iterator[None]:
    """Undo, when the block exits, what a ``Trainer`` built inside it left on ``model``.

    Trainers leave state on the model they trained: accelerate's (autocast) forward wrapper and "prepared" flag,
    activation checkpointing and input-require-grads hooks switched on by TRL (its default
    ``gradient_checkpointing=True``; one more hook per trainer), ``config.use_cache`` and the generation config. Left
    in place, the next stage would run differently in an uninterrupted run than in a resumed one (whose model is
    freshly built), and evaluation would run under the last trainer's autocast.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_attrs = {id(m): {k: m.__dict__[k] for k in _ACCELERATE_MODULE_ATTRS if k in m.__dict__}
                   for m in model.modules()}
    checkpointing = _checkpointing_enabled(model)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embedding_hooks = set(embeddings._forward_hooks) if embeddings is not None else set()
    require_grads = {k: base.__dict__[k] for k in _REQUIRE_GRADS_ATTRS if k in base.__dict__}
    use_cache = getattr(base.config, "use_cache", None)
    generation_config = copy.deepcopy(getattr(base, "generation_config", None))
    try:
        yield
    finally:
        if not checkpointing and _checkpointing_enabled(model):
            set_activation_checkpointing(model, False)
        if embeddings is not None:
            _remove_new_require_grads_hooks(embeddings, embedding_hooks)
        for key in _REQUIRE_GRADS_ATTRS:
            base.__dict__.pop(key, None)
        base.__dict__.update(require_grads)
        for module in model.modules():
            before = saved_attrs.get(id(module), {})
            for key in _ACCELERATE_MODULE_ATTRS:
                if key in before:
                    module.__dict__[key] = before[key]
                else:
                    module.__dict__.pop(key, None)
        if use_cache is not None:
            base.config.use_cache = use_cache
        if generation_config is not None:
            base.generation_config = generation_config


def _remove_new_require_grads_hooks(embeddings: torch.nn.Module, hooks_before: set) -> None:
    for key in set(embeddings._forward_hooks) - hooks_before:
        hook = embeddings._forward_hooks[key]
        if "make_inputs_require_grads" in getattr(hook, "__qualname__", ""):
            for hooks in (embeddings._forward_hooks, embeddings._forward_hooks_with_kwargs,
                          embeddings._forward_hooks_always_called):
                hooks.pop(key, None)


# ------------------------------------------------------------------------------------- TRL's pair tokenisation


class _TokenizerHolder(SimpleNamespace):
    """The one attribute ``DPOTrainer._prepare_dataset`` reads from ``self`` (trl 1.9 and 1.16: ``_tokenizer``)."""


def tokenize_preference_rows(tokenizer, rows: Sequence[dict[str, Any]], max_length: int | None,
                             truncation_mode: str = "keep_start") -> tuple[list[dict[str, list[int]]], list[int]]:
    """Tokenise preference rows exactly as ``DPOTrainer`` does before training (its own ``_prepare_dataset``: EOS
    added to string answers, chat template for conversations, prompt/completion split, rows whose prompt alone fills
    ``max_length`` dropped), so evaluation scores the sequences training optimised.

    Returns ``(examples, kept)``: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` per surviving row, and the indices
    of those rows in ``rows``. ``_prepare_dataset`` is private (trl 1.9–1.16 share its signature).
    """
    from datasets import Dataset
    from trl import DPOTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                  "row_index": i} for i, r in enumerate(rows)])
    settings = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    with quiet_dataset_progress():
        prepared = DPOTrainer._prepare_dataset(_TokenizerHolder(_tokenizer=tokenizer), dataset, tokenizer, settings,
                                               "evaluation")
    columns = prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids", "row_index"]).to_list()
    return ([{k: c[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for c in columns],
            [c["row_index"] for c in columns])


def preference_collator(pad_token_id: int, max_length: int | None, truncation_mode: str = "keep_start"):
    """TRL's ``DataCollatorForPreference`` (trl 1.9 and 1.16): ``[chosen; rejected]`` rows, right padding, a
    ``completion_mask``, truncation to ``max_length`` as in training."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode)
