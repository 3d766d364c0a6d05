"""
Hostile peers and faults in the hive (issue 11): snapshot buffers bounded in
bytes, a daily cap that counts new units only, collision freezes that need
more than one unit, and delivery that counts only what a peer has.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config, HiveConfig
from claudectl.hive import gossip as G
from claudectl.hive.gossip import Gossip
from claudectl.hive.trust import load_trust
from claudectl.hive.units import KnowledgeUnit
from claudectl.relay.keystore import KeyStore
from tests.common import FakeMesh, temp_home
from tests.test_gossip import NOW, ack_all, put, stored, unit_json
from tests.test_hive_cli import run


def make(
    testcase: Any, home: Any = None, clock: Clock | None = None, **hive: Any
) -> tuple[Any, FakeMesh, Gossip]:
    home = home or temp_home(testcase)
    config = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), **hive))
    mesh = FakeMesh("me-1")
    g = Gossip(
        home,
        config,
        mesh,
        "me-1",
        clock.seconds if clock else (lambda: NOW),
        clock.callLater if clock else None,
    )
    g.register()
    return home, mesh, g


def sent_ids(mesh: FakeMesh, peer: str, msg_type: str = "knowledge_sync") -> list[str]:
    return [u["id"] for (to, t, p) in mesh.sent if to == peer and t == msg_type for u in p["units"]]


class SnapshotBudgetTests(SynchronousTestCase):
    """Item 1: what a peer's snapshot pages may hold in memory, in bytes."""

    def test_endless_big_pages_drop_the_buffer_and_the_link(self) -> None:
        home, mesh, g = make(self)
        mesh.connect("evil")
        junk = ["x" * 100_000] * 10  # ~1 MB of page, every entry invalid
        peak = 0
        with capturedLogs() as events:
            for n in range(1, 200):
                if "evil" not in mesh.peers:
                    break
                mesh.deliver(
                    "evil", "knowledge_snapshot", {"page": n, "total_pages": 10**9, "units": junk}
                )
                peak = max(peak, g.buffered_bytes("evil"))
        # Bounded in bytes: never much more than the flush threshold plus one page.
        self.assertLessEqual(peak, G.SNAPSHOT_FLUSH_BYTES + 1_100_000)
        self.assertEqual(mesh.closed, [("evil", "snapshot budget exceeded")])
        self.assertEqual(g._pages.get("evil"), None)
        self.assertEqual(g.buffered_bytes("evil"), 0)
        # Budget / ~1 MB pages: about 64 pages were read, not 200.
        self.assertLess(n, 80)
        lines = [e for e in events if "snapshot pages" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["log_level"], LogLevel.warn)

    def test_pages_of_empty_lists_grow_neither_memory_nor_the_log(self) -> None:
        home, mesh, g = make(self)
        mesh.connect("evil")
        entries = [[]] * 100_000  # 200 KB on the wire, millions of objects if kept
        with capturedLogs() as events:
            for n in range(1, 100):
                if "evil" not in mesh.peers:
                    break
                mesh.deliver(
                    "evil",
                    "knowledge_snapshot",
                    {"page": n, "total_pages": 10**9, "units": entries},
                )
                # The buffer is charged per entry: it never holds more than
                # the flush threshold's worth of entries plus one page.
                self.assertLessEqual(len(g._pages.get("evil", [])), 2 * len(entries))
        self.assertEqual(mesh.closed, [("evil", "snapshot budget exceeded")])
        # One line per merged batch, not one per bad entry.
        self.assertLess(len(events), 50)
        self.assertEqual(stored(home), {})

    def test_empty_pages_never_end(self) -> None:
        home, mesh, g = make(self)
        mesh.connect("evil")
        pages = G.SNAPSHOT_BUDGET_BYTES // G.SNAPSHOT_PAGE_CHARGE + 10
        for n in range(1, pages):
            if "evil" not in mesh.peers:
                break
            mesh.deliver(
                "evil", "knowledge_snapshot", {"page": n, "total_pages": 10**9, "units": []}
            )
        self.assertEqual(mesh.closed, [("evil", "snapshot budget exceeded")])

    def test_a_big_honest_snapshot_is_merged_in_parts(self) -> None:
        home, mesh, g = make(self, max_units=0, max_units_per_peer_per_day=100_000)
        mesh.connect("p")
        units = [
            unit_json(f"ku_{i}", "p", cmd=f"some command number {i} " + "y" * 400)
            for i in range(12_000)
        ]
        pages = G._paginate([(u, u.wire_size) for u in map(KnowledgeUnit.from_json, units)])
        for n, page in enumerate(pages, 1):
            mesh.deliver(
                "p",
                "knowledge_snapshot",
                {"page": n, "total_pages": len(pages), "units": [u.to_json() for u, _ in page]},
            )
            self.assertLessEqual(g.buffered_bytes("p"), G.SNAPSHOT_FLUSH_BYTES + 600_000)
        self.assertEqual(mesh.closed, [])
        self.assertEqual(len(stored(home)), 12_000)
        self.assertGreater(g.counters["merged_batches"], 1)


