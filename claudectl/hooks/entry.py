# -*- test-case-name: tests.test_hooks_entry -*-
"""
The hook command: ``python -m claudectl.hooks EVENT [--home DIR]``.

Claude Code runs it for each hook event with the event's JSON on stdin
(docs/claude-code.md).  It is never in the way: whatever goes wrong -- bad
input, a broken store, a slow disk (:data:`DEADLINE_SECS`) -- it prints
nothing and exits 0, and writes one line to ``~/.claudectl/hooks/hooks.log``
(kept under :data:`MAX_LOG_BYTES`, then rotated to ``hooks.log.1``).

It imports no Twisted and opens no socket: it runs on every tool call
(``scripts/bench_hooks.py`` measures it).  Only the standard library is
imported here; each event imports what it needs.
"""

from __future__ import annotations

# Only what Python has loaded at start-up anyway: the rest is imported by the
# events that need it (the hook of most tool calls returns before any).
import os
import sys

from claudectl.hooks.files import HookHome
from claudectl.hooks.runtime import DEADLINE_SECS, MAX_LOG_BYTES, Deadline, allow, log_error

#: typing is not imported at run time (it costs a start-up of its own).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import IO, Any

#: The events this command handles (installed by ``claudectl hooks install``).
EVENTS = (
    "SessionStart",
    "PermissionRequest",
    "PostToolUse",
    "PostToolUseFailure",
    "PermissionDenied",
    "UserPromptSubmit",
    "Stop",
    "SessionEnd",
)
#: Events whose only job is to resolve a waiting request: nothing to do without one.
_OUTCOME_EVENTS = frozenset(
    {"PostToolUse", "PostToolUseFailure", "PermissionDenied", "UserPromptSubmit", "Stop"}
    | {"SessionEnd"}
)
MAX_INPUT_BYTES = 4 * 1024 * 1024
__all__ = ["DEADLINE_SECS", "EVENTS", "MAX_LOG_BYTES", "handle", "log_error", "main", "run"]


def _parse_args(argv: Sequence[str]) -> tuple[str | None, str | None]:
    event: str | None = None
    home: str | None = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--home" and args:
            home = args.pop(0)
        elif arg.startswith("--home="):
            home = arg.split("=", 1)[1]
        elif event is None and not arg.startswith("-"):
            event = arg
    return event, home


def handle(
    event: str, payload: Mapping[str, Any], home: HookHome, now: int
) -> dict[str, Any] | None:
    """The output object for one event (None: print nothing)."""
    from claudectl.hooks import events

    if event == "SessionStart":
        return events.session_start(payload, home, now)
    if event == "PermissionRequest":
        # The hook runs under Claude Code (the shell execs us): its pid is the session's.
        return events.permission_request(payload, home, now, os.getppid())
    if event in ("PostToolUse", "PostToolUseFailure"):
        events.tool_outcome(payload, home, now, "accept")
    elif event == "PermissionDenied":
        events.tool_outcome(payload, home, now, "reject")
    elif event in ("UserPromptSubmit", "Stop", "SessionEnd"):
        events.turn_over(payload, home, now)
    return None


def run(
    argv: Sequence[str],
    stdin: IO[bytes],
    stdout: IO[str],
    environ: Mapping[str, str],
    now: int | None = None,
    deadline: bool = False,
) -> int:
    """Handle one hook call; always returns 0 (``deadline``: give up after :data:`DEADLINE_SECS`)."""
    event, home_arg = _parse_args(argv)
    try:
        home = HookHome.resolve(home_arg, environ)
    except Exception:
        return 0
    try:
        data = stdin.read(MAX_INPUT_BYTES + 1)
        if event in _OUTCOME_EVENTS and not os.path.exists(
            os.path.join(home.hooks, "pending.json")
        ):
            # The hook of almost every tool call: no request waits, nothing to do.
            return 0
        allow(deadline)
        if len(data) > MAX_INPUT_BYTES:
            raise ValueError(f"hook input over {MAX_INPUT_BYTES} bytes")
        import json
        import time

        payload = json.loads(data) if data.strip() else {}
        if not isinstance(payload, dict):
            raise ValueError("hook input is not a JSON object")
        named = payload.get("hook_event_name")
        if isinstance(named, str) and named in EVENTS:
            event = named
        if event not in EVENTS:
            return 0
        out = handle(event, payload, home, int(time.time()) if now is None else now)
        if out is not None:
            stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
            stdout.flush()
    except Deadline:
        log_error(home, event, f"gave up after {DEADLINE_SECS}s")
    except RecursionError:
        log_error(home, event, "input nested too deeply")
    except Exception as e:
        log_error(home, event, f"{type(e).__name__}: {e}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = sys.argv[1:] if argv is None else argv
        run(args, sys.stdin.buffer, sys.stdout, os.environ, deadline=True)
        if "signal" in sys.modules:  # armed: disarm
            sys.modules["signal"].alarm(0)
    except BaseException:
        pass
    # Never a traceback at exit (a closed stdout, say): exit 0 quietly.
    try:
        sys.stdout.flush()
    except Exception:
        os._exit(0)
    sys.exit(0)
