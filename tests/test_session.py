"""Tests for claudectl.relay.session: bad-frame strikes, dedup, liveness."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay import codec
from claudectl.relay.codec import Envelope, encode
from claudectl.relay.session import (
    BAD_RATIO_WINDOW,
    DEDUP_CAPACITY,
    LOG_BURST,
    LOG_INTERVAL_SECS,
    MAX_BAD_STRIKES,
    Dedup,
    Disconnect,
    FrameFilter,
    LinkCounters,
    Liveness,
    LogGate,
)
from tests.common import vector


def frame(msg_id: str, msg_type: str = codec.HEARTBEAT, payload: object = None) -> bytes:
    """One encoded frame without its newline (as LineReceiver delivers it)."""
    return encode(
        Envelope(msg_id, msg_type, "desk-1", 1, {} if payload is None else payload)
    ).rstrip(b"\n")


class DedupVectorTests(SynchronousTestCase):
    def test_duplicates_vector(self) -> None:
        v = vector("wire.dedup.duplicates")
        d = Dedup()
        delivered = [i for i in v["input"]["ids"] if not d.seen(i)]
        self.assertEqual(delivered, v["expected"]["delivered"])

    def test_capacity_vector(self) -> None:
        v = vector("wire.dedup.capacity")
        self.assertEqual(DEDUP_CAPACITY, v["input"]["capacity"])
        d = Dedup()
        for n in range(1005):
            self.assertFalse(d.seen(f"msg_{n}"))
        for old in v["expected"]["forgotten"]:
            self.assertNotIn(old, d)
        self.assertIn(v["expected"]["remembered_example"], d)
        self.assertIn("msg_1004", d)
        # A forgotten id is new again.
        self.assertFalse(d.seen("msg_0"))

    def test_duplicate_does_not_refresh_position(self) -> None:
        d = Dedup(capacity=3)
        for i in ("a", "b", "c"):
            d.seen(i)
        self.assertTrue(d.seen("a"))  # FIFO, not LRU: "a" is still oldest
        d.seen("d")
        self.assertNotIn("a", d)
        self.assertIn("b", d)


class FrameFilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reasons: list[str] = []
        self.counters = LinkCounters()
        self.dedup = Dedup()
        self.filter = FrameFilter(self.dedup, self.counters, on_bad=self.reasons.append)

    def test_good_frame_delivered(self) -> None:
        line = vector("wire.frame.heartbeat")["expected"]["line"].encode().rstrip(b"\n")
        env = self.filter.feed(line)
        self.assertEqual(env.msg_type, "heartbeat")
        self.assertEqual(self.counters.frames_in, 1)
        self.assertEqual(self.counters.bytes_in, len(line) + 1)

    def test_claudectl_session_heartbeat_accepted(self) -> None:
        line = vector("wire.frame.session_heartbeat")["expected"]["line"].encode()
        env = self.filter.feed(line.rstrip(b"\n"))
        self.assertEqual(env.payload["worker_id"], "worker-01")
        self.assertEqual(self.counters.bad_frames, 0)

    def test_bad_lines_counted_and_skipped(self) -> None:
        bad = [
            b"not json",
            b'{"id":"m"}',
            frame("x").replace(b"heartbeat", b"HeartBeat"),
            b"\xff",
            b'{"id":"m","msg_type":"ack","from_peer":"p","timestamp":1.5,"payload":{}}',
        ]
        for line in bad:
            self.assertIsNone(self.filter.feed(line))
        self.assertEqual(self.counters.bad_frames, len(bad))
        self.assertEqual(len(self.reasons), len(bad))
        self.assertEqual(self.counters.frames_in, 0)
        # The link keeps working: the next good frame is delivered.
        self.assertIsNotNone(self.filter.feed(frame("m1")))
        self.assertEqual(self.counters.reasons["invalid JSON"], 1)
        self.assertEqual(self.counters.reasons["invalid UTF-8"], 1)

    def test_twenty_in_a_row_disconnect(self) -> None:
        for _ in range(MAX_BAD_STRIKES - 1):
            self.assertIsNone(self.filter.feed(b"garbage"))
        with self.assertRaises(Disconnect) as cm:
            self.filter.feed(b"garbage")
        self.assertIn("20 bad frames in a row", str(cm.exception))
        self.assertEqual(MAX_BAD_STRIKES, 20)

    def test_good_frame_resets_strikes(self) -> None:
        for round_ in range(3):
            for _ in range(MAX_BAD_STRIKES - 1):
                self.filter.feed(b"garbage")
            self.assertIsNotNone(self.filter.feed(frame(f"ok{round_}")))
        self.assertEqual(self.counters.bad_frames, 3 * (MAX_BAD_STRIKES - 1))

    def test_duplicate_counts_as_good_for_strikes(self) -> None:
        self.filter.feed(frame("dup"))
        for _ in range(MAX_BAD_STRIKES - 1):
            self.filter.feed(b"garbage")
        self.assertIsNone(self.filter.feed(frame("dup")))
        for _ in range(MAX_BAD_STRIKES - 1):
            self.filter.feed(b"garbage")

    def test_bad_called_directly_counts(self) -> None:
        """The protocol reports over-long lines through bad()."""
        for _ in range(MAX_BAD_STRIKES - 1):
            self.filter.bad("line too long")
        self.assertEqual(self.counters.reasons, {"line too long": MAX_BAD_STRIKES - 1})
        self.assertRaises(Disconnect, self.filter.bad, "line too long")

    def test_empty_and_whitespace_ignored(self) -> None:
        """Defect W3: an empty line is not EOF, and not a strike either."""
        for line in (b"", b"   ", b"\r", b"\t \r"):
            self.assertIsNone(self.filter.feed(line))
        for _ in range(MAX_BAD_STRIKES * 2):
            self.filter.feed(b"")
        self.assertEqual(self.counters.bad_frames, 0)
        self.assertIsNotNone(self.filter.feed(frame("m1")))

    def test_handshake_types_after_auth_ignored(self) -> None:
        for i, t in enumerate(sorted(codec.HANDSHAKE_TYPES)):
            self.assertIsNone(self.filter.feed(frame(f"h{i}", t)))
        self.assertEqual(self.counters.ignored, 3)
        self.assertEqual(self.counters.bad_frames, 0)

    def test_dedup(self) -> None:
        self.assertIsNotNone(self.filter.feed(frame("m1")))
        self.assertIsNone(self.filter.feed(frame("m1")))
        self.assertIsNotNone(self.filter.feed(frame("m2", codec.ACK, {"ack_id": "m1"})))
        self.assertEqual(self.counters.duplicates, 1)

    def test_dedup_per_peer(self) -> None:
        """Defect W8: one window per peer, so two peers may use the same id."""
        other_counters = LinkCounters()
        other = FrameFilter(Dedup(), other_counters)
        self.assertIsNotNone(self.filter.feed(frame("msg_1714000000000_0")))
        self.assertIsNotNone(other.feed(frame("msg_1714000000000_0")))
        # A replacement link of the same peer shares the peer's window.
        replacement = FrameFilter(self.dedup, LinkCounters())
        self.assertIsNone(replacement.feed(frame("msg_1714000000000_0")))


class LivenessTests(SynchronousTestCase):
    def test_deadline_three_intervals(self) -> None:
        clock = Clock()
        live = Liveness(clock.seconds, 30)
        self.assertEqual(live.deadline, 90)
        clock.advance(90)
        self.assertFalse(live.dead())  # strictly more than 3 x interval
        self.assertEqual(live.remaining(), 0)
        clock.advance(0.001)
        self.assertTrue(live.dead())

    def test_touch_extends(self) -> None:
        clock = Clock()
        live = Liveness(clock.seconds, 30)
        for _ in range(10):
            clock.advance(80)
            live.touch()
            self.assertFalse(live.dead())
        self.assertEqual(live.remaining(), 90)
        clock.advance(91)
        self.assertTrue(live.dead())

    def test_other_interval(self) -> None:
        clock = Clock()
        live = Liveness(clock.seconds, 5)
        clock.advance(15.5)
        self.assertTrue(live.dead())


class LongIdTests(SynchronousTestCase):
    def test_overlong_message_id_is_a_bad_frame(self) -> None:
        from claudectl.relay import codec
        from claudectl.relay.session import MAX_ID_CHARS, Dedup, FrameFilter, LinkCounters

        f = FrameFilter(Dedup(), LinkCounters())
        line = codec.encode(codec.Envelope("x" * (MAX_ID_CHARS + 1), "heartbeat", "p", 1, {}))
        self.assertIsNone(f.feed(line))
        self.assertEqual(f.counters.bad_frames, 1)
        self.assertEqual(len(f.dedup._ids), 0)


class BadRatioTests(SynchronousTestCase):
    """Issue 11 item 2: a high bad-frame ratio closes the link."""

    def test_one_valid_frame_every_nineteen_bad_lines_closes(self) -> None:
        f = FrameFilter(Dedup(), LinkCounters())
        sent = 0
        with self.assertRaises(Disconnect) as cm:
            for n in range(10_000):
                for _ in range(19):
                    sent += 1
                    f.feed(b"garbage")
                sent += 1
                f.feed(frame(f"ok{n}"))
        self.assertEqual(cm.exception.kind, "bad_frame_ratio")
        self.assertLessEqual(sent, BAD_RATIO_WINDOW + 1)
        self.assertIn(f"of the last {BAD_RATIO_WINDOW} frames were bad", str(cm.exception))

    def test_half_bad_is_tolerated_more_is_not(self) -> None:
        f = FrameFilter(Dedup(), LinkCounters())
        for n in range(1000):  # exactly half bad: never closed
            f.feed(b"garbage")
            f.feed(frame(f"ok{n}"))
        self.assertFalse(f.ratio_exceeded())
        g = FrameFilter(Dedup(), LinkCounters())
        with self.assertRaises(Disconnect):
            for n in range(1000):  # two bad for each good one
                g.feed(b"garbage")
                g.feed(b"garbage")
                g.feed(frame(f"ok{n}"))

    def test_early_bad_lines_do_not_close_a_young_link(self) -> None:
        f = FrameFilter(Dedup(), LinkCounters())
        for _ in range(MAX_BAD_STRIKES - 1):
            f.feed(b"garbage")
        for n in range(200):
            f.feed(frame(f"ok{n}"))
        self.assertFalse(f.ratio_exceeded())
        self.assertEqual(BAD_RATIO_WINDOW, 64)


class LogGateTests(SynchronousTestCase):
    """Issue 11 item 2: log lines a peer causes are rate-limited per peer."""

    def test_burst_then_summary_per_interval(self) -> None:
        gate = LogGate(burst=5, interval=60.0)
        allowed = [gate.allow(0.0) for _ in range(100)]
        self.assertEqual(allowed[:5], [(True, 0)] * 5)
        self.assertEqual(set(allowed[5:]), {(False, 0)})
        # The next window: the first line logged carries the count suppressed.
        self.assertEqual(gate.allow(60.0), (True, 95))
        self.assertEqual(gate.suppressed_total, 95)
        self.assertEqual(gate.pending(), 0)

    def test_filter_logs_at_most_a_burst_and_summarises(self) -> None:
        clock = Clock()
        logged: list[str] = []
        summaries: list[int] = []
        counters = LinkCounters()
        f = FrameFilter(
            Dedup(),
            counters,
            on_bad=logged.append,
            now=clock.seconds,
            on_suppressed=summaries.append,
        )
        for n in range(300):  # one bad line per two good ones: the link stays up
            f.feed(b"garbage")
            f.feed(frame(f"a{n}"))
            f.feed(frame(f"b{n}"))
        self.assertEqual(len(logged), LOG_BURST)
        self.assertEqual(summaries, [])
        clock.advance(LOG_INTERVAL_SECS)
        f.feed(b"garbage")
        self.assertEqual(summaries, [300 - LOG_BURST])
        self.assertEqual(len(logged), LOG_BURST + 1)
        f.feed(b"garbage")
        f.flush_suppressed()
        self.assertEqual(summaries, [300 - LOG_BURST])  # nothing more was suppressed
        # The budget is the peer's: a replacement link's filter shares it.
        g = FrameFilter(
            Dedup(),
            counters,
            on_bad=logged.append,
            now=clock.seconds,
            on_suppressed=summaries.append,
        )
        for _ in range(5):
            g.bad("line too long")
        g.flush_suppressed()
        self.assertEqual(len(logged), 2 * LOG_BURST)
        self.assertEqual(summaries, [300 - LOG_BURST, 2])


class FeedManyTests(SynchronousTestCase):
    """A whole read at once: the same counts, dedup and bad-frame rules as line by line."""

    def lines(self, *frames: bytes | None) -> list[bytes | None]:
        return [None if f is None else f.rstrip(b"\n") for f in frames]

    def test_heartbeat_runs_are_counted_each_and_delivered_once(self) -> None:
        counters = LinkCounters()
        ff = FrameFilter(Dedup(), counters)
        read = self.lines(
            frame("h1"),
            frame("h2"),
            frame("h2"),  # a duplicate
            frame("k1", codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}),
            frame("h3"),
        )
        envs, stop = ff.feed_many(read)
        self.assertIsNone(stop)
        self.assertEqual([e.id for e in envs], ["h2", "k1", "h3"])
        self.assertEqual(envs[0], codec.decode(frame("h2")))
        self.assertEqual((counters.frames_in, counters.duplicates), (5, 1))
        self.assertEqual(counters.bytes_in, sum(len(f) + 1 for f in read if f is not None))
        # Every id is remembered: a repeat in the next read is a duplicate.
        envs, _ = ff.feed_many(self.lines(frame("h1"), frame("h3")))
        self.assertEqual(envs, [])
        self.assertEqual(counters.duplicates, 3)

    def test_same_as_line_by_line_for_other_frames(self) -> None:
        read = self.lines(
            frame("a", codec.ACK, {"x": 1}),
            b"not json",
            b"",
            frame("b", codec.KNOWLEDGE_SYNC, {"units": []}),
            frame("a", codec.ACK, {"x": 1}),
        )
        one = FrameFilter(Dedup(), LinkCounters())
        many = FrameFilter(Dedup(), LinkCounters())
        by_line = [e for e in (one.feed(x) for x in read if x is not None) if e is not None]
        envs, stop = many.feed_many(read)
        self.assertIsNone(stop)
        self.assertEqual(envs, by_line)
        self.assertEqual(many.counters, one.counters)

    def test_bad_run_disconnects_after_delivering_what_came_before(self) -> None:
        ff = FrameFilter(Dedup(), LinkCounters(), max_strikes=3)
        read = self.lines(frame("h1"), b"x", b"y", None, b"never reached")
        envs, stop = ff.feed_many(read)
        self.assertEqual([e.id for e in envs], ["h1"])
        self.assertIsInstance(stop, Disconnect)
        self.assertEqual(ff.counters.bad_frames, 3)

    def test_good_heartbeats_reset_the_strikes_and_the_ratio_window(self) -> None:
        ff = FrameFilter(Dedup(), LinkCounters(), max_strikes=3, ratio_window=8)
        _envs, stop = ff.feed_many(self.lines(b"x", b"y"))
        self.assertIsNone(stop)
        self.assertEqual(ff._recent_bad, 2)
        _envs, stop = ff.feed_many(self.lines(*[frame(f"h{i}") for i in range(10)]))
        self.assertIsNone(stop)
        self.assertEqual((ff._strikes, ff._recent_bad, len(ff._recent)), (0, 0, 8))
        _envs, stop = ff.feed_many(self.lines(b"x", b"y"))
        self.assertIsNone(stop)  # two strikes again, not four
