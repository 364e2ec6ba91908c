"""The evaluation matrix: implicit-reward preference accuracy (and optional generation metrics) on eval sets.

For a pair (x, y_w, y_l) the implicit reward of a response is r(y) = log π(y|x) − log π₀(y|x), with π₀ the model
before the first task; the margin is r(y_w) − r(y_l) and the pair counts as correct when the margin is positive (ties
count one half, so the untrained model scores exactly 0.5). π₀'s log-probs are computed once (`reference_logps`) and
reused after every task.

Callable on any causal LM + tokenizer + list of `EvalSet`s, so other drivers (e.g. the Axolotl chain) score their
stages with the same code:

    sets = [EvalSet("helpful", rows)]
    ref = reference_logps(base_model, tokenizer, sets)
    scores = evaluate_preferences(trained_model, tokenizer, sets, ref)   # [{"accuracy":..., "margin":...}]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .metrics import preference_accuracy


@dataclass
class EvalSet:
    """A named list of preference rows ({"prompt", "chosen", "rejected"}, strings or message lists)."""

    name: str
    rows: list[dict[str, Any]]


def _render(tokenizer, prompt: Any, completion: Any) -> tuple[list[int], int]:
    """Token ids of prompt+completion (+EOS for plain text) and the prompt's length in tokens."""
    if isinstance(prompt, list):  # conversational
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion)["input_ids"]
        if tokenizer.eos_token_id is not None:
            full_ids = full_ids + [tokenizer.eos_token_id]
    # Tokenizers may merge across the prompt/completion border: the completion starts after the common prefix.
    prefix = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        prefix += 1
    return full_ids, prefix


def _model_device(model) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts: Sequence[Any], completions: Sequence[Any], batch_size: int = 8,
                   max_length: int = 512) -> list[float]:
    """Summed log π(completion | prompt) per row (completion tokens only, truncated to `max_length` tokens)."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    results: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [_render(tokenizer, p, c) for p, c in zip(prompts[start:start + batch_size],
                                                                  completions[start:start + batch_size])]
            encoded = [(ids[:max_length], min(prefix, max_length)) for ids, prefix in encoded]
            width = max(len(ids) for ids, _ in encoded)
            input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(encoded), width), dtype=torch.long)
            completion = torch.zeros((len(encoded), width), dtype=torch.bool)
            for row, (ids, prefix) in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                completion[row, prefix: len(ids)] = True
            input_ids, attention, completion = input_ids.to(device), attention.to(device), completion.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            token_logps = torch.gather(logits.log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)
            token_logps = token_logps.masked_fill(~completion[:, 1:], 0.0)
            results.extend(token_logps.sum(1).tolist())
    finally:
        model.train(was_training)
    return results


def pair_logps(model, tokenizer, eval_set: EvalSet, batch_size: int = 8, max_length: int = 512) -> dict:
    """{"chosen": [...], "rejected": [...]} summed log-probs of each pair's responses."""
    prompts = [row["prompt"] for row in eval_set.rows]
    return {
        "chosen": sequence_logps(model, tokenizer, prompts, [r["chosen"] for r in eval_set.rows], batch_size,
                                 max_length),
        "rejected": sequence_logps(model, tokenizer, prompts, [r["rejected"] for r in eval_set.rows], batch_size,
                                   max_length),
    }


def _progress(iterable, description: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, disable=disable, leave=False)


def reference_logps(model, tokenizer, eval_sets: Sequence[EvalSet], batch_size: int = 8, max_length: int = 512,
                    show_progress: bool = False) -> dict[str, dict]:
    """π₀'s pair log-probs for every eval set (compute once, before the first task, and reuse)."""
    return {s.name: pair_logps(model, tokenizer, s, batch_size, max_length)
            for s in _progress(eval_sets, "eval π₀", not show_progress)}


def preference_scores(policy: dict, reference: dict) -> dict[str, float]:
    """Accuracy (ties = ½) and mean margin from policy and π₀ pair log-probs."""
    margins = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in
               zip(policy["chosen"], policy["rejected"], reference["chosen"], reference["rejected"], strict=True)]
    bad = [i for i, m in enumerate(margins) if not math.isfinite(m)]
    if bad:
        raise FloatingPointError(f"non-finite reward margin on eval rows {bad[:5]} (diverged training?)")
    return {"accuracy": preference_accuracy(margins), "margin": sum(margins) / len(margins), "pairs": len(margins)}


def evaluate_preferences(model, tokenizer, eval_sets: Sequence[EvalSet], reference: dict[str, dict],
                         batch_size: int = 8, max_length: int = 512, show_progress: bool = False) -> list[dict]:
    """One row of the evaluation matrix: per eval set, accuracy / mean margin against the cached π₀ log-probs."""
    row = []
    for eval_set in _progress(eval_sets, "eval", not show_progress):
        if eval_set.name not in reference:
            raise KeyError(f"no π₀ log-probs cached for eval set {eval_set.name!r}")
        row.append(preference_scores(pair_logps(model, tokenizer, eval_set, batch_size, max_length),
                                     reference[eval_set.name]))
    return row


# ----------------------------------------------------------------------------------------------------------------
# Generation metrics. A scorer compares generated texts with references; an LLM judge plugs in as another Scorer.


@runtime_checkable
class Scorer(Protocol):
    """Scores generations against references (higher is better). `name` is the metric's key in reports."""

    name: str

    def score(self, prompts: Sequence[Any], predictions: Sequence[str], references: Sequence[str]) -> float: ...


class BLEU4Scorer:
    """Corpus BLEU-4 (sacrebleu, 13a tokenization, 0..100) of greedy outputs against `chosen`."""

    name = "bleu4"

    def score(self, prompts, predictions, references) -> float:
        import sacrebleu

        return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


class RougeLScorer:
    """Mean ROUGE-L F1 (rouge-score, stemmed, ×100) of greedy outputs against `chosen`."""

    name = "rougeL"

    def score(self, prompts, predictions, references) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        values = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return 100.0 * sum(values) / len(values)


SCORERS = {"bleu4": BLEU4Scorer, "rougeL": RougeLScorer}


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value)
    return value


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int = 64, batch_size: int = 8) -> list:
    """Greedy continuations (decoded, special tokens stripped) of each prompt."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    outputs: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                     if isinstance(p, list) else p for p in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True,
                                add_special_tokens=not isinstance(batch[0], list)).to(device)
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            outputs.extend(tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:],
                                                  skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def evaluate_generation(model, tokenizer, eval_sets: Sequence[EvalSet], scorers: Sequence[Scorer], rows: int = 16,
                        max_new_tokens: int = 64, batch_size: int = 8) -> list[dict[str, float]]:
    """Per eval set, each scorer's value on greedy generations for the first `rows` prompts (reference: chosen)."""
    results = []
    for eval_set in eval_sets:
        subset = eval_set.rows[:rows]
        prompts = [row["prompt"] for row in subset]
        predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
        references = [_as_text(row["chosen"]) for row in subset]
        results.append({s.name: s.score(prompts, predictions, references) for s in scorers})
    return results
