"""Configuration of the LifeAlign Axolotl plugin: the YAML keys (pydantic) and the training-args mixin (dataclass).

This module imports only pydantic, the standard library and `trl_lifealign.reference` (standard library only), so it
can be imported (and the keys validated) without Axolotl or torch. Axolotl merges `LifeAlignArgs` into its own config schema by multiple inheritance, so every field below is a
top-level YAML key and the validator sees the whole config (it can check `rl`, `adapter`, `dpo_loss_type`).

Do not import `axolotl.core.training_args` here: Axolotl builds its training-args class (with our mixin) the first
time that module is imported, which must happen after the plugin is registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from trl_lifealign.reference import DEFAULT_REFERENCE, Reference

PLUGIN_PATH = "axolotl_plugin.LifeAlignPlugin"
TRAINER_PATH = "axolotl_plugin.trainer.AxolotlFPOTrainer"

# Strict numbers: a YAML string such as "0.9" or a boolean is refused instead of being coerced.
_STRICT_NUMBER = {"strict": True, "allow_inf_nan": False}


class LifeAlignArgs(BaseModel):
    """The `lifealign_*` keys of an Axolotl YAML (Axolotl merges these into its config schema)."""

    lifealign_focal_gamma: float = Field(
        default=2.0,
        ge=0.0,
        json_schema_extra={"description": "FPO focusing exponent γ of the weight (1-p)^γ; 0 is exactly DPO."},
        **_STRICT_NUMBER,
    )
    lifealign_consolidate: bool = Field(
        default=True,
        strict=True,
        json_schema_extra={"description": "Consolidate the LoRA update into the memory at the end of the stage."},
    )
    lifealign_memory_dir: str | None = Field(
        default=None,
        json_schema_extra={
            "description": "Directory of the long-term memory shared by every stage of a chain (created if absent); "
            "required when lifealign_consolidate is true."
        },
    )
    lifealign_energy_threshold: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        json_schema_extra={"description": "SLMC: share of the update's spectral energy kept when denoising."},
        **_STRICT_NUMBER,
    )
    lifealign_overlap_weight: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        json_schema_extra={"description": "SLMC: weight λ of the update component that overlaps earlier memory."},
        **_STRICT_NUMBER,
    )
    lifealign_adapter_names: list[str] | None = Field(
        default=None,
        json_schema_extra={"description": "LoRA adapters to consolidate (default: every trainable adapter)."},
    )
    lifealign_previous_adapter: str | None = Field(
        default=None,
        json_schema_extra={
            "description": "Output directory of the previous stage: training starts from its (consolidated) LoRA "
            "adapter. Replaces lora_model_dir, which Axolotl ignores under rl: dpo."
        },
    )
    lifealign_reference: Reference = Field(
        default=DEFAULT_REFERENCE,
        json_schema_extra={
            "description": "DPO reference: 'previous_task' (default), the previous stage's adapter as loaded at the "
            "start of this stage; or 'base', the base model with adapters disabled (LifeAlign's official code)."
        },
    )
    lifealign_replay_datasets: list[dict[str, Any]] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Earlier stages' datasets (same entries as `datasets:`) to replay into this stage."
        },
    )
    lifealign_replay_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        json_schema_extra={"description": "Replayed rows = fraction × this stage's training rows (0 = no replay)."},
        **_STRICT_NUMBER,
    )
    lifealign_replay_capacity: int | None = Field(
        default=None,
        ge=1,
        strict=True,
        json_schema_extra={"description": "Upper bound on the number of replayed rows (default: no bound)."},
    )
    lifealign_replay_seed: int = Field(
        default=0,
        strict=True,
        json_schema_extra={"description": "Seed of the replay sample."},
    )

    @model_validator(mode="before")
    @classmethod
    def _check_lifealign_stage(cls, data: Any) -> Any:
        """Cross-key checks on the whole Axolotl config (this model is merged into Axolotl's schema)."""
        if not isinstance(data, dict):
            return data
        rl = data.get("rl")
        rl = getattr(rl, "value", rl)
        if rl != "dpo":
            raise ValueError(
                f"the LifeAlign plugin ({PLUGIN_PATH}) trains with FPO and needs `rl: dpo`, got rl={rl!r}"
            )
        loss_type = data.get("dpo_loss_type")
        if loss_type is not None and "fpo" not in list(loss_type):
            raise ValueError(
                f"dpo_loss_type={loss_type!r} does not include 'fpo': the LifeAlign plugin trains with FPO "
                "(leave dpo_loss_type unset, or list 'fpo' optionally with 'sigmoid'/'sft' and dpo_loss_weights)"
            )
        adapter = data.get("adapter")
        consolidate = data.get("lifealign_consolidate", True)
        if consolidate and adapter not in ("lora", "qlora"):
            raise ValueError(
                f"lifealign_consolidate consolidates LoRA weights and needs `adapter: lora` or `adapter: qlora`, "
                f"got adapter={adapter!r} (or set lifealign_consolidate: false)"
            )
        if consolidate and not data.get("lifealign_memory_dir"):
            raise ValueError(
                "lifealign_memory_dir is required when lifealign_consolidate is true (the default): name the "
                "directory holding the long-term memory shared by the stages of the chain"
            )
        if data.get("lifealign_previous_adapter") and adapter not in ("lora", "qlora"):
            raise ValueError(
                f"lifealign_previous_adapter continues a LoRA adapter and needs adapter: lora|qlora, got {adapter!r}"
            )
        if data.get("lifealign_previous_adapter") and data.get("lora_model_dir"):
            raise ValueError(
                "set either lifealign_previous_adapter or lora_model_dir, not both: Axolotl ignores lora_model_dir "
                "under rl: dpo, lifealign_previous_adapter is the key that continues from a saved adapter"
            )
        fraction = data.get("lifealign_replay_fraction") or 0.0
        if isinstance(fraction, (int, float)) and fraction > 0 and not data.get("lifealign_replay_datasets"):
            raise ValueError("lifealign_replay_fraction > 0 needs lifealign_replay_datasets (the earlier stages' data)")
        if data.get("sample_packing"):
            raise ValueError("sample_packing must be false with the LifeAlign plugin (preference pairs are not packed)")
        return data


@dataclass
class LifeAlignTrainingArgsMixin:
    """Fields Axolotl adds to its DPO training arguments (`AxolotlDPOConfig`) when the plugin is registered."""

    focal_gamma: float = field(
        default=2.0, metadata={"help": "FPO focusing exponent γ of the weight (1-p)^γ; 0 is exactly DPO."}
    )
    lifealign_previous_adapter: str | None = field(
        default=None, metadata={"help": "Directory of the previous stage's LoRA adapter to continue training."}
    )
    lifealign_reference: str = field(
        default=DEFAULT_REFERENCE,
        metadata={"help": "DPO reference: 'previous_task' (the stage's starting adapter) or 'base' (adapters disabled)."},
    )
