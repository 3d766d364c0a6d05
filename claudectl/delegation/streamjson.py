# -*- test-case-name: tests.test_delegation_streamjson -*-
"""
Claude Code's ``--output-format stream-json --verbose`` output, one JSON
object per line (docs/delegation.md, How a task runs), folded into live progress.

:class:`StreamProgress` is fed line by line and keeps what a controller wants
to see: the session id, model, token and cost counters, the number of turns,
the latest assistant text, the files that Edit/Write tool calls touched, and
the final ``result`` event.

Success is never inferred from the exit status alone: Claude Code exits 0
even when it could not log in.  :attr:`StreamProgress.succeeded` is true only
when a ``result`` event arrived with ``is_error`` false.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from claudectl.text import shorten as one_line

#: Tools whose ``file_path`` input names a file the session modified.
FILE_TOOLS = frozenset({"Edit", "Write", "MultiEdit", "NotebookEdit"})
#: Longest ``last_activity`` text kept (characters).
MAX_ACTIVITY_CHARS = 200
#: Recent activity lines kept (:attr:`StreamProgress.activity`).
ACTIVITY_KEEP = 50
#: Tool inputs that name what a tool works on, in order of preference.
TARGET_KEYS = (
    "file_path",
    "notebook_path",
    "path",
    "command",
    "pattern",
    "url",
    "query",
    "description",
    "prompt",
)
DEFAULT_CONTEXT_WINDOW = 200_000
LARGE_CONTEXT_WINDOW = 1_000_000
_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return 0
    return v


def usage_total(usage: Any) -> int:
    """Tokens processed: input + output + cache creation + cache reads."""
    if not isinstance(usage, dict):
        return 0
    return int(sum(_num(usage.get(k)) for k in _USAGE_KEYS))


def _context_tokens(usage: Any) -> int:
    if not isinstance(usage, dict):
        return 0
    return int(
        sum(
            _num(usage.get(k))
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
    )


def shorten(text: str, limit: int = MAX_ACTIVITY_CHARS) -> str:
    """One line of at most ``limit`` characters (an activity line by default)."""
    return one_line(text, limit)


def tool_line(name: str, inputs: dict[str, Any]) -> str:
    """A tool use with its target: ``Bash: pytest -q``, ``Read: /src/a.py``."""
    for key in TARGET_KEYS:
        value = inputs.get(key)
        if isinstance(value, str) and value.strip():
            return shorten(f"{name}: {value}")
    return shorten(f"using {name}")


@dataclass
class StreamProgress:
    session_id: str | None = None
    model: str | None = None
    num_turns: int = 0
    cost_usd: float = 0.0
    last_text: str | None = None
    last_activity: str | None = None
    files_modified: list[str] = field(default_factory=list)
    context_pct: int = 0
    #: The ``result`` event, once seen.
    has_result: bool = False
    is_error: bool = False
    result_text: str | None = None
    duration_ms: int | None = None
    error: str | None = None
    #: Lines that were not JSON objects (counted, otherwise ignored).
    bad_lines: int = 0
    #: The latest activity lines (what Claude is doing: assistant text, tool
    #: uses with their target, the result), each shortened to one line;
    #: :attr:`activity_count` counts every line ever added.
    activity: deque[str] = field(default_factory=lambda: deque(maxlen=ACTIVITY_KEEP))
    activity_count: int = 0
    _usage_by_message: dict[str, int] = field(default_factory=dict)
    _result_tokens: int | None = None

    @property
    def tokens_used(self) -> int:
        if self._result_tokens is not None:
            return self._result_tokens
        return sum(self._usage_by_message.values())

    @property
    def succeeded(self) -> bool:
        return self.has_result and not self.is_error

    def feed(self, line: bytes | str) -> bool:
        """Take one line; return True if anything a controller sees changed."""
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        line = line.strip()
        if not line:
            return False
        try:
            event = json.loads(line)
        except ValueError:
            self.bad_lines += 1
            return False
        if not isinstance(event, dict):
            self.bad_lines += 1
            return False
        kind = event.get("type")
        if kind == "system":
            return self._system(event)
        if kind == "assistant":
            return self._assistant(event)
        if kind == "result":
            return self._result(event)
        return False

    def _note(self, line: str) -> None:
        if line:
            self.activity.append(line)
            self.activity_count += 1

    def _system(self, event: dict[str, Any]) -> bool:
        if event.get("subtype") != "init":
            return False
        if isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        self.last_activity = "session started"
        self._note("session started")
        return True

    def _assistant(self, event: dict[str, Any]) -> bool:
        message = event.get("message")
        if not isinstance(message, dict):
            return False
        if isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        if isinstance(event.get("error"), str):
            self.error = event["error"]
        usage = message.get("usage")
        raw_id = message.get("id")
        msg_id = raw_id if isinstance(raw_id, str) else f"#{len(self._usage_by_message)}"
        # With --verbose a message may come as several events with one id:
        # count its usage once, with the latest numbers.
        self._usage_by_message[msg_id] = usage_total(usage)
        window = LARGE_CONTEXT_WINDOW if "[1m]" in (self.model or "") else DEFAULT_CONTEXT_WINDOW
        ctx = _context_tokens(usage)
        if ctx:
            self.context_pct = min(100, ctx * 100 // window)
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "text" and isinstance(block.get("text"), str):
                    if block["text"].strip():
                        self.last_text = block["text"]
                        self.last_activity = shorten(block["text"])
                        self._note(self.last_activity)
                elif block.get("type") == "tool_use" and isinstance(block.get("name"), str):
                    name = block["name"]
                    raw_input = block.get("input")
                    inputs = raw_input if isinstance(raw_input, dict) else {}
                    path = inputs.get("file_path") or inputs.get("notebook_path")
                    if name in FILE_TOOLS and isinstance(path, str):
                        if path not in self.files_modified:
                            self.files_modified.append(path)
                        self.last_activity = shorten(f"{name} {path}")
                    else:
                        self.last_activity = shorten(f"using {name}")
                    self._note(tool_line(name, inputs))
        return True

    def _result(self, event: dict[str, Any]) -> bool:
        self.has_result = True
        self.is_error = event.get("is_error") is not False
        if isinstance(event.get("result"), str):
            self.result_text = event["result"]
        elif self.is_error and isinstance(event.get("subtype"), str):
            self.result_text = event["subtype"]
        if isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        turns = event.get("num_turns")
        if isinstance(turns, int) and not isinstance(turns, bool):
            self.num_turns = turns
        cost = event.get("total_cost_usd")
        if not isinstance(cost, bool) and isinstance(cost, (int, float)):
            self.cost_usd = float(cost)
        duration = event.get("duration_ms")
        if isinstance(duration, int) and not isinstance(duration, bool):
            self.duration_ms = duration
        if isinstance(event.get("usage"), dict):
            self._result_tokens = usage_total(event["usage"])
        if self.result_text:
            self.last_activity = shorten(self.result_text)
        self._note(shorten(f"{'failed' if self.is_error else 'done'}: {self.result_text or ''}"))
        return True
