"""The one bounded line splitter (claudectl.lines), used by every line stream."""

from __future__ import annotations

import time
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.lines import OVERLONG, LineSplitter


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


def reference(data: bytes, limit: int) -> list[bytes | None]:
    """What the splitter must produce for ``data`` fed in any pieces."""
    lines = data.split(b"\n")
    tail = lines.pop()
    out: list[bytes | None] = [line if len(line) <= limit else OVERLONG for line in lines]
    if len(tail) > limit:
        out.append(OVERLONG)
    return out


class LineSplitterTests(SynchronousTestCase):
    def test_lines_in_one_read(self) -> None:
        s = LineSplitter(100)
        self.assertEqual(s.feed(b"a\nbb\n\nccc\r\n"), [b"a", b"bb", b"", b"ccc\r"])
        self.assertEqual(s.pending, 0)

    def test_huge_chunk_in_one_read_is_linear(self) -> None:
        """200,000 lines in one read: every line out, in well under a second."""
        data = b'{"msg_type":"heartbeat"}\n' * 200_000
        s = LineSplitter(1024)
        t0 = time.process_time()
        lines = s.feed(data)
        self.assertLess(time.process_time() - t0, 1.0)
        self.assertEqual(len(lines), 200_000)
        self.assertEqual(set(lines), {b'{"msg_type":"heartbeat"}'})

    def test_line_split_across_many_reads(self) -> None:
        """A 1 MiB line one KiB at a time: gathered, given out whole once."""
        line = bytes(range(256)).replace(b"\n", b"x") * 4096
        s = LineSplitter(len(line))
        out = feed_all(s, [line[i : i + 1024] for i in range(0, len(line), 1024)])
        self.assertEqual(out, [])
        self.assertEqual(s.pending, len(line))
        self.assertEqual(s.feed(b"\nnext"), [line])
        self.assertEqual(s.feed(b"\n"), [b"next"])

    def test_tiny_reads_cost_no_more_memory_than_their_bytes(self) -> None:
        """
        A peer sending a 256 KiB line two bytes at a time: what the splitter
        holds stays near the line's size (one object per read: several times it).
        """
        size = 256 * 1024
        s = LineSplitter(size * 2)
        chunk = b"ab"
        tracemalloc.start()
        try:
            for _ in range(size // 2):
                s.feed(chunk)
            current, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(s.pending, size)
        self.assertLess(current, size * 2)
        self.assertEqual(s.feed(b"\n"), [b"ab" * (size // 2)])

    def test_split_between_every_byte(self) -> None:
        data = b"one\ntwo\r\n\nthree\n"
        s = LineSplitter(10)
        self.assertEqual(feed_all(s, [bytes([b]) for b in data]), [b"one", b"two\r", b"", b"three"])

    def test_over_long_line_in_one_read_is_refused(self) -> None:
        s = LineSplitter(4)
        self.assertEqual(s.feed(b"ok\n12345\n1234\n"), [b"ok", OVERLONG, b"1234"])

    def test_over_long_line_over_many_reads_is_reported_once_and_skipped(self) -> None:
        s = LineSplitter(4)
        self.assertEqual(s.feed(b"12"), [])
        self.assertEqual(s.feed(b"345"), [OVERLONG])
        # Nothing of it is kept while the rest of it arrives.
        self.assertEqual(s.pending, 0)
        self.assertEqual(s.feed(b"6789" * 1000), [])
        self.assertEqual(s.pending, 0)
        self.assertEqual(s.feed(b"0\nok\n"), [b"ok"])

    def test_exactly_the_limit_passes(self) -> None:
        s = LineSplitter(4)
        self.assertEqual(s.feed(b"12"), [])
        self.assertEqual(s.feed(b"34\n"), [b"1234"])
        self.assertEqual(s.feed(b"12"), [])
        self.assertEqual(s.feed(b"345\n"), [OVERLONG])

    def test_take_returns_the_unfinished_line(self) -> None:
        s = LineSplitter(100)
        self.assertEqual(s.feed(b"a\nbc"), [b"a"])
        self.assertEqual(s.take(), b"bc")
        self.assertEqual(s.pending, 0)
        self.assertEqual(s.feed(b"d\n"), [b"d"])

    def test_finish(self) -> None:
        s = LineSplitter(4)
        s.feed(b"a\nlast")
        self.assertEqual(s.finish(), b"last")
        self.assertIsNone(s.finish())
        s.feed(b"toolong")
        self.assertIsNone(s.finish())

    def test_bad_limit(self) -> None:
        self.assertRaises(ValueError, LineSplitter, 0)

    @given(
        st.lists(st.sampled_from([b"a", b"bc", b"\n", b"defgh", b"\r\n", b"xyz\nq"]), max_size=40),
        st.lists(st.integers(1, 9), min_size=1, max_size=40),
        st.integers(1, 6),
    )
    def test_any_chunking_gives_the_same_lines(
        self, parts: list[bytes], cuts: list[int], limit: int
    ) -> None:
        data = b"".join(parts)
        chunks, i, k = [], 0, 0
        while i < len(data):
            n = cuts[k % len(cuts)]
            chunks.append(data[i : i + n])
            i, k = i + n, k + 1
        got = feed_all(LineSplitter(limit), chunks)
        # An over-long line split over reads is reported once, when it gets
        # too long; in one read, when its \n arrives: the same list either way.
        self.assertEqual(got, reference(data, limit))
