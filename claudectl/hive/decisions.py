# -*- test-case-name: tests.test_hooks_decisions -*-
"""
Writing claudectl's decision log, ``~/.claudectl/brain/decisions.jsonl``
(docs/hive.md, Distillation): one compact JSON object per line, appended.

claudectl's brain is the main writer of that log; ``claudectl hive record``
and the Claude Code hooks (:mod:`claudectl.hooks`) write lines of the same
format so that ``hive distill`` (and claudectl's own tools) read them alike.
Imports nothing but :mod:`json` and :mod:`os`: the hooks use it on every
tool call.
"""

from __future__ import annotations

import json
import os

#: typing is not imported at run time (the hooks pay for every import).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any, Protocol

    class BrainHome(Protocol):
        """A home that knows its brain directory: :class:`claudectl.home.Home`
        (a Path) or the hooks' lighter ``HookHome`` (a str)."""

        @property
        def brain(self) -> str | os.PathLike[str]: ...


def decisions_file(home: BrainHome) -> str:
    # os.path, not pathlib: the hooks pass a HookHome (strings), the CLI a Home.
    return os.path.join(home.brain, "decisions.jsonl")


def decision_id(now: int, pid: int, n: int) -> str:
    """claudectl's id: ``dec_<epoch>_<os pid>_<n>``."""
    return f"dec_{now}_{pid}_{n}"


def brain_decision(
    *,
    tool: str,
    command: str | None,
    project: str,
    user_action: str,
    brain_action: str,
    now: int,
    pid: int,
    n: int = 0,
    reasoning: str = "",
    confidence: float = 0.8,
) -> dict[str, Any]:
    """A full decision record, as claudectl's brain writes after a suggestion."""
    # claudectl 0.64's record (docs/hive.md, Distillation): ts is a string, ids
    # dec_<epoch>_<pid>_<n>.
    return {
        "ts": str(now),
        "pid": pid,
        "project": project,
        "tool": tool,
        "command": command,
        "brain_action": brain_action,
        "brain_confidence": confidence,
        "brain_reasoning": reasoning,
        "user_action": user_action,
        "decision_type": "session",
        "suggested_at": now,
        "resolved_at": now,
        "brain_decision_ms": None,
        "override_reason": None,
        "rule_name": None,
        "cache_hit": False,
        "decision_id": decision_id(now, pid, n),
        "decision_source": "llm",
        "few_shot_ids": [],
    }


def observation(
    *,
    tool: str,
    command: str | None,
    project: str,
    user_action: str,
    now: int,
    pid: int,
    id_pid: int,
    n: int = 0,
) -> dict[str, Any]:
    """
    An observation record: what the user did without a brain suggestion
    (docs/hive.md, Distillation, lists these fields).  ``pid`` is the session's,
    ``id_pid`` the writing process's (for the decision id).
    """
    return {
        "ts": str(now),
        "pid": pid,
        "project": project,
        "tool": tool,
        "command": command,
        "brain_action": None,
        "brain_confidence": 0.0,
        "brain_reasoning": "",
        "user_action": user_action,
        "decision_id": decision_id(now, id_pid, n),
    }


def encode(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


def append_decisions(home: BrainHome, records: Iterable[Mapping[str, Any]]) -> str:
    """
    Append ``records`` to the log (created 0600 in a 0700 directory).
    Append-only, as the brain writes it: whole lines in one ``write`` with
    ``O_APPEND``, so concurrent writers never interleave inside a line.
    """
    path = decisions_file(home)
    data = "".join(encode(r) for r in records).encode("utf-8")
    if not data:
        return path
    os.makedirs(home.brain, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path
