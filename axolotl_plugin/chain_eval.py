"""Optional per-stage evaluation of an Axolotl chain with the lifelong runner's evaluation matrix and report.

Chain file:

    evaluation:
      eval_sets:                      # trl_lifealign.lifelong.DataSource fields + a name
        - {name: facts, path: data/facts_eval.json}
        - {name: manners, path: data/manners_eval.json, limit: 200}
      batch_size: 8
      max_length: 512

After each finished stage the chain process loads the base model exactly as Axolotl trained it
(``trl_lifealign.adapters.load_base_model``: the stage's dtype, and for QLoRA the same NF4 / double-quantised config,
``bnb_config_kwargs`` included) with the stage's adapter, and scores every eval set: implicit-reward preference accuracy
and margin against the base model π₀ (computed once and cached in ``output_dir/chain_eval_initial_logps.json``). The
rows go into the chain state; at the end the lifelong runner's ``LifelongReport`` is written to the chain's output dir.
"""

from __future__ import annotations

import json
import time
from typing import Any

from trl_lifealign.atomic import atomic_write_json

from .spec import EVAL_CACHE_FILE, STAGE_SUMMARY_FILE, ChainError, ChainSpec, stage_dir

_EVAL_KEYS = {"eval_sets", "batch_size", "max_length"}


def _eval_settings(chain: ChainSpec) -> tuple[list, int, int]:
    from trl_lifealign.lifelong.data import DataSource, load_preference_data
    from trl_lifealign.lifelong.evaluation import EvalSet

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


def check_evaluation(chain: ChainSpec) -> None:
    """Load the eval sets now and check there is one per stage at least (column j = stage j's eval set)."""
    eval_sets, _, _ = _eval_settings(chain)
    if len(eval_sets) < len(chain.stages):
        raise ChainError(
            f"evaluation lists {len(eval_sets)} eval set(s) for {len(chain.stages)} stages: give one per stage, in "
            "stage order (extra sets may follow), so forgetting (BWT) and transfer (FWT) can be computed"
        )


def load_stage_base(chain: ChainSpec, config: dict[str, Any]):
    """The base model and tokenizer of a stage, loaded the way Axolotl loads them for training."""
    import torch
    from transformers import AutoTokenizer

    from trl_lifealign.adapters import load_base_model

    base = config["base_model"]
    local = chain.root / base  # a local path is relative to the chain directory, like in the stage processes
    base = str(local) if local.exists() else base
    dtype = torch.bfloat16 if config.get("bf16") in (True, "auto") else torch.float32
    extra = {"device_map": "auto"} if torch.cuda.is_available() else {}
    model = load_base_model(base, dtype, bool(config.get("load_in_4bit")), config.get("bnb_config_kwargs"), **extra)
    tokenizer = AutoTokenizer.from_pretrained(config.get("tokenizer_config") or base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def evaluate_stage(chain: ChainSpec, index: int, config: dict[str, Any]) -> dict[str, Any]:
    """Score the adapter of stage `index` on every eval set; returns {"row": [...], "eval_names", "seconds"}."""
    from peft import PeftModel

    from trl_lifealign.lifelong.evaluation import (
        evaluate_preferences,
        initial_policy_logps,
        preference_scores,
        prepare_eval_sets,
    )

    started = time.time()
    eval_sets, batch_size, max_length = _eval_settings(chain)
    model, tokenizer = load_stage_base(chain, config)
    prepared = prepare_eval_sets(tokenizer, eval_sets, max_length)
    cache_path = chain.output_dir / EVAL_CACHE_FILE
    if cache_path.is_file():
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
    else:
        initial = initial_policy_logps(model, prepared, batch_size)
        cached = {"initial_logps": initial, "initial_row": [
            {**preference_scores(initial[s.name], initial[s.name]), "dropped": s.dropped} for s in prepared]}
        atomic_write_json(cache_path, cached, indent=1)
    missing = [s.name for s in prepared if s.name not in cached["initial_logps"]]
    if missing:
        raise ChainError(f"{cache_path} has no π₀ log-probs for {missing}: delete it to recompute")
    model = PeftModel.from_pretrained(model, str(stage_dir(chain, index)))
    row = evaluate_preferences(model, prepared, cached["initial_logps"], batch_size)
    return {"row": row, "eval_names": [s.name for s in eval_sets], "seconds": round(time.time() - started, 1)}


def write_chain_report(chain: ChainSpec, state: dict[str, Any]) -> dict[str, Any]:
    """The lifelong runner's report (report.json / report.md / PNGs) in the chain output dir."""
    from trl_lifealign.lifelong.report import LifelongReport, TaskRecord, write_report

    cached = json.loads((chain.output_dir / EVAL_CACHE_FILE).read_text(encoding="utf-8"))
    records = [state["stages"][stage.name] for stage in chain.stages]
    tasks = []
    for index, (stage, record) in enumerate(zip(chain.stages, records)):
        summary_path = stage_dir(chain, index) / STAGE_SUMMARY_FILE
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
        consolidation = summary.get("consolidation")
        tasks.append(TaskRecord(
            name=stage.name, row=record["evaluation"]["row"], dir=stage.name,
            train_pairs=summary.get("train_pairs") or 0, replayed_pairs=summary.get("replayed_pairs") or 0,
            train_loss=summary.get("train_loss"), steps=summary.get("global_step"),
            consolidation={k.removeprefix("slmc/"): v for k, v in consolidation.items()} if consolidation else None,
            seconds=float(record.get("seconds", 0.0))))
    report = LifelongReport(
        task_names=[stage.name for stage in chain.stages], eval_names=records[0]["evaluation"]["eval_names"],
        tasks=tasks, initial_cells=cached["initial_row"],
        settings={"driver": "lifealign axolotl-chain", "chain": str(chain.path)},
        seconds=sum(float(r.get("seconds", 0.0)) for r in records))
    return {"files": [str(p) for p in write_report(chain.output_dir, report)], "metrics": report.metrics}
