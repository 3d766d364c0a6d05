"""
Hostile peers at the relay level (issue 11), on real TCP over loopback.

A real listener node (the RelayNode the service runs, TLS on) faces sockets
that connect and send nothing (slowloris), that ask for TLS and then stall,
and floods of both; a real peer must still authenticate within a second.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from claudectl.control.server import RelayLocator
from claudectl.relay import codec
from claudectl.relay.admission import MAX_INFLIGHT_HANDSHAKES, STALLED_SECS
from claudectl.relay.binding import CAP_TLS
from claudectl.relay.handshake import KeyAuth
from claudectl.relay.node import RelayFactory
from tests.common import make_node, pair_nodes


class Silent(protocol.Protocol):
    """Connects and never sends a byte (unless told to)."""

    def __init__(self, starttls: bool = False) -> None:
        self.starttls = starttls
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.starttls and b"\n" in self.received:
            # Ask for TLS like a peer of this project, then never speak TLS.
            self.starttls = False
            self.transport.write(
                codec.encode(
                    codec.Envelope(
                        "msg_1_0",
                        codec.HANDSHAKE,
                        "mallory-6666",
                        1,
                        {"starttls": CAP_TLS, "version": "0.64.0", "caps": [CAP_TLS]},
                    )
                )
            )

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class SlowlorisTests(TestCase):
    def setUp(self) -> Any:
        self.a = make_node(self, "alpha-1111", reactor, tls=True)
        self.b = make_node(self, "beta-2222", reactor, tls=True)
        self.psk = pair_nodes(self.a, self.b)
        self.attackers: list[Silent] = []
        d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(RelayFactory(self.a))

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)

        return d.addCallback(listening)

    async def tearDown(self) -> None:
        for s in self.attackers:
            if s.transport is not None:
                s.transport.abortConnection()
        await defer.gatherResults([s.lost for s in self.attackers], consumeErrors=True)
        await defer.gatherResults([self.a.close_all(), self.b.close_all()])

    async def attack(self, n: int, sources: list[str], starttls: bool = False) -> None:
        """``n`` silent sockets, spread over the ``sources`` addresses; wait until admitted."""
        port = self.port.getHost().port
        for i in range(n):
            s = Silent(starttls)
            self.attackers.append(s)
            src = sources[i % len(sources)]
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(src, 0)), s
            )
        for _ in range(200):
            await deferLater(reactor, 0.01, lambda: None)
            if self.a.admission.inflight >= min(n, MAX_INFLIGHT_HANDSHAKES):
                break

    async def timed_dial(self) -> float:
        start = time.monotonic()
        proto = await self.b.open_link(
            f"127.0.0.1:{self.port.getHost().port}", KeyAuth(self.psk, "alpha-1111")
        )
        elapsed = time.monotonic() - start
        self.assertEqual(proto.peer_id, "alpha-1111")
        return elapsed

    async def test_sixteen_idle_sockets_do_not_lock_out_a_peer(self) -> None:
        await self.attack(16, ["127.0.0.1"])
        self.assertEqual(self.a.admission.inflight, 16)
        self.assertLess(await self.timed_dial(), 1.0)
        self.assertEqual(self.a.mesh.connected_peers(), ["beta-2222"])
        self.assertGreaterEqual(self.a.admission.rejections.get("idle_shed", 0), 1)

    async def test_idle_flood_from_several_addresses(self) -> None:
        # 40 idle sockets from four other loopback addresses: the newest are
        # admitted by shedding the oldest, and a real peer still gets in.
        await self.attack(40, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"])
        self.assertLessEqual(self.a.admission.inflight, MAX_INFLIGHT_HANDSHAKES)
        self.assertLess(await self.timed_dial(), 1.0)
        counts = self.a.admission.preauth_counts()
        self.assertNotIn("127.0.0.1", counts)  # the peer is no longer pre-auth
        # The shed count is visible where the admission counters are (service status).
        status = RelayLocator(self.a).status()
        import json

        rejections = json.loads(status["status_json"])["rejections"]
        self.assertGreaterEqual(rejections["idle_shed"], 24)
        self.assertNotIn("too_many_handshakes", rejections)

    async def test_sockets_stalled_in_tls_are_shed_too(self) -> None:
        await self.attack(16, ["127.0.0.6"], starttls=True)
        # They asked for TLS (progress), then stalled.
        await deferLater(reactor, STALLED_SECS + 0.1, lambda: None)
        self.assertEqual(self.a.admission.inflight, 16)
        self.assertLess(await self.timed_dial(), 1.0)
        self.assertGreaterEqual(self.a.admission.rejections.get("stalled_shed", 0), 1)

    async def test_flood_while_a_peer_handshakes(self) -> None:
        # A peer dials while 120 idle sockets arrive from four other addresses.
        dial = defer.ensureDeferred(self.timed_dial())
        flood = defer.ensureDeferred(
            self.attack(120, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"])
        )
        elapsed = await dial
        await flood
        self.assertLess(elapsed, 1.0)
        self.assertEqual(self.a.mesh.connected_peers(), ["beta-2222"])
        self.assertLessEqual(self.a.admission.inflight, MAX_INFLIGHT_HANDSHAKES)


class _StormClient(protocol.Protocol):
    """A minimal connector: the sans-IO handshake over one real socket."""

    def __init__(self, identity: str, psk: bytes, listener: str) -> None:
        from claudectl.lines import LineSplitter
        from claudectl.relay.codec import EnvelopeFactory
        from claudectl.relay.handshake import ConnectorHandshake

        self.machine = ConnectorHandshake(EnvelopeFactory(identity), KeyAuth(psk, listener))
        self.lines = LineSplitter(codec.MAX_LINE_BYTES)
        self.ok = False
        self.lost: defer.Deferred[bool] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        for ln in self.lines.feed(data):
            if self.ok or not ln:
                continue
            step = self.machine.receive(codec.decode(ln))
            self.transport.write(b"".join(codec.encode(e) for e in step.send))
            if step.done is not None:
                self.ok = True
                self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(self.ok)


class HandshakeStormTests(TestCase):
    async def test_sixty_clients_at_once_are_paced_not_reset(self) -> None:
        """
        Issue 16: 60 real peers connecting at once (more than the 16 handshake
        slots) all authenticate; none is reset or shed: the ones beyond the
        slots wait for one.
        """
        node = make_node(self, "alpha-1111", reactor, max_peers=128)
        self.addCleanup(node.close_all)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            RelayFactory(node)
        )
        self.addCleanup(port.stopListening)
        clients = []
        for i in range(60):
            psk = bytes([i]) * 32
            node.keystore.save_key(f"storm-{i:03d}", psk)
            clients.append(_StormClient(f"storm-{i:03d}", psk, "alpha-1111"))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await defer.gatherResults([connectProtocol(endpoint, c) for c in clients])
        results = await defer.gatherResults([c.lost for c in clients])
        self.assertEqual(results, [True] * 60)
        rejections = node.admission.rejections
        for reason in ("idle_shed", "stalled_shed", "too_many_handshakes", "waited_too_long"):
            self.assertNotIn(reason, rejections)
        for _ in range(100):
            if not node.protocols:
                break
            await deferLater(reactor, 0.01, lambda: None)
