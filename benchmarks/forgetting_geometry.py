"""Where does a lifelong run's forgetting lie, relative to the span SLMC projects against?

SLMC damps the part of a task's LoRA update that lies in the span of earlier tasks' consolidated updates. That can
only prevent forgetting if the damaging part of an update lies in that span. This script measures it on a finished
run of ``lifealign train`` / ``benchmarks/lifelong_bench.py`` (a run directory holding ``config.json`` and
``tasks/*/adapter``), for every task t > 1:

1. the share of the update's norm inside the span of the earlier updates, per LoRA factor (the paper's and our
   consolidation space) and on the layer's product ``ΔW = s·(B·A)`` (the alternative the LifeAlign reference
   discusses), averaged over layers;
2. an offline test on the product: apply task t's update to the weights after task t-1 (i) as trained, (ii) with its
   in-span part scaled by λ (λ = 0.5, the default, and λ = 0, strict orthogonality), merged into the base weights, and
   score every earlier task's eval set. If the forgetting of earlier tasks survives λ = 0, no projection against the
   earlier updates' span (in either space) can remove it.

    python benchmarks/forgetting_geometry.py RUN_DIR [--json out.json]

e.g. ``RUN_DIR = bench-output/runs/seq-dpo/seed0/runner`` after ``lifealign bench``. The run must not use SLMC for
(2) to show the raw updates' effect; (1) works on any run. CPU seconds: a few per task for the tiny benchmark model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _basis(earlier: list[torch.Tensor]) -> torch.Tensor | None:
    from trl_lifealign.slmc import extend_basis

    basis = None
    for vector in earlier:
        basis = extend_basis(basis, vector)
    return basis


def in_span_share(earlier: list[torch.Tensor], update: torch.Tensor) -> float:
    """‖part of ``update`` inside span(``earlier``)‖ / ‖update‖ (0 with no earlier vectors or a zero update)."""
    from trl_lifealign.slmc import split_by_span

    norm = float(update.norm())
    if not earlier or norm == 0.0:
        return 0.0
    in_span, _ = split_by_span(update, _basis(earlier))
    return float(in_span.norm()) / norm


def remove_in_span(earlier: list[torch.Tensor], update: torch.Tensor, overlap_weight: float) -> torch.Tensor:
    """``update`` (flat) with its part inside span(``earlier``) scaled by ``overlap_weight``: SLMC's projection step
    (no denoising), applied here to whatever space the vectors live in."""
    from trl_lifealign.slmc import split_by_span

    in_span, orthogonal = split_by_span(update, _basis(earlier))
    return orthogonal + overlap_weight * in_span


def _load_run(run_dir: Path):
    """The run's configuration and, per finished task, its directory and saved adapter."""
    from safetensors.torch import load_file

    from trl_lifealign.lifelong.recipe import LifelongConfig, from_dict

    stored = json.loads((run_dir / "config.json").read_text())
    stored.pop("fingerprints", None)
    config = from_dict(LifelongConfig, stored)
    task_dirs = sorted(p.parent for p in (run_dir / "tasks").glob("*/adapter"))
    if len(task_dirs) < 2:
        raise SystemExit(f"{run_dir}: needs at least two finished tasks (tasks/*/adapter), found {len(task_dirs)}")
    states = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in task_dirs]
    adapter_config = json.loads((task_dirs[0] / "adapter" / "adapter_config.json").read_text())
    return config, task_dirs, states, adapter_config


