# -*- test-case-name: tests.test_delegation_tail -*-
"""
The live tail of a delegated task: what Claude Code is doing, line by line.

A worker sends it to the controller of a task as extra ``task_status``
frames that carry an optional payload member ``"tail"``::

    {"state": "running", "stats": {...}, "task_id": "task_…",
     "tail": [{"at": 1745539201.25, "text": "Bash: pytest -q"}, ...]}

No new message type: claudectl 0.64 rejects an unknown ``msg_type`` (a bad
frame, twenty drop the link), but it never parses an inbound
``task_status`` (one receipt log line, docs/delegation.md, The live tail), so the extra
member cannot hurt it.  Tail frames still go to peers of this project only
(links in ``mutual`` mode), at most :data:`TAIL_MIN_INTERVAL_SECS` apart per
task, with at most :data:`TAIL_FRAME_LINES` lines of at most
:data:`TAIL_LINE_CHARS` characters each.

Both ends keep the last :data:`TAIL_KEEP` lines in memory (never in the
stored task record).  The receiving side treats the tail as hostile:
:func:`parse_tail` bounds and cleans everything again.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

from claudectl.delegation.streamjson import shorten
from claudectl.text import clean_line

#: Lines kept per task, on each side.
TAIL_KEEP = 200
#: Lines in one frame.
TAIL_FRAME_LINES = 20
#: Characters in one line.
TAIL_LINE_CHARS = 200
#: Least time between two tail frames of one task (2 per second at most).
TAIL_MIN_INTERVAL_SECS = 0.5
#: A received line's ``at`` further than this from our clock is replaced by our clock.
MAX_SKEW_SECS = 86_400.0


def clean_tail_text(text: Any) -> str:
    """One cleaned line of at most :data:`TAIL_LINE_CHARS` characters ('' if nothing is left)."""
    if not isinstance(text, str):
        return ""
    return shorten(clean_line(text), TAIL_LINE_CHARS)


class Tail:
    """The last :data:`TAIL_KEEP` activity lines, each with a sequence number and a time."""

    def __init__(self, keep: int = TAIL_KEEP) -> None:
        self.lines: deque[tuple[int, float, str]] = deque(maxlen=keep)
        #: Sequence number of the newest line (0: none yet).
        self.seq = 0

    def add(self, at: float, text: Any) -> bool:
        line = clean_tail_text(text)
        if not line:
            return False
        self.seq += 1
        self.lines.append((self.seq, float(at), line))
        return True

    def since(self, seq: int, limit: int | None = None) -> list[tuple[int, float, str]]:
        """Lines newer than ``seq``, oldest first (at most ``limit``)."""
        out = [line for line in self.lines if line[0] > seq]
        return out if limit is None else out[:limit]

    def view(self) -> list[dict[str, Any]]:
        return [{"at": at, "text": text} for _, at, text in self.lines]


def frame_lines(lines: Iterable[tuple[int, float, str]]) -> list[dict[str, Any]]:
    """The ``"tail"`` member of a frame."""
    return [{"at": round(at, 3), "text": text} for _, at, text in lines]


def parse_tail(value: Any, now: float) -> tuple[list[tuple[float, str]], int]:
    """
    A peer's ``"tail"`` member: ``(lines, dropped)``.  At most
    :data:`TAIL_FRAME_LINES` entries are looked at (the rest are dropped and
    counted, as are malformed entries); each text is cleaned and cut; a
    missing, non-finite or far-off ``at`` becomes ``now``.  Not a list:
    ``([], 1)``.
    """
    if not isinstance(value, list):
        return [], 1
    out: list[tuple[float, str]] = []
    dropped = max(0, len(value) - TAIL_FRAME_LINES)
    for item in value[:TAIL_FRAME_LINES]:
        if not isinstance(item, dict):
            dropped += 1
            continue
        text = clean_tail_text(item.get("text"))
        if not text:
            dropped += 1
            continue
        at = item.get("at")
        if (
            isinstance(at, bool)
            or not isinstance(at, (int, float))
            or not math.isfinite(at)
            or abs(at - now) > MAX_SKEW_SECS
        ):
            at = now
        out.append((float(at), text))
    return out, dropped


def bounded(lines: list[dict[str, Any]], max_bytes: int) -> list[dict[str, Any]]:
    """The newest of ``lines`` whose JSON fits ``max_bytes`` (oldest dropped first)."""
    lines = list(lines)
    while lines and len(json.dumps(lines, ensure_ascii=False).encode("utf-8")) > max_bytes:
        lines = lines[max(1, len(lines) // 8) :]
    return lines
