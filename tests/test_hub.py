"""
The hub server (claudectl/hub/server.py, wire.py, tap.py): control lines,
refusals, limits, squatting, flow control -- in memory with StringTransport
and a Clock, plus real loopback TCP for the splice and a relay link through it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.control.server import ControlRegistry
from claudectl.hub import tap, wire
from claudectl.hub.server import Hub, HubFactory, HubLimits
from claudectl.relay.handshake import KeyAuth
from tests.common import make_node, pair_nodes


def hub_node(testcase: Any, identity: str, **relay: Any) -> Any:
    """A TLS node on the real reactor that dials through hubs (as the service's does)."""
    from claudectl.hub.peer import client_endpoint

    node = make_node(testcase, identity, reactor, tls=True, **relay)
    node.dial_via = client_endpoint
    return node


A, B = "laptop-aaaa1111", "desk-bbbb2222"


def lines(t: StringTransport) -> list[dict[str, Any]]:
    return [json.loads(x) for x in t.value().splitlines() if x]


class Harness:
    def __init__(self, token: str = "tok", **limits: Any) -> None:
        self.clock = Clock()
        counter = iter(range(1, 10**6))
        self.hub = Hub(
            self.clock,
            token,
            HubLimits(**limits),
            random=lambda n: next(counter).to_bytes(n, "big"),
        )
        self.factory = HubFactory(self.hub)

    def connect(self, port: int = 40000) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", port))
        proto.makeConnection(t)
        return proto, t

    def send(self, proto: Any, msg: Any) -> None:
        data = msg if isinstance(msg, bytes) else wire.encode(msg)
        proto.dataReceived(data)

    def register(self, identity: str, token: str = "tok") -> tuple[Any, StringTransport]:
        p, t = self.connect()
        self.send(p, {"op": "register", "identity": identity, "token": token})
        return p, t


class WireTests(SynchronousTestCase):
    def test_greeting_tells_a_hub_from_a_relay(self) -> None:
        self.assertTrue(wire.greeting().startswith(wire.GREETING_PREFIX))
        self.assertTrue(wire.is_greeting(wire.greeting().strip()))
        self.assertFalse(wire.is_greeting(b'{"id":"msg_1","msg_type":"challenge"}'))

    def test_decode_checks_shapes(self) -> None:
        for bad in (
            b"not json",
            b"[1]",
            b'{"op":"launch"}',
            b'{"op":"register","identity":"../etc"}',
            b'{"op":"open","to":""}',
            b'{"op":"accept","channel":"xyz"}',
            b'{"op":"register","identity":"' + A.encode() + b'","token":' + b'"x' * 0 + b"5}",
            b"\xff\xfe",
            b"{" * 600 + b"}" * 600,
        ):
            with self.assertRaises(wire.HubProtocolError, msg=repr(bad[:40])):
                wire.decode(bad)
        self.assertEqual(wire.decode(wire.encode({"op": "open", "to": A}))["to"], A)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_decode_raises_only_protocol_errors(self, data: bytes) -> None:
        try:
            wire.decode(data)
        except wire.HubProtocolError:
            pass


class RefusalTests(SynchronousTestCase):
    def test_unregistered_identity_gets_a_clear_refusal(self) -> None:
        h = Harness()
        p, t = h.connect()
        h.send(p, {"op": "open", "to": A})
        [greeting, err] = lines(t)
        self.assertEqual(greeting["hub"], "claudectl-hub")
        self.assertEqual(err["reason"], "not_registered")
        self.assertIn(A, err["message"])
        self.assertTrue(t.disconnecting)

    def test_wrong_token_refuses_registration(self) -> None:
        h = Harness()
        with capturedLogs() as events:
            p, t = h.register(A, token="nope")
        self.assertEqual(lines(t)[-1]["reason"], "bad_token")
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.hub.registrations, {})
        self.assertNotIn("nope", json.dumps([str(e) for e in events]))

    def test_malformed_line_closes_the_registration_with_one_log_line(self) -> None:
        h = Harness()
        p, t = h.register(A)
        self.assertEqual(lines(t)[-1]["op"], "registered")
        with capturedLogs() as events:
            h.send(p, b"garbage\n")
        self.assertEqual(lines(t)[-1]["reason"], "malformed")
        self.assertTrue(t.disconnecting)
        self.assertEqual(len(events), 1)
        self.assertIn(A, events[0]["kind"])
        p.connectionLost(None)
        self.assertNotIn(A, h.hub.registrations)

    def test_a_flood_of_malformed_lines_is_counted_but_logged_ten_times_a_minute(self) -> None:
        h = Harness()
        with capturedLogs() as events:
            for i in range(50):
                p, t = h.connect(port=41000 + i)
                h.send(p, b"garbage\n")
                self.assertEqual(lines(t)[-1]["reason"], "malformed")
        self.assertEqual(h.hub.stats.refused["malformed"], 50)
        texts = [e["log_format"] for e in events]
        self.assertEqual(sum("malformed control line" in x for x in texts), 10)
        self.assertEqual(sum("counting, not logging" in x for x in texts), 1)
        self.assertEqual(len(events), 11)
        h.clock.advance(60)
        with capturedLogs() as events:
            p, t = h.connect(port=42000)
            h.send(p, b"garbage\n")
        self.assertEqual(len(events), 1)  # a new minute, a new budget

    def test_line_too_long_and_op_out_of_state(self) -> None:
        h = Harness()
        p, t = h.connect()
        h.send(p, b"x" * 5000)
        self.assertEqual(lines(t)[-1]["reason"], "malformed")
        p, t = h.register(A)
        h.send(p, {"op": "open", "to": B})  # a registration cannot open
        self.assertEqual(lines(t)[-1]["reason"], "malformed")

    def test_silence_is_closed(self) -> None:
        h = Harness()
        p, t = h.connect()
        h.clock.advance(11)
        self.assertEqual(lines(t)[-1]["reason"], "timeout")
        p, t = h.register(A)
        h.clock.advance(100)
        h.send(p, {"op": "ping"})
        self.assertEqual(lines(t)[-1]["op"], "pong")
        h.clock.advance(100)
        self.assertFalse(t.disconnecting)
        h.clock.advance(21)
        self.assertTrue(t.disconnecting)


