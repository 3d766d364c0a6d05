"""
Forward before the durable write (issue 16): a small batch is decided on the
reactor and what it brings that is new goes on at once, while the writer
thread makes it durable; the ack to the sender still waits for the write.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from claudectl import changes
from claudectl.config import Config, HiveConfig
from claudectl.hive import gossip as gossip_mod
from claudectl.hive.gossip import ACK_DELAY_SECS, LINKUP_PUSH_DELAY_SECS, STATE_SAVE_SECS, Gossip
from claudectl.hive.trust import trust_transaction
from claudectl.statestore import StateWriter
from tests.common import FakeMesh, temp_home
from tests.test_gossip import NOW, put, stored, unit_json
from tests.test_hive_hostile import cluster


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
        # The ack waits a little, to go with the others of that link.
        self.assertEqual(self.acks("peer-a"), [])
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-a"), [["ku_new", 1]])
        # No push round after the write sends it twice.
        self.clock.advance(STATE_SAVE_SECS)
        self.writer.release()
        self.assertEqual(sorted(self.synced()), [("peer-b", "ku_new"), ("peer-c", "ku_new")])

    def test_news_goes_on_the_wire_at_once_in_one_log_line(self) -> None:
        with capturedLogs() as events:
            self.sync("peer-a", unit_json("ku_news", "peer-z", hops=1))
        # Both frames were flushed in the turn that decided them ...
        self.assertEqual(sorted(self.mesh.flushed), ["peer-b", "peer-c"])
        # ... and the node's log says so once, not once per link.
        sent = [formatEvent(e) for e in events if "knowledge unit(s) to" in formatEvent(e)]
        self.assertEqual(sent, ["sent 2 knowledge unit(s) to 2 peers (peer-b: 1, peer-c: 1)"])

    def test_a_second_frame_of_the_turn_is_flushed_when_it_goes(self) -> None:
        self.sync("peer-a", unit_json("ku_one", "peer-z", hops=1))
        self.sync("peer-b", unit_json("ku_two", "peer-y", hops=1))
        # peer-c had a frame in this turn: the second waits for the next ...
        self.assertEqual(self.synced().count(("peer-c", "ku_two")), 0)
        self.assertEqual(self.mesh.flushed.count("peer-c"), 1)
        self.clock.advance(0)
        # ... and goes on the wire as soon as it is sent.
        self.assertEqual(self.synced().count(("peer-c", "ku_two")), 1)
        self.assertEqual(self.mesh.flushed.count("peer-c"), 2)

    def test_a_batch_of_copies_is_counted_not_logged(self) -> None:
        unit = unit_json("ku_c", "peer-z", hops=1)
        self.sync("peer-a", unit)
        self.writer.release()
        self.clock.advance(0)
        with capturedLogs() as events:
            self.sync("peer-b", dict(unit, propagation_count=2))
            self.writer.release()
            self.clock.advance(0)
        self.assertEqual([formatEvent(e) for e in events if "knowledge from" in formatEvent(e)], [])
        self.assertEqual(self.gossip.counters["duplicate_units"], 1)
        self.assertEqual(self.mesh.flushed, ["peer-b", "peer-c"])  # the first copy's only

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
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-a"), [["ku_dup", 1]])
        self.assertEqual(self.acks("peer-b"), [])
        self.assertEqual(self.acks("peer-c"), [])

    def test_copies_of_a_unit_being_written_wait_for_that_write_not_the_writer(self) -> None:
        unit = unit_json("ku_w8", "peer-z", hops=1)
        self.sync("peer-a", unit)
        # peer-c has our copy (it says so), then its own arrives by another path.
        self.mesh.deliver("peer-c", "ack", {"ack_id": "m", "knowledge": [["ku_w8", 1]]})
        self.sync("peer-c", dict(unit, propagation_count=2))
        self.assertEqual(len(self.writer.jobs), 1)  # no job for the copy
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-c"), [])  # not before the unit is written
        self.writer.release()
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-a"), [["ku_w8", 1]])
        self.assertEqual(self.acks("peer-c"), [["ku_w8", 1]])
        self.assertEqual(self.gossip.counters["duplicate_units"], 1)
        self.assertEqual(stored(self.home)["ku_w8"].propagation_count, 2)

    def test_copies_go_the_usual_way_if_the_write_they_waited_for_failed(self) -> None:
        real = self.gossip._commit
        calls: list[int] = []

        def failing_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise OSError(28, "No space left on device")
            return real(*args, **kwargs)

        self.gossip._commit = failing_once  # type: ignore[method-assign]
        unit = unit_json("ku_fail", "peer-z", hops=1)
        self.sync("peer-a", unit)
        self.mesh.deliver("peer-c", "ack", {"ack_id": "m", "knowledge": [["ku_fail", 1]]})
        self.sync("peer-c", dict(unit, propagation_count=2))
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.release()  # the first write fails; the copy is merged instead
        self.clock.advance(0)
        self.writer.release()
        self.flushLoggedErrors(OSError)
        self.assertEqual(len(calls), 2)
        self.assertIn("ku_fail", stored(self.home))
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-a"), [])  # its batch was not written
        self.assertEqual(self.acks("peer-c"), [["ku_fail", 1]])

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
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-b"), [["ku_w", 1]])  # no write to wait for
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

    def test_a_plain_merge_writes_trust_json_later_in_one_flush(self) -> None:
        from claudectl.hive.trust import load_trust, trust_path

        trust_path(self.home).unlink(missing_ok=True)
        for i in range(3):
            self.sync("peer-a", unit_json(f"ku_t{i}", "peer-a", cmd=f"make t{i}"))
            self.writer.release()
            self.clock.advance(0)
        self.assertEqual(len([u for u in stored(self.home) if u.startswith("ku_t")]), 3)
        # Three merges, no trust.json rewrite yet: the counts wait in memory ...
        self.assertFalse(trust_path(self.home).exists())
        self.assertEqual(self.gossip._allowance("peer-a", NOW), 1000 - 3)
        # ... and are written once, within RECORD_FLUSH_SECS.
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)
        self.writer.release()
        rec = load_trust(self.home).get("peer-a")
        assert rec is not None
        self.assertEqual((rec.knowledge_accepted, rec.daily_received[str(NOW // 86400)]), (3, 3))
        self.assertEqual(self.gossip._allowance("peer-a", NOW), 1000 - 3)

    def test_counts_in_a_writer_job_still_count_against_the_cap(self) -> None:
        self.start(max_units_per_peer_per_day=4)
        self.sync("peer-a", unit_json("ku_q1", "peer-a", cmd="make q1"))
        self.sync("peer-a", unit_json("ku_q2", "peer-a", cmd="make q2"))
        self.writer.release()
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)  # the flush job is queued, not run
        self.assertEqual(self.gossip._allowance("peer-a", NOW), 2)
        self.writer.release()
        self.assertEqual(self.gossip._allowance("peer-a", NOW), 2)

    def test_a_failed_flush_keeps_its_counts(self) -> None:
        self.sync("peer-a", unit_json("ku_f1", "peer-a", cmd="make f1"))
        self.writer.release()
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)
        job, _, d = self.writer.jobs.pop(0)
        d.errback(OSError("disk full"))
        self.flushLoggedErrors(OSError)
        self.assertEqual(self.gossip._allowance("peer-a", NOW), 1000 - 1)
        self.gossip.flush_counts()
        self.writer.release()
        from claudectl.hive.trust import load_trust

        rec = load_trust(self.home).get("peer-a")
        assert rec is not None
        self.assertEqual((rec.knowledge_accepted, rec.daily_received[str(NOW // 86400)]), (1, 1))

    def test_a_collision_writes_trust_json_at_once(self) -> None:
        from claudectl.hive.trust import load_trust

        self.sync("peer-a", unit_json("ku_c1", "peer-y", cmd="make col", confidence=0.9))
        self.writer.release()
        self.clock.advance(0)
        self.sync("peer-b", unit_json("ku_c2", "peer-z", cmd="make col", confidence=0.2))
        self.writer.release()
        self.clock.advance(0)
        rec = load_trust(self.home).get("peer-b")
        self.assertTrue(rec is not None and rec.collided_on, f"no evidence at once: {rec}")

    def test_a_merge_prunes_a_stale_peers_units_by_the_books_contact(self) -> None:
        from claudectl.hive.trust import trust_transaction

        put(self.home, "me-1", unit_json("ku_old", "peer-old", cmd="make old"))
        with trust_transaction(self.home) as book:
            book.ensure("peer-old", NOW - 100 * 86400)  # last heard 100 days ago
        self.start()  # the service reads trust.json at start
        # A write it is not told of: the merge goes by the service's book
        # (change notices keep it current), not by reading the file again.
        with trust_transaction(self.home) as book:
            book.ensure("peer-old", NOW).last_sync = NOW
        self.sync("peer-a", unit_json("ku_fresh", "peer-a", cmd="make fresh"))
        self.writer.release()
        self.clock.advance(0)
        held = stored(self.home)
        self.assertIn("ku_fresh", held)
        self.assertNotIn("ku_old", held)  # stale_peer_days (90) passed

    def test_acks_to_one_link_go_together_and_a_closed_link_gets_none(self) -> None:
        for i in range(3):
            self.sync("peer-a", unit_json(f"ku_k{i}", "peer-a", cmd=f"make k{i}"))
            self.writer.release()
            self.clock.advance(0)
        self.clock.advance(ACK_DELAY_SECS)
        frames = [(to, p) for to, t, p in self.mesh.sent if t == "ack"]
        self.assertEqual([to for to, _ in frames], ["peer-a"])  # one frame for three batches
        self.assertEqual(
            sorted(pair[0] for pair in frames[0][1]["knowledge"]), ["ku_k0", "ku_k1", "ku_k2"]
        )
        # peer-b's link closed before its ack was due: it offers the unit again.
        self.mesh.sent.clear()
        self.sync("peer-b", unit_json("ku_kc", "peer-b", cmd="make kc"))
        self.writer.release()
        self.clock.advance(0)
        self.mesh.disconnect("peer-b")
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual([p for to, t, p in self.mesh.sent if t == "ack"], [])

    def test_stopping_sends_the_acks_that_wait(self) -> None:
        self.sync("peer-a", unit_json("ku_s", "peer-a", cmd="make s"))
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual(self.acks("peer-a"), [])
        self.gossip.stop()
        self.assertEqual(self.acks("peer-a"), [["ku_s", 1]])

    def answers(self, peer: str) -> list[dict[str, Any]]:
        """The last page of every snapshot answer sent to ``peer``."""
        return [
            p
            for to, t, p in self.mesh.sent
            if t == "knowledge_snapshot" and to == peer and p["page"] == p["total_pages"]
        ]

    def test_requests_wait_while_the_peer_is_not_reading(self) -> None:
        self.mesh.unsent["peer-a"] = gossip_mod.BACKLOG_BYTES + 1
        for since in (0, 0, 0, NOW - 50):  # the last one asks for less
            self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": since})
        self.assertEqual(self.answers("peer-a"), [])
        self.assertEqual(self.gossip.counters["requests_held"], 3)
        self.clock.advance(gossip_mod.BACKLOG_RETRY_SECS)
        self.assertEqual(self.answers("peer-a"), [])  # still not reading
        self.mesh.unsent["peer-a"] = 0
        self.clock.advance(gossip_mod.BACKLOG_RETRY_SECS)
        # One answer, to the latest request (ku_mine is older than it asks).
        [answer] = self.answers("peer-a")
        self.assertEqual(answer["units"], [])
        # Answered: the next request goes at once.
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        self.assertEqual(len(self.answers("peer-a")), 2)

    def test_a_request_during_an_answer_waits_for_its_last_page(self) -> None:
        for i in range(3):
            put(self.home, "me-1", unit_json(f"ku_big{i}", "me-1", cmd="x" * 200_000 + str(i)))
        self.start()
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        first = [p for to, t, p in self.mesh.sent if t == "knowledge_snapshot"]
        self.assertEqual(len(first), 1)  # one page now, the others in later turns
        self.assertGreater(first[0]["total_pages"], 1)
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.answers("peer-a")), 2)  # the answer, then the held one
        pages = [p["page"] for to, t, p in self.mesh.sent if t == "knowledge_snapshot"]
        total = first[0]["total_pages"]
        self.assertEqual(pages, list(range(1, total + 1)) * 2)  # never interleaved

    def test_a_held_request_is_dropped_with_its_link(self) -> None:
        self.mesh.unsent["peer-a"] = gossip_mod.BACKLOG_BYTES + 1
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        self.mesh.disconnect("peer-a")
        self.mesh.connect("peer-a")
        self.mesh.unsent["peer-a"] = 0
        self.mesh.sent.clear()
        self.clock.advance(gossip_mod.BACKLOG_RETRY_SECS)
        self.assertEqual(self.answers("peer-a"), [])

    def test_a_flood_of_held_requests_keeps_one_timer(self) -> None:
        self.mesh.unsent["peer-a"] = gossip_mod.BACKLOG_BYTES + 1
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        base = len(self.clock.getDelayedCalls())
        for _ in range(100):
            self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
            self.clock.advance(gossip_mod.BACKLOG_RETRY_SECS / 3)
        self.assertLessEqual(len(self.clock.getDelayedCalls()), base)
        self.assertEqual(self.gossip.counters["requests_held"], 100)
        timers = len(self.gossip._timers)
        for _ in range(50):  # link flaps while a request is held
            self.mesh.disconnect("peer-a")
            self.mesh.connect("peer-a")
            self.clock.advance(0)  # the link-up work
            self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        self.assertLessEqual(len(self.gossip._timers), timers + 3)
        self.mesh.disconnect("peer-a")
        self.assertFalse(self.gossip._held_timers)

    def test_counts_a_flush_found_in_a_writer_job_are_written_when_it_is_back(self) -> None:
        from claudectl.hive.trust import load_trust, trust_path

        units = [unit_json(f"ku_x{i}", "peer-a", cmd=f"x{i}") for i in range(20)]
        self.sync("peer-a", *units)  # too big to decide early: a merge job
        self.writer.release()  # merged: counts and tallies wait in memory
        self.clock.advance(0)
        trust_path(self.home).unlink(missing_ok=True)
        self.sync("peer-b", *units)  # copies: a merge job takes the counts ...
        # ... when the flush timer fires: it writes the tallies only.
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)
        self.writer.release()  # the job comes back without writing them: flushed at once
        rec = load_trust(self.home).get("peer-a")
        assert rec is not None
        self.assertEqual(rec.daily_received.get(str(NOW // 86400)), 20)
        self.assertIsNotNone(load_trust(self.home).get("peer-b"), "peer-b's contact")

    def test_stopping_with_a_merge_queued_writes_its_counts(self) -> None:
        from claudectl.hive.trust import load_trust

        units = [unit_json(f"ku_st{i}", "peer-a", cmd=f"st {i}") for i in range(20)]
        self.sync("peer-a", *units)  # merged: 20 counted, in memory
        self.writer.release()
        self.clock.advance(0)
        self.sync("peer-b", *units)  # copies: a job that takes the 20 and writes no trust.json
        self.gossip.stop()
        self.writer.release()
        rec = load_trust(self.home).get("peer-a")
        assert rec is not None
        self.assertEqual(rec.daily_received[str(NOW // 86400)], 20)

    def test_a_unit_the_bounds_evict_at_once_is_not_pushed(self) -> None:
        self.start(max_units=1)  # ku_mine fills the store
        self.sync("peer-a", unit_json("ku_ev", "peer-z", cmd="make ev", hops=1))
        self.writer.release()
        self.clock.advance(0)
        self.assertNotIn("ku_ev", stored(self.home))
        self.assertEqual(self.synced(), [])

    def test_copies_of_a_unit_evicted_as_it_was_stored_are_duplicates(self) -> None:
        """A full store evicts a weak peer unit as it stores it; each later
        copy (a flooding mesh, or a peer sending it again and again) is a
        duplicate -- acked, not stored and evicted again, not counted new."""
        from claudectl.hive.trust import load_trust

        self.start(max_units=1)  # ku_mine fills the store
        weak = unit_json("ku_weak", "peer-z", cmd="make weak", confidence=0.1, hops=1)
        self.sync("peer-a", weak)
        self.writer.release()
        self.clock.advance(0)
        self.assertNotIn("ku_weak", stored(self.home))
        archived = (self.home.hive / "archive.jsonl").read_bytes().count(b"ku_weak")
        self.assertEqual(archived, 1)
        for peer in ("peer-b", "peer-a", "peer-c"):
            self.sync(peer, dict(weak, propagation_count=2))
        self.assertEqual(self.writer.jobs, [])  # nothing to write, not even a look
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(self.acks("peer-b"), [["ku_weak", 1]])
        self.assertEqual(self.gossip.counters["duplicate_units"], 3)
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)
        self.writer.release()
        day = str(NOW // 86400)
        for peer, count in (("peer-a", 1), ("peer-b", 0)):
            rec = load_trust(self.home).get(peer)
            self.assertEqual(rec.daily_received.get(day, 0) if rec else 0, count, peer)
        after = (self.home.hive / "archive.jsonl").read_bytes().count(b"ku_weak")
        self.assertEqual(after, 1)
        # A newer version is news again (decided by the writer).
        self.sync("peer-a", dict(weak, version=2))
        self.assertEqual(len(self.writer.jobs), 1)

    def test_the_evicted_are_forgotten_once_the_store_has_room(self) -> None:
        self.start(max_units=2)
        self.sync("peer-a", unit_json("ku_p1", "peer-z", cmd="make p1", hops=1))
        self.writer.release()
        self.clock.advance(0)
        weak = unit_json("ku_weak", "peer-z", cmd="make weak", confidence=0.1, hops=1)
        self.sync("peer-a", weak)
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual([k[:2] for k in self.gossip._gone_view], [("ku_weak", 1)])
        # The user makes room (hive forget, an edit): the store is read again.
        from claudectl.hive.store import store_transaction

        with store_transaction(self.home, local_id="me-1") as store:
            store.remove_id("ku_p1")
        self.gossip.on_store_changed()
        self.writer.release()
        self.assertEqual(self.gossip._gone_view, frozenset())
        self.sync("peer-b", weak)
        self.writer.release()
        self.assertIn("ku_weak", stored(self.home))

    def full_store_evicts(self, weak: dict[str, Any]) -> None:
        """A store at max_units (ku_mine) evicts ``weak`` as peer-a's copy is stored."""
        self.start(max_units=1)
        self.sync("peer-a", weak)
        self.writer.release()
        self.clock.advance(0)
        self.assertNotIn(weak["id"], stored(self.home))
        self.assertEqual(len(self.gossip._gone), 1)

    def test_a_heavier_copy_under_the_same_id_and_version_is_news(self) -> None:
        """Two nodes that unioned the same cluster each made (id, v+1): the
        one that weighs more than the evicted one is not its copy."""
        weak = unit_json("ku_w", "peer-z", cmd="make w", confidence=0.1, hops=1)
        self.full_store_evicts(weak)
        self.sync("peer-b", dict(weak, confidence=0.9))
        self.assertEqual(len(self.writer.jobs), 1)  # decided by the writer, not dropped
        self.writer.release()
        self.assertEqual(self.gossip.counters["duplicate_units"], 0)

    def test_the_origin_sending_its_evicted_unit_again_is_a_duplicate_too(self) -> None:
        """It ranks the same whoever sends it: its origin's copies, by the
        early path or by the writer's, cost no store write either."""
        from claudectl.hive.trust import load_trust

        weak = unit_json("ku_w", "peer-z", cmd="make w", confidence=0.1, hops=1)
        self.full_store_evicts(weak)
        self.mesh.connect("peer-z")
        self.clock.advance(0)
        self.writer.release()
        self.sync("peer-z", dict(weak, propagation_count=0))
        self.assertEqual(self.writer.jobs, [])
        # In a batch too big for the early path, the writer says the same.
        self.sync("peer-a", *[dict(weak, propagation_count=k) for k in range(2, 19)])
        self.writer.release()
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)
        self.writer.release()
        rec = load_trust(self.home).get("peer-a")
        self.assertEqual(rec.daily_received.get(str(NOW // 86400), 0) if rec else 0, 1)
        archived = (self.home.hive / "archive.jsonl").read_bytes().count(b"ku_w")
        self.assertEqual(archived, 1)

    def test_the_writer_forgets_the_evicted_after_an_hour_too(self) -> None:
        weak = unit_json("ku_w", "peer-z", cmd="make w", confidence=0.1, hops=1)
        now = [NOW]
        self.full_store_evicts(weak)
        self.gossip._now = lambda: now[0]
        now[0] += gossip_mod.GONE_SECS
        # 17 copies: the writer's path; gone no more, so stored (and evicted) again.
        self.sync("peer-b", *[dict(weak, propagation_count=k) for k in range(2, 19)])
        self.writer.release()
        self.clock.advance(0)
        archived = (self.home.hive / "archive.jsonl").read_bytes().count(b"ku_w")
        self.assertEqual(archived, 2)

    def test_a_store_read_again_with_room_forgets_the_evicted(self) -> None:
        """Without change notices the store is looked at when it is needed
        (``_load_units``): a store with room again forgets what was evicted."""
        weak = unit_json("ku_w", "peer-z", cmd="make w", confidence=0.1, hops=1)
        self.full_store_evicts(weak)
        from claudectl.hive.store import store_transaction

        with store_transaction(self.home, local_id="me-1") as store:
            store.remove_id("ku_mine")
        self.gossip._load_units()
        self.assertEqual(self.gossip._gone, {})
        self.assertEqual(self.gossip._gone_pairs, frozenset())

    def test_only_max_units_evictions_are_remembered(self) -> None:
        """A unit past knowledge_ttl_days (or of a stale origin) is not
        remembered: once its origin is heard from again it may stay."""
        self.start(max_units=1)
        old = unit_json("ku_old", "peer-z", cmd="make old", hops=1, validated=NOW - 400 * 86400)
        # Past the ttl (the early path leaves it to the writer, which evicts it).
        self.sync("peer-a", *[old] * 17)
        self.writer.release()
        self.clock.advance(0)
        self.assertNotIn("ku_old", stored(self.home))
        self.assertEqual(self.gossip._gone, {})

    def test_the_evicted_are_forgotten_after_an_hour(self) -> None:
        weak = unit_json("ku_w", "peer-z", cmd="make w", confidence=0.1, hops=1)
        now = [NOW]
        self.gossip._now = lambda: now[0]
        self.full_store_evicts(weak)
        self.gossip._now = lambda: now[0]
        self.sync("peer-b", weak)
        self.assertEqual(self.writer.jobs, [])  # a copy: no job
        now[0] += gossip_mod.GONE_SECS
        self.sync("peer-c", weak)
        self.assertEqual(len(self.writer.jobs), 1)  # the writer decides it again

    def test_a_store_changed_elsewhere_is_looked_at_first(self) -> None:
        """After another process changed knowledge.jsonl (hive forget, a
        raised max_units), a copy is not taken for gone before the store is
        read again."""
        weak = unit_json("ku_w", "peer-z", cmd="make w", confidence=0.1, hops=1)
        self.full_store_evicts(weak)
        from claudectl.hive.store import store_transaction

        with store_transaction(self.home, local_id="me-1") as store:
            store.remove_id("ku_mine")
        self.sync("peer-b", weak)  # no change notice handled yet
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.release()
        self.clock.advance(0)
        self.assertIn("ku_w", stored(self.home))

    def test_copies_waiting_for_a_write_go_once_it_is_done_not_when_the_queue_is(self) -> None:
        """Copies of a unit a queued batch is writing are acknowledged once
        that batch is written, though other batches keep the queue busy."""
        new = unit_json("ku_n", "peer-z", cmd="make n", hops=1)
        self.sync("peer-a", new)  # decided early, queued for the writer
        self.sync("peer-b", dict(new, propagation_count=2))  # a copy: waits for that write
        self.assertEqual(len(self.gossip._after_write), 1)
        more = [unit_json(f"ku_m{i}", "peer-y", cmd=f"make m{i}") for i in range(20)]
        self.sync("peer-c", *more)  # queued behind, over FORWARD_MAX_UNITS
        job, _, d = self.writer.jobs.pop(0)  # only the first batch's job
        d.callback(job())
        self.assertEqual(self.gossip._after_write, [])
        self.assertTrue(self.gossip._merges or self.gossip._merging)
        # Done with: counted a duplicate, its bytes no longer held against peer-b.
        self.assertEqual(self.gossip.counters["duplicate_units"], 1)
        self.assertNotIn("peer-b", self.gossip._unmerged_bytes)
        self.writer.release()

    def test_a_copy_waits_for_every_batch_queued_before_it(self) -> None:
        """A copy of a unit that the second queued batch writes is not done
        when the first one is."""
        first = unit_json("ku_1", "peer-z", cmd="make 1", hops=1)
        second = unit_json("ku_2", "peer-y", cmd="make 2", hops=1)
        self.sync("peer-a", first)  # job 1 starts
        self.sync("peer-a", second)  # queued behind it
        self.sync("peer-b", dict(second, propagation_count=2))  # a copy of ku_2
        self.assertEqual(len(self.gossip._after_write), 1)
        job, _, d = self.writer.jobs.pop(0)
        d.callback(job())  # ku_1 written, ku_2 not yet
        self.assertEqual(len(self.gossip._after_write), 1)
        self.assertIn("peer-b", self.gossip._unmerged_bytes)
        self.writer.release()  # ku_2 written
        self.assertEqual(self.gossip._after_write, [])
        self.assertNotIn("peer-b", self.gossip._unmerged_bytes)

    def test_no_early_decision_after_a_failed_write_until_the_queue_is_empty(self) -> None:
        """What the overlay expected was not written: batches are decided by
        the writer until the queue is empty again."""
        self.sync("peer-a", unit_json("ku_f", "peer-z", cmd="make f", hops=1))
        self.sync("peer-a", unit_json("ku_g", "peer-z", cmd="make g", hops=1))
        job, _, d = self.writer.jobs.pop(0)
        d.errback(OSError("disk full"))
        self.flushLoggedErrors(OSError)
        self.mesh.sent.clear()
        self.sync("peer-b", unit_json("ku_h", "peer-y", cmd="make h", hops=1))
        self.assertEqual(self.synced(), [])  # not passed on before its write
        self.writer.release()
        self.clock.advance(0)
        self.assertIn("ku_h", stored(self.home))

    def test_a_frame_is_charged_per_object_and_array_in_it(self) -> None:
        """A frame of tiny entries costs far more in memory than its bytes:
        each value in it is charged NODE_CHARGE."""
        self.patch(gossip_mod, "HOLD_BYTES", 10_000)
        junk = [{"a": [[], {}, [], {}]} for _ in range(40)]  # 200 containers, ~1 KB
        self.sync("peer-a", *junk)
        self.assertEqual(self.mesh.holds, [("peer-a", True)])

    def test_a_snapshot_is_charged_as_its_budget_counts_it_once_flushed(self) -> None:
        self.patch(gossip_mod, "HOLD_BYTES", 10_000)
        units = [unit_json(f"ku_s{i}", "peer-z", cmd=f"make s{i}") for i in range(10)]
        payload = {"page": 1, "total_pages": 1, "units": units}
        self.mesh.deliver("peer-a", "knowledge_snapshot", payload)
        self.assertEqual(self.mesh.holds, [("peer-a", True)])
        self.assertGreater(self.gossip._unmerged_bytes["peer-a"], 10 * 64 * 20)
        self.writer.release()
        self.assertEqual(self.mesh.holds[-1], ("peer-a", False))
        self.assertEqual(self.gossip._page_bytes, {})

    def test_copies_are_merged_again_when_a_write_they_waited_for_failed(self) -> None:
        new = unit_json("ku_n", "peer-z", cmd="make n", hops=1)
        self.sync("peer-a", new)
        self.sync("peer-b", dict(new, propagation_count=2))
        job, _, d = self.writer.jobs.pop(0)
        d.errback(OSError("disk full"))
        self.flushLoggedErrors(OSError)
        # The copy is merged the usual way: a writer job of its own, which stores it.
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.release()
        self.assertIn("ku_n", stored(self.home))
        self.assertEqual(self.gossip._unmerged_bytes, {})

    def test_a_peer_whose_batches_pile_up_is_not_read_until_they_are_merged(self) -> None:
        """Back-pressure, not loss: past HOLD_BYTES of unmerged batches the
        peer's link is not read; once merged down to half, it is read again,
        and every unit it sent is stored and acked."""
        self.patch(gossip_mod, "HOLD_BYTES", 4000)
        units = [unit_json(f"ku_h{i}", "peer-z", cmd=f"make h{i}", hops=1) for i in range(40)]
        for i in range(0, 40, 20):  # over FORWARD_MAX_UNITS: the writer decides them
            self.sync("peer-a", *units[i : i + 20])
        self.assertEqual(self.mesh.holds, [("peer-a", True)])
        self.assertEqual(self.gossip.counters["reads_held"], 1)
        # A new link while they are merged starts held too.
        self.mesh.connect("peer-a")
        self.assertEqual(self.mesh.holds, [("peer-a", True), ("peer-a", True)])
        self.sync("peer-b", unit_json("ku_other", "peer-y", cmd="make other"))
        self.assertEqual(self.mesh.holds[-1][0], "peer-a")  # other peers are read on
        self.writer.release()
        self.clock.advance(0)
        self.writer.release()
        self.assertEqual(self.mesh.holds[-1], ("peer-a", False))
        self.assertEqual(self.gossip._unmerged_bytes, {})
        for u in units:
            self.assertIn(u["id"], stored(self.home))
        self.clock.advance(ACK_DELAY_SECS)
        self.assertEqual(len(self.acks("peer-a")), 40)

    def test_counts_are_booked_on_the_day_their_units_came(self) -> None:
        from claudectl.hive.trust import load_trust

        clock_now = [NOW - NOW % 86400 + 86400 - 2]  # two seconds before midnight
        self.gossip.stop()
        self.mesh = FakeMesh("me-1")
        self.writer = HeldWriter()
        self.gossip = Gossip(
            self.home,
            dataclasses.replace(Config(), hive=HiveConfig()),
            self.mesh,
            "me-1",
            lambda: clock_now[0],
            call_later=self.clock.callLater,
            writer=self.writer,
        )
        self.gossip.register()
        self.gossip._load_units()
        self.mesh.connect("peer-a")
        self.clock.advance(LINKUP_PUSH_DELAY_SECS)
        self.writer.release()
        first_day = clock_now[0] // 86400
        for i in range(3):
            self.sync("peer-a", unit_json(f"ku_d{i}", "peer-a", cmd=f"day {i}", validated=NOW))
            self.writer.release()
            self.clock.advance(0)
        clock_now[0] += 5  # past midnight when the counts are written
        # Yesterday's counts, not written yet, do not cut today's allowance.
        self.assertEqual(self.gossip._allowance("peer-a", clock_now[0]), 1000)
        self.clock.advance(gossip_mod.RECORD_FLUSH_SECS)
        self.writer.release()
        rec = load_trust(self.home).get("peer-a")
        assert rec is not None
        self.assertEqual(rec.daily_received.get(str(first_day)), 3)
        self.assertNotIn(str(first_day + 1), rec.daily_received)
        self.assertEqual(self.gossip._allowance("peer-a", clock_now[0]), 1000)

    def test_a_failing_trust_write_is_retried_less_often_and_logged_less(self) -> None:
        from twisted.logger import capturedLogs

        from claudectl.hive.trust import load_trust

        self.sync("peer-a", unit_json("ku_fail", "peer-a", cmd="make fail"))
        self.writer.release()
        self.clock.advance(0)
        real = gossip_mod.trust_transaction

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise OSError(28, "No space left on device")

        self.patch(gossip_mod, "trust_transaction", broken)
        with capturedLogs() as events:
            waits = []
            for _ in range(4):
                before = self.clock.seconds()
                while not self.writer.jobs:
                    self.clock.advance(1)
                waits.append(self.clock.seconds() - before)
                self.writer.release()
        self.flushLoggedErrors(OSError)
        self.assertEqual(waits, [5, 10, 20, 40])  # the next try waits longer each time
        texts = [e.get("log_format", "") for e in events]
        self.assertEqual(sum("failed (kept, tried again)" in t for t in texts), 1)
        self.assertEqual(sum("times in a row" in t for t in texts), 2)  # 2nd and 4th
        self.patch(gossip_mod, "trust_transaction", real)
        while not self.writer.jobs:
            self.clock.advance(1)
        self.writer.release()
        rec = load_trust(self.home).get("peer-a")
        assert rec is not None
        self.assertEqual(rec.daily_received[str(NOW // 86400)], 1)  # nothing lost

    def test_a_request_pipelined_behind_the_handshake_gets_its_whole_answer(self) -> None:
        for i in range(3):
            put(self.home, "me-1", unit_json(f"ku_pipe{i}", "me-1", cmd="p" * 200_000 + str(i)))
        self.start()
        self.mesh.disconnect("peer-a")
        self.mesh.connect("peer-a")  # link-up work waits for the next turn ...
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})  # ... this does not
        for _ in range(6):
            self.clock.advance(0)
        pages = [p["page"] for to, t, p in self.mesh.sent if t == "knowledge_snapshot"]
        self.assertGreater(len(pages), 1)
        self.assertEqual(pages, list(range(1, len(pages) + 1)))  # none dropped

    def test_a_newer_link_that_replaces_the_old_one_starts_clean(self) -> None:
        for i in range(3):
            put(self.home, "me-1", unit_json(f"ku_rep{i}", "me-1", cmd="r" * 200_000 + str(i)))
        self.start()
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})  # answer going out
        self.mesh.unsent["peer-a"] = gossip_mod.BACKLOG_BYTES + 1
        self.clock.advance(0)
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})  # held
        self.mesh.connect("peer-a")  # a newer link replaces the old one (no link-down)
        self.mesh.unsent["peer-a"] = 0
        self.mesh.sent.clear()
        for _ in range(8):
            self.clock.advance(gossip_mod.BACKLOG_RETRY_SECS)
        # Nothing of the old link's answer or held request goes on the new one.
        self.assertEqual([p for to, t, p in self.mesh.sent if t == "knowledge_snapshot"], [])
        # A request on the new link: its pages go one per turn.
        self.mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        per_turn = [len([1 for _, t, _ in self.mesh.sent if t == "knowledge_snapshot"])]
        for _ in range(4):
            self.clock.advance(0)
            per_turn.append(len([1 for _, t, _ in self.mesh.sent if t == "knowledge_snapshot"]))
        steps = [b - a for a, b in zip(per_turn, per_turn[1:], strict=False)]
        self.assertEqual(per_turn[0], 1)
        self.assertLessEqual(max(steps), 1)


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


