# -*- test-case-name: tests.test_hooks_events -*-
"""
What each Claude Code hook event does (docs/claude-code.md).

Every handler takes the event's payload (the JSON object Claude Code writes
on the hook's stdin), the home and the time, and returns the JSON object to
print on stdout, or None to print nothing.  The payload is untrusted input:
every field is checked for its type, and anything unexpected means "nothing
to do".  No Twisted, no network: this runs on every tool call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from claudectl.home import Home
from claudectl.hooks import pending
from claudectl.hooks.redact import redact

#: Claude Code caps what a hook adds to the context; stay under it.
MAX_CONTEXT_CHARS = 9000
#: The tool input field that is a call's "command" in decisions.jsonl.
COMMAND_FIELDS = (
    "command",
    "file_path",
    "notebook_path",
    "path",
    "url",
    "pattern",
    "query",
    "description",
)
MAX_GATE_LOG_BYTES = 256 * 1024


def _str(payload: Mapping[str, Any], key: str) -> str | None:
    value = payload.get(key)
    return value if isinstance(value, str) and value else None


def tool_command(tool_input: object) -> str | None:
    """The string claudectl records as a call's ``command`` (redacted)."""
    if not isinstance(tool_input, Mapping):
        return None
    for name in COMMAND_FIELDS:
        value = tool_input.get(name)
        if isinstance(value, str) and value.strip():
            return redact(value)
    return None


def project_name(payload: Mapping[str, Any]) -> str:
    """claudectl names a project by its directory."""
    cwd = _str(payload, "cwd")
    if cwd is None:
        return "unknown"
    return Path(cwd).name or cwd


def local_identity(home: Home) -> str:
    """This machine's peer id, read only (the hooks never create one)."""
    try:
        return home.identity_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def load_hive_config(home: Home, payload: Mapping[str, Any]) -> Any:
    from claudectl.config import load_config

    cwd = _str(payload, "cwd")
    return load_config(home, Path(cwd) if cwd else None).hive


# --- context in ------------------------------------------------------------------------


def session_start(payload: Mapping[str, Any], home: Home, now: int) -> dict[str, Any] | None:
    """The ``## Hive Knowledge`` section as the session's additional context."""
    from claudectl.hive.prompt import build_prompt
    from claudectl.hive.store import hive_active

    config = load_hive_config(home, payload)
    if not hive_active(home, config):
        return None
    text = build_prompt(home, config, local_identity(home), now, project=project_name(payload))
    if not text:
        return None
    if len(text) > MAX_CONTEXT_CHARS:
        text = text[:MAX_CONTEXT_CHARS].rsplit("\n", 1)[0]
    return {"hookSpecificOutput": {"hookEventName": "SessionStart", "additionalContext": text}}


# --- decisions out ---------------------------------------------------------------------


