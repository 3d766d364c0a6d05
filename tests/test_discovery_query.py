"""
Tests for discovery on demand (claudectl.discovery.query and the query
parts of claudectl.discovery.protocol), the announcer's single warning, and
a fuzz run over every datagram parser and DatagramProtocol.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.config import RelayConfig
from claudectl.discovery.beacon import (
    MAX_DATAGRAM_BYTES,
    BeaconError,
    DiscoveryTable,
    encode_beacon,
    parse_beacon,
)
from claudectl.discovery.protocol import (
    DROP_LOG_EVERY_SECS,
    Announcer,
    BeaconListener,
    QueryResponder,
    QuerySender,
    announcer_service,
    scan,
)
from claudectl.discovery.query import (
    ANSWER_WINDOW_SECS,
    ANSWERS_PER_SOURCE,
    QUERY_BYTES,
    QUERY_MAGIC,
    AnswerLimiter,
    QueryAnswerer,
    encode_query,
    parse_query,
    query_port,
)
from tests.test_discovery import RecordingTransport, UDPClock

BEACON = encode_beacon("desk-1", 9847, "0.64.0")
#: The datagram of issue 11 item 10: 1,004 bytes, nested 1,000 deep.
NESTED = b"CCTL" + b"[" * 1000


def free_port_pair() -> int:
    """A UDP port p on loopback such that p and p + 1 are both free."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of UDP ports")


class QueryFormat(SynchronousTestCase):
    def test_query_bytes(self) -> None:
        q = encode_query()
        self.assertEqual(len(q), QUERY_BYTES)
        self.assertTrue(q.startswith(b'CCTQ{"v":1}'))
        self.assertEqual(q[len(b'CCTQ{"v":1}') :], b" " * (QUERY_BYTES - 11))
        parse_query(q)

    def test_never_listed_as_an_instance(self) -> None:
        """claudectl's scanner needs the CCTL magic (pairing.md 7); so does ours."""
        q = encode_query()
        self.assertFalse(q.startswith(b"CCTL"))
        self.assertEqual(self.assertRaises(BeaconError, parse_beacon, q).reason, "no magic")
        table = DiscoveryTable()
        self.assertIsNone(table.observe(q, ("10.0.0.1", 40000), 0.0))
        self.assertEqual(table.rows(0.0), [])

    def test_query_port(self) -> None:
        self.assertEqual(query_port(9848), 9849)
        self.assertIsNone(query_port(65535))
        self.assertIsNone(query_port(0))

    def test_rejects(self) -> None:
        def reason(data: bytes) -> str:
            return self.assertRaises(BeaconError, parse_query, data).reason

        self.assertEqual(reason(BEACON), "no magic")
        self.assertEqual(reason(b"CCTQ"), "no magic")
        self.assertEqual(reason(b"CCTQ[1]"), "not an object")
        self.assertEqual(reason(b"CCTQ\xff\xfe"), "not json")
        self.assertEqual(reason(b"CCTQ" + b"[" * 1000), "too nested")
        self.assertEqual(reason(encode_query() + b" " * MAX_DATAGRAM_BYTES), "oversized")
        parse_query(b'CCTQ{"v":2,"future":[1,2]}')  # members are reserved, ignored


class DocumentedNumbers(SynchronousTestCase):
    """docs/pairing.md describes the query for other implementations: keep it true."""

    def test_doc_matches_the_code(self) -> None:
        from pathlib import Path

        from claudectl.discovery import beacon, protocol, query

        doc = " ".join(
            (Path(__file__).parent.parent / "docs" / "pairing.md")
            .read_text(encoding="utf-8")
            .split()
        )
        longest = encode_beacon("x" * 128, 65535, "0.64.0")
        for text in (
            "padding the datagram to **256 bytes**",
            'we send `{"v":1}`',
            f"nested at most {beacon.MAX_JSON_DEPTH} deep",
            f"our beacon is at most {len(longest)} bytes",
            f"fewer than {query.ANSWERS_PER_SOURCE} answers in the current "
            f"{query.ANSWER_WINDOW_SECS:g} s window, and fewer than {query.ANSWERS_TOTAL} "
            f"answers in all (it tracks at most {query.MAX_TRACKED_SOURCES} source",
            f"the query's source port is {query.MIN_SOURCE_PORT}–65535",
            f"again after {protocol.QUERY_REPEAT_AFTER_SECS:g} s",
        ):
            self.assertIn(text, doc)
        self.assertEqual(encode_query(), b'CCTQ{"v":1}'.ljust(QUERY_BYTES))
        self.assertEqual(QUERY_BYTES, 256)


