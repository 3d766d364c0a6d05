# -*- test-case-name: tests.test_lines -*-
"""
The one line splitter: bytes in, whole lines out, sans I/O and bounded.

Every stream of ``\\n``-terminated lines (relay links, Claude Code's
stream-json stdout) goes through :class:`LineSplitter`:

* one ``bytes.split`` per read, whatever the number of lines in it: no
  rescanning of the buffer, no copy of the rest after each line (the
  quadratic cost of ``partition`` in a loop, or of LineReceiver's
  line-at-a-time loop on a big read);
* a line that arrives over many reads is gathered in one ``bytearray``
  (amortised appends: linear in its length, and no per-read object kept, so
  a peer sending a line two bytes at a time costs no more memory than the
  bytes themselves);
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

    __slots__ = ("max_length", "_partial", "_skipping")

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.max_length = max_length
        #: The start of the line in progress.
        self._partial = bytearray()
        #: Inside an over-long line (already reported): drop up to its ``\n``.
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line kept so far."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[Line]:
        """
        The lines completed by ``data``, in order, without their ``\\n``;
        :data:`OVERLONG` where a line was too long.
        """
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self.max_length
        partial = self._partial
        prior = len(partial)
        if lines:
            first = lines[0]
            if self._skipping:
                # The end of an over-long line already reported.
                self._skipping = False
                del lines[0]
            elif partial:
                partial += first
                lines[0] = bytes(partial)
            if partial:
                self._partial = bytearray()
            if len(data) + prior > limit:
                # Only a read longer than the limit can hold a long line.
                out: list[Line] = [line if len(line) <= limit else OVERLONG for line in lines]
            else:
                out = lines  # type: ignore[assignment]  # list is invariant
        else:
            out = []
        if tail and not self._skipping:
            partial = self._partial
            if len(partial) + len(tail) > limit:
                self._partial = bytearray()
                self._skipping = True
                out.append(OVERLONG)
            else:
                partial += tail
        return out

    def take(self) -> bytes:
        """The unfinished line so far (nothing is kept): for a switch of protocol."""
        rest = bytes(self._partial)
        self._partial = bytearray()
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
