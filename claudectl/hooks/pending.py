# -*- test-case-name: tests.test_hooks_events -*-
"""
Permission requests waiting for the user's answer.

Claude Code tells a hook that it asks the user (``PermissionRequest``) and,
separately, what came of it: the tool ran (``PostToolUse``, or
``PostToolUseFailure`` when it ran and failed), the call was denied
(``PermissionDenied``), or nothing -- the user said no in the dialog and the
turn ended (the next ``UserPromptSubmit``, ``Stop`` or ``SessionEnd`` of the
session).  Between the two, the request waits in
``~/.claudectl/hooks/pending.json``, keyed by session and tool call.

``PermissionRequest`` carries no ``tool_use_id``, so a request is matched by
session, tool name and a digest of ``tool_input`` (by ``tool_use_id`` when
a payload has one; else by tool and redacted command).  The file holds at
most :data:`MAX_PENDING` requests, each for at most :data:`PENDING_TTL`
seconds: older ones are dropped unrecorded (their outcome is unknown).  It
holds commands already redacted (:mod:`claudectl.hooks.redact`), and it is
removed when empty, so that the hook of every other tool call has nothing
to read.  On the per-call path: standard library only (:mod:`claudectl.hooks.files`).
"""

from __future__ import annotations

import json
import os

from claudectl.hooks.files import HookHome, locked, replace_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_PENDING = 200
PENDING_TTL = 3600
VERSION = 1
FIELDS = ("session", "key", "tool", "command", "project", "pid", "ts", "tool_use_id")

#: A waiting request: the keys of :data:`FIELDS`.
Pending = dict  # type: ignore[type-arg]


def pending_path(home: HookHome) -> str:
    return os.path.join(home.hooks, "pending.json")


def input_digest(tool: str, tool_input: object) -> str:
    """
    A short digest of a tool call's input (canonical JSON): CRC-32 and
    Adler-32 side by side, 64 bits.  It tells apart the few requests of one
    session that wait at a time; it guards nothing (zlib, not hashlib: one
    import less on every call).
    """
    import zlib

    try:
        blob = json.dumps([tool, tool_input], sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        blob = json.dumps([tool, repr(tool_input)])
    data = blob.encode("utf-8", "replace")
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def _valid(rec: object) -> bool:
    return (
        isinstance(rec, dict)
        and set(rec) == set(FIELDS)
        and all(isinstance(rec[k], str) for k in ("session", "key", "tool", "project"))
        and isinstance(rec["ts"], int)
        and isinstance(rec["pid"], int)
    )


def read_pending(home: HookHome) -> list[Pending]:
    try:
        with open(pending_path(home), "rb") as f:
            data = json.loads(f.read())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return []
    requests = data.get("requests") if isinstance(data, dict) else None
    return [r for r in requests if _valid(r)] if isinstance(requests, list) else []


def _write(home: HookHome, items: list[Pending]) -> None:
    path = pending_path(home)
    if not items:
        # No file is the fast path of every tool call's hook (under the lock: safe).
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    doc = {"version": VERSION, "requests": items}
    replace_file(path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))


def _fresh(items: list[Pending], now: int) -> list[Pending]:
    return [p for p in items if now - PENDING_TTL <= p["ts"] <= now + 60]


def make(
    *,
    session: str,
    key: str,
    tool: str,
    command: str | None,
    project: str,
    pid: int,
    ts: int,
    tool_use_id: str | None = None,
) -> Pending:
    return {
        "session": session,
        "key": key,
        "tool": tool,
        "command": command,
        "project": project,
        "pid": pid,
        "ts": ts,
        "tool_use_id": tool_use_id,
    }


def add(home: HookHome, request: Pending) -> None:
    """Remember ``request`` (replacing an identical one; oldest dropped past the cap)."""
    path = pending_path(home)
    with locked(path):
        items = [
            p
            for p in _fresh(read_pending(home), request["ts"])
            if (p["session"], p["key"]) != (request["session"], request["key"])
        ]
        items.append(request)
        _write(home, items[-MAX_PENDING:])


def take(
    home: HookHome,
    session: str,
    key: str | None,
    tool_use_id: str | None,
    now: int,
    tool: str | None = None,
    command_of: Callable[[], str | None] | None = None,
) -> Pending | None:
    """
    Remove and return the request this outcome answers (None: none waits):
    the same tool call id or input digest, else the oldest request of the
    session for the same tool and (redacted) command.
    """
    path = pending_path(home)
    if not os.path.exists(path):  # the common case, on every tool call: nothing to do
        return None
    with locked(path):
        items = read_pending(home)
        fresh = _fresh(items, now)
        mine = [p for p in fresh if p["session"] == session]
        found = next(
            (
                p
                for p in mine
                if (tool_use_id and p["tool_use_id"] == tool_use_id) or (key and p["key"] == key)
            ),
            None,
        )
        if found is None and mine and tool is not None and command_of is not None:
            command = command_of()  # redacting costs imports: only when needed
            if command is not None:
                found = next(
                    (p for p in mine if (p["tool"], p["command"]) == (tool, command)), None
                )
        if found is not None:
            fresh.remove(found)
        if found is not None or len(fresh) != len(items):
            _write(home, fresh)
        return found


def take_session(home: HookHome, session: str, now: int) -> list[Pending]:
    """Remove and return every request of ``session`` still waiting."""
    path = pending_path(home)
    if not os.path.exists(path):
        return []
    with locked(path):
        items = read_pending(home)
        fresh = _fresh(items, now)
        mine = [p for p in fresh if p["session"] == session]
        rest = [p for p in fresh if p["session"] != session]
        if mine or len(rest) != len(items):
            _write(home, rest)
        return mine
