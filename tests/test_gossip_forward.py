"""
Forward before the durable write (issue 16): a small batch is decided on the
reactor and what it brings that is new goes on at once, while the writer
thread makes it durable; the ack to the sender still waits for the write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl import changes
from claudectl.config import Config, HiveConfig
from claudectl.hive import gossip as gossip_mod
from claudectl.hive.gossip import LINKUP_PUSH_DELAY_SECS, STATE_SAVE_SECS, Gossip
from claudectl.statestore import StateWriter
from tests.common import FakeMesh, temp_home
from tests.test_gossip import NOW, put, stored, unit_json


class HeldWriter(StateWriter):
    """A writer thread whose jobs run only when the test releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], defer.Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((lambda: fn(*args, **kwargs), (), d))
        return d

    def release(self) -> None:
        """Run every job (and those they queue), in order."""
        while self.jobs:
            job, _, d = self.jobs.pop(0)
            try:
                result = job()
            except Exception:
                d.errback()
            else:
                d.callback(result)


class ForwardBeforeWriteTests(SynchronousTestCase):
    PEERS = ("peer-a", "peer-b", "peer-c")

    def setUp(self) -> None:
        self.home = temp_home(self)
        put(self.home, "me-1", unit_json("ku_mine", "me-1", cmd="make local"))
        self.start()

    def start(self, **hive: Any) -> None:
        config = dataclasses.replace(Config(), hive=dataclasses.replace(HiveConfig(), **hive))
        self.mesh = FakeMesh("me-1")
        self.clock = Clock()
        self.writer = HeldWriter()
        self.gossip = Gossip(
            self.home,
            config,
            self.mesh,
            "me-1",
            lambda: NOW,
            call_later=self.clock.callLater,
            writer=self.writer,
        )
        self.gossip.register()
        self.gossip._load_units()  # the service reads its store at start
        for p in self.PEERS:
            self.mesh.connect(p)
        self.clock.advance(0)  # link-up work (requests)
        self.clock.advance(LINKUP_PUSH_DELAY_SECS)  # ... and the push round after it
        self.writer.release()
        self.mesh.sent.clear()

    def sync(self, peer: str, *units: dict[str, Any]) -> None:
        self.mesh.deliver(peer, "knowledge_sync", {"sync_epoch": NOW, "units": list(units)})

    def synced(self) -> list[tuple[str, str]]:
        """(peer, unit id) of every unit sent in knowledge_sync frames so far."""
        return [
            (to, u["id"])
            for to, t, p in self.mesh.sent
            if t == "knowledge_sync"
            for u in p["units"]
        ]

    def acks(self, peer: str) -> list[list[Any]]:
        return [
            pair
            for to, t, p in self.mesh.sent
            if t == "ack" and to == peer
            for pair in p["knowledge"]
        ]

    def test_new_unit_goes_on_before_its_write_and_the_ack_waits(self) -> None:
        self.sync("peer-a", unit_json("ku_new", "peer-z", hops=1))
        # Passed on at once, with one more hop, to everyone but the sender ...
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_new"), ("peer-c", "ku_new")])
        [frame] = [p for to, t, p in self.mesh.sent if to == "peer-b"]
        self.assertEqual(frame["units"][0]["propagation_count"], 2)
        # ... while it is not written yet, and the sender has no ack.
        self.assertNotIn("ku_new", stored(self.home))
        self.assertEqual(self.acks("peer-a"), [])
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.release()
        self.clock.advance(0)
        self.assertIn("ku_new", stored(self.home))
        self.assertEqual(self.acks("peer-a"), [["ku_new", 1]])
        # No push round after the write sends it twice.
        self.clock.advance(STATE_SAVE_SECS)
        self.writer.release()
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_new"), ("peer-c", "ku_new")])

    def test_copies_are_not_forwarded_twice(self) -> None:
        unit = unit_json("ku_dup", "peer-z", hops=1)
        self.sync("peer-a", unit)
        self.sync("peer-b", unit)  # another path, before the first copy is written
        self.sync("peer-c", dict(unit, propagation_count=3))  # a longer one
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_dup"), ("peer-c", "ku_dup")])
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_dup"), ("peer-c", "ku_dup")])
        self.assertEqual(stored(self.home)["ku_dup"].propagation_count, 2)
        # The first sender hears that we have it, once it is written; the
        # others got our copy, which tells them as much: no ack for crossings.
        self.assertEqual(self.acks("peer-a"), [["ku_dup", 1]])
        self.assertEqual(self.acks("peer-b"), [])
        self.assertEqual(self.acks("peer-c"), [])

    def test_crossing_copies_count_as_delivered_both_ways(self) -> None:
        unit = unit_json("ku_x", "peer-z", hops=1)
        self.sync("peer-a", unit)
        self.writer.release()
        self.clock.advance(0)
        # peer-b sent its copy before ours reached it; it acks none of ours either.
        self.sync("peer-b", dict(unit, propagation_count=2))
        self.writer.release()
        self.mesh.deliver("peer-b", "ack", {"ack_id": "m", "knowledge": []})
        self.assertEqual(self.acks("peer-b"), [])
        ps = self.gossip.state.peer("peer-b")
        self.assertEqual(ps.sent["ku_x"], 1)  # its copy says it has it
        # Neither a push round nor the next link sends it to peer-b again.
        self.mesh.disconnect("peer-b")
        self.mesh.connect("peer-b")
        self.clock.advance(LINKUP_PUSH_DELAY_SECS + 1)
        self.writer.release()
        self.assertNotIn(("peer-b", "ku_x"), self.synced()[2:])
        self.assertEqual(self.synced().count(("peer-b", "ku_x")), 1)

    def test_a_copy_of_a_written_unit_needs_no_writer_job(self) -> None:
        self.sync("peer-a", unit_json("ku_w", "peer-z", hops=1))
        self.writer.release()
        self.clock.advance(0)
        # peer-b acknowledged our copy, then (after a restart, say) offers its own.
        self.mesh.deliver("peer-b", "ack", {"ack_id": "m", "knowledge": [["ku_w", 1]]})
        self.sync("peer-b", unit_json("ku_w", "peer-z", hops=2))
        self.assertEqual(self.writer.jobs, [])
        self.assertEqual(self.acks("peer-b"), [["ku_w", 1]])  # at once: it is durable
        self.assertEqual(self.gossip.counters["merged_batches"], 2)

    def test_units_the_merge_refuses_are_not_forwarded(self) -> None:
        put(self.home, "me-1", unit_json("ku_held", "peer-q", cmd="make held", confidence=0.95))
        self.start()
        self.sync(
            "peer-a",
            # claims to come from this node
            unit_json("ku_fake", "me-1", cmd="make fake"),
            # the key of a local unit: local always wins
            unit_json("ku_rival", "peer-z", cmd="make local", confidence=0.99, evidence=99),
            # below the peer unit that holds its key
            unit_json("ku_weak", "peer-z", cmd="make held", confidence=0.5),
            # invalid
            dict(unit_json("ku_bad", "peer-z", cmd="make bad"), evidence_count="many"),
        )
        self.assertEqual(self.synced(), [])
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual(self.synced(), [])
        self.assertEqual(sorted(stored(self.home)), ["ku_held", "ku_mine"])
        self.assertEqual(self.gossip.counters["bad_units"], 1)

    def test_over_the_rate_cap_nothing_goes_early(self) -> None:
        self.start(max_units_per_peer_per_day=1)
        self.sync(
            "peer-a",
            unit_json("ku_c1", "peer-z", cmd="make one"),
            unit_json("ku_c2", "peer-z", cmd="make two"),
        )
        self.assertEqual(self.synced(), [])  # the cap may cut it: wait for the merge
        self.writer.release()
        self.clock.advance(0)
        [(to_b, kept), (to_c, kept_c)] = sorted(self.synced())
        self.assertEqual((to_b, to_c), ("peer-b", "peer-c"))
        self.assertEqual(kept, kept_c)
        self.assertIn(kept, stored(self.home))
        self.assertEqual(self.gossip.counters["dropped_rate_cap"], 1)

    def test_a_store_changed_by_another_process_waits_for_the_merge(self) -> None:
        put(self.home, "me-1", unit_json("ku_cli", "me-1", cmd="make cli"))  # not seen yet
        self.sync("peer-a", unit_json("ku_late", "peer-z", cmd="make cli", confidence=0.99))
        self.assertEqual(self.synced(), [])
        self.writer.release()
        self.clock.advance(0)
        # The CLI's local unit holds the key: the peer's unit is refused, never sent.
        self.assertEqual(self.synced(), [])
        self.assertNotIn("ku_late", stored(self.home))
        # Once the queue is empty, early forwarding resumes.
        self.sync("peer-a", unit_json("ku_next", "peer-z", cmd="make next"))
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_next"), ("peer-c", "ku_next")])

    def test_a_big_store_is_indexed_on_the_writer_thread(self) -> None:
        self.patch(gossip_mod, "FORWARD_INDEX_INLINE", 0)  # every store is big
        self.start()
        self.sync("peer-a", unit_json("ku_b1", "peer-z", cmd="make b1"))
        self.assertEqual(self.synced(), [])  # no index on the reactor: the usual path
        self.writer.release()  # the index job, the merge, the new store's index
        self.clock.advance(0)
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_b1"), ("peer-c", "ku_b1")])
        self.mesh.sent.clear()
        self.sync("peer-a", unit_json("ku_b2", "peer-z", cmd="make b2"))
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_b2"), ("peer-c", "ku_b2")])
        index = self.gossip._key_index
        cache = self.gossip._units_cache
        assert index is not None and cache is not None
        self.assertIs(index[0], cache[1])  # built for the store as written

    def test_a_shorter_path_past_the_hop_limit_goes_on(self) -> None:
        self.start(max_propagation=3)
        unit = unit_json("ku_far", "peer-z", hops=2)
        self.sync("peer-a", unit)  # stored at the hop limit: nobody gets it
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual(self.synced(), [])
        self.sync("peer-b", dict(unit, propagation_count=0))  # a shorter path
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual(stored(self.home)["ku_far"].propagation_count, 1)
        self.assertEqual(self.synced(), [("peer-c", "ku_far")])
        [frame] = [p for to, t, p in self.mesh.sent if t == "knowledge_sync"]
        self.assertEqual(frame["units"][0]["propagation_count"], 1)

    def test_a_failed_write_sends_no_ack(self) -> None:
        self.sync("peer-a", unit_json("ku_lost", "peer-z"))
        self.assertEqual(len(self.synced()), 2)
        job, args, d = self.writer.jobs.pop(0)
        d.errback(OSError("disk full"))
        self.flushLoggedErrors(OSError)
        self.clock.advance(0)
        self.assertEqual(self.acks("peer-a"), [])  # peer-a offers it again later
        self.assertNotIn("ku_lost", stored(self.home))