class Answering(SynchronousTestCase):
    def answer(
        self,
        a: QueryAnswerer,
        data: bytes = b"",
        source: tuple[str, int] = ("10.0.0.9", 40000),
        now: float = 0.0,
        beacon: bytes | None = BEACON,
    ) -> bytes | None:
        return a.answer(data or encode_query(), source, lambda: beacon, now)

    def test_answers_with_the_beacon(self) -> None:
        a = QueryAnswerer()
        self.assertEqual(self.answer(a), BEACON)
        self.assertEqual(a.answered, 1)

    def test_never_larger_than_the_query(self) -> None:
        a = QueryAnswerer()
        short = b"CCTQ{}"
        self.assertIsNone(self.answer(a, short))
        self.assertEqual(a.dropped, {"query too short": 1})
        exact = b"CCTQ{}" + b" " * (len(BEACON) - 6)
        self.assertEqual(self.answer(a, exact), BEACON)

    def test_privileged_and_zero_source_ports_get_nothing(self) -> None:
        a = QueryAnswerer()
        for port in (0, 7, 53, 1023):
            self.assertIsNone(self.answer(a, source=("10.0.0.9", port)))
        self.assertEqual(self.answer(a, source=("10.0.0.9", 1024)), BEACON)

    def test_nothing_before_the_relay_listens(self) -> None:
        a = QueryAnswerer()
        self.assertIsNone(self.answer(a, beacon=None))
        self.assertEqual(a.dropped, {"not listening yet": 1})

    def test_per_source_rate_limit(self) -> None:
        a = QueryAnswerer()
        got = [self.answer(a, now=0.1 * i) for i in range(ANSWERS_PER_SOURCE + 5)]
        self.assertEqual(sum(g is not None for g in got), ANSWERS_PER_SOURCE)
        self.assertIsNotNone(
            self.answer(a, source=("10.0.0.10", 40000), now=1.0),
            "another source has its own budget",
        )
        self.assertIsNotNone(self.answer(a, now=ANSWER_WINDOW_SECS + 0.1))

    def test_total_and_source_table_bounds(self) -> None:
        limiter = AnswerLimiter(per_source=2, total=5, window=10.0, max_sources=3)
        allowed = [limiter.allow(f"10.0.0.{i}", 0.0) for i in range(10)]
        self.assertEqual(allowed, [True, True, True] + [False] * 7)
        self.assertEqual(sum(limiter.allow("10.0.0.1", 1.0) for _ in range(5)), 1)
        self.assertTrue(limiter.allow("10.0.0.1", 1.0) is False)
        self.assertTrue(limiter.allow("10.0.0.99", 10.0), "a new window, the table expired")

    @given(
        data=st.binary(max_size=1100) | st.integers(0, 400).map(lambda n: b"CCTQ{}" + b" " * n),
        port=st.integers(0, 65535),
        repeats=st.integers(1, 30),
    )
    def test_no_amplification(self, data: bytes, port: int, repeats: int) -> None:
        """Bytes out never exceed bytes in, for any datagram, however often sent."""
        a = QueryAnswerer()
        sent = 0
        for i in range(repeats):
            for d in (data, QUERY_MAGIC + data):
                out = a.answer(d, ("10.0.0.9", port), lambda: BEACON, i * 0.01)
                if out is not None:
                    self.assertLessEqual(len(out), len(d))
                    sent += 1
        self.assertLessEqual(sent, ANSWERS_PER_SOURCE)


class Responder(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = QueryResponder(lambda: BEACON, self.clock)
        self.transport = FakeDatagramTransport()
        self.proto.makeConnection(self.transport)

    def test_answer_goes_to_the_querier(self) -> None:
        self.proto.datagramReceived(encode_query(), ("192.168.1.7", 51234))
        self.assertEqual(self.transport.written, [(BEACON, ("192.168.1.7", 51234))])

    def test_junk_is_dropped_with_one_debug_line(self) -> None:
        with capturedLogs() as events:
            for i in range(1000):
                self.proto.datagramReceived(NESTED if i % 2 else b"x" * i, ("10.0.0.1", 4000))
        self.assertEqual(self.transport.written, [])
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.debug)
        with capturedLogs() as events:
            self.clock.advance(DROP_LOG_EVERY_SECS - 1)
            self.proto.datagramReceived(b"junk", ("10.0.0.1", 4000))
            self.clock.advance(1)
            self.proto.datagramReceived(b"junk", ("10.0.0.1", 4000))
        # The first drop was logged at once; the next line, 10 s later, counts the rest.
        self.assertEqual([e["count"] for e in events], [999 + 2])

    def test_send_errors_are_dropped(self) -> None:
        self.transport.write = lambda *a: (_ for _ in ()).throw(OSError(101, "unreachable"))
        self.proto.datagramReceived(encode_query(), ("192.168.1.7", 51234))  # no exception


