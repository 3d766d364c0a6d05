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
session, tool name and a digest of ``tool_input`` (and by ``tool_use_id``
when a payload has one).  The file holds at most :data:`MAX_PENDING`
requests, each for at most :data:`PENDING_TTL` seconds: older ones are
dropped unrecorded (their outcome is unknown).  It holds commands already
redacted (:mod:`claudectl.hooks.redact`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from claudectl.atomic import atomic_write, locked
from claudectl.home import Home

MAX_PENDING = 200
PENDING_TTL = 3600
VERSION = 1


@dataclass(frozen=True)
class Pending:
    session: str
    key: str
    tool: str
    command: str | None
    project: str
    pid: int
    ts: int
    tool_use_id: str | None = None


def hooks_dir(home: Home) -> Any:
    return home.data / "hooks"


def pending_path(home: Home) -> Any:
    return hooks_dir(home) / "pending.json"


def input_digest(tool: str, tool_input: object) -> str:
    """A short digest of a tool call's input (canonical JSON)."""
    try:
        blob = json.dumps([tool, tool_input], sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        blob = json.dumps([tool, repr(tool_input)])
    return hashlib.sha256(blob.encode("utf-8", "replace")).hexdigest()[:32]


def _read(home: Home) -> list[Pending]:
    try:
        data = json.loads(pending_path(home).read_bytes())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return []
    out = []
    for rec in data.get("requests", []) if isinstance(data, dict) else []:
        try:
            out.append(Pending(**rec))
        except TypeError:
            continue
    return out


def _write(home: Home, items: list[Pending]) -> None:
    if not items:
        # No file is the fast path of every tool call's hook (under the lock: safe).
        pending_path(home).unlink(missing_ok=True)
        return
    doc = {"version": VERSION, "requests": [asdict(p) for p in items]}
    # Not durable: a crash loses at most the outcome of a request in flight.
    atomic_write(
        pending_path(home), json.dumps(doc, separators=(",", ":")), mode=0o600, durable=False
    )


def _fresh(items: list[Pending], now: int) -> list[Pending]:
    return [p for p in items if now - PENDING_TTL <= p.ts <= now + 60]


def add(home: Home, request: Pending) -> None:
    """Remember ``request`` (replacing an identical one; oldest dropped past the cap)."""
    home.ensure_private_dir(hooks_dir(home))
    with locked(pending_path(home)):
        items = [
            p
            for p in _fresh(_read(home), request.ts)
            if (p.session, p.key) != (request.session, request.key)
        ]
        items.append(request)
        _write(home, items[-MAX_PENDING:])


def take(
    home: Home,
    session: str,
    key: str | None,
    tool_use_id: str | None,
    now: int,
    tool: str | None = None,
    command: str | None = None,
) -> Pending | None:
    """
    Remove and return the request this outcome answers (None: none waits):
    the same tool call id or input digest, else the oldest request of the
    session for the same tool and (redacted) command.
    """
    path = pending_path(home)
    if not path.exists():  # the common case, on every tool call: nothing to do
        return None
    with locked(path):
        items = _read(home)
        fresh = _fresh(items, now)
        found = None
        for p in fresh:
            if p.session != session:
                continue
            if (tool_use_id and p.tool_use_id == tool_use_id) or (key and p.key == key):
                found = p
                break
        if found is None and tool is not None and command is not None:
            found = next(
                (p for p in fresh if (p.session, p.tool, p.command) == (session, tool, command)),
                None,
            )
        if found is not None:
            fresh.remove(found)
        if found is not None or len(fresh) != len(items):
            _write(home, fresh)
        return found


def take_session(home: Home, session: str, now: int) -> list[Pending]:
    """Remove and return every request of ``session`` still waiting."""
    path = pending_path(home)
    if not path.exists():
        return []
    with locked(path):
        items = _read(home)
        fresh = _fresh(items, now)
        mine = [p for p in fresh if p.session == session]
        rest = [p for p in fresh if p.session != session]
        if mine or len(rest) != len(items):
            _write(home, rest)
        return mine
