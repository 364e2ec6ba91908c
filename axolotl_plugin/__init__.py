"""LifeAlign for Axolotl: one `plugins:` line turns `rl: dpo` into FPO with SLMC memory consolidation.

    plugins:
      - axolotl_plugin.LifeAlignPlugin
    lifealign_memory_dir: ./outputs/memory

The plugin class lives in `axolotl_plugin.plugin` and is loaded on first access (Axolotl's plugin loader does
`getattr(axolotl_plugin, "LifeAlignPlugin")`), so importing the package (the args model, the chain command) does not
pay for importing Axolotl. See README.md in this folder.
"""

from __future__ import annotations

import importlib

from .args import PLUGIN_PATH, TRAINER_PATH, LifeAlignArgs, LifeAlignTrainingArgsMixin

__all__ = ["LifeAlignPlugin", "LifeAlignArgs", "LifeAlignTrainingArgsMixin", "PLUGIN_PATH", "TRAINER_PATH"]


def __getattr__(name: str):
    if name == "LifeAlignPlugin":
        value = importlib.import_module(".plugin", __name__).LifeAlignPlugin
        globals()[name] = value
        return value
    raise AttributeError(f"module 'axolotl_plugin' has no attribute {name!r}")