class ScanUnit(SynchronousTestCase):
    def test_query_sent_at_once_and_repeated_once(self) -> None:
        clock = UDPClock()
        cfg = RelayConfig(lan_broadcast_addr="10.1.255.255", lan_broadcast_port=9848)
        d = scan(clock, cfg, 3.0, "me-1")
        [(port, sender, udp, transport)] = clock.udp
        self.assertIsInstance(sender, QuerySender)
        self.assertEqual(port, 0, "queries leave from an ephemeral port, answers come back there")
        self.assertTrue(transport.broadcast)
        self.assertEqual(transport.written, [(encode_query(), ("10.1.255.255", 9849))])
        clock.advance(1.0)
        self.assertEqual(len(transport.written), 2)
        sender.datagramReceived(BEACON, ("10.1.0.7", 9849))
        clock.advance(2.0)
        self.assertEqual(len(transport.written), 2)
        rows = self.successResultOf(d)
        self.assertEqual([r.address for r in rows], ["10.1.0.7:9847"])
        self.assertTrue(udp.stopped)
        self.assertTrue(all(p.stopped for _, _, p, _ in clock.shared))

    def test_no_query_when_asked(self) -> None:
        clock = UDPClock()
        d = scan(clock, RelayConfig(), 1.0, None, query=False)
        self.assertEqual(clock.udp, [])
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), [])


class FailingTransport(RecordingTransport):
    def write(self, packet: bytes, addr: Any = None) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        super().write(packet, addr)


class AnnouncerWarnsOnce(SynchronousTestCase):
    def test_one_warning_per_failing_streak(self) -> None:
        a = Announcer(("255.255.255.255", 9848), "desk-1", 9847)
        t = FailingTransport(fail_with=OSError(101, "Network is unreachable"))
        a.makeConnection(t)
        with capturedLogs() as events:
            for _ in range(30):  # five minutes of 10 s announcements
                a.announce()
        self.assertEqual(
            [e["log_level"] for e in events if e["log_level"] > LogLevel.debug], [LogLevel.warn]
        )
        self.assertEqual(a.errors, 30)
        with capturedLogs() as events:
            t.fail_with = None
            a.announce()
            a.announce()
        self.assertEqual([e["log_level"] for e in events], [LogLevel.info])
        self.assertIn("work again", events[0]["log_format"])
        with capturedLogs() as events:
            t.fail_with = OSError(101, "Network is unreachable")
            a.announce()
            a.announce()
        self.assertEqual(
            [e["log_level"] for e in events if e["log_level"] > LogLevel.debug],
            [LogLevel.warn],
            "a new streak warns again",
        )


class BusyQueryPort(SynchronousTestCase):
    def test_busy_port_is_one_warning_and_announcing_goes_on(self) -> None:
        clock = UDPClock()
        clock.busy.add(9849)
        with capturedLogs() as events:
            svc = announcer_service(RelayConfig(), "desk-1", 9847, clock)
            svc.startService()
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("cannot answer LAN discovery queries", warnings[0]["log_format"])
        [(_, _, _, transport)] = clock.udp
        self.assertEqual(len(transport.written), 1, "the announcement still went out")
        self.successResultOf(svc.stopService())


# --- fuzz ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


DATAGRAMS = st.one_of(
    st.binary(max_size=2000),
    st.tuples(st.sampled_from([b"CCTL", b"CCTQ", b"CCT", b""]), st.binary(max_size=1100)).map(
        lambda t: t[0] + t[1]
    ),
    st.tuples(st.sampled_from([b"CCTL", b"CCTQ"]), JSON.map(_json_bytes)).map(
        lambda t: t[0] + t[1]
    ),
    # Deep nesting; a datagram over 1024 bytes is refused before decoding.
    st.tuples(
        st.sampled_from([b"CCTL", b"CCTQ"]),
        st.integers(1, 1100) | st.integers(995, 1020),
        st.sampled_from([b"[", b'{"a":', b'[{"identity":']),
    ).map(lambda t: t[0] + t[2] * t[1]),
    st.fixed_dictionaries({"identity": JSON, "port": JSON, "version": JSON}).map(
        lambda d: b"CCTL" + _json_bytes(d)
    ),
    st.just(NESTED),
)
ADDRS = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))


