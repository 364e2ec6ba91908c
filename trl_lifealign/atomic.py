"""Crash-safe file writes: a reader sees the old file or the new one, never a half-written one; and the checked
reader of the versioned JSON state files those writes produce.

Every write goes to a temporary file in the destination's directory (same filesystem, so the rename is atomic), is
flushed and fsynced, then renamed over the destination with ``os.replace``. Used for run state, long-term memory,
reports and chain state, so that killing a process at any moment loses nothing already trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMPORARY_SUFFIXES = (".tmp", ".tmp.old")
"""Names of our temporary files and directories end so (and start with a dot): a crash may leave them behind, and
:func:`remove_temporaries` clears them on the next start."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + ``os.replace``), with the permissions a plain
    ``open(path, "w")`` would give (``mkstemp`` alone would leave the file readable by its owner only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **json_kwargs: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically; ``json_kwargs`` go to ``json.dumps``."""
    json_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(data, **json_kwargs) + "\n")


def atomic_write_dir(target: str | Path, write: Callable[[Path], Any]) -> None:
    """Build directory ``target`` through ``write(staging_dir)`` so that it appears complete or not at all.

    An existing ``target`` is replaced only once the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        write(staging)
        if target.exists():
            retired = staging.with_name(staging.name + ".old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_copytree(source: str | Path, target: str | Path) -> None:
    """Copy directory ``source`` to ``target`` so that ``target`` appears complete or not at all."""
    atomic_write_dir(target, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True))


def remove_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary files and directories a crashed atomic write left anywhere under ``root``; returns them."""
    removed = []
    for path in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.name.endswith(TEMPORARY_SUFFIXES) and path.exists():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def sha256_file(path: str | Path, block_size: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def read_versioned_json(path: str | Path, format_name: str, versions: tuple[int, ...], error: type[Exception],
                        what: str, missing_hint: str = "") -> dict[str, Any]:
    """A JSON state file checked to hold ``{"format": format_name, "format_version": one of versions, ...}``.

    Raises ``error`` naming the file when it is missing (followed by ``missing_hint``), truncated or corrupt, of
    another format, or of a version this release does not read.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"no {what} at {path}{missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as failure:
        raise error(f"{what} {path} is truncated or corrupt: {failure}") from None
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise error(f"{path} is not in the {what} format {format_name!r}")
    if data.get("format_version") not in versions:
        raise error(f"{path} has format version {data.get('format_version')}; this version of trl-lifealign reads "
                    f"versions {list(versions)}")
    return data