def _request_key(payload: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    session, tool = _str(payload, "session_id"), _str(payload, "tool_name")
    if session is None or tool is None:
        return None
    return session, pending.input_digest(tool, payload.get("tool_input")), tool


def permission_request(
    payload: Mapping[str, Any], home: Home, now: int, session_pid: int
) -> dict[str, Any] | None:
    """
    Remember the request until its outcome is known; with a gate, show the
    knowledge about it or allow it (``[hive] gate``).
    """
    key = _request_key(payload)
    if key is None:
        return None
    session, digest, tool = key
    assert tool is not None
    command = tool_command(payload.get("tool_input"))
    output: dict[str, Any] | None = None
    from claudectl.config import ConfigError

    try:
        config = load_hive_config(home, payload)
    except ConfigError as e:
        # Still record the user's decision; only the gate is off.
        from claudectl.hooks.entry import log_error

        log_error(home, "PermissionRequest", f"{e} (the gate is off)")
        config = None
    if config is not None and config.gate != "off":
        from claudectl.hive.store import hive_active

        if hive_active(home, config):
            output, allowed = _gate(payload, home, now, config, tool, command)
            if allowed:
                # Not the user's decision: not recorded as one (it would feed
                # the knowledge that allowed it).  Logged in gate.jsonl.
                return output
    pending.add(
        home,
        pending.Pending(
            session=session,
            key=digest,
            tool=tool,
            command=command,
            project=project_name(payload),
            pid=session_pid,
            ts=now,
            tool_use_id=_str(payload, "tool_use_id"),
        ),
    )
    return output


def _gate(
    payload: Mapping[str, Any], home: Home, now: int, config: Any, tool: str, command: str | None
) -> tuple[dict[str, Any] | None, bool]:
    from claudectl.hive.delivery import load_delivery
    from claudectl.hive.distill import read_preferences
    from claudectl.hive.store import load_store
    from claudectl.hive.trust import load_trust
    from claudectl.hooks.gate import evaluate

    # The gate matches the real command; only what is written is redacted.
    raw = payload.get("tool_input")
    real = None
    if isinstance(raw, Mapping):
        for name in COMMAND_FIELDS:
            if isinstance(raw.get(name), str) and raw[name].strip():
                real = raw[name]
                break
    local_id = local_identity(home)
    view = evaluate(
        load_store(home).store.units(),
        mode=config.gate,
        tool=tool,
        command=real,
        local_id=local_id,
        trust=load_trust(home, config.default_trust),
        min_evidence=config.export_min_evidence,
        delivery=load_delivery(home),
        preferences=read_preferences(home),
    )
    message = view.message()
    if view.allow:
        _log_auto_allow(home, now, payload, tool, command, view.allowed_by, view.reason)
        out: dict[str, Any] = {
            "hookSpecificOutput": {
                "hookEventName": "PermissionRequest",
                "decision": {"behavior": "allow"},
            }
        }
        if message:
            out["systemMessage"] = message
        return out, True
    return ({"systemMessage": message} if message else None), False


def gate_log_path(home: Home) -> Path:
    return pending.hooks_dir(home) / "gate.jsonl"


def _log_auto_allow(
    home: Home,
    now: int,
    payload: Mapping[str, Any],
    tool: str,
    command: str | None,
    unit_ids: list[str],
    reason: str,
) -> None:
    """Every automatic allow, one line in ``hooks/gate.jsonl`` (rotated to ``.1``)."""
    record = {
        "ts": now,
        "session_id": _str(payload, "session_id"),
        "project": project_name(payload),
        "tool": tool,
        "command": command,
        "decision": "allow",
        "units": unit_ids,
        "reason": reason,
    }
    append_bounded(gate_log_path(home), json.dumps(record, ensure_ascii=False) + "\n")


def append_bounded(path: Path, line: str, max_bytes: int = MAX_GATE_LOG_BYTES) -> None:
    """Append ``line``; past ``max_bytes`` the file becomes ``<name>.1`` first."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.stat().st_size + len(line) > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode("utf-8", "replace"))
    finally:
        os.close(fd)


def _record(home: Home, requests: list[pending.Pending], user_action: str, now: int) -> None:
    from claudectl.hive.decisions import append_decisions, observation

    records = [
        observation(
            tool=p.tool,
            command=p.command,
            project=p.project,
            user_action=user_action,
            now=now,
            pid=p.pid,
            id_pid=os.getpid(),
            n=n,
        )
        for n, p in enumerate(requests)
    ]
    append_decisions(home, records)


def tool_outcome(payload: Mapping[str, Any], home: Home, now: int, user_action: str) -> None:
    """``PostToolUse`` / ``PostToolUseFailure`` (accept) or ``PermissionDenied`` (reject)."""
    key = _request_key(payload)
    if key is None:
        return None
    session, digest, tool = key
    command = tool_command(payload.get("tool_input"))
    found = pending.take(
        home, session, digest, _str(payload, "tool_use_id"), now, tool=tool, command=command
    )
    if found is not None:
        _record(home, [found], user_action, now)
    return None


def turn_over(payload: Mapping[str, Any], home: Home, now: int) -> None:
    """
    ``UserPromptSubmit`` / ``Stop`` / ``SessionEnd``: requests of the session
    still waiting were denied in the dialog (the tool never ran).
    """
    session = _str(payload, "session_id")
    if session is None:
        return None
    left = pending.take_session(home, session, now)
    if left:
        _record(home, left, "reject", now)
    return None
