"""The DPO reference policy of a task in a sequence, shared by the lifelong runner and the Axolotl plugin.

- ``"previous_task"``: the policy as the task starts (TRL's frozen ``"ref"`` copy of the adapter). The default: in
  ``lifealign bench`` (README, "Benchmark") it forgot far less than ``"base"`` for every method (sequential DPO BWT
  -5.0 vs -14.0 points, LifeAlign -4.1 vs -11.0, over 3 seeds).
- ``"base"``: the base model with the adapter disabled, what LifeAlign's official code does.

Standard library only: the Axolotl plugin's args model imports it without torch or Axolotl.
"""

from __future__ import annotations

from typing import Literal

Reference = Literal["base", "previous_task"]
REFERENCE_CHOICES: tuple[str, ...] = ("base", "previous_task")
DEFAULT_REFERENCE: Reference = "previous_task"

__all__ = ["DEFAULT_REFERENCE", "REFERENCE_CHOICES", "Reference"]