def _initial_adapter(config, base_path: str) -> dict[str, torch.Tensor]:
    """The adapter as the runner created it before the first task (its own LoRA wrapping, same seed)."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from trl_lifealign.adapters import wrap_lora

    model = wrap_lora(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), config.lora, config.seed)
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({key.rsplit(".lora_A.", 1)[0] for key in state if ".lora_A." in key})


def analyse(run_dir: Path, lambdas: tuple[float, ...] = (0.5, 0.0)) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_lifealign.lifelong.evaluation import evaluate_preferences, initial_policy_logps, prepare_eval_sets
    from trl_lifealign.lifelong.runner import load_eval_sets, uses_chat_template

    config, task_dirs, states, adapter_config = _load_run(run_dir)
    base_path = adapter_config["base_model_name_or_path"]
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    states = [_initial_adapter(config, base_path)] + states
    modules = _modules(states[0])
    tasks = len(states) - 1

    # Per-layer updates of every task in both spaces.
    product: dict[str, list[torch.Tensor]] = {}
    factors: dict[str, list[torch.Tensor]] = {}
    for module in modules:
        a = [s[f"{module}.lora_A.weight"] for s in states]
        b = [s[f"{module}.lora_B.weight"] for s in states]
        product[module] = [scale * (b[t + 1] @ a[t + 1] - b[t] @ a[t]) for t in range(tasks)]
        factors[module] = [torch.cat([(a[t + 1] - a[t]).reshape(-1), (b[t + 1] - b[t]).reshape(-1)])
                           for t in range(tasks)]

    def mean(values):
        return sum(values) / len(values)

    geometry = []
    for t in range(1, tasks):
        geometry.append({
            "task": task_dirs[t].name,
            "in_span_factors": mean([in_span_share(factors[m][:t], factors[m][t]) for m in modules]),
            "in_span_product": mean([in_span_share([u.reshape(-1) for u in product[m][:t]], product[m][t].reshape(-1))
                                     for m in modules]),
        })

    # Offline projection test on merged weights.
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    base_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    eval_sets, _ = load_eval_sets(config, uses_chat_template(config, tokenizer))  # the run's own matrix columns
    batch = config.evaluation.batch_size
    prepared = prepare_eval_sets(tokenizer, eval_sets, config.evaluation.max_length)
    initial = initial_policy_logps(model, prepared, batch)  # π₀ = the base model (the initial adapter's B is zero)

    def weight_name(module: str) -> str:  # base_model.model.X.q_proj -> X.q_proj.weight
        return module.removeprefix("base_model.model.") + ".weight"

    def score(deltas: dict[str, torch.Tensor]) -> list[float]:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in base_weights.items():
                params[name].copy_(value)
            for module, delta in deltas.items():
                params[weight_name(module)].add_(delta)
        return [r["accuracy"] for r in evaluate_preferences(model, prepared, initial, batch)]

    def merged(upto: int) -> dict[str, torch.Tensor]:  # sum of the first `upto` updates = s·B·A after task upto-1
        return {m: sum(product[m][:upto]) for m in modules}

    projection = []
    for t in range(1, tasks):
        before = score(merged(t))
        rows = {"as trained": score(merged(t + 1))}
        for lam in lambdas:
            deltas = merged(t)
            for m in modules:
                earlier = [u.reshape(-1) for u in product[m][:t]]
                deltas[m] = deltas[m] + remove_in_span(earlier, product[m][t].reshape(-1), lam).reshape(
                    product[m][t].shape)
            rows[f"product λ={lam:g}"] = score(deltas)
        change = {k: 100 * mean([row[j] - before[j] for j in range(t)]) for k, row in rows.items()}
        learned = {k: 100 * (row[t] - before[t]) for k, row in rows.items()}
        projection.append({"task": task_dirs[t].name, "before": before, "after": rows,
                           "earlier_tasks_change_points": change, "own_task_change_points": learned})
    return {"run_dir": str(run_dir), "geometry": geometry, "projection": projection,
            "eval_names": [e.name for e in eval_sets]}


def render(result: dict) -> str:
    lines = [f"Run: {result['run_dir']}", "",
             "| task | update in earlier span: per factor | on the product ΔW |", "|---|---|---|"]
    for g in result["geometry"]:
        lines.append(f"| {g['task']} | {g['in_span_factors']:.3f} | {g['in_span_product']:.3f} |")
    variants = list(result["projection"][0]["earlier_tasks_change_points"])
    lines += ["", "Accuracy change (points) caused by each task's update, offline on merged weights: on the earlier "
              "tasks (mean) / on the task itself", "",
              "| task | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for p in result["projection"]:
        cells = [f"{p['earlier_tasks_change_points'][v]:+.1f} / {p['own_task_change_points'][v]:+.1f}"
                 for v in variants]
        lines.append(f"| {p['task']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a lifelong run directory (config.json, tasks/*/adapter)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    result = analyse(args.run_dir)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