class Fuzz(SynchronousTestCase):
    """Every datagram reaches every parser and protocol; nothing escapes."""

    @settings(max_examples=400, deadline=None)
    @given(datagrams=st.lists(DATAGRAMS, min_size=1, max_size=8), addr=ADDRS)
    def test_protocols_never_raise(self, datagrams: list[bytes], addr: tuple[str, int]) -> None:
        clock = Clock()
        table = DiscoveryTable("me-1")
        listener = BeaconListener(table, clock)
        sender = QuerySender(DiscoveryTable("me-1"), clock, ("127.255.255.255", 9849))
        sender.makeConnection(RecordingTransport())
        responder = QueryResponder(lambda: BEACON, clock)
        out = FakeDatagramTransport()
        responder.makeConnection(out)
        with capturedLogs() as events:
            for data in datagrams:
                for proto in (listener, sender, responder):
                    proto.datagramReceived(data, addr)
                clock.advance(0.5)
        self.assertEqual(
            [e for e in events if e["log_level"] > LogLevel.debug or "log_failure" in e], []
        )
        self.assertLessEqual(len(events), 3 * len(datagrams))
        for packet, to in out.written:
            self.assertEqual(to, addr)
            self.assertLessEqual(len(packet), max(len(d) for d in datagrams))
        for row in table.rows(clock.seconds()):
            self.assertTrue(row.version.isprintable())

    @settings(max_examples=300, deadline=None)
    @given(DATAGRAMS)
    def test_parsers_raise_only_beacon_error(self, data: bytes) -> None:
        for parse in (parse_beacon, parse_query):
            try:
                parse(data)
            except BeaconError:
                pass

    def test_the_nested_datagram_of_issue_11(self) -> None:
        self.assertEqual(len(NESTED), 1004)
        table = DiscoveryTable()
        with capturedLogs() as events:
            BeaconListener(table, Clock()).datagramReceived(NESTED, ("10.0.0.1", 9848))
        self.assertEqual(table.rejected, {"too nested": 1})
        self.assertEqual([e["log_level"] for e in events], [LogLevel.debug])


# --- real UDP on loopback ----------------------------------------------------------------


class OnDemandLoopback(TestCase):
    """Instances that announce every 600 s, found by a 1 s scan over real UDP."""

    timeout = 30

    def config(self, port: int) -> RelayConfig:
        return RelayConfig(
            lan_broadcast_addr="127.255.255.255", lan_broadcast_port=port, lan_announce_interval=600
        )

    def start(self, cfg: RelayConfig, identity: str, tcp_port: int) -> Any:
        svc = announcer_service(cfg, identity, tcp_port, reactor)
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    @defer.inlineCallbacks
    def test_rare_announcers_are_found_by_a_short_scan(self) -> Any:
        port = free_port_pair()
        cfg = self.config(port)
        svcs = [self.start(cfg, f"peer-{i}", 9870 + i) for i in range(3)]
        self.start(cfg, "me-0000", 9869)  # the scanning machine's own service
        # Their one announcement at start is over; the next is 10 minutes away.
        yield deferLater(reactor, 0.5, lambda: None)
        passive, active = yield defer.gatherResults(
            [
                scan(reactor, cfg, 1.0, "me-0000", query=False),
                scan(reactor, cfg, 1.0, "me-0000"),
            ]
        )
        self.assertEqual(passive, [], "nobody announced during the scan")
        self.assertEqual(
            [(r.identity, r.address, r.version) for r in active],
            [(f"peer-{i}", f"127.0.0.1:{9870 + i}", "0.64.0") for i in range(3)],
        )
        self.assertTrue(
            all(s.responder.answerer.answered >= 1 for s in svcs),
            "all three share the query port and each answered",
        )

    @defer.inlineCallbacks
    def test_answer_is_unicast_to_the_querier(self) -> Any:
        port = free_port_pair()
        svc = self.start(self.config(port), "desk-1", 9847)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        s.sendto(encode_query(), ("127.0.0.1", port + 1))
        s.sendto(b"CCTQ" + b"[" * 1000, ("127.0.0.1", port + 1))
        s.sendto(NESTED, ("127.0.0.1", port + 1))  # a beacon is not a query
        s.sendto(b"CCTQ{}", ("127.0.0.1", port + 1))  # shorter than the answer
        yield deferLater(reactor, 0.5, lambda: None)
        got = []
        while True:
            try:
                got.append(s.recv(2048))
            except BlockingIOError:
                break
        self.assertEqual(got, [encode_beacon("desk-1", 9847, "0.64.0")])
        self.assertEqual(
            svc.responder.answerer.dropped, {"too nested": 1, "no magic": 1, "query too short": 1}
        )

    @defer.inlineCallbacks
    def test_scan_survives_the_nested_datagram(self) -> Any:
        port = free_port_pair()
        d = scan(reactor, self.config(port), 0.5, None)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(NESTED, ("127.0.0.1", port))
            s.sendto(b"CCTL" + b"\xff" * 500, ("127.0.0.1", port))
            s.sendto(encode_beacon("ok-1", 9847, "0.64.0"), ("127.0.0.1", port))
        rows = yield d
        self.assertEqual([r.identity for r in rows], ["ok-1"])
