"""Optional per-stage evaluation of an Axolotl chain with the lifelong runner's evaluation matrix and report.

Chain file:

    evaluation:
      eval_sets:                      # trl_lifealign.lifelong.DataSource fields + a name
        - {name: facts, path: data/facts_eval.json}
        - {name: manners, path: data/manners_eval.json, limit: 200}
      batch_size: 8
      max_length: 512

After each finished stage the chain process loads the base model (4-bit if the stage config says `load_in_4bit`)
with the stage's adapter and scores every eval set: implicit-reward preference accuracy and margin against the base
model π₀ (computed once and cached in `output_dir/chain_eval_reference.json`). The rows go into the chain state;
at the end `report.json`, `report.md` and the PNGs are written to the chain's output dir by the lifelong runner's
report code (Last / AP / BWT / FWT).
"""

from __future__ import annotations

import json
import time
from typing import Any

from trl_lifealign.atomic import atomic_write_json

REFERENCE_FILE = "chain_eval_reference.json"
_EVAL_KEYS = {"eval_sets", "batch_size", "max_length"}


def _eval_settings(chain) -> tuple[list, int, int]:
    from trl_lifealign.lifelong import DataSource, EvalSet, load_preference_data

    from .chain import ChainError

    settings = chain.evaluation or {}
    unknown = sorted(set(settings) - _EVAL_KEYS)
    if unknown:
        raise ChainError(f"evaluation: unknown key(s) {unknown}; expected some of {sorted(_EVAL_KEYS)}")
    entries = settings.get("eval_sets") or []
    if not entries:
        raise ChainError("evaluation.eval_sets must list at least one {name, path|dataset, ...} entry")
    eval_sets = []
    for index, entry in enumerate(entries):
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name:
            raise ChainError(f"evaluation.eval_sets[{index}] needs a name")
        if entry.get("path"):
            entry["path"] = str(chain.root / entry["path"])
        try:
            data = load_preference_data(DataSource(**entry))
        except (TypeError, ValueError) as error:
            raise ChainError(f"evaluation.eval_sets[{index}] ({name}): {error}") from error
        eval_sets.append(EvalSet(name, data.rows))
    return eval_sets, int(settings.get("batch_size", 8)), int(settings.get("max_length", 512))


def check_evaluation(chain) -> None:
    """Load the eval sets now and check there is one per stage at least (column j = stage j's eval set)."""
    from .chain import ChainError

    eval_sets, _, _ = _eval_settings(chain)
    if len(eval_sets) < len(chain.stages):
        raise ChainError(
            f"evaluation lists {len(eval_sets)} eval set(s) for {len(chain.stages)} stages: give one per stage, in "
            "stage order (extra sets may follow), so forgetting (BWT) and transfer (FWT) can be computed"
        )


def _load_base(chain, config: dict[str, Any]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = config["base_model"]
    local = chain.root / base  # a local path is relative to the chain directory, like in the stage processes
    base = str(local) if local.exists() else base
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if config.get("bf16") in (True, "auto") else torch.float32}
    if config.get("load_in_4bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=kwargs["dtype"])
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(config.get("tokenizer_config") or base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def evaluate_stage(chain, index: int, config: dict[str, Any]) -> dict[str, Any]:
    """Score the adapter of stage `index` on every eval set; returns {"row": [...], "seconds": ...}."""
    from peft import PeftModel

    from trl_lifealign.lifelong import evaluate_preferences, reference_logps

    from .chain import stage_dir

    started = time.time()
    eval_sets, batch_size, max_length = _eval_settings(chain)
    model, tokenizer = _load_base(chain, config)
    reference_path = chain.output_dir / REFERENCE_FILE
    if reference_path.is_file():
        cached = json.loads(reference_path.read_text())
    else:
        reference = reference_logps(model, tokenizer, eval_sets, batch_size, max_length)
        initial_row = evaluate_preferences(model, tokenizer, eval_sets, reference, batch_size, max_length)
        cached = {"reference": reference, "initial_row": initial_row}
        atomic_write_json(reference_path, cached, indent=1)
    missing = [s.name for s in eval_sets if s.name not in cached["reference"]]
    if missing:
        raise RuntimeError(f"{reference_path} has no π₀ log-probs for {missing}: delete it to recompute")
    model = PeftModel.from_pretrained(model, str(stage_dir(chain, index)))
    model.eval()
    row = evaluate_preferences(model, tokenizer, eval_sets, cached["reference"], batch_size, max_length)
    return {"row": row, "eval_names": [s.name for s in eval_sets], "seconds": round(time.time() - started, 1)}


def write_chain_report(chain, state: dict[str, Any]) -> dict[str, Any]:
    """report.json / report.md / PNGs (the lifelong runner's format) in the chain output dir; returns paths."""
    from trl_lifealign.lifelong import continual_metrics
    from trl_lifealign.lifelong.report import write_report

    from .chain import stage_dir

    cached = json.loads((chain.output_dir / REFERENCE_FILE).read_text())
    names = [stage.name for stage in chain.stages]
    records = [state["stages"][name] for name in names]
    eval_names = records[0]["evaluation"]["eval_names"]
    accuracy = [[cell["accuracy"] for cell in r["evaluation"]["row"]] for r in records]
    margin = [[cell["margin"] for cell in r["evaluation"]["row"]] for r in records]
    initial_accuracy = [cell["accuracy"] for cell in cached["initial_row"]]
    initial_margin = [cell["margin"] for cell in cached["initial_row"]]
    tasks = []
    for index, (name, record) in enumerate(zip(names, records)):
        summary_path = stage_dir(chain, index) / "lifealign_stage_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        consolidation = summary.get("consolidation") or {}
        tasks.append({
            "name": name,
            "train_pairs": summary.get("train_pairs", 0),
            "replayed_pairs": summary.get("replayed_pairs", 0),
            "data": [{"skipped_total": 0}],
            "train": {"train_loss": float(summary.get("train_loss", float("nan")))},
            "consolidation": {"kept_energy": consolidation.get("slmc/kept_energy"),
                              "conflict": consolidation.get("slmc/conflict")},
            "seconds": float(record.get("seconds", 0.0)),
        })
    report = {
        "task_names": names,
        "eval_names": eval_names,
        "matrix": {"accuracy": accuracy, "margin": margin},
        "initial_row": {"accuracy": initial_accuracy, "margin": initial_margin},
        "metrics": continual_metrics(accuracy, initial_accuracy),
        "margin_metrics": continual_metrics(margin, initial_margin),
        "seconds": sum(float(r.get("seconds", 0.0)) for r in records),
        "settings": {"driver": "lifealign axolotl-chain", "chain": str(chain.path)},
        "eval_data": [],
        "tasks": tasks,
        "skipped_rows_total": 0,
    }
    return {"files": [str(p) for p in write_report(chain.output_dir, report)], "metrics": report["metrics"]}
