"""``KLAnchorCallback``: a prompt-only memory and a KL anchor to the policy as each task started (LwF, see ``math``).

After each task's last optimizer step, up to ``prompts_per_task`` distinct prompts of the task's training data are
taken from the trainer's tokenised ``train_dataset`` (the ``prompt_ids`` column every ``DPOTrainer`` builds, so any
data format works: plain or conversational, ids only), sampled deterministically from the task index, and the current
policy's greedy answers to them are generated. The ``(prompt_ids, answer_ids)`` pairs join a FIFO memory of
``capacity`` pairs in ``state_dir`` (one JSON file with a format version, written atomically). No preference labels
are kept.

During a later task every training batch adds ``weight · KL(π_ref ‖ π_θ)`` on ``batch_size`` stored pairs (the i-th
batch of the task takes pairs ``i·b …`` in turn), averaged over the answer tokens, where ``π_ref`` is TRL's frozen
``ref`` adapter: the policy as the task started (the lifelong runner's ``reference: previous_task``). The reference
forward runs without gradient; both run in the trainer's mode, precision and activation-checkpointing setting.
DeepSpeed and sharded (FSDP2) training are refused.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch

from ... import distributed as dist
from ...adapters import REF_ADAPTER
from ...atomic import atomic_write_json, read_versioned_json
from ...errors import LifeAlignError
from ..base import AuxiliaryLossMixin, TaskBoundaryCallback, is_last_step
from ..config import KLAnchorConfig
from .math import token_kl

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "KLAnchorCallback", "KLAnchorError", "MEMORY_FILE", "load_anchor_memory"]

FORMAT_NAME, FORMAT_VERSION = "trl-lifealign-kl-anchor-memory", 1
MEMORY_FILE = "kl_anchor_memory.json"


class KLAnchorError(LifeAlignError, RuntimeError):
    """The KL anchor cannot run: memory file missing or corrupt, no ``ref`` adapter, trainer not set up for it."""


def load_anchor_memory(state_dir: str | Path) -> list[dict]:
    """The stored pairs ``[{"task_index", "prompt_ids", "answer_ids"}, ...]``, oldest first; :class:`KLAnchorError`
    names the file when it is missing, truncated or not a KL-anchor memory."""
    path = Path(state_dir) / MEMORY_FILE
    data = read_versioned_json(path, FORMAT_NAME, (FORMAT_VERSION,), KLAnchorError, "KL anchor memory",
                               ": was the previous task trained with KLAnchorCallback and this state_dir?")
    pairs = data.get("pairs")
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and p.get("prompt_ids") and p.get("answer_ids")
                                              for p in pairs):
        raise KLAnchorError(f"KL anchor memory {path} has malformed pairs")
    return pairs


def _tokenizer(trainer):
    processing_class = getattr(trainer, "processing_class", None)
    return getattr(processing_class, "tokenizer", processing_class)  # a multimodal processor wraps one


def _pad(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of ``rows`` padded to one length, on the left or the right."""
    width = max(len(row) for row in rows)
    ids = [([pad_id] * (width - len(r)) + r) if left else (r + [pad_id] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


class KLAnchorCallback(TaskBoundaryCallback):
    """Anchor later tasks to the policy as they started on a prompt-only memory of earlier tasks' prompts.

    Args:
        config: the settings (:class:`~trl_lifealign.defences.config.KLAnchorConfig`; None: the defaults).
        state_dir: where the memory of (prompt, answer) pairs is kept (and read by a new callback, e.g. on resume).

    Needs a trainer that adds auxiliary losses (``FPOTrainer``, or a DPO trainer with
    :class:`~trl_lifealign.defences.base.AuxiliaryLossMixin` and ``bind_callbacks(trainer)``) and, from the second
    task on, TRL's frozen ``ref`` adapter (a ``PeftModel`` given to the trainer without ``peft_config``/``ref_model``).
    Logs ``kl_anchor/kl`` every step and ``kl_anchor/pairs`` at each task's end.
    """

    name = "kl_anchor"

    def __init__(self, config: KLAnchorConfig | None, state_dir: str | Path):
        super().__init__(state_dir)
        self.config = config if config is not None else KLAnchorConfig()
        self.pairs: list[dict] | None = None
        self.last_kl: float | None = None
        self._calls = 0
        self._finished = True

    # ------------------------------------------------------------------------------------------------ checks
    def _require_trainer(self):
        if self.trainer is None or not isinstance(self.trainer, AuxiliaryLossMixin):
            raise KLAnchorError("KLAnchorCallback needs a trainer that adds auxiliary losses and is bound to it: use "
                                "FPOTrainer, or a DPOTrainer subclass with AuxiliaryLossMixin first in its bases and "
                                "trl_lifealign.callbacks.bind_callbacks(trainer)")
        return self.trainer

    @staticmethod
    def _peft_model(trainer, model):
        unwrapped = trainer.accelerator.unwrap_model(model) if trainer is not None else model
        if REF_ADAPTER not in (getattr(unwrapped, "peft_config", None) or {}):
            adapters = sorted(getattr(unwrapped, "peft_config", None) or {})
            raise KLAnchorError(f"the KL anchor needs `reference: previous_task` (TRL's frozen {REF_ADAPTER!r} "
                                "adapter, made when the trainer is given a PeftModel without peft_config or "
                                f"ref_model); the model has adapters {adapters}")
        return unwrapped

    # ------------------------------------------------------------------------------------------ task boundaries
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.task_index is None:
            raise RuntimeError("KLAnchorCallback: call start_task(task_index) before training each task")
        trainer = self._require_trainer()
        if model is not None:
            # Measured: the anchor's extra forwards break ZeRO-3's gradient partitioning (an assertion in its
            # reduce epilogue); untested under ZeRO-1/2 and FSDP2.
            dist.refuse_sharded_training(model, "KLAnchorCallback", "its extra forward passes inside the training "
                                         "step are not supported by their gradient hooks", trainer, args)
        if self.task_index == 0:
            self.pairs = []
        elif self.pairs is None:
            self.pairs = load_anchor_memory(self.state_dir)
        if self.pairs:
            self._peft_model(trainer, model)
        self._calls = 0
        self._finished = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._finished and is_last_step(state):
            self.end_task(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._finished:  # training stopped before its last step: still a boundary
            self.end_task(model, state)

    def end_task(self, model, state=None) -> None:
        """Store the task's prompts with the policy's greedy answers (FIFO to ``capacity``) and log the memory size."""
        trainer = self._require_trainer()
        prompts = self.task_prompts(trainer.train_dataset)
        answers = self.generate(trainer, model, prompts)
        added = [{"task_index": self.task_index, "prompt_ids": p, "answer_ids": a} for p, a in zip(prompts, answers)]
        self.pairs = [*(self.pairs or []), *added][-self.config.capacity:]
        if dist.is_main_process():
            atomic_write_json(self.state_dir / MEMORY_FILE, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                                             "capacity": self.config.capacity, "pairs": self.pairs},
                              indent=None, separators=(",", ":"))
        dist.barrier()
        self.last_summary = {"pairs": len(self.pairs), "added": len(added),
                             "tasks": sorted({p["task_index"] for p in self.pairs})}
        self._finished = True
        self.log_metrics({"kl_anchor/pairs": float(len(self.pairs)), "kl_anchor/added": float(len(added))}, state)

    # -------------------------------------------------------------------------------------------------- memory
    def task_prompts(self, dataset) -> list[list[int]]:
        """Up to ``prompts_per_task`` distinct ``prompt_ids`` of ``dataset``, in an order drawn from the task index."""
        columns = getattr(dataset, "column_names", None)
        if dataset is None or (columns is not None and "prompt_ids" not in columns):
            raise KLAnchorError("KLAnchorCallback reads the tokenised 'prompt_ids' column DPOTrainer builds; the "
                                f"trainer's train_dataset has columns {columns}")
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            order = random.Random(self.task_index).sample(range(len(dataset)), len(dataset))
            rows = (dataset[i]["prompt_ids"] for i in order)
        else:  # an IterableDataset: its first prompts
            rows = (row["prompt_ids"] for row in dataset)
        distinct: dict[tuple[int, ...], None] = {}
        for row in rows:  # stop at the first prompts_per_task distinct prompts (rows are read one at a time)
            if len(row):
                distinct.setdefault(tuple(int(t) for t in row), None)
            if len(distinct) >= self.config.prompts_per_task:
                break
        return [list(p) for p in distinct]

    def generate(self, trainer, model, prompts: list[list[int]]) -> list[list[int]]:
        """The policy's greedy answers to ``prompts`` (left-padded batches, eval mode, ``max_new_tokens``), each cut
        after its first EOS."""
        tokenizer = _tokenizer(trainer)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise KLAnchorError("KLAnchorCallback needs the trainer's processing_class to have an eos_token_id")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        policy = trainer.accelerator.unwrap_model(model)
        device = next(policy.parameters()).device
        was_training, answers = policy.training, []
        policy.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(prompts), self.config.batch_size):
                    ids, mask = _pad(prompts[start:start + self.config.batch_size], pad, True, device)
                    out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.config.max_new_tokens,
                                          do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True)
                    for row in out[:, ids.shape[1]:].tolist():
                        answers.append(row[:row.index(eos) + 1] if eos in row else row)
        finally:
            policy.train(was_training)
        return answers

    # ------------------------------------------------------------------------------------------- the anchor
    def anchor_pairs(self, call: int) -> list[dict]:
        """The pairs the ``call``-th training batch of the task is anchored on (rotating through the memory)."""
        count = len(self.pairs or [])
        size = min(self.config.batch_size, count)
        start = (call * dist.world_size() + dist.rank()) * size
        return [self.pairs[(start + j) % count] for j in range(size)]

    def auxiliary_loss(self, trainer, model, inputs) -> torch.Tensor | None:
        """``weight · KL(π_ref ‖ π_θ)`` over the answer tokens of this batch's anchor pairs (None before any)."""
        if not self.pairs:
            return None
        pairs = self.anchor_pairs(self._calls)
        self._calls += 1
        from trl.trainer.utils import use_adapter

        peft_model = self._peft_model(trainer, model)
        tokenizer = _tokenizer(trainer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = inputs["input_ids"].device
        ids, attention = _pad([p["prompt_ids"] + p["answer_ids"] for p in pairs], pad, False, device)
        answer = [[0] * len(p["prompt_ids"]) + [1] * len(p["answer_ids"]) for p in pairs]
        answer_mask, _ = _pad(answer, 0, False, device)
        with torch.no_grad(), use_adapter(peft_model, REF_ADAPTER), warnings.catch_warnings():
            # Reentrant activation checkpointing warns that a no-grad forward has no input requiring grad.
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad", category=UserWarning)
            reference = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        policy = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        # Logits at position j predict token j + 1: anchor the positions that predict answer tokens.
        kl, _ = token_kl(policy[:, :-1], reference[:, :-1], answer_mask[:, 1:])
        self.last_kl = float(kl.detach())
        self.record_step_metric("kl_anchor/kl", self.last_kl)
        return self.config.weight * kl
