# -*- test-case-name: tests.test_delegation_process -*-
"""
Finding and ending the processes of one Claude Code run by their environment.

Every Claude Code child gets ``CLAUDECTL_RUN_ID=<random token>`` in its
environment, and everything it starts inherits it -- also a process that
left the group with ``setsid()`` (a daemonizing dev server), which a group
kill cannot reach.  :func:`pids_with_env` reads ``/proc/<pid>/environ``
(Linux; elsewhere it finds nothing) and :func:`kill_tagged` sends those
processes SIGKILL.

Only processes whose environment we may read are seen (our own user's, or
all for root); the tag is random, so nothing else matches it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

#: The environment variable that tags every process of one run.
RUN_ID_ENV = "CLAUDECTL_RUN_ID"
PROC = Path("/proc")


def pids_with_env(tags: Mapping[str, str], proc: Path = PROC) -> list[int]:
    """Pids (other than ours) whose initial environment holds every ``name=value``."""
    if not tags:
        return []
    wanted = [f"{k}={v}".encode() for k, v in tags.items()]
    me = os.getpid()
    found = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            env = (proc / entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(w in env for w in wanted):
            found.append(int(entry))
    return sorted(found)


def kill_tagged(
    tags: Mapping[str, str], kill: Callable[[int, int], None] = os.kill, proc: Path = PROC
) -> list[int]:
    """SIGKILL every process tagged with ``tags``; returns the pids signalled."""
    killed = []
    for pid in pids_with_env(tags, proc):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        killed.append(pid)
    return killed
