"""The evaluation matrix: implicit-reward preference accuracy of a policy against the initial policy π₀.

For a pair (x, y_w, y_l) the implicit reward of a response is r(y) = log π(y|x) − log π₀(y|x), π₀ being the model
before the first task; the margin is r(y_w) − r(y_l) and the pair counts as correct when the margin is positive (ties
count one half, so the untrained model scores exactly 0.5). π₀'s log-probs are computed once
(:func:`initial_policy_logps`) and reused after every task.

Pairs are tokenised exactly as ``DPOTrainer`` tokenises training data (``trl_lifealign.compat``: EOS, chat template,
prompt/completion split, rows whose prompt alone fills ``max_length`` dropped and counted) and per-token
log-probabilities come from TRL's ``selective_log_softmax`` (no full-vocabulary log-softmax tensor). Under several
ranks each rank scores a share of the pairs.

Callable on any causal LM + tokenizer + list of :class:`EvalSet`, so other drivers (the Axolotl chain, the
benchmark) score with the same code::

    sets = prepare_eval_sets(tokenizer, [EvalSet("helpful", rows)], max_length=512)
    initial = initial_policy_logps(base_model, sets)
    row = evaluate_preferences(trained_model, sets, initial)   # [{"accuracy", "margin", "pairs", "dropped"}]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed as dist
from ..compat import preference_collator, tokenize_preference_rows
from .metrics import preference_accuracy

__all__ = [
    "EvalSet",
    "PreparedEvalSet",
    "evaluate_preferences",
    "initial_policy_logps",
    "model_device",
    "pair_logps",
    "preference_scores",
    "prepare_eval_sets",
    "reference_logps",
]


@dataclass
class EvalSet:
    """A named list of preference rows ({"prompt", "chosen", "rejected"}, strings or message lists)."""

    name: str
    rows: list[dict[str, Any]]


@dataclass
class PreparedEvalSet:
    """An eval set tokenised the way ``DPOTrainer`` tokenises training pairs.

    Attributes:
        name: the set's name (a matrix column).
        examples: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` per scored pair.
        kept: indices (into the set's rows) of the scored pairs; the others' prompt alone fills ``max_length``.
        rows: number of rows in the set.
        pad_token_id / max_length: what the collator pads with and truncates to.
    """

    name: str
    examples: list[dict[str, list[int]]]
    kept: list[int]
    rows: int
    pad_token_id: int
    max_length: int | None
    source_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def dropped(self) -> int:
        """Rows not scored because their prompt alone fills ``max_length`` (TRL drops them from training too)."""
        return self.rows - len(self.kept)


def prepare_eval_sets(tokenizer, eval_sets: Sequence[EvalSet], max_length: int | None = 512) -> list[PreparedEvalSet]:
    """Tokenise every eval set once (reused for π₀ and every row of the matrix)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prepared = []
    for eval_set in eval_sets:
        examples, kept = tokenize_preference_rows(tokenizer, eval_set.rows, max_length)
        if not examples:
            raise ValueError(f"eval set {eval_set.name!r}: every prompt fills evaluation.max_length={max_length} on "
                             "its own, so no pair can be scored; raise max_length")
        prepared.append(PreparedEvalSet(eval_set.name, examples, kept, len(eval_set.rows),
                                        pad if pad is not None else 0, max_length, eval_set.rows))
    return prepared


def model_device(model) -> torch.device:
    """The device of the model's first materialised parameter (CPU if none)."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _batch_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs of every row of a collated ``[chosen; rejected]`` batch."""
    from trl.trainer.utils import selective_log_softmax

    device = model_device(model)
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    token_logps = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])
    return (token_logps * batch["completion_mask"][:, 1:].to(device)).sum(1).cpu()


@torch.no_grad()
def pair_logps(model, prepared: PreparedEvalSet, batch_size: int = 8) -> dict[str, list[float]]:
    """``{"chosen": [...], "rejected": [...]}``: summed log-probs of each scored pair's answers.

    With several ranks each rank scores every ``world_size``-th pair and the results are gathered; every rank runs
    the same number of forward passes (a sharded model's forward is a collective).
    """
    collate = preference_collator(prepared.pad_token_id, prepared.max_length)
    rank, world = dist.rank(), dist.world_size()
    mine = list(range(rank, len(prepared.examples), world))
    batches = math.ceil(math.ceil(len(prepared.examples) / world) / batch_size)
    was_training = model.training
    model.eval()
    scored: dict[int, tuple[float, float]] = {}
    try:
        for step in range(batches):
            indices = mine[step * batch_size:(step + 1) * batch_size]
            batch = collate([prepared.examples[i] for i in (indices or [0])])  # a padding pass keeps ranks in step
            chosen, rejected = _batch_logps(model, batch).chunk(2)
            scored.update({i: (c, r) for i, c, r in zip(indices, chosen.tolist(), rejected.tolist())})
    finally:
        model.train(was_training)
    for shard in dist.all_gather_objects(scored):
        scored.update(shard)
    order = range(len(prepared.examples))
    return {"chosen": [scored[i][0] for i in order], "rejected": [scored[i][1] for i in order]}


def _progress(iterable, description: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, disable=disable, leave=False)


def initial_policy_logps(model, eval_sets: Sequence[PreparedEvalSet], batch_size: int = 8,
                         show_progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """π₀'s pair log-probs for every eval set (compute once, before the first task, and reuse)."""
    return {s.name: pair_logps(model, s, batch_size) for s in _progress(eval_sets, "eval π₀", not show_progress)}


def reference_logps(model, tokenizer, eval_sets: Sequence[EvalSet], batch_size: int = 8, max_length: int = 512,
                    show_progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """Deprecated name of :func:`initial_policy_logps` (π₀ is not the DPO reference policy); removed in 0.3."""
    warnings.warn("reference_logps is deprecated: use prepare_eval_sets + initial_policy_logps (removed in 0.3)",
                  FutureWarning, stacklevel=2)
    return initial_policy_logps(model, prepare_eval_sets(tokenizer, eval_sets, max_length), batch_size, show_progress)


def preference_scores(policy: dict, initial: dict) -> dict[str, float]:
    """Accuracy (ties = ½) and mean margin from the policy's and π₀'s pair log-probs."""
    margins = [(pc - ic) - (pr - ir) for pc, pr, ic, ir in
               zip(policy["chosen"], policy["rejected"], initial["chosen"], initial["rejected"], strict=True)]
    bad = [i for i, m in enumerate(margins) if not math.isfinite(m)]
    if bad:
        raise FloatingPointError(f"non-finite reward margin on eval pairs {bad[:5]} (diverged training?)")
    return {"accuracy": preference_accuracy(margins), "margin": sum(margins) / len(margins), "pairs": len(margins)}


def evaluate_preferences(model, eval_sets: Sequence[PreparedEvalSet], initial: dict[str, dict],
                         batch_size: int = 8, show_progress: bool = False) -> list[dict]:
    """One row of the evaluation matrix: per eval set, accuracy / mean margin against π₀, pairs scored and dropped."""
    row = []
    for eval_set in _progress(eval_sets, "eval", not show_progress):
        if eval_set.name not in initial:
            raise KeyError(f"no π₀ log-probs cached for eval set {eval_set.name!r}")
        scores = preference_scores(pair_logps(model, eval_set, batch_size), initial[eval_set.name])
        row.append({**scores, "dropped": eval_set.dropped})
    return row
