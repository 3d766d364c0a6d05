# -*- test-case-name: tests.test_delegation_gitws -*-
"""
Git workspaces for tasks that carry ``git_ref`` / ``git_commit``.

The task runs in a fresh clone (``workspaces/<peer>--<task>/``) detached at
the requested ref (or ``git_commit``).  The source is ``git_remote`` when
given, else the task's ``cwd``.  After the run, ``HEAD`` of the workspace is
the handoff's ``git_ref``.

Safety (the worker applies :func:`parse_source` and :func:`remote_allowed`):

* a local source -- a path or a ``file://`` URL -- is a directory like
  ``cwd``: it must lie under ``[delegation] allowed_dirs`` (the caller
  checks), and the clone is made from its resolved path;
* a network remote (``https``, ``ssh``, ``git``, ``user@host:path``) is
  fetched only if it matches ``[delegation] allowed_git_remotes`` (empty by
  default): the peer must not make this machine fetch from hosts it picks,
  with this machine's network position and SSH agent;
* refs and remotes that start with ``-`` are refused (no option injection),
  other transports (``ext::`` can run commands) are refused and barred by
  ``GIT_ALLOW_PROTOCOL``, and git never prompts;
* every git command runs in its own process group (the setsid trampoline);
  cancelling its Deferred kills the group (a stop or a shutdown during a
  clone does not wait for it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from claudectl.process import setsid_exec

#: ``run_git(args, cwd) -> Deferred[(stdout, stderr, exit code)]``; cancelling
#: the Deferred ends the git process.
GitRunner = Callable[[list[str], str], "Deferred[tuple[bytes, bytes, int]]"]

LOCAL = "local"
REMOTE = "remote"
_NETWORK_URL = re.compile(r"^(https|ssh|git)://", re.I)
_FILE_URL = re.compile(r"^file://", re.I)
_ANY_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/]")
_COMMIT = re.compile(r"^[0-9a-fA-F]{4,64}$")
_DOT_SEGMENT = re.compile(r"(^|[/:])\.\.?($|/)")
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.I)
#: Output kept from one git command (stdout and stderr each).
MAX_GIT_OUTPUT = 1024 * 1024
SETSID_EXEC = str(Path(setsid_exec.__file__).resolve())

log = Logger()


class WorkspaceError(Exception):
    """The checkout could not be made, or the source is not allowed; says why."""


def git_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    out = {
        k: env[k] for k in ("PATH", "HOME", "LANG", "SSH_AUTH_SOCK", "GIT_SSH_COMMAND") if k in env
    }
    out.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    out.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "https:ssh:git:file"})
    return out


class _GitProtocol(ProcessProtocol):
    def __init__(self, done: Deferred[tuple[bytes, bytes, int]]) -> None:
        self.done = done
        self.out = bytearray()
        self.err = bytearray()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buf = self.out if childFD == 1 else self.err
        if len(buf) < MAX_GIT_OUTPUT:
            buf += data[: MAX_GIT_OUTPUT - len(buf)]

    def processEnded(self, reason: Failure) -> None:
        if self.done.called:
            return  # cancelled
        code = getattr(reason.value, "exitCode", None)
        self.done.callback((bytes(self.out), bytes(self.err), 128 if code is None else code))


def default_git_runner(
    reactor: Any,
    environ: dict[str, str] | None = None,
    kill: Callable[[int, int], None] = os.killpg,
    python: str = sys.executable,
) -> GitRunner:
    """Run git through the setsid trampoline; cancelling kills its whole group."""

    def run(args: list[str], cwd: str) -> Deferred[tuple[bytes, bytes, int]]:
        git = shutil.which("git") or "git"
        holder: dict[str, Any] = {}

        def cancel(_d: Deferred[Any]) -> None:
            transport = holder.get("transport")
            if transport is None or transport.pid is None:
                return
            try:
                kill(transport.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ProcessExitedAlready):
                pass
            log.info("killed git {command} (pid {pid})", command=args[0], pid=transport.pid)

        d: Deferred[tuple[bytes, bytes, int]] = Deferred(cancel)
        proto = _GitProtocol(d)
        holder["transport"] = reactor.spawnProcess(
            proto,
            python,
            [python, "-I", SETSID_EXEC, "--", git, *args],
            env=git_env(environ),
            path=cwd,
        )
        return d

    return run


def parse_source(source: str) -> tuple[str, str]:
    """``(LOCAL, path)`` or ``(REMOTE, url)`` for a ``git_remote``; raises if not allowed.

    A ``file://`` URL is a local path.  A local path is returned as given (the
    caller requires it to be absolute and under ``allowed_dirs``).
    """
    if not source or source.startswith("-") or "::" in source:
        raise WorkspaceError(f"git_remote {source!r} is not allowed")
    if any(ord(c) < 32 or c == "\x7f" for c in source):
        raise WorkspaceError("git_remote contains control characters")
    if _FILE_URL.match(source):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise WorkspaceError(
                f"git_remote {source!r}: only file:///absolute/path URLs are allowed"
            )
        path = unquote(parts.path)
        if "\0" in path:
            raise WorkspaceError("git_remote contains control characters")
        return LOCAL, path
    if _NETWORK_URL.match(source) or _SCP.match(source):
        return REMOTE, source
    if _ANY_URL.match(source):
        raise WorkspaceError(
            f"git_remote {source!r}: only https, ssh and git URLs or local paths are allowed"
        )
    return LOCAL, source


def remote_allowed(url: str, allowed: Iterable[str]) -> bool:
    """Whether ``url`` matches ``[delegation] allowed_git_remotes``.

    An entry matches the same URL, or URLs below it: ``https://host/org`` and
    ``https://host/org/`` match ``https://host/org/repo.git`` but not
    ``https://host/org-other/x``; an entry ending in ``:`` (``git@host:``)
    matches every path on that host.  ``"*"`` matches every remote.  URLs
    with ``.``/``..`` segments or percent-encoded separators never match.
    """
    if _DOT_SEGMENT.search(url.split("://", 1)[-1]) or _ENCODED_SEPARATOR.search(url):
        return False
    if "\\" in url or any(c.isspace() for c in url):
        return False
    for entry in allowed:
        entry = entry.strip()
        if not entry:
            continue
        if entry == "*" or url == entry:
            return True
        if entry.endswith(("/", ":")):
            if url.startswith(entry):
                return True
        elif url.startswith(entry + "/"):
            return True
    return False


def check_ref(ref: str, what: str = "git_ref") -> None:
    if not ref or ref.startswith("-") or any(c in ref for c in "\0\n\r ") or ".." in ref:
        raise WorkspaceError(f"{what} {ref!r} is not a valid git ref")


def check_commit(commit: str) -> None:
    if not _COMMIT.match(commit):
        raise WorkspaceError(f"git_commit {commit!r} is not a commit id")


def check_remote(source: str) -> None:
    parse_source(source)


async def prepare(
    run_git: GitRunner, source: str, dest: Path, ref: str | None, commit: str | None
) -> str:
    """Clone ``source`` into ``dest`` and detach at ``commit``/``ref``; return HEAD."""
    check_remote(source)
    if ref:
        check_ref(ref)
    if commit:
        check_commit(commit)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    out, err, code = await run_git(
        ["clone", "--quiet", "--no-checkout", "--", source, str(dest)], str(dest.parent)
    )
    if code != 0:
        raise WorkspaceError(f"git clone of {source} failed: {_last_line(err)}")
    target = None
    candidates = [commit] if commit else [ref, f"origin/{ref}"] if ref else ["HEAD"]
    for c in candidates:
        out, err, code = await run_git(
            ["rev-parse", "--verify", "--quiet", f"{c}^{{commit}}"], str(dest)
        )
        if code == 0:
            target = out.decode().strip()
            break
    if target is None:
        raise WorkspaceError(
            f"{'commit ' + commit if commit else 'ref ' + str(ref)} not found in {source}"
        )
    out, err, code = await run_git(["checkout", "--quiet", "--detach", target], str(dest))
    if code != 0:
        raise WorkspaceError(f"git checkout of {target} failed: {_last_line(err)}")
    return target


async def head(run_git: GitRunner, path: str) -> str | None:
    """``git rev-parse HEAD`` in ``path``, or None if it is not a repository."""
    try:
        out, err, code = await run_git(["rev-parse", "--verify", "--quiet", "HEAD"], path)
    except Exception:
        return None
    return out.decode().strip() or None if code == 0 else None


def _last_line(err: bytes) -> str:
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no error output"
