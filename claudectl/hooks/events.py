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

from claudectl.hooks.files import HookHome, append_bounded, locked, replace_file, stat_key

#: typing is not imported at run time (a start-up cost of its own).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

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
#: How long a SessionStart context is reused while none of its inputs change.
CONTEXT_CACHE_SECS = 600
#: How long past that a cached context may still be shown while new units are merged in.
STALE_CONTEXT_SECS = 3600
MAX_CACHED_PROJECTS = 32


def _str(payload: Mapping[str, Any], key: str) -> str | None:
    value = payload.get(key)
    return value if isinstance(value, str) and value else None


def real_command(tool_input: object) -> str | None:
    """The string claudectl records as a call's ``command``, before redaction."""
    if not isinstance(tool_input, dict):
        return None
    for name in COMMAND_FIELDS:
        value = tool_input.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def tool_command(tool_input: object) -> str | None:
    """The string claudectl records as a call's ``command`` (redacted)."""
    from claudectl.hooks.redact import redact

    raw = real_command(tool_input)
    return None if raw is None else redact(raw)


def project_name(payload: Mapping[str, Any]) -> str:
    """claudectl names a project by its directory."""
    cwd = _str(payload, "cwd")
    if cwd is None:
        return "unknown"
    return os.path.basename(cwd.rstrip("/")) or cwd


def local_identity(home: HookHome) -> str:
    """This machine's peer id, read only (the hooks never create one)."""
    try:
        with open(home.identity_file, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _config_paths(home: HookHome, payload: Mapping[str, Any]) -> list[str]:
    paths = [home.config_file]
    cwd = _str(payload, "cwd")
    if cwd is not None:
        paths.append(os.path.join(cwd, ".claudectl.toml"))
    return paths


def gate_configured(home: HookHome, payload: Mapping[str, Any]) -> bool:
    """
    Could the config set ``[hive] gate``?  Only then is the config parsed
    (the gate is off by default; most calls need not pay for TOML).
    """
    for path in _config_paths(home, payload):
        try:
            with open(path, "rb") as f:
                if b"gate" in f.read():
                    return True
        except OSError:
            continue
    return False


def load_hive_config(home: HookHome, payload: Mapping[str, Any]) -> Any:
    from pathlib import Path

    from claudectl.config import load_config

    cwd = _str(payload, "cwd")
    return load_config(home.full(), Path(cwd) if cwd else None).hive  # type: ignore[arg-type]


# --- context in ------------------------------------------------------------------------


def _trust_key(path: str, now: int) -> Any:
    """
    What of ``trust.json`` the section depends on: each peer's level, freeze
    and quarantine.  The service rewrites the file on every batch it
    receives (sync times, counts); that alone does not change the section.
    """
    try:
        with open(path, "rb") as f:
            book = json.loads(f.read())
        return sorted(
            [
                peer,
                rec.get("trust_level"),
                rec.get("frozen"),
                (rec.get("quarantined_until") or 0) > now,
            ]
            for peer, rec in book.items()
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError, TypeError):
        return stat_key(path)  # unreadable: any change counts


def _context_key(home: HookHome, payload: Mapping[str, Any], project: str, now: int) -> list[Any]:
    import claudectl

    files = [os.path.join(home.hive, name) for name in ("knowledge.jsonl", "delivery.json", "mode")]
    files += [os.path.join(home.brain, "preferences.json"), home.identity_file]
    files += _config_paths(home, payload)
    trust = _trust_key(os.path.join(home.hive, "trust.json"), now)
    return [claudectl.__version__, project, [stat_key(f) for f in files], trust]


def _cache_path(home: HookHome) -> str:
    return os.path.join(home.hooks, "context-cache.json")


def _cache_entry(home: HookHome, project: str) -> dict[str, Any] | None:
    try:
        with open(_cache_path(home), "rb") as f:
            entry = json.loads(f.read())[project]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("until"), int)
        or not isinstance(entry.get("text"), str)
    ):
        return None
    return entry


