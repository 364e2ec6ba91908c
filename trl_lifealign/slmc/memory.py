"""Long-term memory of SLMC on disk: one orthonormal basis per LoRA factor + a JSON manifest.

Layout of ``memory_dir``::

    manifest.json                         format version, memory kind, task count, theta/lambda, adapters, factors
    basis-<task>-<token>.safetensors      per factor: (k, width) float32 orthonormal rows

Two kinds of memory (``SLMCConfig.memory_kind``):

- ``paper``: one row per task and factor, the flattened consolidated update (width = the factor's numel); k is at
  most the number of tasks. This replaces the raw history the official code keeps: the projection only needs the span.
- ``subspace``: the leading singular directions of each task's consolidated update, its row space for ``lora_A``
  (width = in_features) and column space for ``lora_B`` (width = out_features); k grows with the kept ranks.

Format version 2 records the kind; version 1 memories (before the kind existed) load as ``paper``. A save writes the
data under a new name, then atomically replaces the manifest that points at it,
then deletes older data files, so a crash at any moment leaves a manifest pointing at a complete, checksummed file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write_json, fsync_dir, read_versioned_json, sha256_file
from ..errors import LifeAlignError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MemoryFormatError", "MemoryMismatchError", "LongTermMemory", "ModelSpec"]

FORMAT_NAME = "trl-lifealign-slmc-memory"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
_GROWTH_ROWS = 4  # spare basis rows reserved per factor (untouched pages cost no RAM until written)


class MemoryFormatError(LifeAlignError, RuntimeError):
    """The memory directory holds a truncated, corrupt or unknown-format file."""


class MemoryMismatchError(LifeAlignError, ValueError):
    """The stored memory does not belong to this model's LoRA layout (rank, target modules or shapes differ)."""


@dataclass
class ModelSpec:
    """The LoRA layout a memory belongs to.

    Attributes:
        adapters: adapter name -> {"rank": int, "target_modules": sorted list or str}.
        factors: factor (parameter) name -> full shape, in model order.
    """

    adapters: dict[str, dict]
    factors: dict[str, list[int]]


