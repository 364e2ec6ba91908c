"""`lifealign demo`: a fully offline lifelong-alignment run on synthetic tasks whose preferences conflict.

It builds a tiny Llama and a tokenizer (trl_lifealign.tiny), generates three preference tasks over the same questions
(prefer concise answers, then polite ones, then detailed ones: the third undoes the first), and runs the sequence
twice: sequential DPO (FPO with γ=0, no consolidation) and LifeAlign (FPO γ=2 + SLMC). It prints both accuracy
matrices and Last / AP / BWT / FWT side by side, and writes each run's report and plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .demo_tasks import (  # noqa: F401  (re-exported: the demo's data, used by the tests and the benchmarks)
    DEMO_MARKER,
    DEMO_TASKS,
    demo_config,
    demo_texts,
    make_demo_tasks,
    prepare_demo_dir,
    write_demo_data,
)


def run_demo(output_dir: str | Path, train_per_task: int | None = None, eval_per_task: int = 12,
             epochs: float | None = None, quiet: bool = False, model: str = "tiny") -> dict[str, Any]:
    """Run both methods on the demo tasks; returns {"dpo": LifelongResult, "lifealign": LifelongResult, "seconds"}.

    ``model="tiny"`` builds a 2-layer model on the spot; ``model="smollm2"`` runs the real SmolLM2-135M-Instruct
    (``trl_lifealign.lifelong.demo_smollm2``) and also prints its answers to a few prompts.
    """
    output_dir = Path(output_dir)
    prepare_demo_dir(output_dir)
    if model == "smollm2":
        from .demo_smollm2 import run_smollm2_demo

        return run_smollm2_demo(output_dir, train_per_task, epochs, quiet)
    if model != "tiny":
        raise ValueError(f"model must be 'tiny' or 'smollm2', got {model!r}")
    from trl_lifealign.tiny import build_tiny_llama, train_tokenizer

    from .runner import run_lifelong

    train_per_task = train_per_task or 24
    epochs = epochs or 3.0
    started = time.perf_counter()
    tasks = make_demo_tasks(train_per_task, eval_per_task)
    data_paths = write_demo_data(output_dir / "data", train_per_task, eval_per_task)
    tokenizer = train_tokenizer(demo_texts(tasks), vocab_size=400)
    results = {}
    for method in ("dpo", "lifealign"):
        model_ = build_tiny_llama(tokenizer, hidden_size=32, num_hidden_layers=2, seed=0)
        config = demo_config(output_dir / method, data_paths, method, epochs)
        if not quiet:
            print(f"== {method}: {' -> '.join(tasks)} ({train_per_task} pairs per task, {epochs:g} epochs)",
                  flush=True)
        results[method] = run_lifelong(config, model=model_, tokenizer=tokenizer)
    results["seconds"] = time.perf_counter() - started
    return results


def format_comparison(results: dict[str, Any]) -> str:
    """Both accuracy matrices and Last / AP / BWT / FWT side by side."""
    from .report import matrix_markdown

    lines = []
    for method, title in (("dpo", "Sequential DPO"), ("lifealign", "LifeAlign (FPO + SLMC)")):
        result = results[method]
        lines += [f"{title}: preference accuracy after each task (rows) on each task's eval set (columns)",
                  matrix_markdown(result.matrix, result.task_names, result.eval_names, result.initial_row), ""]
    lines.append("| metric | Sequential DPO | LifeAlign |")
    lines.append("|---|---|---|")
    for key, label in (("last", "Last"), ("ap", "AP"), ("bwt", "BWT"), ("fwt", "FWT")):
        values = [results[m].metrics[key] for m in ("dpo", "lifealign")]
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values) + " |")
    lines.append("")
    for method in ("dpo", "lifealign"):
        lines.append(f"{method}: report {results[method].run_dir / 'report.md'}")
    if "answers" in results:
        from .demo_smollm2 import format_answers

        lines += ["", format_answers(results)]
    lines.append(f"total wall time: {results['seconds']:.1f} s")
    return "\n".join(lines)
