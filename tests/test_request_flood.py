"""
A peer that floods knowledge_requests and never reads (hostile peers):
the service holds one request per peer while an answer is going out, so its
buffers stay bounded -- on the real reactor, real loopback TCP, the real
service tree (``makeService``).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from claudectl.hive import gossip as gossip_mod
from claudectl.hive.store import store_transaction
from claudectl.hive.units import KnowledgeUnit
from claudectl.relay.handshake import KeyAuth
from claudectl.relay.keystore import KeyStore
from tests.common import make_node, temp_home
from tests.test_gossip import unit_json
from tests.test_services import RunningService
from tests.test_statestore import gossip_of, wait_for

UNITS = 3000  # an answer of ~2 MB


class RequestFloodTests(TestCase):
    timeout = 90

    async def test_a_peer_that_never_reads_gets_one_answer_at_a_time(self) -> None:
        s = RunningService(temp_home(self))
        local = KeyStore(s.home).ensure_identity()
        now = int(time.time())
        with store_transaction(s.home, local_id=local, now=now) as store:
            for i in range(UNITS):
                store.insert(
                    KnowledgeUnit.from_json(
                        unit_json(f"ku_f{i}", local, cmd=f"flood command {i}", validated=now)
                    )
                )
        s.start()
        self.addCleanup(s.stop)
        await wait_for(lambda: s.node.listening_ports, 10, "the listener")
        # Smaller bounds keep the test quick; the logic is the same.
        self.patch(gossip_mod, "BACKLOG_BYTES", 256 * 1024)
        peer = make_node(self, "peer-flood", reactor=reactor)
        psk = b"f" * 32
        peer.keystore.save_key(local, psk)
        KeyStore(s.home).save_key("peer-flood", psk)
        proto = await peer.open_link(f"127.0.0.1:{s.port}", KeyAuth(psk, local))
        self.addCleanup(peer.close_all)
        g = gossip_of(s)
        await wait_for(lambda: "peer-flood" in s.node.mesh.connected_peers(), 10, "the link")
        # Stop reading, then ask again and again.
        proto.transport.pauseProducing()
        for _ in range(200):
            peer.mesh.send(local, "knowledge_request", {"since_epoch": 0})
        await wait_for(
            lambda: g.counters.get("requests_held", 0) >= 150, 20, "the requests to be held"
        )
        # What the service wrote and the peer did not read is bounded: one
        # answer's worth at most, not 200 answers.
        first = s.node.mesh.unsent_bytes("peer-flood")
        one_answer = sum(
            p.nbytes
            for p in g._answers.answer(  # the cached answer's size
                "peer-flood",
                g._load_units(),
                g._contexts.get(g.config.hive),
                now,
                lambda: g._sendable(g._load_units()),
            ).pages
        )
        self.assertLess(first, one_answer + 2 * gossip_mod.BACKLOG_BYTES)
        self.assertEqual(len(g._held_requests), 1)
        # Reading again, the peer gets the answer and the one held request's.
        snapshots: list[Any] = []
        peer.mesh.add_handler("knowledge_snapshot", lambda p, env: snapshots.append(env))
        proto.transport.resumeProducing()
        await wait_for(
            lambda: sum(1 for e in snapshots if e.payload["page"] == e.payload["total_pages"]) >= 2,
            30,
            "two answers",
        )
        await wait_for(lambda: not g._held_requests and "peer-flood" not in g._outbox, 10, "idle")
        finished = sum(1 for e in snapshots if e.payload["page"] == e.payload["total_pages"])
        self.assertEqual(finished, 2)


class SyncFloodTests(TestCase):
    """A peer that sends knowledge faster than the writer merges it: its link
    is not read while its waiting batches are over HOLD_BYTES (TCP's flow
    control holds the rest in the kernel and the sender), and nothing it sent
    is lost -- on the real reactor, real loopback TCP, the real service tree."""

    timeout = 90

    async def test_a_flooding_peer_is_held_then_read_again_and_nothing_is_lost(self) -> None:
        await self.flood(tls=False)

    async def test_the_same_over_tls(self) -> None:
        await self.flood(tls=True)

    async def flood(self, tls: bool) -> None:
        import threading

        s = RunningService(temp_home(self))
        local = KeyStore(s.home).ensure_identity()
        s.start()
        self.addCleanup(s.stop)
        await wait_for(lambda: s.node.listening_ports, 10, "the listener")
        hold = 100 * 1024
        self.patch(gossip_mod, "HOLD_BYTES", hold)
        peer = make_node(self, "peer-sync-flood", reactor=reactor, tls=tls)
        psk = b"s" * 32
        peer.keystore.save_key(local, psk)
        KeyStore(s.home).save_key("peer-sync-flood", psk)
        await peer.open_link(f"127.0.0.1:{s.port}", KeyAuth(psk, local))
        self.addCleanup(peer.close_all)
        g = gossip_of(s)
        await wait_for(lambda: "peer-sync-flood" in s.node.mesh.connected_peers(), 10, "the link")
        self.assertEqual(
            s.node.mesh.peer_transport("peer-sync-flood"), "tls1.3" if tls else "plaintext"
        )
        # The writer is busy (a slow disk, a big merge) while the frames come.
        busy = threading.Event()
        self.addCleanup(busy.set)
        g.writer.run(busy.wait, 30)
        most: list[int] = []
        charge = g._charge

        def charged(batch: Any) -> None:
            charge(batch)
            most.append(g._unmerged_bytes.get("peer-sync-flood", 0))

        g._charge = charged  # type: ignore[method-assign]
        now = int(time.time())
        pad = "x" * 3000
        sent = []
        for f in range(20):  # 20 frames of 20 units, ~60 KiB each: 1.2 MiB in all
            units = [
                unit_json(f"ku_s{f}_{i}", "peer-sync-flood", cmd=f"{pad} {f} {i}", validated=now)
                for i in range(20)
            ]
            sent += [u["id"] for u in units]
            peer.mesh.send(local, "knowledge_sync", {"sync_epoch": now, "units": units})
        await wait_for(lambda: g.counters["reads_held"] >= 1, 20, "the peer's link to be held")
        await deferLater(reactor, 0.5, lambda: None)  # the rest waits in the kernel
        self.assertLess(max(most), hold + 256 * 1024)
        self.assertLess(g._unmerged_bytes["peer-sync-flood"], 1024 * 1024)
        busy.set()

        def missing() -> list[str]:
            held = {u.id for u in g._load_units()}
            return [uid for uid in sent if uid not in held]

        # Read again once merged down to half: every unit it sent arrives.
        await wait_for(lambda: not missing(), 30, "every unit stored")
        await wait_for(lambda: not g._unmerged_bytes and not g._merging, 30, "every batch merged")
        self.assertIn("peer-sync-flood", s.node.mesh.connected_peers())
        self.assertEqual(g._holding, set())