class ReviewFindingsTests(SynchronousTestCase):
    """What a review of the early path found (each failed before its fix)."""

    PEERS = ForwardBeforeWriteTests.PEERS
    setUp = ForwardBeforeWriteTests.setUp
    start = ForwardBeforeWriteTests.start
    sync = ForwardBeforeWriteTests.sync
    synced = ForwardBeforeWriteTests.synced
    acks = ForwardBeforeWriteTests.acks

    def test_hostile_cluster_union_is_not_computed_on_the_reactor(self) -> None:
        """
        HIGH: _forward_early runs merge_unit on the reactor; union_clusters is
        quadratic in a variant's contributing_peers (``p not in
        v.contributing_peers[:i]``).  A ~110 KB frame (one cluster, 10,000
        contributors) against any stored cluster of the same problem_key and
        approach stalls the reactor for ~1 s (20,000: ~3.5 s; measured).
        Before the change this ran on the writer thread (GIL-shared, but the
        reactor kept running).
        """
        put(self.home, "me-1", cluster("ku_held", "peer-q", [("approve", 5)]))
        self.start()
        evil = cluster("ku_evil", "peer-z", [("approve", 5)])
        evil["content"]["variants"][0]["contributing_peers"] = [f"p{i:06d}" for i in range(10_000)]
        t = time.perf_counter()
        self.sync("peer-a", evil)  # the writer job is held: only reactor work is timed
        spent = time.perf_counter() - t
        self.assertLess(spent, 0.1, f"receive() spent {spent * 1e3:.0f} ms on the reactor")

    def test_consent_is_decided_on_the_trust_file_not_a_stale_copy(self) -> None:
        """
        MEDIUM: _forward_early builds ShareContext(identity, cfg, self._trust, {})
        from the in-memory trust book, which lags trust.json (50 ms settle plus
        a read with inotify, 3 s when polling, and never for an in-place
        same-size rewrite within one file-clock tick -- the case 331ba3d fixed
        for ShareContexts).  push_all/_merged use the file (ShareContext.load /
        self._contexts.get).  Here the user has just demoted peer-b to 0.1
        (tier "ignored"); a unit whose consent needs "suggested" still goes
        to peer-b early.
        """
        with trust_transaction(self.home) as book:
            book.set_level("peer-b", 0.1, NOW)
        # (no on_trust_changed yet: the notice is still settling)
        unit = unit_json("ku_consent", "peer-z", cmd="make consent")
        unit["sharing_consent"] = {"min_trust_tier": "suggested"}
        self.sync("peer-a", unit)
        self.writer.release()
        self.clock.advance(0)
        self.assertNotIn(("peer-b", "ku_consent"), self.synced())
        self.assertIn(("peer-c", "ku_consent"), self.synced())

    def test_a_contradicting_noop_cluster_still_counts_as_collision_evidence(self) -> None:
        """
        LOW: a cluster copy under another id whose union adds nothing is
        DUPLICATE with store=None, so it is settled on the reactor (no writer
        job).  The old path (_all_known is by id: False) ran the trust
        transaction, where check_collisions records contradiction evidence.
        """
        put(self.home, "me-1", cluster("ku_held", "peer-q", [("approve", 5)]))
        self.start()
        rival = cluster("ku_rival", "peer-r", [("approve", 5)])
        rival["content"]["variants"][0]["contributing_peers"] = ["peer-q"]
        rival["confidence"] = 0.1  # 0.6 below the held one: a collision
        self.sync("peer-a", rival)
        self.writer.release()
        self.clock.advance(0)
        from claudectl.hive.trust import load_trust

        rec = load_trust(self.home).get("peer-a")
        evidence = rec.collided_on if rec is not None else None
        self.assertTrue(rec is not None and evidence, f"no collision evidence for peer-a: {rec}")

    def test_a_peer_that_connects_while_the_unit_is_being_written_gets_it(self) -> None:
        """
        LOW (liveness): the push round after the write is skipped for units that
        went out early -- but a peer whose link came up between the early push
        and the write got neither: its request was answered and its link-up push
        ran from the store as written before.  Before the change the push round
        after the write covered it.
        """
        self.sync("peer-a", unit_json("ku_new", "peer-z", cmd="make new"))
        self.mesh.connect("peer-d")  # comes up while the write is pending
        self.clock.advance(0)
        self.clock.advance(LINKUP_PUSH_DELAY_SECS)
        self.writer.release()
        self.clock.advance(0)
        self.clock.advance(STATE_SAVE_SECS)
        self.writer.release()
        self.assertIn(("peer-d", "ku_new"), self.synced())

    def test_a_cli_write_right_after_our_commit_is_not_taken_for_ours(self) -> None:
        """The store's signature is taken under its lock: a CLI write the
        moment our transaction lets go is not taken for our own write (else
        the early path trusts a cache without the CLI's unit and passes on a
        peer unit that the writer then refuses, local knowledge winning)."""
        import contextlib

        real = gossip_mod.store_transaction
        done: list[int] = []

        @contextlib.contextmanager
        def then_the_cli_writes(*args: Any, **kwargs: Any) -> Any:
            with real(*args, **kwargs) as store:
                yield store
            if not done:
                done.append(1)
                put(self.home, "me-1", unit_json("ku_cli", "me-1", cmd="make cli"))

        self.patch(gossip_mod, "store_transaction", then_the_cli_writes)
        self.sync("peer-a", unit_json("ku_first", "peer-z", cmd="make first"))
        self.writer.release()
        self.clock.advance(0)
        self.assertEqual(done, [1])
        self.mesh.sent.clear()
        self.sync("peer-a", unit_json("ku_rival", "peer-z", cmd="make cli", confidence=0.99))
        self.writer.release()
        self.clock.advance(0)
        self.assertNotIn("ku_rival", stored(self.home))  # local wins in the writer
        self.assertEqual(self.synced(), [], "a unit the writer refuses went out early")
