"""The focal exponent's single home: its default and its valid range (standard library only, so YAML schemas such as
the Axolotl plugin's can import it without torch)."""

from __future__ import annotations

import math
from typing import Any

DEFAULT_FOCAL_GAMMA = 2.0
"""LifeAlign's γ: the FPO weight is (1 − p)^γ; 0 is exactly DPO."""


def check_focal_gamma(value: Any, key: str = "focal_gamma") -> float:
    """``value`` as a float, or ``ValueError`` naming ``key`` unless it is a finite number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a finite number >= 0 (0 is plain DPO), got {value!r}")
    return float(value)
