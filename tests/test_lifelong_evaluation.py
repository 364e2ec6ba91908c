"""The evaluation matrix code on a real tiny model: π₀ scores exactly 0.5, TRL's tokenisation and truncation,
conversational rows, rank-independent results, generation scorers."""

import pytest
import torch

from trl_lifealign.lifelong.evaluation import (
    EvalSet,
    evaluate_preferences,
    initial_policy_logps,
    pair_logps,
    prepare_eval_sets,
    reference_logps,
)
from trl_lifealign.lifelong.generation import BLEU4Scorer, RougeLScorer, Scorer, evaluate_generation


@pytest.fixture
def eval_sets(preference_rows):
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in preference_rows[:4]]
    return [EvalSet("plain", preference_rows), EvalSet("chat", conversational)]


def test_untrained_model_scores_half_and_a_changed_model_does_not(tiny_model, tiny_tokenizer, eval_sets):
    prepared = prepare_eval_sets(tiny_tokenizer, eval_sets, max_length=64)
    initial = initial_policy_logps(tiny_model, prepared, batch_size=3)
    # Different batch sizes give the same log-probs up to float noise: ties stay ties.
    row = evaluate_preferences(tiny_model, prepared, initial, batch_size=5)
    assert [cell["accuracy"] for cell in row] == [0.5, 0.5]
    assert all(abs(cell["margin"]) < 1e-4 and cell["dropped"] == 0 for cell in row)
    with torch.no_grad():
        tiny_model.lm_head.weight.add_(torch.randn_like(tiny_model.lm_head.weight))
    changed = evaluate_preferences(tiny_model, prepared, initial, batch_size=5)
    assert any(cell["accuracy"] != 0.5 for cell in changed)
    other = prepare_eval_sets(tiny_tokenizer, [EvalSet("other", eval_sets[0].rows)], max_length=64)
    with pytest.raises(KeyError, match="no π₀ log-probs"):
        evaluate_preferences(tiny_model, other, initial)


def test_log_probs_match_a_plain_full_vocabulary_computation(tiny_model, tiny_tokenizer, preference_rows):
    """TRL's tokenisation (EOS appended to string answers) + selective log-softmax equal the textbook computation."""
    (prepared,) = prepare_eval_sets(tiny_tokenizer, [EvalSet("plain", preference_rows)], max_length=64)
    logps = pair_logps(tiny_model, prepared, batch_size=3)
    for index, example in enumerate(prepared.examples):
        for key in ("chosen", "rejected"):
            ids = torch.tensor([example["prompt_ids"] + example[f"{key}_ids"]])
            with torch.no_grad():
                full = tiny_model(ids).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            expected = full[torch.arange(len(targets)), targets][len(example["prompt_ids"]) - 1:].sum().item()
            assert logps[key][index] == pytest.approx(expected, abs=1e-4)
        assert example["chosen_ids"][-1] == tiny_tokenizer.eos_token_id


def test_pairs_whose_prompt_fills_max_length_are_dropped_and_counted(tiny_model, tiny_tokenizer, preference_rows):
    long_prompt = {"prompt": " ".join(["What colour is the sky?"] * 20), "chosen": "Blue.", "rejected": "Green."}
    (prepared,) = prepare_eval_sets(tiny_tokenizer, [EvalSet("mixed", [long_prompt, *preference_rows[:2]])],
                                    max_length=24)
    assert prepared.kept == [1, 2] and prepared.dropped == 1
    (row,) = evaluate_preferences(tiny_model, [prepared], initial_policy_logps(tiny_model, [prepared]))
    assert row["pairs"] == 2 and row["dropped"] == 1


def test_deprecated_reference_logps_still_works(tiny_model, tiny_tokenizer, eval_sets):
    with pytest.warns(FutureWarning, match="initial_policy_logps"):
        old = reference_logps(tiny_model, tiny_tokenizer, eval_sets, batch_size=4, max_length=64)
    new = initial_policy_logps(tiny_model, prepare_eval_sets(tiny_tokenizer, eval_sets, 64), batch_size=4)
    assert old == new


class LengthJudge:
    """A stand-in for an LLM judge: any object with `name` and `score(prompts, predictions, references)`."""

    name = "judge"

    def score(self, prompts, predictions, references):
        return float(sum(len(p) > 0 for p in predictions)) / len(predictions)


def test_generation_metrics_with_builtin_and_custom_scorers(tiny_model, tiny_tokenizer, eval_sets):
    scorers = [BLEU4Scorer(), RougeLScorer(), LengthJudge()]
    assert all(isinstance(s, Scorer) for s in scorers)
    results = evaluate_generation(tiny_model, tiny_tokenizer, eval_sets, scorers, rows=2, max_new_tokens=4)
    assert len(results) == 2 and set(results[0].scores) == {"bleu4", "rougeL", "judge"}
    for result in results:
        assert 0.0 <= result.scores["bleu4"] <= 100.0 and 0.0 <= result.scores["rougeL"] <= 100.0
        assert len(result.answers) == 2 and result.empty_answers == sum(not a.strip() for a in result.answers)
        assert set(result.summary()) >= {"bleu4", "rougeL", "judge", "empty_answers"}
    perfect = [row["chosen"] for row in eval_sets[0].rows[:2]]
    assert BLEU4Scorer().score([], perfect, perfect) == pytest.approx(100.0)
    assert RougeLScorer().score([], perfect, perfect) == pytest.approx(100.0)
