"""The evaluation matrix code on a real tiny model: π₀ scores exactly 0.5, conversational rows, generation scorers."""

import pytest
import torch

from trl_lifealign.lifelong.evaluation import (
    BLEU4Scorer,
    EvalSet,
    RougeLScorer,
    Scorer,
    evaluate_generation,
    evaluate_preferences,
    reference_logps,
    sequence_logps,
)


@pytest.fixture
def eval_sets(preference_rows):
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in preference_rows[:4]]
    return [EvalSet("plain", preference_rows), EvalSet("chat", conversational)]


def test_untrained_model_scores_half_and_a_changed_model_does_not(tiny_model, tiny_tokenizer, eval_sets):
    reference = reference_logps(tiny_model, tiny_tokenizer, eval_sets, batch_size=3, max_length=64)
    # Different batch sizes give the same log-probs up to float noise: ties stay ties.
    row = evaluate_preferences(tiny_model, tiny_tokenizer, eval_sets, reference, batch_size=5, max_length=64)
    assert [cell["accuracy"] for cell in row] == [0.5, 0.5]
    assert all(abs(cell["margin"]) < 1e-4 for cell in row)
    with torch.no_grad():
        tiny_model.lm_head.weight.add_(torch.randn_like(tiny_model.lm_head.weight))
    changed = evaluate_preferences(tiny_model, tiny_tokenizer, eval_sets, reference, batch_size=5, max_length=64)
    assert any(cell["accuracy"] != 0.5 for cell in changed)
    with pytest.raises(KeyError, match="no π₀ log-probs"):
        evaluate_preferences(tiny_model, tiny_tokenizer, [EvalSet("other", eval_sets[0].rows)], reference)


def test_sequence_logps_counts_only_completion_tokens(tiny_model, tiny_tokenizer):
    short, longer = sequence_logps(tiny_model, tiny_tokenizer, ["Is water wet?"] * 2,
                                   ["Yes.", "Yes, water is wet and cows drink water."])
    assert longer < short < 0  # more completion tokens, lower summed log-prob


class LengthJudge:
    """A stand-in for an LLM judge: any object with `name` and `score(prompts, predictions, references)`."""

    name = "judge"

    def score(self, prompts, predictions, references):
        return float(sum(len(p) > 0 for p in predictions)) / len(predictions)


def test_generation_metrics_with_builtin_and_custom_scorers(tiny_model, tiny_tokenizer, eval_sets):
    scorers = [BLEU4Scorer(), RougeLScorer(), LengthJudge()]
    assert all(isinstance(s, Scorer) for s in scorers)
    results = evaluate_generation(tiny_model, tiny_tokenizer, eval_sets, scorers, rows=2, max_new_tokens=4)
    assert len(results) == 2 and set(results[0]) == {"bleu4", "rougeL", "judge"}
    for cell in results:
        assert 0.0 <= cell["bleu4"] <= 100.0 and 0.0 <= cell["rougeL"] <= 100.0 and 0.0 <= cell["judge"] <= 1.0
    perfect = [row["chosen"] for row in eval_sets[0].rows[:2]]
    assert BLEU4Scorer().score([], perfect, perfect) == pytest.approx(100.0)
    assert RougeLScorer().score([], perfect, perfect) == pytest.approx(100.0)