class LimitTests(SynchronousTestCase):
    def test_registration_cap(self) -> None:
        h = Harness(max_registrations=2)
        h.register(A)
        h.register(B)
        p, t = h.register("third-cccc3333")
        self.assertEqual(lines(t)[-1]["reason"], "too_many")
        self.assertEqual(sorted(h.hub.registrations), [B, A])

    def test_silent_connections_are_capped(self) -> None:
        h = Harness(max_unidentified=2)
        (p1, _), (p2, _) = h.connect(), h.connect()
        p3, t3 = h.connect()
        self.assertTrue(t3.disconnecting)
        self.assertEqual(h.hub.status()["refused"], {"too_many_connections": 1})
        p3.connectionLost(None)
        h.send(p1, {"op": "register", "identity": A, "token": "tok"})  # p1 identified
        p4, t4 = h.connect()
        self.assertFalse(t4.disconnecting)
        h.send(p2, b"junk\n")  # refused: its slot is free once it is gone
        p2.connectionLost(None)
        p4.connectionLost(None)
        p1.connectionLost(None)
        self.assertEqual(h.hub.unidentified, 0)

    def test_pings_in_a_loop_get_one_answer_a_second(self) -> None:
        """A client that pings and never reads cannot grow the hub's buffers."""
        h = Harness()
        p, t = h.register(A)
        t.clear()
        for _ in range(1000):
            h.send(p, {"op": "ping"})
        self.assertEqual([m["op"] for m in lines(t)], ["pong"])
        h.clock.advance(1.0)
        h.send(p, {"op": "ping"})
        self.assertEqual([m["op"] for m in lines(t)], ["pong", "pong"])
        self.assertFalse(t.disconnecting)

    def test_second_registration_replaces_the_first_and_is_logged(self) -> None:
        h = Harness()
        first, t1 = h.register(A)
        with capturedLogs() as events:
            second, t2 = h.register(A)
        self.assertEqual(lines(t1)[-1]["reason"], "replaced")
        self.assertTrue(t1.disconnecting)
        self.assertIs(h.hub.registrations[A], second)
        self.assertTrue(any("registered again" in e["log_format"] for e in events))
        self.assertEqual(h.hub.status()["reregistrations"], 1)
        first.connectionLost(None)  # the old link closing does not drop the new one
        self.assertIs(h.hub.registrations[A], second)

    def test_channel_caps_and_accept_timeout(self) -> None:
        h = Harness(max_channels_per_registration=2)
        reg, rt = h.register(A)
        dialers = [h.connect() for _ in range(3)]
        for p, _ in dialers:
            h.send(p, {"op": "open", "to": A})
        incoming = [m for m in lines(rt) if m.get("op") == "incoming"]
        self.assertEqual(len(incoming), 2)
        self.assertEqual(lines(dialers[2][1])[-1]["reason"], "too_many")
        h.clock.advance(16)
        self.assertEqual(lines(dialers[0][1])[-1]["reason"], "timeout")
        self.assertEqual(h.hub.pending, {})
        # An accept for an expired channel is refused.
        p, t = h.connect()
        h.send(p, {"op": "accept", "channel": incoming[0]["channel"]})
        self.assertEqual(lines(t)[-1]["reason"], "no_such_channel")

    def test_registration_leaving_refuses_its_waiting_channels(self) -> None:
        h = Harness()
        reg, _ = h.register(A)
        d, dt = h.connect()
        h.send(d, {"op": "open", "to": A})
        reg.connectionLost(None)
        self.assertEqual(lines(dt)[-1]["reason"], "not_registered")

    def test_splice_forwards_and_rate_limit_pauses(self) -> None:
        h = Harness(bytes_per_sec_per_registration=1000)
        reg, rt = h.register(A)
        d, dt = h.connect()
        h.send(d, {"op": "open", "to": A})
        channel = lines(rt)[-1]["channel"]
        acc, at = h.connect()
        h.send(acc, wire.encode({"op": "accept", "channel": channel}) + b"challenge\n")
        self.assertTrue(
            dt.value().endswith(wire.encode({"op": "spliced", "channel": channel}) + b"challenge\n")
        )
        # The target learns the dialer's address (its relay admission counts that).
        self.assertEqual(json.loads(at.value().splitlines()[1])["peer"], "10.0.0.9")
        d.dataReceived(b"x" * 1500)  # over one second's budget
        self.assertTrue(at.value().endswith(b"x" * 1500))
        self.assertEqual(dt.producerState, "paused")
        h.clock.advance(0.6)
        self.assertEqual(dt.producerState, "producing")
        self.assertEqual(h.hub.status()["channels"], 1)
        self.assertEqual(h.hub.status()["bytes_forwarded"], len(b"challenge\n") + 1500)
        # A full write buffer on one side pauses the other (its producer).
        at.producer.pauseProducing()
        self.assertEqual(dt.producerState, "paused")
        at.producer.resumeProducing()
        self.assertEqual(dt.producerState, "producing")
        # One side closing closes the other.
        d.connectionLost(None)
        self.assertTrue(at.disconnecting)
        acc.connectionLost(None)
        self.assertEqual(h.hub.status()["channels"], 0)

    def test_status_needs_the_token(self) -> None:
        h = Harness()
        p, t = h.connect()
        h.send(p, {"op": "status", "token": "bad"})
        self.assertEqual(lines(t)[-1]["reason"], "bad_token")
        h.register(A)
        p, t = h.connect()
        h.send(p, {"op": "status", "token": "tok"})
        self.assertEqual(lines(t)[-1]["registrations"], 1)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=200), max_size=6))
    def test_nothing_a_client_sends_crashes_the_hub(self, chunks: list[bytes]) -> None:
        h = Harness()
        reg, _ = h.register(A)
        for start in (b"", wire.encode({"op": "open", "to": A})):
            p, t = h.connect()
            p.dataReceived(start)
            for chunk in chunks:
                p.dataReceived(chunk)
            p.connectionLost(None)
        self.assertIn(A, h.hub.registrations)


