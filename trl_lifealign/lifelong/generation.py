"""Generation metrics: greedy answers to eval prompts, scored against the preferred (``chosen``) answer.

The paper's metrics: BLEU-4 (sacrebleu) and ROUGE-L (rouge-score) on 0–100, and an LLM judge
(:class:`trl_lifealign.lifelong.judge.JudgeScorer`). A scorer is any object with a ``name`` and
``score(prompts, predictions, references) -> float``. The answers themselves are returned too, so a run can save
them next to the scores, and empty answers are counted: an instruct model trained without its chat template often
answers with end-of-sequence straight away, which n-gram metrics alone would only show as a low score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .decoding import generate_greedy
from .evaluation import EvalSet

__all__ = ["BLEU4Scorer", "GenerationResult", "RougeLScorer", "SCORERS", "Scorer", "as_text", "build_scorers",
           "evaluate_generation", "generate_greedy"]


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


def build_scorers(names: Sequence[str], judge: dict[str, Any] | None = None) -> list[Scorer]:
    """Scorers by name (``bleu4``, ``rougeL``, ``judge`` built from the ``judge`` settings)."""
    scorers: list[Scorer] = []
    for name in names:
        if name == "judge":
            from .judge import JudgeScorer

            scorers.append(JudgeScorer.from_config(judge or {}))
        else:
            scorers.append(SCORERS[name]())
    return scorers


def as_text(value: Any) -> str:
    """A string answer, or the concatenated contents of a message list."""
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value)
    return value


@dataclass
class GenerationResult:
    """One eval set's generation scores, the answers they were computed from, and what went wrong.

    Attributes:
        scores: ``{scorer name: value}``.
        prompts / answers / references: the scored items, in order (answers as generated).
        empty_answers: answers that are empty or whitespace only.
        judge: the LLM judge's summary (valid items, failures by kind) when a judge scored the set.
    """

    scores: dict[str, float | None]
    prompts: list[Any]
    answers: list[str]
    references: list[str]
    empty_answers: int
    judge: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a report row keeps (the answers go to a file of their own)."""
        out: dict[str, Any] = {**self.scores, "empty_answers": self.empty_answers, "answers": len(self.answers)}
        if self.judge is not None:
            out["judge_summary"] = self.judge
        return out


def _score(scorer: Scorer, prompts, answers, references) -> tuple[float | None, dict | None]:
    """The scorer's value and, for an LLM judge, its failure summary; a judge with no valid verdict at all gives
    ``None`` (reported as missing, never as a number)."""
    from .judge import JudgeError

    try:
        value = scorer.score(prompts, answers, references)
    except JudgeError as error:
        return None, error.result.summary() if error.result is not None else {"error": str(error)}
    last = getattr(scorer, "last_result", None)
    return value, (last.summary() if last is not None else None)


def evaluate_generation(model, tokenizer, eval_sets: Sequence[EvalSet], scorers: Sequence[Scorer], rows: int = 16,
                        max_new_tokens: int = 64, batch_size: int = 8) -> list[GenerationResult]:
    """Per eval set, greedy answers to the first `rows` prompts and each scorer's value against `chosen`."""
    results = []
    for eval_set in eval_sets:
        subset = eval_set.rows[:rows]
        prompts = [row["prompt"] for row in subset]
        answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
        references = [as_text(row["chosen"]) for row in subset]
        scores, judge = {}, None
        for scorer in scorers:
            scores[scorer.name], summary = _score(scorer, prompts, answers, references)
            judge = summary or judge
        results.append(GenerationResult(scores, prompts, answers, references,
                                        sum(1 for a in answers if not a.strip()), judge))
    return results
