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
