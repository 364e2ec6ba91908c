"""`AxolotlFPOTrainer`: Axolotl's DPO trainer with the FPO loss, continuing from the previous stage's adapter.

Axolotl resolves this class through the YAML key `trainer_cls` (the plugin's `register` sets it), which keeps the
model and reference in the constructor call. The FPO loss comes from `trl_lifealign.fpo.FPOTrainer` by inheritance;
Axolotl's mixins (optimizers, schedulers, RNG state, double-BOS fix) come from `AxolotlDPOTrainer`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.integrations.base import PluginManager

from trl_lifealign.fpo import FPOTrainer
from trl_lifealign.atomic import atomic_write_json
from trl_lifealign.reference import DEFAULT_REFERENCE, REFERENCE_CHOICES

from .args import PLUGIN_PATH, TRAINER_PATH

START_ADAPTER_FILE = "lifealign_start_adapter.json"
# LoRA settings that must agree between the YAML and the adapter a stage continues from.
_LORA_FIELDS_THAT_MUST_MATCH = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")


def _lifealign_plugin_registered() -> bool:
    from . import LifeAlignPlugin

    return any(isinstance(plugin, LifeAlignPlugin) for plugin in PluginManager.get_instance().plugins.values())


def _check_same_lora(yaml_config, saved_config, previous: str) -> None:
    """Refuse to continue from an adapter whose shape or targets differ from the stage's LoRA settings."""
    if yaml_config is None:
        return
    differences = []
    for name in _LORA_FIELDS_THAT_MUST_MATCH:
        ours, theirs = getattr(yaml_config, name, None), getattr(saved_config, name, None)
        if isinstance(ours, (set, list, tuple)) and isinstance(theirs, (set, list, tuple)):
            ours, theirs = sorted(ours), sorted(theirs)
        if ours != theirs:
            differences.append(f"{name}: YAML {ours!r} vs saved {theirs!r}")
    if differences:
        raise ValueError(
            f"the LoRA settings of this stage differ from the adapter in lifealign_previous_adapter={previous!r} "
            f"({'; '.join(differences)}): every stage of a chain must use the same LoRA layout"
        )


class AxolotlFPOTrainer(FPOTrainer, AxolotlDPOTrainer):
    """Axolotl DPO trainer whose loss is FPO; starts from `args.lifealign_previous_adapter` when it is set.

    Reference (`args.lifealign_reference`): `"previous_task"` (default) keeps TRL's frozen `"ref"` copy of the adapter
    as loaded at the start of the stage; `"base"` (LifeAlign's official code) computes it with adapters disabled.
    """

    def __init__(self, model, ref_model=None, *args: Any, **kwargs: Any):
        if not _lifealign_plugin_registered():
            raise RuntimeError(
                f"trainer_cls is {TRAINER_PATH} but the LifeAlign plugin is not registered, so its lifealign_* keys "
                f"were dropped by Axolotl. Add `plugins: [{PLUGIN_PATH}]` to the YAML; if it is listed, Axolotl "
                "could not import it: see the 'Failed to load plugin' traceback above (a misspelled path?)."
            )
        training_args = kwargs.get("args")
        previous = getattr(training_args, "lifealign_previous_adapter", None)
        reference = getattr(training_args, "lifealign_reference", DEFAULT_REFERENCE)
        if reference not in REFERENCE_CHOICES:
            raise ValueError(f"lifealign_reference must be 'base' or 'previous_task', got {reference!r}")
        if previous:
            model = self._load_previous_adapter(model, previous, kwargs.get("peft_config"))
            kwargs["peft_config"] = None  # TRL would otherwise wrap a second, fresh adapter
        super().__init__(model, ref_model, *args, **kwargs)
        if previous and reference == "base" and "ref" in getattr(self.model, "peft_config", {}):
            # TRL copied the loaded adapter into a frozen "ref" adapter; without it the reference is the base model.
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        if previous:
            self._record_start_adapter(previous, reference)

    def _record_start_adapter(self, previous: str, reference: str) -> None:
        """Write `<output_dir>/lifealign_start_adapter.json`: per-tensor sum and norm of the adapter as loaded, the
        reference the stage uses (with `previous_task`: whether TRL's frozen "ref" adapter equals that start).

        Read back from the model's parameters (not the file), so it shows what this stage really starts from; the
        chain and the tests compare it with the previous stage's saved (consolidated) adapter.
        """
        stats = {}
        params = dict(self.model.named_parameters())
        ref_matches = "ref" in getattr(self.model, "peft_config", {})
        for name, param in params.items():
            if ".default." not in name or "lora_" not in name:
                continue
            ref_param = params.get(name.replace(".default.", ".ref."))
            gathered = [p for p in (param, ref_param) if p is not None]
            if getattr(param, "ds_numel", None) is not None and param.numel() == 0:
                import deepspeed

                context = deepspeed.zero.GatheredParameters(gathered)  # collective: every rank takes part
            else:
                context = contextlib.nullcontext()
            with context:
                values = param.detach().double().cpu()
                if ref_param is None:
                    ref_matches = False
                elif ref_matches:
                    ref_matches = torch.equal(ref_param.detach().double().cpu(), values)
            stats[name.replace(".default.", ".")] = [values.sum().item(), values.norm().item()]
        if not self.accelerator.is_main_process:
            return
        record = {"previous_adapter": str(Path(previous).resolve()), "tensors": stats, "reference": reference,
                  "ref_adapter_equals_start": ref_matches}
        atomic_write_json(Path(self.args.output_dir) / START_ADAPTER_FILE, record, indent=1, sort_keys=True)

    @staticmethod
    def _load_previous_adapter(model, previous: str, yaml_peft_config):
        from peft import PeftConfig, PeftModel

        if not (Path(previous) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"lifealign_previous_adapter={previous!r} holds no adapter_config.json")
        if hasattr(model, "peft_config"):
            raise ValueError(
                "the model already carries a PEFT adapter (lora_model_dir?); lifealign_previous_adapter loads the "
                "previous stage's adapter itself"
            )
        _check_same_lora(yaml_peft_config, PeftConfig.from_pretrained(previous), previous)
        return PeftModel.from_pretrained(model, previous, is_trainable=True)