def _store_context(home: HookHome, key: list[Any], now: int, text: str) -> None:
    path = _cache_path(home)
    home.ensure_private_dir(home.hooks)
    with locked(path):
        try:
            with open(path, "rb") as f:
                cache = json.loads(f.read())
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        cache.pop(key[1], None)
        cache[key[1]] = {"key": key, "until": now + CONTEXT_CACHE_SECS, "text": text}
        while len(cache) > MAX_CACHED_PROJECTS:
            cache.pop(next(iter(cache)))
        replace_file(path, json.dumps(cache, ensure_ascii=False).encode("utf-8"))


def _only_new_knowledge(old: object, new: list[Any]) -> bool:
    """Do the keys differ only in ``knowledge.jsonl`` / ``delivery.json`` (new units)?"""
    if not isinstance(old, list) or len(old) != len(new) or old[:2] != new[:2]:
        return False
    if old[3:] != new[3:]:  # trust
        return False
    old_stats, new_stats = old[2], new[2]
    if not isinstance(old_stats, list) or len(old_stats) != len(new_stats):
        return False
    return all(
        a == b for i, (a, b) in enumerate(zip(old_stats, new_stats, strict=True)) if i not in (0, 1)
    )


def session_start(payload: Mapping[str, Any], home: HookHome, now: int) -> dict[str, Any] | None:
    """
    The ``## Hive Knowledge`` section as the session's additional context.

    Built from the store the first time, then reused for
    :data:`CONTEXT_CACHE_SECS` while the store, trust, deliveries,
    preferences, identity and config files stay as they were.  When only
    new units arrived (``knowledge.jsonl`` / ``delivery.json`` changed) and
    the cached text is less than :data:`STALE_CONTEXT_SECS` past its time,
    it is printed at once and rebuilt in a detached child for the next
    session; any other change (trust, config, mode) rebuilds it first.
    """
    from claudectl.hooks.runtime import arm_deadline, may_detach

    project = project_name(payload)
    key = _context_key(home, payload, project, now)
    entry = _cache_entry(home, project)
    if entry is not None and entry.get("key") == key and now < entry["until"]:
        text = entry["text"]
    elif (
        entry is not None
        and may_detach()
        and now < entry["until"] + STALE_CONTEXT_SECS
        and _only_new_knowledge(entry.get("key"), key)
    ):
        text = entry["text"]
        _refresh_detached(payload, home, now, project, key)
    else:
        arm_deadline()
        text = build_context(payload, home, now, project)
        _store_context(home, key, now, text)
    if not text:
        return None
    return {"hookSpecificOutput": {"hookEventName": "SessionStart", "additionalContext": text}}


def _refresh_detached(
    payload: Mapping[str, Any], home: HookHome, now: int, project: str, key: list[Any]
) -> None:
    """Rebuild the cached context in a child that outlives this hook call."""
    import sys

    sys.stdout.flush()
    if os.fork() != 0:
        return
    # The child: off Claude Code's pipes (it waits for them to close) and session,
    # and behind the session that is starting (it may share few CPUs).
    try:
        os.setsid()
        os.nice(10)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        from claudectl.hooks.runtime import arm_deadline

        arm_deadline()
        _store_context(home, key, now, build_context(payload, home, now, project))
    except BaseException as e:
        from claudectl.hooks.runtime import log_error

        log_error(home, "SessionStart", f"background refresh: {type(e).__name__}: {e}")
    os._exit(0)


def build_context(payload: Mapping[str, Any], home: HookHome, now: int, project: str) -> str:
    """What ``claudectl hive prompt --project PROJECT`` prints ("" when nothing)."""
    from claudectl.hive.prompt import build_prompt
    from claudectl.hive.store import hive_active

    full: Any = home.full()
    config = load_hive_config(home, payload)
    if not hive_active(full, config):
        return ""
    text = build_prompt(full, config, local_identity(home), now, project=project)
    if len(text) > MAX_CONTEXT_CHARS:
        text = text[:MAX_CONTEXT_CHARS].rsplit("\n", 1)[0]
    return text


# --- decisions out ---------------------------------------------------------------------


def _request_key(payload: Mapping[str, Any]) -> tuple[str, str, str] | None:
    from claudectl.hooks import pending

    session, tool = _str(payload, "session_id"), _str(payload, "tool_name")
    if session is None or tool is None:
        return None
    return session, pending.input_digest(tool, payload.get("tool_input")), tool