class LeadingEdgeNoticeTests(SynchronousTestCase):
    """A change notice is passed on in the next turn; a burst after it gives one more call."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.watcher = changes.ChangeWatcher(self.clock)
        self.seen: list[tuple[float, str]] = []
        self.watcher.on(
            Path("/x"),
            "knowledge.jsonl",
            lambda n: self.seen.append((self.clock.seconds(), n)),
            at_once=True,
        )
        self.watcher.on(Path("/x"), "trust.json", lambda n: self.seen.append((-1.0, n)))

    def test_first_notice_at_once(self) -> None:
        self.watcher.notice(["knowledge.jsonl"])
        self.clock.advance(0)
        self.assertEqual(self.seen, [(0, "knowledge.jsonl")])
        self.clock.advance(changes.SETTLE_SECS * 4)
        self.assertEqual(len(self.seen), 1)

    def test_a_burst_is_one_more_call_at_the_end_of_the_window(self) -> None:
        self.watcher.notice(["knowledge.jsonl"])
        self.clock.advance(0)
        for _ in range(5):
            self.clock.advance(changes.SETTLE_SECS / 10)
            self.watcher.notice(["knowledge.jsonl"])
        self.clock.advance(changes.SETTLE_SECS * 0.4)  # just before the window ends
        self.assertEqual(len(self.seen), 1)
        self.clock.advance(changes.SETTLE_SECS * 0.2)
        self.assertEqual(len(self.seen), 2)
        self.clock.advance(changes.SETTLE_SECS * 4)
        self.assertEqual(len(self.seen), 2)

    def test_other_names_settle_first(self) -> None:
        self.watcher.notice(["trust.json"])
        self.clock.advance(0)
        self.watcher.notice(["trust.json"])
        self.assertEqual(self.seen, [])
        self.clock.advance(changes.SETTLE_SECS)
        self.assertEqual(self.seen, [(-1.0, "trust.json")])
        self.clock.advance(changes.SETTLE_SECS * 4)
        self.assertEqual(len(self.seen), 1)

    def test_stop_cancels_the_window(self) -> None:
        self.watcher.notice(["knowledge.jsonl"])
        self.clock.advance(0)
        self.watcher.notice(["knowledge.jsonl"])
        self.watcher.stop()
        self.clock.advance(changes.SETTLE_SECS * 2)
        self.assertEqual(len(self.seen), 1)
        self.watcher.notice(["knowledge.jsonl"])  # a stopped watcher started again
        self.clock.advance(0)
        self.assertEqual(len(self.seen), 2)


class StoreNoticeTests(SynchronousTestCase):
    """Notices of knowledge.jsonl changes: our own writes and bursts cost no extra read."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        put(self.home, "me-1", unit_json("ku_mine", "me-1", cmd="make local"))
        self.mesh = FakeMesh("me-1", ["peer-a", "peer-b"])
        self.clock = Clock()
        self.writer = HeldWriter()
        self.gossip = Gossip(
            self.home,
            Config(),
            self.mesh,
            "me-1",
            lambda: NOW,
            call_later=self.clock.callLater,
            writer=self.writer,
        )
        self.gossip.register()
        self.gossip._watched = True  # as under a ChangeWatcher
        self.gossip.on_store_changed(first=True)
        self.writer.release()

    def test_a_notice_during_our_own_merge_reads_nothing(self) -> None:
        self.mesh.deliver(
            "peer-a", "knowledge_sync", {"sync_epoch": NOW, "units": [unit_json("ku_n", "peer-z")]}
        )
        job, _, d = self.writer.jobs.pop(0)
        result = job()  # the merge writes knowledge.jsonl ...
        self.assertIsNone(self.gossip.on_store_changed())  # ... inotify tells us first
        d.callback(result)
        self.assertEqual(self.writer.jobs, [])  # no read of our own write
        self.assertIn("ku_n", [u.id for u in self.gossip._load_units()])

    def test_a_burst_of_notices_during_a_read_is_one_more_look(self) -> None:
        put(self.home, "me-1", unit_json("ku_cli1", "me-1", cmd="make one"))
        self.assertIsNotNone(self.gossip.on_store_changed())
        put(self.home, "me-1", unit_json("ku_cli2", "me-1", cmd="make two"))
        for _ in range(3):
            self.assertIsNone(self.gossip.on_store_changed())
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.release()  # the read sees both writes: no second read
        self.assertEqual(self.writer.jobs, [])
        ids = {u.id for u in self.gossip._load_units()}
        self.assertTrue({"ku_cli1", "ku_cli2"} <= ids)
        self.clock.advance(0)  # the push round
        sent = {u["id"] for _, t, p in self.mesh.sent if t == "knowledge_sync" for u in p["units"]}
        self.assertTrue({"ku_cli1", "ku_cli2"} <= sent)
        # A change after that read is read again.
        put(self.home, "me-1", unit_json("ku_cli3", "me-1", cmd="make three"))
        self.assertIsNotNone(self.gossip.on_store_changed())
