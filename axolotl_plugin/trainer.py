"""`AxolotlFPOTrainer`: Axolotl's DPO trainer with the FPO loss, continuing from the previous stage's adapter.

Axolotl resolves this class through the YAML key `trainer_cls` (the plugin's `register` sets it), which keeps the
model and reference in the constructor call. The FPO loss, the binding of LifeAlign callbacks to the trainer's
loggers and TRL's `ref` adapter handling come from `trl_lifealign.fpo.FPOTrainer` by inheritance; Axolotl's mixins
(optimizers, schedulers, RNG state, double-BOS fix) come from `AxolotlDPOTrainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.integrations.base import PluginManager

from trl_lifealign import distributed as dist
from trl_lifealign.adapters import DEFAULT_ADAPTER, REF_ADAPTER, check_same_lora, drop_ref_adapter, lora_factors
from trl_lifealign.atomic import atomic_write_json
from trl_lifealign.compat import bind_dpo_trainer_arguments, replace_dpo_trainer_argument
from trl_lifealign.fpo import FPOTrainer
from trl_lifealign.reference import DEFAULT_REFERENCE, REFERENCE_CHOICES

from .spec import PLUGIN_PATH, TRAINER_PATH

START_ADAPTER_FILE = "lifealign_start_adapter.json"


def _lifealign_plugin_registered() -> bool:
    # By class path, not isinstance: the plugin module imports this one when it registers.
    return any(f"{type(p).__module__}.{type(p).__name__}" == "axolotl_plugin.plugin.LifeAlignPlugin"
               for p in PluginManager.get_instance().plugins.values())


class AxolotlFPOTrainer(FPOTrainer, AxolotlDPOTrainer):
    """Axolotl DPO trainer whose loss is FPO; starts from `args.lifealign_previous_adapter` when it is set.

    Reference (`args.lifealign_reference`): `"previous_task"` (default) keeps TRL's frozen `"ref"` copy of the adapter
    as loaded at the start of the stage; `"base"` (LifeAlign's official code) computes it with adapters disabled.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if not _lifealign_plugin_registered():
            raise RuntimeError(
                f"trainer_cls is {TRAINER_PATH} but the LifeAlign plugin is not registered, so its lifealign_* keys "
                f"were dropped by Axolotl. Add `plugins: [{PLUGIN_PATH}]` to the YAML; if it is listed, Axolotl "
                "could not import it: see the 'Failed to load plugin' traceback above (a misspelled path?)."
            )
        bound = bind_dpo_trainer_arguments(args, kwargs)
        previous = getattr(bound.get("args"), "lifealign_previous_adapter", None)
        reference = getattr(bound.get("args"), "lifealign_reference", DEFAULT_REFERENCE)
        if reference not in REFERENCE_CHOICES:
            raise ValueError(f"lifealign_reference must be 'base' or 'previous_task', got {reference!r}")
        if previous:
            model = _load_previous_adapter(bound["model"], previous, bound.get("peft_config"))
            args, kwargs = replace_dpo_trainer_argument(args, kwargs, "model", model)
            # TRL would otherwise wrap a second, fresh adapter around the loaded one.
            args, kwargs = replace_dpo_trainer_argument(args, kwargs, "peft_config", None)
        super().__init__(*args, **kwargs)
        if previous and reference == "base":
            # TRL copied the loaded adapter into a frozen "ref" adapter; without it the reference is the base model.
            drop_ref_adapter(self.model)
        if previous:
            self._record_start_adapter(previous, reference)

    def _record_start_adapter(self, previous: str, reference: str) -> None:
        """Write `<output_dir>/lifealign_start_adapter.json`: per-tensor sum and norm of the adapter as loaded, the
        reference the stage uses (with `previous_task`: whether TRL's frozen "ref" adapter equals that start).

        Read back from the model's parameters (not the file), so it shows what this stage really starts from; the
        chain and the tests compare it with the previous stage's saved (consolidated) adapter.
        """
        start = lora_factors(self.model, DEFAULT_ADAPTER)
        ref = lora_factors(self.model, REF_ADAPTER)
        ref_matches = bool(ref)
        stats = {}
        for name, param in start.items():
            ref_param = ref.get(name.replace(f".{DEFAULT_ADAPTER}.", f".{REF_ADAPTER}."))
            with dist.gathered([p for p in (param, ref_param) if p is not None]):
                values = dist.read_full_fp32(param).double().cpu()
                if ref_param is None:
                    ref_matches = False
                elif ref_matches:
                    ref_matches = torch.equal(dist.read_full_fp32(ref_param).double().cpu(), values)
            stats[name.replace(f".{DEFAULT_ADAPTER}.", ".")] = [values.sum().item(), values.norm().item()]
        if dist.is_main_process():
            record = {"previous_adapter": str(Path(previous).resolve()), "tensors": stats, "reference": reference,
                      "ref_adapter_equals_start": ref_matches}
            atomic_write_json(Path(self.args.output_dir) / START_ADAPTER_FILE, record, indent=1, sort_keys=True)


def _load_previous_adapter(model, previous: str, yaml_peft_config):
    """The stage's base model with the previous stage's adapter loaded (trainable), after checking its layout."""
    from peft import PeftConfig, PeftModel

    if not (Path(previous) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"lifealign_previous_adapter={previous!r} holds no adapter_config.json")
    if hasattr(model, "peft_config"):
        raise ValueError("the model already carries a PEFT adapter (lora_model_dir?); lifealign_previous_adapter loads "
                         "the previous stage's adapter itself")
    if yaml_peft_config is not None:
        check_same_lora(yaml_peft_config, PeftConfig.from_pretrained(previous),
                        f"lifealign_previous_adapter={previous!r}")
    return PeftModel.from_pretrained(model, previous, is_trainable=True)
