"""A lifelong run directory: its lock, its commit record (``state.json``), what may change between resumes, and the
π₀ log-prob cache. Nothing read from a run directory is trusted: every file is validated and named in errors.

What a resume guarantees: re-running the same configuration continues after the last committed task and ends with
the same adapters and metrics as an uninterrupted run. The configuration is compared by what determines the result,
not by where it lives: the data's *content* (not its path), the model's identity, the training settings; so a run
directory (and its data) can be moved. Evaluation settings and eval data may not change once a task is committed
(the matrix would mix rows scored differently); before the first commit any change simply starts afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, remove_temporaries
from ..errors import LifeAlignError
from .config import LifelongConfig

__all__ = ["ConfigurationMismatchError", "RunDirectory", "RunStateError", "digest", "run_fingerprints"]

STATE_FILE = "state.json"
STATE_VERSION = 2
INITIAL_LOGPS_FILE = "initial_logps.json"
LOCK_FILE = ".lifealign.lock"
_TASK_DIR_PARTS = 2  # tasks/NN-name


class RunStateError(LifeAlignError, RuntimeError):
    """A run directory holds a truncated, malformed or unsafe file; the message names it."""


class ConfigurationMismatchError(LifeAlignError, ValueError):
    """The run directory holds committed tasks of a different configuration; the message names what differs."""


def digest(payload: Any) -> str:
    """A short, stable digest of a JSON-able value."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_identity(model: str | None, in_memory=None) -> Any:
    """What identifies the base model, wherever it lives: an in-memory model by its config and a checksum of every
    parameter; a local folder by its config and weight files' names and sizes; a hub id as given."""
    if in_memory is not None:
        import torch

        config = getattr(in_memory, "config", None)
        with torch.no_grad():
            sums = [(name, list(p.shape), str(p.dtype), float(p.detach().double().sum()))
                    for name, p in in_memory.named_parameters()]
        return {"config": config.to_json_string() if config is not None else None, "parameters": sums}
    if model is None:
        return None
    path = Path(model)
    if not path.is_dir():
        return model
    config = path / "config.json"
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir()
                   if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file())
    return {"config": config.read_text(encoding="utf-8") if config.is_file() else None, "weights": files}


def run_fingerprints(config: LifelongConfig, in_memory_model, train_digests: list[list[str]],
                     eval_digests: list[str]) -> dict[str, str]:
    """Per-component digests of what determines a run's result (``training``) and its matrix (``evaluation``).

    ``train_digests[i]`` / ``eval_digests[j]`` are the content digests of task i's training sources and eval set j
    (``PreferenceData.digest``): paths do not enter, so a moved run directory or data folder resumes.
    """
    settings = config.to_dict()
    for key in ("output_dir", "tasks", "eval_sets", "evaluation", "model", "tokenizer"):
        settings.pop(key)
    parts = {
        "model": digest(_model_identity(config.model, in_memory_model)),
        "tokenizer": digest(config.tokenizer),
        "settings": digest(settings),
    }
    for index, task in enumerate(config.tasks):
        parts[f"tasks[{index}]"] = digest({"name": task.name, "overrides": task.overrides,
                                            "data": train_digests[index]})
    evaluation = {"settings": config.to_dict()["evaluation"], "sets": [
        (spec.name, digest) for spec, digest in zip(config.resolved_eval_sets(), eval_digests)]}
    parts["evaluation"] = digest(evaluation)
    return parts


class RunDirectory:
    """The files of one run directory, read and written safely (rank 0 writes; every rank may read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_handle = None

    # ------------------------------------------------------------------------------------------------ lock/clean
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the directory for the block: a second process on it fails at once."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunStateError(f"another process is running in {self.path} (it holds {self.path / LOCK_FILE}); "
                                "wait for it to finish or use another output_dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def remove_temporaries(self) -> list[Path]:
        """Delete what crashed atomic writes left behind (temporary files, half-built memory copies)."""
        return remove_temporaries(self.path) if self.path.is_dir() else []

    # ------------------------------------------------------------------------------------------------ run state
    def _read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunStateError(f"{path} is truncated or corrupt ({error}); delete the run directory to start "
                                "over") from None

    def read_state(self) -> dict[str, Any] | None:
        """The validated commit record, or None for a new directory."""
        if not (self.path / STATE_FILE).is_file():
            return None
        state = self._read_json(STATE_FILE)
        where = self.path / STATE_FILE
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise RunStateError(f"{where} is not a trl-lifealign run state of version {STATE_VERSION} (found "
                                f"{version!r})")
        for key, kind in (("fingerprints", dict), ("completed", list)):
            if not isinstance(state.get(key), kind):
                raise RunStateError(f"{where} lacks a valid {key!r} field")
        for index, record in enumerate(state["completed"]):
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise RunStateError(f"{where}: completed[{index}] is not a task record")
        return state

    def task_dir(self, index: int, name: str) -> Path:
        return self.path / "tasks" / f"{index + 1:02d}-{name}"

    def committed_task_dir(self, index: int, record: dict[str, Any]) -> Path:
        """The directory of committed task ``index``: recomputed from its index and name, never taken from the file
        (a crafted ``state.json`` cannot point the runner at files outside the run directory)."""
        directory = self.task_dir(index, record["name"])
        if record.get("dir") != str(directory.relative_to(self.path)):
            raise RunStateError(f"{self.path / STATE_FILE}: completed[{index}] names directory {record.get('dir')!r}, "
                                f"expected {directory.relative_to(self.path)}")
        if directory.is_symlink() or not directory.resolve().is_relative_to(self.path.resolve()):
            raise RunStateError(f"{directory} leaves the run directory {self.path}")
        return directory

    def commit(self, state: dict[str, Any]) -> None:
        """Write the commit record atomically: the moment a task counts as done."""
        atomic_write_json(self.path / STATE_FILE, {**state, "version": STATE_VERSION}, default=str)

    def check_resumable(self, state: dict[str, Any], fingerprints: dict[str, str]) -> None:
        """Refuse committed tasks of another configuration, naming every component that differs."""
        if not state["completed"]:
            return
        stored = state["fingerprints"]
        changed = sorted(key for key in set(stored) | set(fingerprints) if stored.get(key) != fingerprints.get(key))
        if changed:
            raise ConfigurationMismatchError(
                f"{self.path} holds {len(state['completed'])} committed task(s) of a different configuration: "
                f"{', '.join(changed)} changed (evaluation settings and data content count too). Re-run with the "
                "original configuration to resume, or use another output_dir"
            )

    # -------------------------------------------------------------------------------------------------- π₀ cache
    def read_initial_logps(self, key: str) -> dict[str, Any] | None:
        """π₀'s cached log-probs if they were computed for ``key`` (model + eval settings + eval data), else None
        (missing, stale or corrupt: the caller recomputes them)."""
        path = self.path / INITIAL_LOGPS_FILE
        if not path.is_file():
            return None
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(cached, dict) or cached.get("key") != key or not isinstance(cached.get("logps"), dict):
            return None
        return cached["logps"]

    def write_initial_logps(self, key: str, logps: dict[str, Any]) -> None:
        atomic_write_json(self.path / INITIAL_LOGPS_FILE, {"key": key, "logps": logps}, indent=None)

    def discard_partial_run(self) -> None:
        """Remove what an interrupted run with no committed task left (before a fresh start)."""
        import shutil

        for name in ("tasks", "memory"):
            if (self.path / name).exists():
                shutil.rmtree(self.path / name)
        for name in (STATE_FILE, INITIAL_LOGPS_FILE):
            (self.path / name).unlink(missing_ok=True)
