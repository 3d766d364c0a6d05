# -*- test-case-name: tests.test_logbudget -*-
"""
How many log lines a source of bad input may cause.

A peer (or anyone who can open a TCP connection) decides how often the
service meets bad input; if every occurrence wrote a log line, a loop of
malformed lines or refused registrations would grow the log file without
bound.  Rejections are always *counted* (in the caller's statistics); a
:class:`LogBudget` decides which of them are also *logged*: the first
``per_minute`` for a key (a peer id, an address) in each minute of the
clock, then one note that the rest of that minute goes unlogged.

Keys are forgotten when the minute turns, and at most ``max_keys`` keys are
told apart in one minute (the rest share one budget), so a flood from many
addresses costs bounded memory and bounded lines too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: The budget shared by every key past ``max_keys`` in one minute.
OTHERS = "(other sources)"


class LogBudget:
    """Per-key, per-minute allowance of log lines (reactor-free: give it a clock)."""

    def __init__(
        self,
        seconds: Callable[[], float],
        per_minute: int,
        on_exhausted: Callable[[str], None],
        max_keys: int = 1024,
    ) -> None:
        self._seconds = seconds
        self._per_minute = per_minute
        self._on_exhausted = on_exhausted
        self._max_keys = max_keys
        self._minute = -1
        self._counts: dict[str, int] = {}

    def allow(self, key: str) -> bool:
        """
        Whether this occurrence for ``key`` gets its log line.  The first
        occurrence over the minute's budget calls ``on_exhausted(key)`` (the
        caller logs "no more of these this minute").
        """
        minute = int(self._seconds()) // 60
        if minute != self._minute:
            self._minute = minute
            self._counts.clear()
        if key not in self._counts and len(self._counts) >= self._max_keys:
            key = OTHERS
        count = self._counts.get(key, 0)
        self._counts[key] = count + 1
        if count == self._per_minute:
            self._on_exhausted(key)
        return count < self._per_minute


#: Log lines one peer's delegation frames may cause a minute (tasks accepted,
#: refused, finished, interrupted; bad frames): more than a person delegates,
#: few enough that a flood costs ~6 KB of log a minute.
PEER_LINES_PER_MINUTE = 30

#: Characters of a peer's string kept in a log line.
PEER_TEXT_CHARS = 200


def peer_text(value: object) -> object:
    """A peer's string for a log line: on one line, cut to PEER_TEXT_CHARS."""
    if not isinstance(value, str):
        return value
    from claudectl.text import clean_line, shorten

    text = clean_line(value)
    cut = shorten(text, PEER_TEXT_CHARS)
    return cut if len(text) <= PEER_TEXT_CHARS else f"{cut} ({len(text):,} characters)"


class PeerLog:
    """
    The log lines a peer's frames cause, through a :class:`LogBudget` per
    peer: at most ``per_minute`` lines a minute for each peer, then one note,
    and every string field on one line and cut (a peer's ``task_id`` or
    ``cwd`` can be a megabyte).  What is not logged is still counted by the
    caller.
    """

    def __init__(self, log: Any, seconds: Callable[[], float], per_minute: int, what: str) -> None:
        self._log = log
        self._what = what
        self._budget = LogBudget(seconds, per_minute, self._exhausted)

    def _exhausted(self, peer: str) -> None:
        self._log.info(
            "{peer}: more {what} lines this minute; not logging them",
            peer=peer_text(peer),
            what=self._what,
        )

    def info(self, peer: str, text: str, **fields: object) -> None:
        if self._budget.allow(peer):
            self._log.info(text, peer=peer_text(peer), **_cut(fields))

    def warn(self, peer: str, text: str, **fields: object) -> None:
        if self._budget.allow(peer):
            self._log.warn(text, peer=peer_text(peer), **_cut(fields))


def _cut(fields: dict[str, object]) -> dict[str, object]:
    return {k: peer_text(v) for k, v in fields.items()}
