"""Tests for claudectl.discovery.beacon: the CCTL datagram and the scanner table."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.discovery.beacon import (
    MAX_DATAGRAM_BYTES,
    MAX_JSON_DEPTH,
    Beacon,
    BeaconError,
    DiscoveryTable,
    Row,
    connect_address,
    encode_beacon,
    parse_beacon,
)
from tests.common import vector

IDENTITY = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True).filter(lambda s: s != "_pending")


class BeaconVectors(SynchronousTestCase):
    def test_announcement(self) -> None:
        v = vector("pairing.lan.announcement")
        i = v["input"]
        data = encode_beacon(i["identity"], i["port"], i["version"])
        self.assertEqual(data, v["expected"]["datagram_utf8"].encode("utf-8"))
        self.assertEqual(parse_beacon(data), Beacon(i["identity"], i["port"], i["version"]))
        self.assertEqual(v["expected"]["udp_port"], 9848)

    def test_rejects(self) -> None:
        for text in vector("pairing.lan.reject")["input"]["datagrams_utf8"]:
            self.assertRaises(BeaconError, parse_beacon, text.encode("utf-8"))

    def test_connect_address(self) -> None:
        v = vector("pairing.lan.connect_address")
        host, port = v["input"]["source"].rsplit(":", 1)
        table = DiscoveryTable()
        row = table.observe(
            encode_beacon("laptop-1", v["input"]["announced_port"], "0.64.0"),
            (host, int(port)),
            0.0,
        )
        self.assertEqual(row.address, v["expected"]["connect_addr"])
        self.assertEqual(connect_address("fe80::1", 9847), "[fe80::1]:9847")

    def test_staleness(self) -> None:
        v = vector("pairing.lan.staleness")
        after = v["input"]["stale_after_secs"]
        for ago, stale in zip(v["input"]["seen_secs_ago"], v["expected"]["stale"], strict=True):
            row = Row("x-1", "10.0.0.1", 9847, "0.64.0", last_seen=1000.0)
            self.assertEqual(row.is_stale(1000.0 + ago, after), stale)


class Parsing(SynchronousTestCase):
    def reason(self, data: bytes) -> str:
        return self.assertRaises(BeaconError, parse_beacon, data).reason

    def test_claudectl_leniency(self) -> None:
        # Extra keys and any key order are fine; version is optional.
        b = parse_beacon(b'CCTL{"type":"announce","port":9847,"identity":"a-1","paired_count":2}')
        self.assertEqual(b, Beacon("a-1", 9847, "unknown"))
        self.assertEqual(
            parse_beacon(b'CCTL{"identity":"a-1","port":1,"version":7}').version, "unknown"
        )
        self.assertEqual(parse_beacon(b'CCTL {"identity":"a-1","port":1}\n').identity, "a-1")

    def test_reasons(self) -> None:
        self.assertEqual(self.reason(b"CCTL" + b" " * MAX_DATAGRAM_BYTES), "oversized")
        self.assertEqual(self.reason(b"CCTX{}"), "no magic")
        self.assertEqual(self.reason(b"CCTL"), "no magic")
        self.assertEqual(self.reason(b"CCTL{}{}"), "not json")
        self.assertEqual(self.reason(b"CCTL\xff"), "not json")
        self.assertEqual(self.reason(b"CCTL[1]"), "not an object")
        self.assertEqual(self.reason(b'CCTL{"port":1}'), "no identity")
        self.assertEqual(self.reason(b'CCTL{"identity":"a\\u001b[31m","port":1}'), "bad identity")
        self.assertEqual(self.reason(b'CCTL{"identity":"_pending","port":1}'), "bad identity")
        self.assertEqual(self.reason(b'CCTL{"identity":"a-1","port":"9847"}'), "no port")
        self.assertEqual(self.reason(b'CCTL{"identity":"a-1","port":true}'), "no port")
        self.assertEqual(self.reason(b'CCTL{"identity":"a-1","port":9847.0}'), "no port")
        self.assertEqual(self.reason(b'CCTL{"identity":"a-1","port":75383}'), "bad port")
        self.assertEqual(self.reason(b'CCTL{"identity":"a-1","port":0}'), "bad port")

    def test_nesting(self) -> None:
        """Issue 11: a 1,004-byte datagram nested 1,000 deep raised RecursionError."""
        self.assertEqual(self.reason(b"CCTL" + b"[" * 1000), "too nested")
        self.assertEqual(
            self.reason(b"CCTL" + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH), "not an object"
        )
        deep = b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1)
        self.assertEqual(self.reason(b"CCTL" + deep), "too nested")
        # Brackets inside strings are text, not nesting (claudectl accepts these).
        b = parse_beacon(b'CCTL{"identity":"a-1","port":1,"version":"' + b'[{\\"' * 40 + b'"}')
        self.assertEqual(b.identity, "a-1")

    def test_version_is_made_printable(self) -> None:
        b = parse_beacon(
            b'CCTL{"identity":"a-1","port":1,"version":"1.0\\u001b[2J' + b"x" * 60 + b'"}'
        )
        self.assertTrue(b.version.isprintable())
        self.assertLessEqual(len(b.version), 32)

    @given(
        identity=IDENTITY,
        port=st.integers(1, 65535),
        version=st.text(
            alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20
        ),
    )
    def test_roundtrip(self, identity: str, port: int, version: str) -> None:
        data = encode_beacon(identity, port, version)
        self.assertEqual(parse_beacon(data), Beacon(identity, port, version))
        self.assertEqual(list(json.loads(data[4:])), ["identity", "port", "version"])

    @given(st.binary(max_size=1100))
    def test_arbitrary_bytes_raise_only_beacon_error(self, data: bytes) -> None:
        try:
            parse_beacon(b"CCTL" + data)
        except BeaconError:
            pass


class Table(SynchronousTestCase):
    def test_one_row_per_identity_latest_wins(self) -> None:
        t = DiscoveryTable(own_identity="me-1")
        t.observe(encode_beacon("b-2", 9847, "0.64.0"), ("10.0.0.2", 9848), 1.0)
        t.observe(encode_beacon("a-1", 9847, "0.63.0"), ("10.0.0.1", 9848), 2.0)
        t.observe(encode_beacon("a-1", 9900, "0.64.0"), ("10.0.0.9", 40000), 3.0)
        rows = t.rows(4.0)
        self.assertEqual(
            [(r.identity, r.address, r.version) for r in rows],
            [("a-1", "10.0.0.9:9900", "0.64.0"), ("b-2", "10.0.0.2:9847", "0.64.0")],
        )
        self.assertEqual(t.accepted, 3)

    def test_leaves_itself_out(self) -> None:
        t = DiscoveryTable(own_identity="me-1")
        self.assertIsNone(t.observe(encode_beacon("me-1", 9847, "x"), ("10.0.0.1", 1), 0.0))
        self.assertEqual(t.rows(0.0), [])

    def test_counts_rejections(self) -> None:
        t = DiscoveryTable()
        for data in (b"BADDATA", b"", b"CCT", b"CCTLnot json", b"CCTL" + b"x" * 2000):
            self.assertIsNone(t.observe(data, ("10.0.0.1", 1), 0.0))
        self.assertEqual(t.rejected_total, 5)
        self.assertEqual(t.rejected["no magic"], 3)
        self.assertEqual(t.rejected["oversized"], 1)
        self.assertEqual(t.rows(0.0), [])

    def test_bounded(self) -> None:
        """A flood of made-up identities stops at max_rows; known ones still update."""
        t = DiscoveryTable(max_rows=3)
        for i in range(10):
            t.observe(encode_beacon(f"fake-{i}", 9847, "x"), ("10.0.0.66", 1), 0.0)
        self.assertEqual([r.identity for r in t.rows(0.0)], ["fake-0", "fake-1", "fake-2"])
        self.assertEqual(t.rejected["table full"], 7)
        t.observe(encode_beacon("fake-1", 9900, "x"), ("10.0.0.66", 1), 1.0)
        self.assertEqual(t.rows(1.0)[1].port, 9900)
        t.observe(encode_beacon("new-1", 9847, "x"), ("10.0.0.7", 1), 30.5)
        self.assertEqual(
            [r.identity for r in t.rows(30.5)], ["fake-1", "new-1"], "stale rows make room"
        )

    def test_stale_rows_forgotten(self) -> None:
        t = DiscoveryTable()
        t.observe(encode_beacon("a-1", 9847, "x"), ("10.0.0.1", 1), 0.0)
        t.observe(encode_beacon("b-1", 9847, "x"), ("10.0.0.2", 1), 20.0)
        self.assertEqual([r.identity for r in t.rows(30.0)], ["a-1", "b-1"])
        self.assertEqual([r.identity for r in t.rows(31.0)], ["b-1"])

    def test_json_view(self) -> None:
        row = Row("a-1", "10.0.0.1", 9847, "0.64.0", 0.0)
        self.assertEqual(
            row.to_json(), {"identity": "a-1", "addr": "10.0.0.1:9847", "version": "0.64.0"}
        )
