"""Atomic file replacement with one durability level, for every writer in the project.

A reader sees the old file or the new one, never a half-written one, and once a
call returns the new file survives a power cut: bytes go to a temp file in the
same directory, which is flushed and fsynced, renamed over the target with
``os.replace``, and the directory is fsynced so the rename itself is durable.
Temp names are random per call, so processes and threads writing one target
never share a temp file; a failed write (``ENOSPC`` included) removes its temp.

Hand-written because no maintained library fits: ``atomicwrites`` is archived
(unmaintained since 2022) and the forks don't fsync the directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "atomic_write", "fsync_dir"]


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Yield a file to stream into (np.savez, json.dump, pyarrow); it replaces ``path``
    only when the block exits without an exception."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', not {mode!r}")
    target = Path(path)
    tmp = _temp_name(target)
    # O_EXCL: never reuse another writer's temp; 0o666 lets the umask decide, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    text = mode == "w"
    try:
        with open(fd, mode, encoding=(encoding or "utf-8") if text else None,
                  newline="" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp path for writers that need a file name (SQLite's backup API);
    once the block exits cleanly it is fsynced and replaces ``path``."""
    target = Path(path)
    tmp = _temp_name(target)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


def atomic_write(path: str | os.PathLike[str], data: bytes | str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` (text is encoded with ``encoding``)."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_open(path, "wb") as f:
        f.write(payload)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames in ``directory`` durable; a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)
