"""`LifeAlignPlugin`, the Axolotl plugin: one `plugins:` line turns `rl: dpo` into FPO with SLMC memory consolidation.

    plugins:
      - axolotl_plugin.LifeAlignPlugin
    lifealign_memory_dir: ./outputs/memory

What the plugin does (Axolotl 0.19 hooks):
- `register` (raw config, before validation): selects our trainer through `trainer_cls` (Axolotl builds a plugin's
  `get_trainer_cls` class without the model under `rl: dpo`, the YAML `trainer_cls` path keeps it) and defaults
  `dpo_loss_type` to `[fpo]`; it refuses a different `trainer_cls` and imports the trainer now, so a broken install
  stops the run here instead of silently training plain DPO.
- `get_input_args` / `get_training_args_mixin` / `get_training_args`: the `lifealign_*` keys and their route into
  the trainer's arguments (`focal_gamma`, previous adapter, reference).
- `load_datasets`: optional replay of earlier stages' data, loaded through Axolotl's own preference pipeline.
- `add_callbacks_post_trainer`: `MemoryConsolidationCallback` on `lifealign_memory_dir` (consolidates in
  `on_train_end`, i.e. before Axolotl saves, so the saved adapter is the consolidated one).
- `post_trainer_create`: checks that the trainer really is FPO with the configured γ.

Importing this module imports `axolotl.integrations.base` (seconds); the package exposes the plugin lazily so that
`import axolotl_plugin` and the `lifealign` CLI stay cheap. It must stay free of `axolotl.core.training_args` (see
args.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trl_lifealign.atomic import atomic_write_json

from .args import SLMC_KEYS, LifeAlignArgs, LifeAlignTrainingArgsMixin
from .spec import PLUGIN_PATH, STAGE_SUMMARY_FILE, TRAINER_PATH

try:
    from axolotl.integrations.base import BasePlugin
    from axolotl.utils.logging import get_logger
except ModuleNotFoundError as error:
    # Without Axolotl the package still imports (the `lifealign axolotl-chain` command and the args model work and
    # say what to install); only Axolotl instantiates the plugin, so it cannot be used half-installed.
    if error.name is None or error.name.split(".")[0] != "axolotl":
        raise
    _AXOLOTL_MISSING = error

    class BasePlugin:  # type: ignore[no-redef]
        def __init__(self):
            raise ModuleNotFoundError(
                f"{PLUGIN_PATH} needs Axolotl: pip install 'trl-lifealign[axolotl]'"
            ) from _AXOLOTL_MISSING

    get_logger = logging.getLogger

__all__ = ["LifeAlignPlugin", "LifeAlignArgs", "LifeAlignTrainingArgsMixin", "PLUGIN_PATH", "TRAINER_PATH"]

LOG = get_logger(__name__)


class LifeAlignPlugin(BasePlugin):
    """Axolotl plugin: FPO loss + memory consolidation of LoRA weights at the end of each stage (LifeAlign)."""

    def register(self, cfg: dict) -> None:
        """Select the FPO trainer and loss on the raw config; fail here if they cannot be used."""
        if cfg.get("rl") != "dpo":
            raise ValueError(f"{PLUGIN_PATH} trains with FPO and needs `rl: dpo`, got rl={cfg.get('rl')!r}")
        trainer_cls = cfg.get("trainer_cls")
        if trainer_cls and trainer_cls != TRAINER_PATH:
            from axolotl.utils.import_helper import get_cls_from_module_str

            from .trainer import AxolotlFPOTrainer

            custom = get_cls_from_module_str(trainer_cls)
            if not (isinstance(custom, type) and issubclass(custom, AxolotlFPOTrainer)):
                raise ValueError(
                    f"trainer_cls={trainer_cls!r} is not a subclass of {TRAINER_PATH}: with {PLUGIN_PATH} the run "
                    "would not train with FPO. Remove trainer_cls (the plugin sets it) or subclass AxolotlFPOTrainer."
                )
        else:
            # Import now: any error in our package (or trl_lifealign) surfaces here, loudly, not as plain DPO.
            from . import trainer as _trainer  # noqa: F401

            cfg["trainer_cls"] = TRAINER_PATH
        if cfg.get("dpo_loss_type") is None:
            cfg["dpo_loss_type"] = ["fpo"]

    def get_input_args(self) -> str:
        return "axolotl_plugin.args.LifeAlignArgs"

    def get_training_args_mixin(self) -> str:
        return "axolotl_plugin.args.LifeAlignTrainingArgsMixin"

    def get_training_args(self, cfg) -> dict[str, Any]:
        """Copy the stage keys into the DPO training arguments (fields added by the mixin)."""
        from axolotl.core.training_args import AxolotlTrainingMixins

        if not issubclass(AxolotlTrainingMixins, LifeAlignTrainingArgsMixin):
            raise RuntimeError(
                "Axolotl built its training arguments without the LifeAlign mixin: `axolotl.core.training_args` was "
                f"imported before {PLUGIN_PATH} was registered (another plugin or custom code imported it at import "
                "time). Import it lazily, or list the LifeAlign plugin first."
            )
        from trl_lifealign.distributed import cpu_process_group_defaults

        return cpu_process_group_defaults({
            "focal_gamma": float(cfg.lifealign_focal_gamma),
            "lifealign_previous_adapter": cfg.lifealign_previous_adapter,
            "lifealign_reference": cfg.lifealign_reference,
        })

    def pre_model_load(self, cfg) -> None:
        """Seed every RNG, then fail before the (possibly long) model load if the previous stage's adapter is missing.

        Axolotl 0.19 creates the LoRA adapter before the trainer seeds the RNGs (``Trainer.__init__``), so ``lora_A``
        was drawn from an unseeded generator and two runs of one seeded stage differed; seeding here, with the seed the
        trainer will use (``seed``, default 42 as in ``TrainingArguments``), makes a seeded stage reproducible.
        """
        from transformers import set_seed

        set_seed(cfg.seed if cfg.seed is not None else 42)
        previous = cfg.lifealign_previous_adapter
        if previous and not (Path(previous) / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"lifealign_previous_adapter={previous!r} holds no adapter_config.json: it must be the output_dir of a "
                "finished earlier stage (its LoRA adapter is saved there)"
            )

    def load_datasets(self, cfg, preprocess: bool = False):
        """Replay: this stage's data plus a seeded sample of the earlier stages' data (Axolotl's own loaders)."""
        if not cfg.lifealign_replay_fraction:
            return None
        from .replay import load_with_replay

        meta, self._replayed_pairs = load_with_replay(cfg)
        return meta

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        """The stage's defences and memory-consolidation callback, in the order their hooks must run (the trainer
        binds them, so their metrics reach its loggers)."""
        from trl_lifealign.defences.factory import build_defences, ordered_callbacks

        from .args import defence_settings

        memory = None
        if cfg.lifealign_consolidate:
            from trl_lifealign.slmc import MemoryConsolidationCallback, SLMCConfig

            settings = {field_: cfg[key] for key, field_ in SLMC_KEYS.items() if cfg[key] is not None}
            memory = MemoryConsolidationCallback(cfg.lifealign_memory_dir, SLMCConfig(**settings))
        self._callback = memory
        defences_settings = defence_settings(cfg)
        monitor, monitor_logps = self._budget_monitor(cfg, trainer) if cfg.lifealign_forgetting_budget else ([], {})
        defences = build_defences(defences_settings, cfg.lifealign_defences_dir or Path(cfg.output_dir) / "defences",
                                  monitor_sets=monitor, monitor_logps=monitor_logps)
        for defence in defences.values():
            defence.start_task(int(cfg.lifealign_task_index or 0))
        self._defences = defences
        return ordered_callbacks(defences, memory)

    @staticmethod
    def _budget_monitor(cfg, trainer):
        """The budget's monitor sets, tokenised like training pairs, and π₀'s log-probs on them (adapters off)."""
        from trl_lifealign.lifelong.data import DataSource, load_preference_data
        from trl_lifealign.lifelong.evaluation import EvalSet, initial_policy_logps, prepare_eval_sets

        sets = []
        for index, entry in enumerate(cfg.lifealign_budget_monitor_sets):
            entry = dict(entry)
            name = entry.pop("name", None) or f"stage{index + 1}"
            sets.append(EvalSet(name, load_preference_data(DataSource(**entry)).rows))
        prepared = prepare_eval_sets(trainer.processing_class, sets, cfg.sequence_len)
        with trainer.model.disable_adapter():
            return prepared, initial_policy_logps(trainer.model, prepared)

    def post_train(self, cfg, model) -> None:
        """Log the stage summary and keep it beside the adapter (Axolotl calls this twice: idempotent).

        The console progress bar is closed by the time the callback logs in `on_train_end`, so the `slmc/*` metrics
        are printed here and written, with the training loss and row counts, to
        `<output_dir>/lifealign_stage_summary.json` (rank 0).
        """
        from trl_lifealign.distributed import is_main_process

        if not is_main_process():
            return
        report = getattr(getattr(self, "_callback", None), "last_report", None)
        trainer = getattr(self, "_trainer", None)
        summary: dict[str, Any] = {
            "focal_gamma": cfg.lifealign_focal_gamma,
            "reference": cfg.lifealign_reference,
            "previous_adapter": cfg.lifealign_previous_adapter,
            "memory_dir": cfg.lifealign_memory_dir if cfg.lifealign_consolidate else None,
            "consolidation": report.metrics() if report is not None else None,
            "defences": {name: d.summary() for name, d in getattr(self, "_defences", {}).items()},
        }
        if trainer is not None:
            losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
            summary["train_loss"] = losses[-1] if losses else None
            summary["train_pairs"] = len(trainer.train_dataset) if trainer.train_dataset is not None else None
            summary["replayed_pairs"] = getattr(self, "_replayed_pairs", 0)
            summary["global_step"] = trainer.state.global_step
        if report is not None:
            # Rank 0 only (checked above). Not through Axolotl's rank-aware LOG: after a multi-process run Axolotl has
            # destroyed the process group before post_train, and that logger's rank check then raises.
            logging.getLogger(__name__).info("LifeAlign consolidation: %s",
                                             json.dumps(report.metrics(), sort_keys=True))
        atomic_write_json(Path(cfg.output_dir) / STAGE_SUMMARY_FILE, summary, indent=1, default=str)

    def post_trainer_create(self, cfg, trainer) -> None:
        """The last check before training: the trainer is FPO, with the configured γ and consolidation."""
        from trl_lifealign.fpo import FPOTrainer

        if not isinstance(trainer, FPOTrainer):
            raise RuntimeError(
                f"{PLUGIN_PATH} is registered but Axolotl built {type(trainer).__name__}, not an FPO trainer (another "
                "plugin's get_trainer_cls took precedence?): refusing to train plain DPO"
            )
        if getattr(trainer.args, "focal_gamma", None) != cfg.lifealign_focal_gamma:
            raise RuntimeError(
                f"the trainer's focal_gamma={getattr(trainer.args, 'focal_gamma', None)!r} differs from "
                f"lifealign_focal_gamma={cfg.lifealign_focal_gamma!r}"
            )
        self._trainer = trainer
        LOG.info(
            "LifeAlign: FPO (focal_gamma=%s), reference=%s, previous adapter=%s, memory=%s",
            cfg.lifealign_focal_gamma,
            cfg.lifealign_reference,
            cfg.lifealign_previous_adapter,
            cfg.lifealign_memory_dir if cfg.lifealign_consolidate else "off",
        )
