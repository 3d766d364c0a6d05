# -*- test-case-name: tests.test_hooks_entry -*-
"""
The few file operations of the per-tool-call hooks, on the standard
library's cheapest modules.

A hook is a fresh Python process on every tool call, and most of its time is
imports: :mod:`claudectl.home` (a dataclass over :mod:`pathlib`) and
:mod:`claudectl.atomic` (:mod:`tempfile`) cost more than the work itself.
So the per-call paths use :class:`HookHome` (the same directories, as
strings) and the helpers below, which keep the same rules as
:mod:`claudectl.atomic`: a read-modify-write holds ``<file>.lock``; a file
is replaced by writing a temporary file beside it and renaming it over
(never half-written); log lines are appended whole with one ``O_APPEND``
write.  Only :mod:`os` and :mod:`fcntl` are imported.
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

HOME_ENV = "CLAUDECTL_HOME"


class HookHome:
    """The directories of a claudectl home (see :class:`claudectl.home.Home`), as strings."""

    __slots__ = ("root", "data", "brain", "hive", "hooks", "relay")

    def __init__(self, root: str) -> None:
        self.root = root
        self.data = os.path.join(root, ".claudectl")
        self.brain = os.path.join(self.data, "brain")
        self.hive = os.path.join(self.data, "hive")
        self.hooks = os.path.join(self.data, "hooks")
        self.relay = os.path.join(self.data, "relay")

    @classmethod
    def resolve(cls, explicit: str | None, environ: Mapping[str, str]) -> HookHome:
        """Like :meth:`claudectl.home.Home.resolve`: ``--home``, else ``$CLAUDECTL_HOME``, else ``~``."""
        chosen = explicit or environ.get(HOME_ENV)
        if chosen:
            return cls(os.path.abspath(os.path.expanduser(chosen)))
        return cls(os.path.expanduser("~"))

    @property
    def identity_file(self) -> str:
        return os.path.join(self.relay, "identity")

    @property
    def config_file(self) -> str:
        return os.path.join(self.root, ".config", "claudectl", "config.toml")

    def ensure_private_dir(self, path: str) -> str:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def full(self) -> object:
        """The :class:`claudectl.home.Home` for the slower paths."""
        from claudectl.home import Home

        return Home.resolve(self.root, {})


class locked:
    """
    ``with locked(path):`` holds the advisory lock ``<path>.lock`` (as
    :func:`claudectl.atomic.locked`; a class, to spare :mod:`contextlib`).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace ``path`` with ``data`` by renaming a temporary file over it.
    Not fsynced: call it holding the file's lock, for state whose loss after
    a crash costs little (a request waiting for its answer).
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def append_bounded(path: str, data: bytes, max_bytes: int) -> None:
    """Append ``data`` in one write; past ``max_bytes`` the file becomes ``<path>.1`` first."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        if os.stat(path).st_size + len(data) > max_bytes:
            os.replace(path, path + ".1")
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def stat_key(path: str) -> list[int] | None:
    """What changes when a file changes (None: no such file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]