@dataclass
class LongTermMemory:
    """Per-factor orthonormal bases of all earlier consolidated updates, plus the metadata to validate and resume.

    Attributes:
        memory_dir: directory holding the manifest and data file.
        spec: LoRA layout (adapters, factor shapes) the memory belongs to.
        task_count: number of consolidated task boundaries so far.
        energy_threshold / overlap_weight / basis_rel_tol: settings of the last boundary.
        history: one small dict of statistics per consolidated boundary.
    """

    memory_dir: Path
    spec: ModelSpec
    task_count: int = 0
    energy_threshold: float = 0.9
    overlap_weight: float = 0.5
    basis_rel_tol: float = 1e-4
    kind: str = "paper"
    history: list[dict] = field(default_factory=list)
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _ranks: dict[str, int] = field(default_factory=dict, repr=False)
    data_file: str | None = None

    # ----------------------------------------------------------------------------------------------------- bases
    def width(self, name: str) -> int:
        """Length of factor ``name``'s basis rows: its numel (``paper``) or the dimension of its row / column space
        (``subspace``: in_features for ``lora_A``, out_features for ``lora_B``)."""
        shape = self.spec.factors[name]
        if self.kind == "paper":
            return _numel(shape)
        from .subspace import factor_side

        return int(shape[-1]) if factor_side(name) == "row" else int(shape[0])

    def basis(self, name: str) -> torch.Tensor:
        """``(k, width)`` float32 basis of factor ``name`` (a view; k may be 0)."""
        numel = self.width(name)
        buffer = self._buffers.get(name)
        if buffer is None:
            return torch.zeros((0, numel), dtype=torch.float32)
        # A row may be reserved (next_direction_buffer) for a factor whose update then added no direction.
        return buffer[: self._ranks.get(name, 0)]

    def _reserved(self, name: str) -> torch.Tensor:
        """Factor ``name``'s row buffer with at least one spare row after the current basis (grown if needed)."""
        numel = self.width(name)
        rank = self._ranks.get(name, 0)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] <= rank:
            grown = torch.empty((rank + _GROWTH_ROWS, numel), dtype=torch.float32)
            if rank:
                grown[:rank].copy_(buffer[:rank])
            self._buffers[name] = buffer = grown
        return buffer

    def next_direction_buffer(self, name: str) -> torch.Tensor:
        """The spare row :meth:`append_direction` fills next for factor ``name`` (flat float32, contents undefined).
        Computing the new direction straight into it (``consolidate_update(..., direction_out=...)``) makes the
        append copy-free; the row stays outside the basis until appended."""
        return self._reserved(name)[self._ranks.get(name, 0)]

    def append_direction(self, name: str, direction: torch.Tensor) -> None:
        """Append one unit row to factor ``name``'s basis (amortised: rows are reserved ahead)."""
        numel = self.width(name)
        direction = direction.detach().reshape(-1).to(torch.float32)
        if direction.numel() != numel:
            raise ValueError(f"direction for {name} has {direction.numel()} elements, expected {numel}")
        rank = self._ranks.get(name, 0)
        row = self._reserved(name)[rank]
        if direction.data_ptr() != row.data_ptr():  # already in place when computed into next_direction_buffer()
            row.copy_(direction)
        self._ranks[name] = rank + 1

    def set_basis(self, name: str, rows: torch.Tensor) -> None:
        """Replace factor ``name``'s basis by ``rows`` (``(k, width)``, orthonormal; the subspace memory's update)."""
        rows = rows.detach().to(torch.float32)
        if rows.ndim != 2 or rows.shape[1] != self.width(name):
            raise ValueError(f"basis for {name} has shape {tuple(rows.shape)}, expected (k, {self.width(name)})")
        buffer = torch.empty((rows.shape[0] + _GROWTH_ROWS, rows.shape[1]), dtype=torch.float32)
        buffer[: rows.shape[0]].copy_(rows)
        self._buffers[name], self._ranks[name] = buffer, rows.shape[0]

    def basis_ranks(self) -> dict[str, int]:
        return {name: self._ranks.get(name, 0) for name in self.spec.factors}

    @property
    def ram_bytes(self) -> int:
        """Bytes of basis rows held in RAM (reserved-but-unwritten rows excluded: they are never touched)."""
        return sum(self._ranks.get(name, 0) * self.width(name) * 4 for name in self.spec.factors)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the manifest plus the data file it points at (0 if never saved)."""
        total = 0
        manifest = self.memory_dir / MANIFEST_NAME
        if manifest.exists():
            total += manifest.stat().st_size
        if self.data_file and (self.memory_dir / self.data_file).exists():
            total += (self.memory_dir / self.data_file).stat().st_size
        return total

    # ----------------------------------------------------------------------------------------------- persistence
    def save(self) -> None:
        """Write the data file under a new name, atomically replace the manifest, then delete older data files."""
        from safetensors.torch import save_file

        self.memory_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: self.basis(name).contiguous() for name in self.spec.factors if self._ranks.get(name, 0)}
        data_name = f"basis-{self.task_count:05d}-{secrets.token_hex(4)}.safetensors"
        data_path = self.memory_dir / data_name
        tmp_path = self.memory_dir / f".{data_name}.tmp"
        try:
            save_file(tensors, str(tmp_path), metadata={"format": FORMAT_NAME, "task_count": str(self.task_count)})
            with open(tmp_path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp_path, data_path)
        except BaseException:
            if tmp_path.exists():
                tmp_path.unlink()
            raise
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "memory_kind": self.kind,
            "task_count": self.task_count,
            "energy_threshold": self.energy_threshold,
            "overlap_weight": self.overlap_weight,
            "basis_rel_tol": self.basis_rel_tol,
            "adapters": self.spec.adapters,
            "factors": {
                name: {"shape": list(shape), "basis_rank": self._ranks.get(name, 0)}
                for name, shape in self.spec.factors.items()
            },
            "data_file": data_name,
            "data_bytes": data_path.stat().st_size,
            "data_sha256": sha256_file(data_path),
            "history": self.history,
        }
        atomic_write_json(self.memory_dir / MANIFEST_NAME, manifest, indent=1)
        fsync_dir(self.memory_dir)
        self.data_file = data_name
        # Only now is the old data unreferenced. Leftovers of a crash (older data, stray temp files) go too.
        for stale in self.memory_dir.glob("basis-*.safetensors"):
            if stale.name != data_name:
                stale.unlink()
        for pattern in (".basis-*.tmp", f".{MANIFEST_NAME}.*.tmp"):
            for stale in self.memory_dir.glob(pattern):
                stale.unlink()

    @classmethod
    def exists(cls, memory_dir: str | Path) -> bool:
        return (Path(memory_dir) / MANIFEST_NAME).exists()

    @classmethod
    def load(cls, memory_dir: str | Path, expected: ModelSpec | None = None) -> LongTermMemory:
        """Load and validate a memory; with ``expected``, refuse one that belongs to a different LoRA layout.

        Raises:
            MemoryFormatError: missing/truncated/corrupt manifest or data file, or an unknown format version.
            MemoryMismatchError: rank, target modules or a factor's shape differ from ``expected`` (the message names
                the first mismatching adapter or parameter).
        """
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        memory_dir = Path(memory_dir)
        manifest_path = memory_dir / MANIFEST_NAME
        manifest = read_versioned_json(manifest_path, FORMAT_NAME, READABLE_VERSIONS, MemoryFormatError,
                                       "SLMC memory manifest")
        kind = manifest.get("memory_kind", "paper")
        if kind not in ("paper", "subspace"):
            raise MemoryFormatError(f"{manifest_path} has an unknown memory_kind {kind!r}")
        try:
            spec = ModelSpec(
                adapters=dict(manifest["adapters"]),
                factors={name: [int(v) for v in entry["shape"]] for name, entry in manifest["factors"].items()},
            )
            ranks = {name: int(entry["basis_rank"]) for name, entry in manifest["factors"].items()}
            data_name, data_bytes, data_sha = str(manifest["data_file"]), int(manifest["data_bytes"]), \
                str(manifest["data_sha256"])
            memory = cls(memory_dir=memory_dir, spec=spec, task_count=int(manifest["task_count"]),
                         energy_threshold=float(manifest["energy_threshold"]),
                         overlap_weight=float(manifest["overlap_weight"]),
                         basis_rel_tol=float(manifest["basis_rel_tol"]), history=list(manifest.get("history", [])),
                         data_file=data_name, kind=kind)
        except KeyError as error:
            raise MemoryFormatError(f"SLMC memory manifest {manifest_path} lacks field {error}") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise MemoryFormatError(f"SLMC memory manifest {manifest_path} has a malformed field: {error}") from None
        if Path(data_name).name != data_name or not data_name.startswith("basis-"):
            raise MemoryFormatError(f"SLMC memory manifest {manifest_path} names an unexpected data file {data_name!r}")
        if expected is not None:
            check_spec(spec, expected, memory_dir)
        data_path = memory_dir / data_name
        if not data_path.exists():
            raise MemoryFormatError(f"SLMC memory data file {data_path} named by {manifest_path} is missing")
        size = data_path.stat().st_size
        if size != data_bytes:
            raise MemoryFormatError(
                f"SLMC memory data file {data_path} is truncated or overwritten: {size} bytes, manifest says "
                f"{data_bytes}"
            )
        if sha256_file(data_path) != data_sha:
            raise MemoryFormatError(f"SLMC memory data file {data_path} is corrupt (SHA-256 differs from the manifest)")
        try:
            with safe_open(str(data_path), framework="pt") as handle:
                stored = set(handle.keys())
                for name, rank in ranks.items():
                    if rank == 0:
                        continue
                    if name not in stored:
                        raise MemoryFormatError(f"SLMC memory data file {data_path} lacks the basis of {name}")
                    tensor = handle.get_tensor(name)
                    numel = memory.width(name)
                    if tuple(tensor.shape) != (rank, numel) or tensor.dtype != torch.float32:
                        raise MemoryFormatError(
                            f"basis of {name} in {data_path} has shape {tuple(tensor.shape)} {tensor.dtype}, manifest "
                            f"says ({rank}, {numel}) float32"
                        )
                    buffer = torch.empty((rank + _GROWTH_ROWS, numel), dtype=torch.float32)
                    buffer[:rank].copy_(tensor)
                    memory._buffers[name] = buffer
                    memory._ranks[name] = rank
        except SafetensorError as error:
            raise MemoryFormatError(f"SLMC memory data file {data_path} is corrupt: {error}") from None
        return memory


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def check_spec(stored: ModelSpec, expected: ModelSpec, where: Path | str) -> None:
    """Raise :class:`MemoryMismatchError` naming the first adapter or parameter where ``stored`` != ``expected``."""
    if set(stored.adapters) != set(expected.adapters):
        raise MemoryMismatchError(
            f"SLMC memory at {where} was built for adapters {sorted(stored.adapters)}, the model trains "
            f"{sorted(expected.adapters)}"
        )
    for adapter, stored_info in stored.adapters.items():
        info = expected.adapters[adapter]
        for key in ("rank", "target_modules"):
            if stored_info.get(key) != info.get(key):
                raise MemoryMismatchError(
                    f"SLMC memory at {where}: adapter {adapter!r} has {key} {stored_info.get(key)!r} in memory but "
                    f"{info.get(key)!r} in the model"
                )
    for name, shape in stored.factors.items():
        if name not in expected.factors:
            raise MemoryMismatchError(f"SLMC memory at {where}: parameter {name} (shape {shape}) is not in the model")
        if list(expected.factors[name]) != list(shape):
            raise MemoryMismatchError(
                f"SLMC memory at {where}: parameter {name} has shape {list(shape)} in memory but "
                f"{list(expected.factors[name])} in the model"
            )
    for name, shape in expected.factors.items():
        if name not in stored.factors:
            raise MemoryMismatchError(f"SLMC memory at {where}: model parameter {name} (shape {shape}) is not in "
                                      "memory")
