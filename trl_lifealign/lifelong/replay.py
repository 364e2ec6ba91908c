"""Experience replay across tasks, with the paper's rule.

After a task finishes, a random `fraction` of its training pairs (seeded per task) enters a buffer of fixed
`capacity`; when the buffer is full the oldest pairs are dropped first (FIFO). The buffer is mixed into every later
task's training data. (The official code instead keeps the *first* 20% of each task and, when full, drops the
*newest* pairs.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json


class ReplayBuffer:
    """A FIFO buffer of preference pairs, each tagged with the task it came from."""

    def __init__(self, fraction: float, capacity: int, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"replay fraction must be in [0, 1], got {fraction}")
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        self.fraction = fraction
        self.capacity = capacity
        self.seed = seed
        self.entries: list[dict[str, Any]] = []  # {"task": name, "row": {...}}, oldest first

    @property
    def enabled(self) -> bool:
        return self.fraction > 0 and self.capacity > 0

    def rows(self) -> list[dict[str, Any]]:
        """The buffered pairs, oldest first."""
        return [entry["row"] for entry in self.entries]

    def counts_by_task(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry["task"]] = counts.get(entry["task"], 0) + 1
        return counts

    def add_task(self, task_name: str, task_index: int, rows: list[dict[str, Any]]) -> int:
        """Add a random `fraction` of `rows` (seeded by `seed` and `task_index`); evict the oldest beyond capacity.

        Returns the number of pairs added (before eviction).
        """
        if not self.enabled or not rows:
            return 0
        count = int(round(self.fraction * len(rows)))
        count = min(max(count, 1), len(rows))
        rng = random.Random(f"replay-{self.seed}-{task_index}")
        chosen = sorted(rng.sample(range(len(rows)), count))
        self.entries.extend({"task": task_name, "row": rows[i]} for i in chosen)
        overflow = len(self.entries) - self.capacity
        if overflow > 0:
            del self.entries[:overflow]
        return count

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "capacity": self.capacity, "seed": self.seed, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        """Write the buffer atomically (temp file + os.replace)."""
        atomic_write_json(path, self.state_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> ReplayBuffer:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        buffer = cls(state["fraction"], state["capacity"], state["seed"])
        buffer.entries = state["entries"]
        return buffer