class OptionsTests(SynchronousTestCase):
    def test_options(self) -> None:
        o = tap.Options()
        o.parseOptions(["--listen", "tcp:0", "--token", "t", "--rate", "0", "--max-channels", "3"])
        self.assertEqual((o["token"], o.limits.max_channels_per_registration), ("t", 3))
        self.assertEqual(o.limits.bytes_per_sec_per_registration, 0)
        for bad in (
            ["--listen", "nonsense:"],
            ["--token", "a", "--token-file", "x"],
            ["--rate", "x"],
        ):
            with self.assertRaises(usage.UsageError):
                tap.Options().parseOptions(bad)


class PeerSideTests(SynchronousTestCase):
    def test_unusable_hub_entries_are_skipped_with_a_warning(self) -> None:
        from twisted.application.service import MultiService

        from claudectl.hub.peer import attach, usable_hubs

        self.assertEqual(
            usable_hubs(["hub.example.org:9849", "no port:x", "10.0.0.1"]),
            ["hub.example.org:9849", "10.0.0.1"],
        )
        node = make_node(self, A, hubs=("bad:port:x", "127.0.0.1:9849"))
        top = MultiService()
        with capturedLogs() as events:
            attach(node, ControlRegistry(), top)
        self.assertEqual([s.name for s in top], ["hub:127.0.0.1:9849"])
        self.assertTrue(any("bad:port:x" in str(e.get("hub")) for e in events))

    def test_a_hub_cannot_make_the_peer_hold_sockets_without_end(self) -> None:
        """
        ``incoming`` lines in a flood open at most MAX_PENDING_ACCEPTS channel
        connections at once; each unspliced one is closed after the handshake
        timeout, and frees its slot.
        """
        from twisted.internet.testing import MemoryReactorClock

        from claudectl.hub.peer import MAX_PENDING_ACCEPTS, _Registration

        mem = MemoryReactorClock()
        node = make_node(self, A, mem)
        reg = _Registration(node, "127.0.0.1:9849", "tok")
        reg.makeConnection(StringTransport())
        reg.dataReceived(wire.greeting() + wire.encode({"op": "registered"}))
        self.assertTrue(reg.registered.called)
        for i in range(MAX_PENDING_ACCEPTS * 4):
            reg.dataReceived(wire.encode({"op": "incoming", "channel": f"{i:032x}"}))
        self.assertEqual(len(mem.tcpClients), MAX_PENDING_ACCEPTS)
        # The hub never answers on them: connected, then timed out.
        accepts = []
        for _host, _port, factory, _t, _b in mem.tcpClients:
            proto = factory.buildProtocol(None)
            t = StringTransport()
            proto.makeConnection(t)
            accepts.append((proto, t))
        mem.advance(float(node.handshake_timeout_secs) + 1)
        for proto, t in accepts:
            self.assertTrue(t.disconnecting)
            proto.connectionLost(None)
        self.assertEqual(reg.accepting, 0)
        reg.dataReceived(wire.encode({"op": "incoming", "channel": "f" * 32}))
        self.assertEqual(len(mem.tcpClients), MAX_PENDING_ACCEPTS + 1)
        reg.connectionLost(None)

    def test_token_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("secret-token\n")
        o = tap.Options()
        o.parseOptions(["--token-file", path])
        self.assertEqual(o["token"], "secret-token")
        with self.assertRaises(usage.UsageError):
            tap.Options().parseOptions(["--token-file", path + ".missing"])


