"""LifeAlign for Axolotl: one `plugins:` line turns `rl: dpo` into FPO with SLMC memory consolidation.

    plugins:
      - axolotl_plugin.LifeAlignPlugin
    lifealign_memory_dir: ./outputs/memory

Everything is loaded on first access (Axolotl's plugin loader does `getattr(axolotl_plugin, "LifeAlignPlugin")`), so
importing the package (the command line, the chain file reader) pays neither for Axolotl nor for pydantic. See
README.md in this folder.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LifeAlignPlugin": "plugin",
    "LifeAlignArgs": "args",
    "LifeAlignTrainingArgsMixin": "args",
    "PLUGIN_PATH": "spec",
    "TRAINER_PATH": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'axolotl_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value
