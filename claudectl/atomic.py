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

A writer killed half-way (kill -9, power loss) leaves its temporary file
behind: ``.<name>.<8 random characters>.tmp``.  The writer holds an
exclusive ``flock`` on it from creation to rename, so
:func:`sweep_temp_files` (run when the service starts) removes exactly the
files of that pattern whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: The names :func:`atomic_write` gives its temporary files: ``.<name>.``,
#: 8 random characters (hex digits; ``tempfile.mkstemp``, used before, put
#: 8 of ``[a-z0-9_]``: files of older versions are swept too), ``.tmp``.
TEMP_NAME = re.compile(r"\A\..+\.[a-z0-9_]{8}\.tmp\Z", re.DOTALL)
#: A temporary file younger than this is left alone by the sweep (its
#: writer may be between creating and locking it).
TEMP_MIN_AGE_SECS = 1.0


def atomic_write(
    path: Path | str, data: bytes | str, mode: int = 0o600, durable: bool = True
) -> None:
    """
    Replace ``path`` with ``data`` atomically; the file gets ``mode``.

    ``durable=False`` skips the fsyncs: still never half-written (the rename
    is atomic), but a crash may bring back the previous version.  Only for
    caches whose loss costs a little redundant work.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = _in_dir(path, _create_temp)
    try:
        with os.fdopen(fd, "wb") as f:
            # Held until the rename: tells the sweep this writer is alive.
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
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


def _in_dir(path: Path, fn: Callable[[Path], T]) -> T:
    """``fn(path)``, creating ``path``'s directory first if it is missing
    (asked of the file system only then: a write is one ``mkdir`` less)."""
    try:
        return fn(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return fn(path)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (0600, named as :data:`TEMP_NAME`
    says, never an existing file): ``tempfile.mkstemp`` without its setup."""
    for _ in range(100):
        tmp = os.path.join(path.parent, f".{path.name}.{_NAMES.getrandbits(32):08x}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Temporary names need not be secret (O_EXCL and O_NOFOLLOW make a file
#: of our own every time), only rarely equal: no getrandom() per write.
_NAMES = random.Random()


def sweep_temp_files(
    directories: Iterable[Path | str], min_age: float = TEMP_MIN_AGE_SECS
) -> list[Path]:
    """
    Remove the temporary files of interrupted :func:`atomic_write` calls in
    ``directories`` (not recursive): regular files of our own naming pattern,
    owned by us, older than ``min_age`` seconds, that no live writer holds
    locked.  Returns what was removed; never raises for a file it skips.
    """
    removed: list[Path] = []
    now = time.time()
    uid = os.getuid()
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not TEMP_NAME.match(name):
                continue
            path = Path(directory) / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or now - st.st_mtime < min_age:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a writer is alive and busy with it
                os.unlink(path)
                removed.append(path)
            except OSError:
                continue
            finally:
                os.close(fd)
    return removed


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
    fd = _in_dir(path, lambda p: os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode))
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
    lock_path = path.with_name(path.name + ".lock")
    # Read-only: flock needs no write access on a local file system, and
    # closing it is no IN_CLOSE_WRITE notice for the change watchers of its
    # directory.  NFS emulates flock with byte-range locks, whose exclusive
    # lock needs a descriptor open for writing: there, open it again so.
    fd = _in_dir(lock_path, lambda p: _lock_fd(p, fcntl.LOCK_SH if shared else fcntl.LOCK_EX))
    try:
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _lock_fd(lock_path: Path, how: int) -> int:
    """``lock_path`` opened (created 0600) and locked ``how``."""
    fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno != errno.EBADF:
            raise
    except BaseException:  # interrupted while waiting for the lock
        os.close(fd)
        raise
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    return fd