class ServiceTests(SynchronousTestCase):
    def test_make_service_listens_and_logs_status_when_it_changes(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        r = MemoryReactorClock()
        o = tap.Options()
        o.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--token", "t"])
        svc = tap.makeService(o, reactor=r)
        self.assertEqual(r.tcpServers, [])  # nothing before startService
        with capturedLogs() as events:
            svc.startService()
            self.assertEqual(len(r.tcpServers), 1)
            r.advance(tap.STATUS_LOG_INTERVAL_SECS)
            svc.hub.stats.bytes_forwarded = 5  # type: ignore[attr-defined]
            r.advance(tap.STATUS_LOG_INTERVAL_SECS)
            r.advance(tap.STATUS_LOG_INTERVAL_SECS)  # unchanged: not logged again
        status_lines = [e for e in events if "hub status" in e.get("log_format", "")]
        self.assertEqual([e["bytes_forwarded"] for e in status_lines], [0, 5])
        svc.stopService()


class LoopbackTests(TestCase):
    """Real TCP on 127.0.0.1: a relay link spliced through a hub, TLS end to end."""

    @defer.inlineCallbacks
    def test_direct_dial_fails_so_the_dialer_goes_through_a_hub(self) -> Any:
        hub = Hub(reactor, "tok")
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(HubFactory(hub))
        self.addCleanup(port.stopListening)
        hub_addr = f"127.0.0.1:{port.getHost().port}"
        # A closed port: where B thinks A is.
        closed = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            HubFactory(hub)
        )
        dead_addr = f"127.0.0.1:{closed.getHost().port}"
        yield closed.stopListening()
        a = hub_node(self, A, hubs=(hub_addr,), hub_token="tok")
        b = hub_node(self, B, hubs=(hub_addr,), hub_token="")
        pair_nodes(a, b)
        from twisted.application.service import MultiService

        from claudectl.hub.peer import attach

        top = MultiService()
        registry = ControlRegistry()
        attach(a, registry, top)
        top.startService()
        self.addCleanup(top.stopService)
        yield until(lambda: A in hub.registrations)
        yield until(lambda: registry.status_providers[0]()["hubs"][0]["state"] == "registered")
        from twisted.logger import globalLogPublisher

        lines: list[str] = []

        def factory_lines(event: dict[str, Any]) -> None:
            text = str(event.get("log_format") or "")
            if "factory" in text.lower():
                lines.append(text.format(**event) if "{factory" in text else text)

        globalLogPublisher.addObserver(factory_lines)
        self.addCleanup(globalLogPublisher.removeObserver, factory_lines)
        proto = yield b.open_link(dead_addr, KeyAuth(b"k" * 32, A))
        self.assertEqual(proto.result.peer_id, A)
        self.assertEqual(proto.result.transport, "tls1.3")
        self.assertEqual(proto.hub_via, hub_addr)
        yield until(lambda: a.mesh.is_connected(B))
        self.assertEqual(registry.peer_info_providers[-1](B), {"via": hub_addr})
        self.assertEqual(hub.status()["channels"], 1)
        # The channel's dial (A's accept) and B's dial logged no factory
        # start/stop lines: a stranger's channel cost two each (review 15).
        self.assertEqual(lines, [])
        # Every socket on the way sends small frames at once (TCP_NODELAY):
        # the hub's two spliced ones and both relay ends.
        socks = [c.transport.socket for c in hub.spliced]
        for node in (a, b):
            [link] = node.mesh.links.values()
            t = link.protocol.transport
            socks.append(getattr(t, "socket", None) or t.transport.socket)
        self.assertEqual(len(socks), 4)
        for sock in socks:
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        yield b.close_all()
        yield a.close_all()
        yield until(lambda: not hub.spliced)

    @defer.inlineCallbacks
    def test_a_hub_that_does_not_know_the_peer_is_passed_over_for_the_next(self) -> Any:
        """The peer's address is a hub it left; the next listed hub has it."""
        hubs, addrs = [], []
        for _ in range(2):
            hub = Hub(reactor, "tok")
            port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
                HubFactory(hub)
            )
            self.addCleanup(port.stopListening)
            hubs.append(hub)
            addrs.append(f"127.0.0.1:{port.getHost().port}")
        a = hub_node(self, A, hubs=(addrs[1],), hub_token="tok")
        b = hub_node(self, B, hubs=(addrs[1],))
        pair_nodes(a, b)
        from twisted.application.service import MultiService

        from claudectl.hub.peer import attach

        top = MultiService()
        attach(a, ControlRegistry(), top)
        top.startService()
        self.addCleanup(top.stopService)
        yield until(lambda: A in hubs[1].registrations)
        proto = yield b.open_link(addrs[0], KeyAuth(b"k" * 32, A))
        self.assertEqual((proto.result.peer_id, proto.hub_via), (A, addrs[1]))
        self.assertEqual(hubs[0].stats.refused, {"not_registered": 1})
        yield until(lambda: a.mesh.is_connected(B))
        [inbound] = [p for p in a.protocols if p.result is not None]
        # Admission counts the dialer's address as the hub saw it, kept apart
        # from direct addresses (never loopback-exempt, no shared cooldown).
        self.assertEqual(
            (inbound.hub_peer_ip, inbound.ip), ("127.0.0.1", f"hub:{addrs[1]}/127.0.0.1")
        )
        from claudectl.relay.admission import _is_loopback

        self.assertFalse(_is_loopback(inbound.ip))
        yield b.close_all()
        yield a.close_all()
        yield until(lambda: not hubs[1].spliced)

    @defer.inlineCallbacks
    def test_a_squatter_with_the_token_denies_service_but_cannot_authenticate(self) -> Any:
        from twisted.application.service import MultiService

        from claudectl.hub.peer import attach
        from claudectl.relay.handshake import HandshakeFailed

        hub = Hub(reactor, "tok")
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(HubFactory(hub))
        self.addCleanup(port.stopListening)
        hub_addr = f"127.0.0.1:{port.getHost().port}"
        real = hub_node(self, A, hubs=(hub_addr,), hub_token="tok")
        squatter = hub_node(self, A, hubs=(hub_addr,), hub_token="tok")
        b = hub_node(self, B)
        pair_nodes(real, b)
        squatter.keystore.save_key(B, b"s" * 32)  # its own idea of a key: not B's
        with capturedLogs() as events:
            for n, node in enumerate((real, squatter), start=1):
                top = MultiService()
                attach(node, ControlRegistry(), top)
                top.startService()
                self.addCleanup(top.stopService)
                yield until(lambda n=n: hub.stats.registrations_total == n)
        self.assertEqual(len(hub.registrations), 1)
        self.assertTrue(any("registered again" in e.get("log_format", "") for e in events))
        with self.assertRaises(HandshakeFailed):
            yield b.open_link(hub_addr, KeyAuth(b"k" * 32, A))
        self.assertFalse(b.mesh.is_connected(A))
        self.assertFalse(squatter.mesh.is_connected(B))
        yield b.close_all()
        yield squatter.close_all()
        yield until(lambda: not hub.spliced)

    @defer.inlineCallbacks
    def test_relay_connect_to_a_hub_address_needs_the_peer_named(self) -> Any:
        from twisted.application.service import MultiService

        from claudectl.hub.peer import attach

        hub = Hub(reactor, "tok")
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(HubFactory(hub))
        self.addCleanup(port.stopListening)
        hub_addr = f"127.0.0.1:{port.getHost().port}"
        a = hub_node(self, A, hubs=(hub_addr,), hub_token="tok")
        b = hub_node(self, B)
        pair_nodes(a, b)
        top = MultiService()
        attach(a, ControlRegistry(), top)
        top.startService()
        self.addCleanup(top.stopService)
        yield until(lambda: A in hub.registrations)
        parent = MultiService()
        parent.startService()
        self.addCleanup(parent.stopService)
        b.keystore.save_key("other-cccc3333", b"o" * 32)  # two peers: no guessing
        with self.assertRaises(Exception) as caught:
            yield defer.Deferred.fromCoroutine(b.connect(hub_addr, None, parent))
        self.assertIn("is a claudectl hub: name the peer", str(caught.exception))
        outcome = yield defer.Deferred.fromCoroutine(b.connect(hub_addr, A, parent))
        self.assertEqual((outcome.peer, outcome.address), (A, hub_addr))
        self.assertEqual(b.dialers[A].address, hub_addr)
        yield b.remove_dialer(A)
        yield b.close_all()
        yield a.close_all()
        yield until(lambda: not hub.spliced)

    @defer.inlineCallbacks
    def test_bulk_bytes_flow_both_ways_through_a_real_splice(self) -> Any:
        hub = Hub(reactor, "")
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(HubFactory(hub))
        self.addCleanup(port.stopListening)
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        reg = yield connectProtocol(ep, Collect())
        reg.transport.write(wire.encode({"op": "register", "identity": A}))
        yield until(lambda: reg.has("registered"))
        dialer = yield connectProtocol(ep, Collect())
        dialer.transport.write(wire.encode({"op": "open", "to": A}))
        yield until(lambda: reg.has("incoming"))
        acc = yield connectProtocol(ep, Collect())
        acc.transport.write(
            wire.encode({"op": "accept", "channel": reg.has("incoming")["channel"]})
        )
        yield until(lambda: acc.spliced and dialer.spliced)
        payload = bytes(range(256)) * 8192  # 2 MiB each way
        dialer.transport.write(payload)
        acc.transport.write(payload[::-1])
        yield until(lambda: len(acc.raw) >= len(payload) and len(dialer.raw) >= len(payload))
        self.assertEqual(acc.raw, payload)
        self.assertEqual(dialer.raw, payload[::-1])
        self.assertEqual(hub.status()["bytes_forwarded"], 2 * len(payload))
        for p in (reg, acc, dialer):
            p.transport.loseConnection()
        yield until(lambda: not hub.spliced and not hub.registrations)


def deferLater(secs: float) -> Any:
    from twisted.internet.task import deferLater as later

    return later(reactor, secs, lambda: None)


@defer.inlineCallbacks
def until(condition: Any, timeout: float = 10.0) -> Any:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        yield deferLater(0.01)
        waited += 0.01


class Collect(Protocol):
    """A test client: control lines until ``spliced``, then raw bytes."""

    def __init__(self) -> None:
        self.buf = b""
        self.raw = b""
        self.spliced = False
        self.seen: list[dict[str, Any]] = []

    def dataReceived(self, data: bytes) -> None:
        if self.spliced:
            self.raw += data
            return
        self.buf += data
        while not self.spliced and b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            self.seen.append(msg)
            if msg.get("op") == "spliced":
                self.spliced = True
                self.raw, self.buf = self.buf, b""

    def has(self, op: str) -> Any:
        return next((m for m in self.seen if m.get("op") == op), None)
