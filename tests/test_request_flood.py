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
