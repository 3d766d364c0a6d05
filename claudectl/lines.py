# -*- test-case-name: tests.test_lines -*-
"""
The one line splitter: bytes in, whole lines out, sans I/O and bounded.

Every stream of ``\\n``-terminated lines (relay links, Claude Code's
stream-json stdout) goes through :class:`LineSplitter`:

* one ``bytes.split`` per read, whatever the number of lines in it: no
  rescanning of the buffer, no copy of the rest after each line (the
  quadratic cost of ``partition`` in a loop, or of LineReceiver's
  line-at-a-time loop on a big read);
* a line that arrives over many reads is kept as a list of pieces and joined
  once, when its ``\\n`` arrives (no ``+=`` of a growing buffer);
* a line longer than ``max_length`` (the ``\\n`` not counted) is never kept:
  it is reported once, as :data:`OVERLONG` in the output, as soon as it is
  known to be too long, and the rest of it is skipped up to its ``\\n``.

The delimiter is ``\\n`` alone; a ``\\r`` before it stays in the line (the
callers' parsers strip whitespace).
"""

from __future__ import annotations

from typing import Final

#: Stands in the output for a line longer than ``max_length`` (dropped).
OVERLONG: Final = None

Line = bytes | None


class LineSplitter:
    """Splits a byte stream into lines of at most ``max_length`` bytes."""

    __slots__ = ("max_length", "_pieces", "_pending", "_skipping")

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.max_length = max_length
        #: The start of the line in progress, one piece per read.
        self._pieces: list[bytes] = []
        self._pending = 0
        #: Inside an over-long line (already reported): drop up to its ``\n``.
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line kept so far."""
        return self._pending

    def feed(self, data: bytes) -> list[Line]:
        """
        The lines completed by ``data``, in order, without their ``\\n``;
        :data:`OVERLONG` where a line was too long.
        """
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self.max_length
        prior = self._pending
        if lines:
            first = lines[0]
            if self._skipping:
                # The end of an over-long line already reported.
                self._skipping = False
                del lines[0]
            elif self._pieces:
                self._pieces.append(first)
                lines[0] = b"".join(self._pieces)
            if self._pieces:
                self._pieces = []
                self._pending = 0
            if len(data) + prior > limit:
                # Only a read longer than the limit can hold a long line.
                out: list[Line] = [line if len(line) <= limit else OVERLONG for line in lines]
            else:
                out = lines  # type: ignore[assignment]  # list is invariant
        else:
            out = []
        if tail and not self._skipping:
            self._pieces.append(tail)
            self._pending += len(tail)
            if self._pending > limit:
                self._pieces = []
                self._pending = 0
                self._skipping = True
                out.append(OVERLONG)
        return out

    def take(self) -> bytes:
        """The unfinished line so far (nothing is kept): for a switch of protocol."""
        rest = b"".join(self._pieces)
        self._pieces = []
        self._pending = 0
        self._skipping = False
        return rest

    def finish(self) -> Line | None:
        """
        At the end of the stream: the last line if it had no ``\\n`` (None
        if there is none, or if it was an over-long one already reported).
        """
        skipping = self._skipping
        rest = self.take()
        if skipping or not rest:
            return None
        return rest
