"""Configuration of the LifeAlign Axolotl plugin: the YAML keys (pydantic) and the training-args mixin (dataclass).

Defaults and valid ranges come from the library's own config objects (``SLMCConfig``, ``DEFAULT_FOCAL_GAMMA``, the
replay defaults), so a key means the same here as in ``lifealign train``. This module imports pydantic (declared by
the ``axolotl`` extra, and by Axolotl itself) and the standard-library-only parts of ``trl_lifealign``: the keys are
validated without torch. Axolotl merges `LifeAlignArgs` into its own config schema by multiple inheritance, so every
field is a top-level YAML key and the validator sees the whole config (it can check `rl`, `adapter`,
`dpo_loss_type`).

Do not import `axolotl.core.training_args` here: Axolotl builds its training-args class (with our mixin) the first
time that module is imported, which must happen after the plugin is registered.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, model_validator

from trl_lifealign.defences.config import (
    AveragingConfig,
    EWCConfig,
    ForgettingBudgetConfig,
    FreezeLayersConfig,
    KLAnchorConfig,
    MergingConfig,
)
from trl_lifealign.fpo.focal import DEFAULT_FOCAL_GAMMA
from trl_lifealign.lifelong.replay import DEFAULT_REPLAY_CAPACITY
from trl_lifealign.reference import DEFAULT_REFERENCE, Reference
from trl_lifealign.slmc.config import SLMCConfig

from .spec import PLUGIN_PATH, TRAINER_PATH  # noqa: F401  (re-exported)

# Strict numbers: a YAML string such as "0.9" or a boolean is refused instead of being coerced.
_STRICT_NUMBER = {"strict": True, "allow_inf_nan": False}
_SLMC = SLMCConfig()
# YAML key -> SLMCConfig field.
SLMC_KEYS = {"lifealign_energy_threshold": "energy_threshold", "lifealign_overlap_weight": "overlap_weight",
             "lifealign_adapter_names": "adapter_names", "lifealign_memory_kind": "memory_kind",
             "lifealign_project_steps": "project_steps"}


# YAML key -> the defence's config class (the same objects `lifealign train` takes under `defences:`). O-LoRA trains
# a new adapter per task and keeps the earlier ones active, which one Axolotl stage's single adapter cannot hold:
# `lifealign train` has it.
DEFENCE_KEYS = {"lifealign_averaging": ("averaging", AveragingConfig), "lifealign_ewc": ("ewc", EWCConfig),
                "lifealign_kl_anchor": ("kl_anchor", KLAnchorConfig),
                "lifealign_freeze_layers": ("freeze_layers", FreezeLayersConfig),
                "lifealign_merging": ("merging", MergingConfig),
                "lifealign_forgetting_budget": ("forgetting_budget", ForgettingBudgetConfig)}
STATEFUL_DEFENCES = ("lifealign_ewc", "lifealign_kl_anchor", "lifealign_merging", "lifealign_forgetting_budget")


def _help(name: str) -> str:
    return SLMCConfig.__dataclass_fields__[name].metadata["help"]


class LifeAlignArgs(BaseModel):
    """The `lifealign_*` keys of an Axolotl YAML (Axolotl merges these into its config schema)."""

    lifealign_focal_gamma: float = Field(
        default=DEFAULT_FOCAL_GAMMA, ge=0.0,
        json_schema_extra={"description": "FPO focusing exponent γ of the weight (1-p)^γ; 0 is exactly DPO."},
        **_STRICT_NUMBER,
    )
    lifealign_consolidate: bool = Field(
        default=True, strict=True,
        json_schema_extra={"description": "Consolidate the LoRA update into the memory at the end of the stage."},
    )
    lifealign_memory_dir: str | None = Field(
        default=None,
        json_schema_extra={"description": "Directory of the long-term memory shared by every stage of a chain "
                                          "(created if absent); required when lifealign_consolidate is true."},
    )
    lifealign_energy_threshold: float = Field(
        default=_SLMC.energy_threshold, json_schema_extra={"description": _help("energy_threshold")},
        **_STRICT_NUMBER)
    lifealign_overlap_weight: float = Field(
        default=_SLMC.overlap_weight, json_schema_extra={"description": _help("overlap_weight")}, **_STRICT_NUMBER)
    lifealign_adapter_names: list[str] | None = Field(
        default=None, json_schema_extra={"description": _help("adapter_names")})
    lifealign_memory_kind: str = Field(
        default=_SLMC.memory_kind, strict=True, json_schema_extra={"description": _help("memory_kind")})
    lifealign_project_steps: bool = Field(
        default=_SLMC.project_steps, strict=True, json_schema_extra={"description": _help("project_steps")})
    lifealign_previous_adapter: str | None = Field(
        default=None,
        json_schema_extra={"description": "Output directory of the previous stage: training starts from its "
                                          "(consolidated) LoRA adapter. Replaces lora_model_dir, which Axolotl ignores "
                                          "under rl: dpo."},
    )
    lifealign_reference: Reference = Field(
        default=DEFAULT_REFERENCE,
        json_schema_extra={"description": "DPO reference: 'previous_task' (default), the previous stage's adapter as "
                                          "loaded at the start of this stage; or 'base', the base model with adapters "
                                          "disabled (LifeAlign's official code)."},
    )
    lifealign_replay_stages: list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={"description": "Earlier stages, oldest first, as {name, datasets: [entries like "
                                          "`datasets:`]}: a random lifealign_replay_fraction of each one's rows "
                                          "enters a FIFO buffer of lifealign_replay_capacity rows mixed into this "
                                          "stage (the rule of `lifealign train`)."},
    )
    lifealign_replay_datasets: list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={"description": "Deprecated (removed in 0.3): earlier data as one flat list; it counts as "
                                          "one earlier stage. Use lifealign_replay_stages."},
    )
    lifealign_averaging: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"description": "Model averaging at the stage's end: {alpha, per_layer, space}."})
    lifealign_ewc: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"description": "Online EWC: {strength, decay, fisher_batches}."})
    lifealign_kl_anchor: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"description": "KL anchor on earlier prompts: {weight, prompts_per_task, "
                                                        "capacity, max_new_tokens, batch_size}; needs lifealign_"
                                                        "reference: previous_task."})
    lifealign_freeze_layers: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"description": "Freeze the lowest layers' LoRA factors after the first "
                                                        "stage: {num_layers}."})
    lifealign_merging: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"description": "Merge every stage's trained adapter with PEFT's "
                                                        "add_weighted_adapter at each stage's end: {method, density}."})
    lifealign_forgetting_budget: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"description": "Forgetting budget: {budget, max_evaluations, space}; the "
                                                        "monitor sets go in lifealign_budget_monitor_sets."})
    lifealign_budget_monitor_sets: list[dict[str, Any]] | None = Field(
        default=None, json_schema_extra={"description": "One {name, path|dataset, ...} per stage so far (the "
                                                        "lifelong DataSource fields), in stage order."})
    lifealign_defences_dir: str | None = Field(
        default=None, json_schema_extra={"description": "Directory of the defences' state shared along a chain "
                                                        "(EWC Fisher, KL anchor prompts, budget scores)."})
    lifealign_task_index: int | None = Field(
        default=None, ge=0, strict=True,
        json_schema_extra={"description": "0-based index of this stage in the sequence (the chain sets it)."})
    lifealign_replay_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0,
        json_schema_extra={"description": "Share of each earlier stage's rows kept for replay (0 = no replay)."},
        **_STRICT_NUMBER,
    )
    lifealign_replay_capacity: int = Field(
        default=DEFAULT_REPLAY_CAPACITY, ge=1, strict=True,
        json_schema_extra={"description": "Replay buffer size in rows; the oldest are dropped when it is full."},
    )
    lifealign_replay_seed: int = Field(
        default=0, ge=0, strict=True, json_schema_extra={"description": "Seed of the replay sample."})

    @model_validator(mode="before")
    @classmethod
    def _check_lifealign_stage(cls, data: Any) -> Any:
        """Cross-key checks on the whole Axolotl config (this model is merged into Axolotl's schema)."""
        if not isinstance(data, dict):
            return data
        _check_stage_keys(data)
        _check_defence_keys(data)
        slmc_values = {field_: data[key] for key, field_ in SLMC_KEYS.items() if data.get(key) is not None}
        try:
            SLMCConfig(**slmc_values)
        except (TypeError, ValueError) as error:
            field_, _, message = str(error).partition(": ")
            key = next((k for k, f in SLMC_KEYS.items() if f == field_), field_)
            raise ValueError(f"{key}: {message or error}") from None
        return data


def _check_stage_keys(data: dict[str, Any]) -> None:
    rl = getattr(data.get("rl"), "value", data.get("rl"))
    if rl != "dpo":
        raise ValueError(f"the LifeAlign plugin ({PLUGIN_PATH}) trains with FPO and needs `rl: dpo`, got rl={rl!r}")
    loss_type = data.get("dpo_loss_type")
    if loss_type is not None and "fpo" not in list(loss_type):
        raise ValueError(f"dpo_loss_type={loss_type!r} does not include 'fpo': the LifeAlign plugin trains with FPO "
                         "(leave dpo_loss_type unset, or list 'fpo' optionally with 'sigmoid'/'sft' and "
                         "dpo_loss_weights)")
    adapter = data.get("adapter")
    consolidate = data.get("lifealign_consolidate", True)
    if consolidate and adapter not in ("lora", "qlora"):
        raise ValueError(f"lifealign_consolidate consolidates LoRA weights and needs `adapter: lora` or `adapter: "
                         f"qlora`, got adapter={adapter!r} (or set lifealign_consolidate: false)")
    if consolidate and not data.get("lifealign_memory_dir"):
        raise ValueError("lifealign_memory_dir is required when lifealign_consolidate is true (the default): name the "
                         "directory holding the long-term memory shared by the stages of the chain")
    if data.get("lifealign_previous_adapter") and adapter not in ("lora", "qlora"):
        raise ValueError(f"lifealign_previous_adapter continues a LoRA adapter and needs adapter: lora|qlora, got "
                         f"{adapter!r}")
    if data.get("lifealign_previous_adapter") and data.get("lora_model_dir"):
        raise ValueError("set either lifealign_previous_adapter or lora_model_dir, not both: Axolotl ignores "
                         "lora_model_dir under rl: dpo, lifealign_previous_adapter is the key that continues from a "
                         "saved adapter")
    _check_replay_keys(data)
    if data.get("sample_packing"):
        raise ValueError("sample_packing must be false with the LifeAlign plugin (preference pairs are not packed)")


def defence_settings(cfg) -> Any:
    """The stage's defences as the factory takes them (an object with one optional config per defence)."""
    from types import SimpleNamespace

    return SimpleNamespace(**{name: cls(**cfg[key]) for key, (name, cls) in DEFENCE_KEYS.items()
                              if cfg.get(key) is not None})


def _check_defence_keys(data: dict[str, Any]) -> None:
    for key, (_, cls) in DEFENCE_KEYS.items():
        if data.get(key) is None:
            continue
        if not isinstance(data[key], dict):
            raise ValueError(f"{key}: expected a mapping of its settings, got {data[key]!r}")
        try:
            cls(**data[key])
        except TypeError as error:
            raise ValueError(f"{key}: {error}") from None
        except ValueError as error:
            raise ValueError(f"{key}.{error}") from None
    stateful = [key for key in STATEFUL_DEFENCES if data.get(key) is not None]
    if stateful and not data.get("lifealign_defences_dir"):
        raise ValueError(f"{stateful} keep state across stages: set lifealign_defences_dir (the chain sets it)")
    if (stateful or data.get("lifealign_freeze_layers")) and data.get("lifealign_task_index") is None:
        raise ValueError("the lifealign defences need lifealign_task_index (the stage's 0-based index; the chain "
                         "sets it)")
    if data.get("lifealign_kl_anchor") and data.get("lifealign_reference", DEFAULT_REFERENCE) != "previous_task":
        raise ValueError("lifealign_kl_anchor needs lifealign_reference: previous_task (the anchor is the stage's "
                         "starting adapter, TRL's frozen 'ref' copy)")
    if data.get("lifealign_forgetting_budget") and not data.get("lifealign_budget_monitor_sets"):
        raise ValueError("lifealign_forgetting_budget needs lifealign_budget_monitor_sets (one set per stage so far)")


def _check_replay_keys(data: dict[str, Any]) -> None:
    stages, flat = data.get("lifealign_replay_stages"), data.get("lifealign_replay_datasets")
    if stages and flat:
        raise ValueError("set lifealign_replay_stages or the deprecated lifealign_replay_datasets, not both")
    if flat:
        warnings.warn("lifealign_replay_datasets is deprecated and will be removed in 0.3: list the earlier stages "
                      "under lifealign_replay_stages ({name, datasets}); a flat list counts as one earlier stage",
                      FutureWarning, stacklevel=2)
    for index, stage in enumerate(stages or []):
        if not isinstance(stage, dict) or set(stage) != {"name", "datasets"} or not isinstance(stage["datasets"], list):
            raise ValueError(f"lifealign_replay_stages[{index}] must be {{name, datasets: [...]}}, got {stage!r}")
    fraction = data.get("lifealign_replay_fraction") or 0.0
    if isinstance(fraction, (int, float)) and fraction > 0 and not (stages or flat):
        raise ValueError("lifealign_replay_fraction > 0 needs lifealign_replay_stages (the earlier stages' data)")


def replay_stages(cfg) -> list[dict[str, Any]]:
    """The earlier stages to replay, oldest first, with the deprecated flat list as one stage."""
    if cfg.lifealign_replay_stages:
        return list(cfg.lifealign_replay_stages)
    if cfg.lifealign_replay_datasets:
        return [{"name": "earlier", "datasets": list(cfg.lifealign_replay_datasets)}]
    return []


@dataclass
class LifeAlignTrainingArgsMixin:
    """Fields Axolotl adds to its DPO training arguments (`AxolotlDPOConfig`) when the plugin is registered."""

    focal_gamma: float = field(
        default=DEFAULT_FOCAL_GAMMA,
        metadata={"help": "FPO focusing exponent γ of the weight (1-p)^γ; 0 is exactly DPO."}
    )
    lifealign_previous_adapter: str | None = field(
        default=None, metadata={"help": "Directory of the previous stage's LoRA adapter to continue training."}
    )
    lifealign_reference: str = field(
        default=DEFAULT_REFERENCE,
        metadata={"help": "DPO reference: 'previous_task' (the stage's starting adapter) or 'base' (adapters "
                          "disabled)."},
    )
