# -*- test-case-name: tests.test_delegation_gitws -*-
"""
Git workspaces for tasks that carry ``git_ref`` / ``git_remote``.

The task runs in a fresh clone (``workspaces/<peer>--<task>/``) detached at
the requested ref (or ``git_commit``).  The source is ``git_remote`` when
given, else the task's ``cwd``.  After the run, ``HEAD`` of the workspace is
the handoff's ``git_ref``.

Safety: refs and remotes that start with ``-`` are refused (no option
injection), only the ``https``, ``ssh``, ``git`` and ``file`` transports are
allowed (``GIT_ALLOW_PROTOCOL``; ``ext::`` can run commands), a local source
must itself be allowed (the caller checks), and git never prompts.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

#: ``run_git(args, cwd) -> Deferred[(stdout, stderr, exit code)]``
GitRunner = Callable[[list[str], str], "Deferred[tuple[bytes, bytes, int]]"]

_URL = re.compile(r"^(https|ssh|git|file)://", re.I)
_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/]")
_COMMIT = re.compile(r"^[0-9a-fA-F]{4,64}$")


class WorkspaceError(Exception):
    """The checkout could not be made; the message says why."""


def git_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    out = {k: env[k] for k in ("PATH", "HOME", "LANG", "SSH_AUTH_SOCK") if k in env}
    out.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "https:ssh:git:file"})
    return out


def default_git_runner(reactor: Any, environ: dict[str, str] | None = None) -> GitRunner:
    from twisted.internet.utils import getProcessOutputAndValue

    def run(args: list[str], cwd: str) -> Deferred[tuple[bytes, bytes, int]]:
        git = shutil.which("git") or "git"
        return getProcessOutputAndValue(git, args, env=git_env(environ), path=cwd,
                                        reactor=reactor)

    return run


def is_remote_url(source: str) -> bool:
    return bool(_URL.match(source) or _SCP.match(source))


def check_ref(ref: str, what: str = "git_ref") -> None:
    if not ref or ref.startswith("-") or any(c in ref for c in "\0\n\r ") or ".." in ref:
        raise WorkspaceError(f"{what} {ref!r} is not a valid git ref")


def check_remote(source: str) -> None:
    if source.startswith("-") or "::" in source:
        raise WorkspaceError(f"git_remote {source!r} is not allowed")


async def prepare(run_git: GitRunner, source: str, dest: Path, ref: str | None,
                  commit: str | None) -> str:
    """Clone ``source`` into ``dest`` and detach at ``commit``/``ref``; return HEAD."""
    check_remote(source)
    if ref:
        check_ref(ref)
    if commit and not _COMMIT.match(commit):
        raise WorkspaceError(f"git_commit {commit!r} is not a commit id")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    out, err, code = await run_git(["clone", "--quiet", "--no-checkout", "--", source, str(dest)],
                                   str(dest.parent))
    if code != 0:
        raise WorkspaceError(f"git clone of {source} failed: {_last_line(err)}")
    target = None
    candidates = [commit] if commit else [ref, f"origin/{ref}"] if ref else ["HEAD"]
    for c in candidates:
        out, err, code = await run_git(["rev-parse", "--verify", "--quiet", f"{c}^{{commit}}"],
                                       str(dest))
        if code == 0:
            target = out.decode().strip()
            break
    if target is None:
        raise WorkspaceError(f"{'commit ' + commit if commit else 'ref ' + str(ref)} "
                             f"not found in {source}")
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
