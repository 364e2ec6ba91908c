"""Validate an Axolotl stage config the way `axolotl train` does, in-process, before any stage is launched.

Axolotl skips a plugin it cannot import (it prints the error and trains plain DPO), so the chain imports every
listed plugin itself first and stops on the first failure. Then the config goes through Axolotl's own plugin
registration, pydantic validation (with the `lifealign_*` keys merged in) and normalization.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

from .spec import PLUGIN_PATH

LIFEALIGN_KEY_PREFIX = "lifealign_"


class StageConfigError(ValueError):
    """A stage config that Axolotl or the LifeAlign plugin would refuse (or silently mis-handle)."""


def check_plugins_importable(config: dict[str, Any], where: str) -> None:
    """Import every `plugins:` entry; raise `StageConfigError` naming the first one that fails."""
    plugins = config.get("plugins") or []
    if not isinstance(plugins, list):
        raise StageConfigError(f"{where}: `plugins` must be a list of dotted paths, got {plugins!r}")
    lifealign_keys = sorted(k for k in config if k.startswith(LIFEALIGN_KEY_PREFIX))
    if lifealign_keys and PLUGIN_PATH not in plugins:
        raise StageConfigError(
            f"{where}: sets {lifealign_keys} but `plugins:` does not list {PLUGIN_PATH}; Axolotl would drop those "
            "keys silently and train plain DPO"
        )
    for plugin in plugins:
        module_name, _, class_name = str(plugin).rpartition(".")
        if not module_name:
            raise StageConfigError(f"{where}: plugin {plugin!r} is not a '<module>.<Class>' path")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            try:  # Axolotl's own fallback for its built-in integrations
                module = importlib.import_module("axolotl.integrations." + module_name)
            except ImportError:
                raise StageConfigError(
                    f"{where}: plugin {plugin!r} cannot be imported ({error}); Axolotl would skip it and train "
                    "without it. Check the spelling of the path and that its package is installed."
                ) from error
        if not hasattr(module, class_name):
            raise StageConfigError(f"{where}: plugin {plugin!r}: module {module_name!r} has no {class_name!r}")


def validate_stage_config(
    config: dict[str, Any],
    where: str = "config",
    capabilities: dict[str, Any] | None = None,
    env_capabilities: dict[str, Any] | None = None,
    normalize: bool = True,
):
    """Run `config` through Axolotl's plugin registration, validation and (optionally) normalization.

    Args:
        config: the stage's Axolotl config (a plain dict; not modified).
        where: a name for error messages (file or stage).
        capabilities / env_capabilities: Axolotl's hardware description; default: this machine's. Pass the target
            hardware (e.g. `{"bf16": True, "n_gpu": 8, ...}`) to validate a GPU recipe on a CPU machine.
        normalize: also run Axolotl's `normalize_config` (loads the model config from `base_model`).

    Returns:
        the validated Axolotl config (`DictDefault`).

    Raises:
        StageConfigError: a plugin cannot be imported, or `lifealign_*` keys come without the plugin.
        pydantic.ValidationError / ValueError: Axolotl's (or the plugin's) own validation refused the config.
    """
    from axolotl.cli.config import gpu_capabilities, prepare_plugins
    from axolotl.utils.config import normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    check_plugins_importable(config, where)
    cfg = DictDefault(copy.deepcopy(config))
    prepare_plugins(cfg)
    if capabilities is None:
        capabilities, env_capabilities = gpu_capabilities()
    validated = validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
    if normalize:
        normalize_config(validated)
    return validated