class DailyCapTests(SynchronousTestCase):
    """Item 7: the cap counts new units; crossing it freezes the sender."""

    def test_duplicates_and_echoes_do_not_use_up_the_cap(self) -> None:
        home, mesh, g = make(self, max_units_per_peer_per_day=10)
        put(home, "me-1", unit_json("ku_mine", "me-1", cmd="mine"))
        mesh.connect("p")
        batch = [unit_json(f"ku_{i}", "p", cmd=f"cmd {i}") for i in range(8)]
        echo = unit_json("ku_mine", "me-1", cmd="mine", hops=1)
        for _ in range(3):  # a claudectl peer resends its whole store on reconnect
            mesh.deliver("p", "knowledge_sync", {"sync_epoch": NOW, "units": batch + [echo]})
        g.flush_counts()
        fresh = [unit_json(f"ku_new{i}", "p", cmd=f"new {i}") for i in range(2)]
        mesh.deliver("p", "knowledge_sync", {"sync_epoch": NOW, "units": fresh})
        self.assertIn("ku_new1", stored(home))
        self.assertEqual(g.counters["dropped_rate_cap"], 0)
        g.flush_counts()
        rec = load_trust(home).get("p")
        assert rec is not None
        self.assertEqual(rec.daily_received[str(NOW // 86400)], 10)
        self.assertFalse(rec.frozen)

    def test_crossing_the_cap_freezes_the_sender(self) -> None:
        home, mesh, g = make(self, max_units_per_peer_per_day=10)
        KeyStore(home).ensure_identity()
        mesh.connect("p")
        batch = [unit_json(f"ku_{i}", "p", cmd=f"cmd {i}") for i in range(12)]
        mesh.deliver("p", "knowledge_sync", {"sync_epoch": NOW, "units": batch})
        self.assertEqual(len(stored(home)), 10)
        self.assertEqual(g.counters["dropped_rate_cap"], 2)
        rec = load_trust(home).get("p")
        assert rec is not None
        self.assertTrue(rec.frozen)
        self.assertTrue((rec.freeze_reason or "").startswith("rate cap exceeded"))
        # Visible in `hive trust`.
        code, out, err = run(home, "hive", "trust", "p")
        self.assertEqual(code, 0, err)
        self.assertIn("frozen", out)
        # The two cut units were not acknowledged: the sender offers them again.
        [ack] = [p for (to, t, p) in mesh.sent if t == "ack"]
        self.assertEqual([i for i, _ in ack["knowledge"]], [f"ku_{i}" for i in range(10)])


class DeliveryTests(SynchronousTestCase):
    """Items 8 and 12: a unit counts as delivered only when the peer has it."""

    def test_unit_queued_when_the_link_drops_is_sent_again(self) -> None:
        home, mesh, g = make(self)
        put(home, "me-1", unit_json("ku_1", "me-1"))
        mesh.connect("p")
        self.assertEqual(sent_ids(mesh, "p"), ["ku_1"])
        mesh.disconnect("p")  # the frame was still queued: no ack came
        mesh.sent.clear()
        mesh.connect("p")
        self.assertEqual(sent_ids(mesh, "p"), ["ku_1"])
        # Acknowledged now: never again.
        ack_all(mesh, "p")
        mesh.disconnect("p")
        mesh.sent.clear()
        mesh.connect("p")
        self.assertEqual(sent_ids(mesh, "p"), [])

    def test_restart_reoffers_unacknowledged_units(self) -> None:
        home, mesh, g = make(self)
        put(home, "me-1", unit_json("ku_1", "me-1"), unit_json("ku_2", "me-1", cmd="ls"))
        mesh.connect("p")
        mesh.deliver("p", "ack", {"ack_id": "m", "knowledge": [["ku_1", 1]]})
        g.stop()
        state = json.loads((home.hive / "sync_state.json").read_text())
        self.assertEqual(state["p"]["units_sent"], ["ku_1"])
        # kill -9 and a new process on the same home.
        _, mesh2, g2 = make(self, home=home)
        mesh2.connect("p")
        self.assertEqual(sent_ids(mesh2, "p"), ["ku_2"])

    def test_request_is_answered_from_what_the_peer_has(self) -> None:
        home, mesh, g = make(self)
        put(home, "me-1", unit_json("ku_1", "me-1", validated=NOW - 10))
        mesh.connect("p")
        mesh.sent.clear()
        mesh.deliver("p", "knowledge_request", {"since_epoch": NOW - 100})
        self.assertEqual(sent_ids(mesh, "p", "knowledge_snapshot"), ["ku_1"])

    def test_receiver_acknowledges_what_it_merged(self) -> None:
        home, mesh, g = make(self)
        mesh.connect("p")
        mesh.connect("old", mode="oneway", direction="outbound")
        mesh.sent.clear()
        units = [unit_json("ku_a", "p"), dict(unit_json("ku_bad", "p", cmd="x"), version="x")]
        mesh.deliver("p", "knowledge_sync", {"sync_epoch": NOW, "units": units})
        [ack] = [(to, p) for (to, t, p) in mesh.sent if t == "ack"]
        self.assertEqual(ack[0], "p")
        self.assertEqual(ack[1]["knowledge"], [["ku_a", 1]])
        self.assertTrue(ack[1]["ack_id"].startswith("msg_"))
        # A claudectl peer never gets an ack (it would only log it).
        mesh.sent.clear()
        mesh.deliver(
            "old",
            "knowledge_sync",
            {"sync_epoch": NOW, "units": [unit_json("ku_b", "old", cmd="b")]},
        )
        self.assertEqual([t for (_, t, _) in mesh.sent if t == "ack"], [])

    def test_a_hostile_ack_marks_only_what_was_in_flight(self) -> None:
        home, mesh, g = make(self)
        put(home, "me-1", unit_json("ku_1", "me-1"))
        mesh.connect("p")
        mesh.deliver(
            "p",
            "ack",
            {
                "ack_id": "m",
                "knowledge": [["ku_1", 2], ["ku_fake", 1], "junk", [1, 2], ["ku_x", True]],
            },
        )
        self.assertEqual(g.state.peer("p").sent, {})

    def test_claudectl_client_gets_nothing_its_serve_gets_everything(self) -> None:
        home, mesh, g = make(self)
        put(home, "me-1", unit_json("ku_1", "me-1"))
        # claudectl `relay connect` dials us: it only prints knowledge frames.
        mesh.connect("cc", mode="oneway", direction="inbound")
        self.assertEqual([t for (to, t, _) in mesh.sent if to == "cc"], [])
        self.assertEqual(g.push_all(), 0)
        mesh.disconnect("cc")
        self.assertNotIn("ku_1", g.state.peer("cc").sent)
        # Later we dial its `relay serve`: that one merges what it reads.
        mesh.connect("cc", mode="oneway", direction="outbound")
        self.assertEqual(sent_ids(mesh, "cc"), ["ku_1"])
        self.assertEqual(g.state.peer("cc").sent, {"ku_1": 1})

    def test_claudectl_serve_counts_once_the_link_stayed_up(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        home, mesh, g = make(self, clock=clock)
        put(home, "me-1", unit_json("ku_1", "me-1"))
        mesh.connect("cc", mode="oneway", direction="outbound")
        clock.advance(1)
        self.assertEqual(sent_ids(mesh, "cc"), ["ku_1"])
        # The link drops before the liveness deadline: not delivered.
        clock.advance(30)
        mesh.disconnect("cc")
        clock.advance(200)
        self.assertEqual(g.state.peer("cc").sent, {})
        mesh.sent.clear()
        mesh.connect("cc", mode="oneway", direction="outbound")
        clock.advance(1)
        self.assertEqual(sent_ids(mesh, "cc"), ["ku_1"])
        clock.advance(g._confirm_secs() + 1)
        self.assertEqual(g.state.peer("cc").sent, {"ku_1": 1})
        g.stop()


class LogBoundTests(SynchronousTestCase):
    """Item 2 (hive part): logs a peer can make grow are bounded."""

    def test_conflict_and_resolution_logs_rotate(self) -> None:
        home, mesh, g = make(self, max_log_bytes=8192)
        put(home, "me-1", unit_json("ku_local", "me-1", confidence=0.6, evidence=5))
        mesh.connect("evil")
        for n in range(300):  # every unit loses to the local one: one record each
            mesh.deliver(
                "evil",
                "knowledge_sync",
                {
                    "sync_epoch": NOW,
                    "units": [unit_json(f"ku_{n}", "evil", confidence=0.99, evidence=100)],
                },
            )
        for name in ("conflicts.jsonl", "resolutions.jsonl"):
            path = home.hive / name
            old = home.hive / (name + ".1")
            self.assertLessEqual(path.stat().st_size, 8192)
            self.assertLessEqual(old.stat().st_size, 8192)
            for p in (path, old):  # every line is still a whole record
                for line in p.read_text().splitlines():
                    json.loads(line)
        last = json.loads((home.hive / "conflicts.jsonl").read_text().splitlines()[-1])
        self.assertEqual(last["incoming_id"], "ku_299")

    def test_config_key(self) -> None:
        from claudectl.config import ConfigError, overlay

        c = overlay(Config(), {"hive": {"max_log_bytes": 1 << 20}}, "t")
        self.assertEqual(c.hive.max_log_bytes, 1 << 20)
        self.assertEqual(Config().hive.max_log_bytes, 16 * 1024 * 1024)
        self.assertRaises(ConfigError, overlay, Config(), {"hive": {"max_log_bytes": 10}}, "t")


class PeerLogRateTests(SynchronousTestCase):
    def test_bad_input_warnings_are_rate_limited_per_peer(self) -> None:
        home, mesh, g = make(self)
        mesh.connect("evil")
        mesh.connect("good")
        with capturedLogs() as events:
            for _ in range(100):
                mesh.deliver("evil", "knowledge_sync", {"sync_epoch": NOW, "units": [[]]})
                mesh.deliver("evil", "knowledge_sync", {"sync_epoch": NOW, "units": "x"})
            mesh.deliver("good", "knowledge_sync", {"sync_epoch": NOW, "units": [[]]})
        bad = [
            e
            for e in events
            if e.get("log_format", "").startswith("rejected ")
            or "without a units list" in e.get("log_format", "")
        ]
        self.assertEqual(
            len([e for e in bad if e.get("peer_id") == "evil"]), G.PEER_WARNINGS_PER_MINUTE
        )
        self.assertEqual(len([e for e in bad if e.get("peer_id") == "good"]), 1)
        self.assertEqual(g.counters["bad_units"], 201)  # still counted


class EngineFuzzTests(SynchronousTestCase):
    """Any JSON a peer can send to the hive handlers: nothing escapes, nothing piles up."""

    def test_arbitrary_payloads(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from claudectl.relay.codec import Envelope

        json_values = st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=5)
                | st.dictionaries(st.text(max_size=10), inner, max_size=5)
            ),
            max_leaves=30,
        )
        unitish = st.fixed_dictionaries(
            {},
            optional={
                k: json_values
                for k in (
                    "id",
                    "version",
                    "source_peer",
                    "content",
                    "scope",
                    "confidence",
                    "evidence_count",
                    "category",
                )
            },
        )
        payloads = st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"units": st.lists(unitish | json_values, max_size=8)},
                optional={
                    "page": json_values,
                    "total_pages": json_values,
                    "sync_epoch": json_values,
                },
            ),
            st.fixed_dictionaries({}, optional={"since_epoch": json_values}),
            st.fixed_dictionaries({"ack_id": json_values, "knowledge": json_values}),
        )
        home, mesh, g = make(self)
        put(home, "me-1", unit_json("ku_1", "me-1"))
        mesh.connect("p")
        kinds = ["knowledge_sync", "knowledge_snapshot", "knowledge_request", "ack"]

        @settings(max_examples=150)
        @given(st.sampled_from(kinds), payloads)
        def one(kind: str, payload: Any) -> None:
            env = Envelope("msg_fuzz_1", kind, "p", 0, payload)
            for handler in mesh.handlers[kind]:
                handler("p", env)  # raises if anything escapes
            self.assertLessEqual(g.buffered_bytes("p"), G.SNAPSHOT_FLUSH_BYTES + 1_100_000)

        one()