def permission_request(
    payload: Mapping[str, Any], home: HookHome, now: int, session_pid: int
) -> dict[str, Any] | None:
    """
    Remember the request until its outcome is known; with a gate, show the
    knowledge about it or allow it (``[hive] gate``).
    """
    from claudectl.hooks import pending

    key = _request_key(payload)
    if key is None:
        return None
    session, digest, tool = key
    command = tool_command(payload.get("tool_input"))
    output: dict[str, Any] | None = None
    if gate_configured(home, payload):
        from claudectl.config import ConfigError

        try:
            config = load_hive_config(home, payload)
        except ConfigError as e:
            # Still record the user's decision; only the gate is off.
            from claudectl.hooks.runtime import log_error

            log_error(home, "PermissionRequest", f"{e} (the gate is off)")
            config = None
        if config is not None and config.gate != "off":
            from claudectl.hive.store import hive_active

            if hive_active(home.full(), config):  # type: ignore[arg-type]
                output, allowed = _gate(payload, home, now, config, tool, command)
                if allowed:
                    # Not the user's decision: not recorded as one (it would feed
                    # the knowledge that allowed it).  Logged in gate.jsonl.
                    return output
    pending.add(
        home,
        pending.make(
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
    payload: Mapping[str, Any],
    home: HookHome,
    now: int,
    config: Any,
    tool: str,
    command: str | None,
) -> tuple[dict[str, Any] | None, bool]:
    from claudectl.hooks.runtime import arm_deadline

    arm_deadline()
    from claudectl.hive.delivery import load_delivery
    from claudectl.hive.distill import read_preferences
    from claudectl.hive.store import load_store
    from claudectl.hive.trust import load_trust
    from claudectl.hooks.gate import evaluate

    full: Any = home.full()
    view = evaluate(
        load_store(full).store.units(),
        mode=config.gate,
        tool=tool,
        # The gate matches the real command; only what is written is redacted.
        command=real_command(payload.get("tool_input")),
        local_id=local_identity(home),
        trust=load_trust(full, config.default_trust),
        min_evidence=config.export_min_evidence,
        delivery=load_delivery(full),
        preferences=read_preferences(full),
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


def gate_log_path(home: HookHome) -> str:
    return os.path.join(home.hooks, "gate.jsonl")


def _log_auto_allow(
    home: HookHome,
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
    line = json.dumps(record, ensure_ascii=False) + "\n"
    append_bounded(gate_log_path(home), line.encode("utf-8"), MAX_GATE_LOG_BYTES)


def _record(home: HookHome, requests: list[dict[str, Any]], user_action: str, now: int) -> None:
    from claudectl.hive.decisions import append_decisions, observation

    records = [
        observation(
            tool=p["tool"],
            command=p["command"],
            project=p["project"],
            user_action=user_action,
            now=now,
            pid=p["pid"],
            id_pid=os.getpid(),
            n=n,
        )
        for n, p in enumerate(requests)
    ]
    append_decisions(home, records)


def tool_outcome(payload: Mapping[str, Any], home: HookHome, now: int, user_action: str) -> None:
    """``PostToolUse`` / ``PostToolUseFailure`` (accept) or ``PermissionDenied`` (reject)."""
    from claudectl.hooks import pending

    key = _request_key(payload)
    if key is None:
        return
    session, digest, tool = key
    found = pending.take(
        home,
        session,
        digest,
        _str(payload, "tool_use_id"),
        now,
        tool=tool,
        command_of=lambda: tool_command(payload.get("tool_input")),
    )
    if found is not None:
        _record(home, [found], user_action, now)


def turn_over(payload: Mapping[str, Any], home: HookHome, now: int) -> None:
    """
    ``UserPromptSubmit`` / ``Stop`` / ``SessionEnd``: requests of the session
    still waiting were denied in the dialog (the tool never ran).
    """
    from claudectl.hooks import pending

    session = _str(payload, "session_id")
    if session is None:
        return
    left = pending.take_session(home, session, now)
    if left:
        _record(home, left, "reject", now)
