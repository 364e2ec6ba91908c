"""Building the defences a configuration asks for, in the order their hooks must run.

Training-time defences (freezing, EWC, KL anchor, O-LoRA) act during the steps; boundary defences act after the last
optimizer step, in list order: averaging and merging rewrite the adapter first, SLMC then consolidates the result,
and the forgetting budget, last, pulls it back if an earlier task dropped too far. The lifelong runner and the
Axolotl plugin build their callbacks here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import TaskBoundaryCallback

__all__ = ["BOUNDARY_ORDER", "DEFENCE_NAMES", "TRAINING_ORDER", "build_defences", "ordered_callbacks"]

TRAINING_ORDER = ("freeze_layers", "ewc", "kl_anchor", "olora")
BOUNDARY_ORDER = ("averaging", "merging")  # before SLMC; the forgetting budget comes after it
DEFENCE_NAMES = (*TRAINING_ORDER, *BOUNDARY_ORDER, "forgetting_budget")
# name -> (module under trl_lifealign.defences, callback class); imported only when the defence is used.
_CALLBACKS = {"freeze_layers": ("freezing.callback", "FreezeLayersCallback"), "ewc": ("ewc.callback", "EWCCallback"),
              "kl_anchor": ("lwf.callback", "KLAnchorCallback"), "olora": ("olora.callback", "OLoRACallback"),
              "averaging": ("averaging.callback", "ModelAveragingCallback"),
              "merging": ("merging.callback", "AdapterMergingCallback"),
              "forgetting_budget": ("budget.callback", "ForgettingBudgetCallback")}


def build_defences(settings: Any, state_root: str | Path, *, lora_config=None, seed: int = 0,
                   monitor_sets: list | None = None, monitor_logps: dict | None = None,
                   batch_size: int = 8) -> dict[str, TaskBoundaryCallback]:
    """The callbacks of every defence set in ``settings`` (an object with one optional config per name in
    ``DEFENCE_NAMES``), each with its state directory ``state_root/<name>``. The forgetting budget needs its
    prepared monitor sets and their π₀ log-probs."""
    import importlib

    def build(name: str, config):
        module, cls = _CALLBACKS[name]
        callback = getattr(importlib.import_module(f"trl_lifealign.defences.{module}"), cls)
        if name == "freeze_layers" or name == "averaging":
            return callback(config)
        if name == "olora":
            return callback(config, lora_config, root / name, seed=seed)
        if name == "merging":
            return callback(config, root / name, seed=seed)
        if name == "forgetting_budget":
            return callback(config, monitor_sets or [], monitor_logps or {}, root / name, batch_size=batch_size)
        return callback(config, root / name)

    root = Path(state_root)
    defences = {}
    for name in DEFENCE_NAMES:
        config = getattr(settings, name, None)
        if config is not None:
            defences[name] = build(name, config)
    return defences


def ordered_callbacks(defences: dict[str, TaskBoundaryCallback], memory=None) -> list:
    """Training-time defences, then averaging and merging, then the SLMC callback (if any), then the budget."""
    ordered = [defences[n] for n in (*TRAINING_ORDER, *BOUNDARY_ORDER) if n in defences]
    if memory is not None:
        ordered.append(memory)
    if "forgetting_budget" in defences:
        ordered.append(defences["forgetting_budget"])
    return ordered
