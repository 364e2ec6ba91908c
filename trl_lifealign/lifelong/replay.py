"""Experience replay across tasks, with the paper's rule, for the lifelong runner and the Axolotl chain alike.

After a task finishes, a random `fraction` of its training pairs (seeded per task) enters a buffer of fixed
`capacity`; when the buffer is full the oldest pairs are dropped first (FIFO). The buffer is mixed into every later
task's training data. (The official code instead keeps the *first* 20% of each task and, when full, drops the
*newest* pairs.) :func:`replay_plan` computes the same buffer from the earlier tasks' sizes alone, for drivers that
load each task's rows themselves (the Axolotl plugin).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import LifeAlignError

DEFAULT_REPLAY_CAPACITY = 1000


class ReplayFileError(LifeAlignError, RuntimeError):
    """A saved replay buffer is truncated or malformed; the message names the file."""


def replay_selection(task_index: int, rows: int, fraction: float, seed: int) -> list[int]:
    """Indices (sorted) of the ``round(fraction · rows)`` pairs (at least one) task ``task_index`` gives the buffer."""
    if fraction <= 0 or rows == 0:
        return []
    count = min(max(int(round(fraction * rows)), 1), rows)
    return sorted(random.Random(f"replay-{seed}-{task_index}").sample(range(rows), count))


def replay_plan(task_sizes: list[int], fraction: float, capacity: int, seed: int) -> list[tuple[int, int]]:
    """The buffer after tasks ``0..len(task_sizes)-1`` finished: ``(task index, row index)`` pairs, oldest first."""
    entries = [(task, row) for task, size in enumerate(task_sizes)
               for row in replay_selection(task, size, fraction, seed)]
    return entries[max(0, len(entries) - capacity):] if capacity > 0 else []


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
        chosen = replay_selection(task_index, len(rows), self.fraction, self.seed)
        self.entries.extend({"task": task_name, "row": rows[i]} for i in chosen)
        overflow = len(self.entries) - self.capacity
        if overflow > 0:
            del self.entries[:overflow]
        return len(chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "capacity": self.capacity, "seed": self.seed, "entries": self.entries}

    def save(self, path: str | Path) -> None:
        """Write the buffer atomically (temp file + os.replace)."""
        atomic_write_json(path, self.state_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> ReplayBuffer:
        """The buffer saved at ``path``; :class:`ReplayFileError` naming the file when it is truncated or malformed."""
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
            buffer = cls(float(state["fraction"]), int(state["capacity"]), int(state["seed"]))
            entries = state["entries"]
            if not isinstance(entries, list) or not all(isinstance(e, dict) and {"task", "row"} <= set(e)
                                                        for e in entries):
                raise ValueError("entries must be a list of {task, row} objects")
        except FileNotFoundError:
            raise ReplayFileError(f"replay buffer file {path} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
            raise ReplayFileError(f"replay buffer file {path} is truncated or malformed: {error}") from None
        buffer.entries = entries
        return buffer
