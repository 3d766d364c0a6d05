# -*- test-case-name: tests.test_atomic -*-
"""
Safe writes to stored state.

Every file claudectl writes goes through :func:`atomic_write`: the bytes go
to a temporary file in the same directory, are fsynced, get their final mode,
and are renamed over the target; then the directory is fsynced.  A reader sees
the old file or the new one, never half of one.

:func:`locked` takes an advisory ``flock`` on ``<file>.lock`` so that the CLI
and the running service do read-modify-write cycles one at a time instead of
losing each other's updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: Path | str, data: bytes | str, mode: int = 0o600,
                 durable: bool = True) -> None:
    """
    Replace ``path`` with ``data`` atomically; the file gets ``mode``.

    ``durable=False`` skips the fsyncs: still never half-written (the rename
    is atomic), but a crash may bring back the previous version.  Only for
    caches whose loss costs a little redundant work.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def append_line(path: Path | str, line: bytes | str, mode: int = 0o600) -> None:
    """Append one complete line (a log record) and fsync it."""
    if isinstance(line, str):
        line = line.encode("utf-8")
    if not line.endswith(b"\n"):
        line += b"\n"
    fsync_append(path, line, mode)


def fsync_append(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Append complete lines in one write and fsync them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path | str, shared: bool = False) -> Iterator[None]:
    """
    Hold an advisory lock on ``<path>.lock`` for the duration of the block.

    Use it around every read-modify-write of a shared file.  The lock file
    itself is never removed (removing it would race with other lockers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
