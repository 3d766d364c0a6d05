"""
Encrypted links: TLS 1.3 bound to the pairing key, on real TCP over loopback.

Two real nodes (the same RelayNode the service runs) talk through the real
reactor; a byte-forwarding proxy in the middle captures, or injects, what
passes.  The attacks of the secure-channel issue are reproduced here: a
reflection through the node's own listener, a downgrade, injection.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.relay import codec
from claudectl.relay.binding import PLAINTEXT, TLS13, channel_proof
from claudectl.relay.crypto import proof
from claudectl.relay.handshake import MUTUAL, ONEWAY, HandshakeFailed, KeyAuth
from claudectl.relay.node import RelayFactory
from claudectl.relay.nonces import IssuedNonces
from claudectl.relay.tls import CERT_FILE, KEY_FILE, LinkTLS, ensure_credentials
from tests.common import make_node, pair_nodes, temp_home


def line(msg_type: str, payload: Any, from_peer: str) -> bytes:
    return codec.encode(codec.Envelope("msg_1_0", msg_type, from_peer, 1, payload))


class Pipe(protocol.Protocol):
    """One side of the proxy: forwards to ``other``, records what it forwards."""

    def __init__(self, log: bytearray) -> None:
        self.log = log
        self.other: Pipe | None = None
        self.pending: list[bytes] = []
        #: Each read, as it came.
        self.reads: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.log.extend(data)
        self.reads.append(data)
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.loseConnection()


class Proxy(protocol.Factory):
    """A TCP proxy to ``target`` that records both directions of every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = bytearray()  # connector -> listener
        self.down = bytearray()  # listener -> connector
        self.client_sides: list[Pipe] = []

    def buildProtocol(self, addr: Any) -> Pipe:
        inner = Pipe(self.up)
        outer = Pipe(self.down)
        inner.other, outer.other = outer, inner
        self.client_sides.append(inner)

        def connected(p: Pipe) -> None:
            for data in inner.pending:
                p.transport.write(data)
            inner.pending = []

        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.target_port), outer)
        d.addCallback(connected)
        return inner


def tls_records(data: bytes) -> list[int]:
    """The content types of the TLS records in ``data``; fails on anything else."""
    types = []
    i = 0
    while i < len(data):
        assert i + 5 <= len(data), "truncated TLS record header"
        ctype, major, minor, length = (
            data[i],
            data[i + 1],
            data[i + 2],
            int.from_bytes(data[i + 3 : i + 5], "big"),
        )
        assert ctype in (20, 21, 22, 23), f"not a TLS record at offset {i}: {data[i : i + 20]!r}"
        assert (major, minor) in ((3, 1), (3, 3)), f"bad record version {major}.{minor}"
        types.append(ctype)
        i += 5 + length
    return types


def split_first_flight(data: bytes, lines: int) -> tuple[list[bytes], bytes]:
    """The first ``lines`` NDJSON lines, and the bytes after them."""
    out = []
    for _ in range(lines):
        nl = data.index(b"\n")
        out.append(data[:nl])
        data = data[nl + 1 :]
    return out, data


class Captured:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def text(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


class TwoNodes(TestCase):
    """Two real nodes on loopback."""

    def setUp(self) -> Any:
        self.a = make_node(self, "alpha-1111", reactor, tls=True)
        self.b = make_node(self, "beta-2222", reactor, tls=True)
        self.psk = pair_nodes(self.a, self.b)
        self.log = Captured()
        self.addCleanup(self.log.stop)
        d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(RelayFactory(self.a))

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)

        return d.addCallback(listening)

    def tearDown(self) -> Any:
        return defer.gatherResults([self.a.close_all(), self.b.close_all()])

    async def dial(
        self, port: int | None = None, node: Any = None, expect: str = "alpha-1111"
    ) -> Any:
        node = node or self.b
        return await node.open_link(
            f"127.0.0.1:{port or self.port.getHost().port}", KeyAuth(self.psk, expect)
        )

    async def settle(self, secs: float = 0.05) -> None:
        await deferLater(reactor, secs, lambda: None)


class TLSLinkTests(TwoNodes):
    async def test_both_sides_tls13_mutual_and_remembered(self) -> None:
        client = await self.dial()
        await self.settle()
        self.assertEqual(client.result.transport, TLS13)
        self.assertEqual(self.b.mesh.peer_transport("alpha-1111"), TLS13)
        self.assertEqual(self.a.mesh.peer_transport("beta-2222"), TLS13)
        self.assertEqual(self.a.mesh.peer_mode("beta-2222"), MUTUAL)
        self.assertTrue(self.a.keystore.is_tls("beta-2222"))
        self.assertTrue(self.b.keystore.is_tls("alpha-1111"))
        conn = client.transport.getHandle()
        self.assertEqual(conn.get_protocol_version_name(), "TLSv1.3")
        # Frames flow both ways inside TLS.
        got: list[str] = []
        self.a.mesh.add_handler(codec.KNOWLEDGE_SYNC, lambda p, e: got.append(p))
        self.b.mesh.send("alpha-1111", codec.KNOWLEDGE_SYNC, {"units": [], "sync_epoch": 1})
        await self.settle()
        self.assertEqual(got, ["beta-2222"])
        # The listener's key and certificate exist, private to the user.
        for name in (KEY_FILE, CERT_FILE):
            mode = stat.S_IMODE(os.stat(self.a.home.relay / name).st_mode)
            self.assertEqual(mode, 0o600, name)

    async def test_wrong_key_fails_and_counts(self) -> None:
        self.b.keystore.save_key("alpha-1111", b"w" * 32)
        self.psk = b"w" * 32
        with self.assertRaises(HandshakeFailed) as e:
            await self.dial()
        self.assertIn("denied", str(e.exception))
        await self.settle()
        self.assertEqual(self.a.mesh.connected_peers(), [])
        self.assertIn("handshake with beta-2222 at 127.0.0.1 failed: wrong proof", self.log.text())

    async def test_capturing_proxy_sees_only_tls_after_first_flight(self) -> None:
        proxy = Proxy(self.port.getHost().port)
        pport = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(proxy)
        self.addCleanup(pport.stopListening)
        await self.dial(pport.getHost().port)
        secret = "SECRET-UNIT-TEXT-approve cargo test"
        self.b.mesh.send(
            "alpha-1111", codec.KNOWLEDGE_SYNC, {"units": [{"content": secret}], "sync_epoch": 1}
        )
        self.a.mesh.send("beta-2222", codec.TASK_STATUS, {"summary": secret})
        await self.settle(0.2)
        # Connector -> listener: one plaintext line (the starttls request), then TLS.
        [starttls], up_rest = split_first_flight(bytes(self.proxy_check(proxy.up)), 1)
        self.assertEqual(json.loads(starttls)["payload"]["starttls"], "tls-v1")
        # Listener -> connector: the challenge, then TLS.
        [challenge], down_rest = split_first_flight(bytes(proxy.down), 1)
        self.assertIn("tls-v1", json.loads(challenge)["payload"]["caps"])
        self.assertEqual(json.loads(challenge)["payload"]["identity"], "alpha-1111")
        for rest in (up_rest, down_rest):
            self.assertIn(23, tls_records(rest))  # application data records
            self.assertNotIn(b"msg_type", rest)
            self.assertNotIn(b"SECRET", rest)
            self.assertNotIn(b"proof", rest)

    async def test_proof_rides_with_finished_and_ack_leaves_before_link_up_work(self) -> None:
        proxy = Proxy(self.port.getHost().port)
        pport = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(proxy)
        self.addCleanup(pport.stopListening)
        waiting: list[int] = []

        def up(peer: str) -> None:
            # The listener's link-up work runs: its handshake_ack (a TLS
            # record) must already be in the kernel, at the proxy's socket.
            sock = proxy.client_sides[0].other.transport.getHandle()  # type: ignore[union-attr]
            try:
                waiting.append(len(sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)))
            except BlockingIOError:
                waiting.append(0)

        self.a.mesh.add_link_observer(up, None)
        await self.dial(pport.getHost().port)
        self.assertEqual(len(waiting), 1)
        self.assertGreater(waiting[0], 0)
        # Connector -> listener: starttls + ClientHello, then one write holding
        # its Finished and the proof (application data), nothing after it.
        reads = proxy.client_sides[0].reads
        [_starttls], hello = split_first_flight(reads[0], 1)
        self.assertEqual(tls_records(hello), [22])
        self.assertEqual(len(reads), 2, [tls_records(r) for r in reads[1:]])
        self.assertEqual(tls_records(reads[1])[-2:], [23, 23])  # Finished, proof

    async def test_known_tls_peer_gets_starttls_before_any_challenge(self) -> None:
        first = await self.dial()  # writes alpha's .tls marker on beta's side
        first.close("test")
        await first.when_closed()
        got = bytearray()

        class Silent(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.extend(data)

        silent = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            protocol.Factory.forProtocol(Silent)
        )
        self.addCleanup(silent.stopListening)
        d = self.b.open_link(f"127.0.0.1:{silent.getHost().port}", KeyAuth(self.psk, "alpha-1111"))
        d.addErrback(lambda _f: None)

        def first_record() -> bytes | None:
            rest = bytes(got).split(b"\n", 1)[1] if b"\n" in got else b""
            if len(rest) < 5 or len(rest) < 5 + int.from_bytes(rest[3:5], "big"):
                return None
            return rest[: 5 + int.from_bytes(rest[3:5], "big")]

        for _ in range(250):
            if first_record() is not None:
                break
            await self.settle(0.02)
        # No challenge was sent, yet the starttls request and a ClientHello came.
        [starttls], _rest = split_first_flight(bytes(got), 1)
        self.assertEqual(json.loads(starttls)["payload"]["starttls"], "tls-v1")
        hello = first_record()
        assert hello is not None
        self.assertEqual(tls_records(hello), [22])
        for proto in list(self.b.protocols):
            proto.transport.abortConnection()

    async def test_links_share_one_tls_factory_per_side(self) -> None:
        first = await self.dial()
        layer = first.transport.protocol
        self.assertIsInstance(layer, LinkTLS)
        first.close("test")
        await first.when_closed()
        second = await self.dial()
        self.assertIs(second.transport.protocol.factory, layer.factory)
        self.assertEqual(second.transport.getHandle().get_protocol_version_name(), "TLSv1.3")

    def proxy_check(self, data: bytearray) -> bytearray:
        self.assertTrue(data, "nothing passed the proxy")
        return data

    async def test_injected_bytes_kill_the_link(self) -> None:
        proxy = Proxy(self.port.getHost().port)
        pport = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(proxy)
        self.addCleanup(pport.stopListening)
        client = await self.dial(pport.getHost().port)
        await self.settle()
        self.assertEqual(self.a.mesh.connected_peers(), ["beta-2222"])
        got: list[Any] = []
        self.a.mesh.add_handler(codec.DELEGATE_TASK, lambda p, e: got.append(e))
        # The attacker forges a whole TLS application-data record toward the listener.
        forged = line(codec.DELEGATE_TASK, {"prompt": "rm -rf ~"}, "beta-2222")
        record = bytes([23, 3, 3]) + len(forged).to_bytes(2, "big") + forged
        outer = proxy.client_sides[0].other
        assert outer is not None and outer.transport is not None
        outer.transport.write(record)
        await client.when_closed()
        await self.settle()
        self.assertEqual(got, [])
        self.assertEqual(self.a.mesh.connected_peers(), [])
        self.assertIn("TLS error", self.a.mesh.states["beta-2222"].last_error or "")


class ReflectionTests(TwoNodes):
    """The attack: make a node answer its own listener's challenge for us."""

    async def test_reflection_through_a_byte_relay_is_refused(self) -> None:
        # The node dials an address the attacker holds, expecting beta; the
        # attacker splices that connection onto the node's own listener.
        proxy = Proxy(self.port.getHost().port)
        pport = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(proxy)
        self.addCleanup(pport.stopListening)
        with self.assertRaises(HandshakeFailed):
            await self.a.open_link(
                f"127.0.0.1:{pport.getHost().port}", KeyAuth(self.psk, "beta-2222")
            )
        await self.settle()
        self.assertEqual(self.a.mesh.connected_peers(), [])

    async def test_plaintext_frame_reflection_is_refused(self) -> None:
        """
        The attacker speaks frames: it opens a connection to the node's
        listener claiming to be beta, hands that challenge to the node's
        outgoing side (dialing the attacker), and passes answers back.
        """
        for node in (self.a, self.b):
            node.policy = type(node.policy)(
                tls=False, require_encryption=False, is_own_nonce=node.nonces.issued
            )
        await self.reflect_challenge()

    async def test_frame_reflection_with_tls_offered_is_refused(self) -> None:
        await self.reflect_challenge()

    async def reflect_challenge(self) -> None:
        listener_side: defer.Deferred[list[bytes]] = defer.Deferred()
        to_listener = FrameClient()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), to_listener
        )
        challenge = await to_listener.next_line()

        class Attacker(LineReceiver):
            delimiter = b"\n"

            def connectionMade(self) -> None:
                self.transport.write(challenge + b"\n")  # the node's own challenge

            def lineReceived(self, data: bytes) -> None:
                listener_side.callback([data])

        server = protocol.Factory.forProtocol(Attacker)
        aport = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(server)
        self.addCleanup(aport.stopListening)
        with self.assertRaises(HandshakeFailed) as e:
            await self.a.open_link(
                f"127.0.0.1:{aport.getHost().port}", KeyAuth(self.psk, "beta-2222")
            )
        self.assertIn("reflection", str(e.exception))
        self.assertFalse(listener_side.called)  # the node never answered it
        self.assertIn("reflection attempt refused", self.log.text())
        to_listener.transport.loseConnection()
        self.assertEqual(self.a.mesh.connected_peers(), [])


class FrameClient(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.waiting: list[defer.Deferred[bytes]] = []

    def lineReceived(self, data: bytes) -> None:
        if self.waiting:
            self.waiting.pop(0).callback(data)
        else:
            self.lines.append(data)

    def next_line(self) -> defer.Deferred[bytes]:
        if self.lines:
            return defer.succeed(self.lines.pop(0))
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append(d)
        return d


class DowngradeTests(TwoNodes):
    async def claudectl_connect(
        self, peer: str = "beta-2222", psk: bytes | None = None
    ) -> dict[str, Any]:
        """Exactly what a claudectl 0.64 connector sends: a plaintext proof."""
        client = FrameClient()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client
        )
        self.addCleanup(client.transport.loseConnection)
        challenge = json.loads(await client.next_line())
        client.sendLine(
            line(
                codec.HANDSHAKE,
                {
                    "proof": proof(psk or self.psk, challenge["payload"]["nonce"]),
                    "version": "0.64.0",
                },
                peer,
            ).rstrip(b"\n")
        )
        return json.loads(await client.next_line())

    async def test_claudectl_connector_still_plaintext_and_labelled(self) -> None:
        ack = await self.claudectl_connect()
        self.assertEqual(ack["payload"], {"status": "ok"})
        await self.settle()
        self.assertEqual(self.a.mesh.peer_mode("beta-2222"), ONEWAY)
        self.assertEqual(self.a.mesh.peer_transport("beta-2222"), PLAINTEXT)
        self.assertIn("not encrypted", self.log.text())

    async def test_plaintext_after_tls_is_a_downgrade(self) -> None:
        await self.dial()
        await self.settle()
        await self.b.close_all()
        await self.settle()
        ack = await self.claudectl_connect()
        self.assertEqual(ack["payload"], {"status": "denied", "reason": "downgrade"})
        self.assertIn("downgrade refused: beta-2222 has used TLS before", self.log.text())

    async def test_require_encryption_refuses_plaintext(self) -> None:
        import dataclasses

        self.a.policy = dataclasses.replace(self.a.policy, require_encryption=True)
        ack = await self.claudectl_connect()
        self.assertEqual(ack["payload"], {"status": "denied", "reason": "encryption_required"})
        # ... while a peer of this project still connects, over TLS.
        client = await self.dial()
        self.assertEqual(client.result.transport, TLS13)

    async def test_connector_refuses_plaintext_listener_when_required(self) -> None:
        import dataclasses

        plain = make_node(self, "plain-3333", reactor, tls=False)
        pair_nodes(plain, self.b, self.psk)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            RelayFactory(plain)
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(plain.close_all)
        self.b.policy = dataclasses.replace(self.b.policy, require_encryption=True)
        with self.assertRaises(HandshakeFailed) as e:
            await self.dial(port.getHost().port, expect="plain-3333")
        self.assertIn("require_encryption", str(e.exception))
        # Without the setting the same listener gets a plaintext link, labelled so.
        self.b.policy = dataclasses.replace(self.b.policy, require_encryption=False)
        client = await self.dial(port.getHost().port, expect="plain-3333")
        self.assertEqual(client.result.transport, PLAINTEXT)
        # Once a peer spoke TLS, a listener claiming it without TLS is refused.
        self.b.keystore.mark_tls("plain-3333")
        await self.b.close_all()
        with self.assertRaises(HandshakeFailed) as e:
            await self.dial(port.getHost().port, expect="plain-3333")
        self.assertIn("downgrade refused", str(e.exception))


class TLSFailureTests(TwoNodes):
    async def test_junk_instead_of_a_client_hello_is_one_counted_failure(self) -> None:
        client = FrameClient()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client
        )
        await client.next_line()  # challenge
        closed: defer.Deferred[None] = defer.Deferred()
        client.connectionLost = lambda reason=None: closed.callback(None)  # type: ignore
        # The starttls frame, then bytes that are not a TLS ClientHello.
        client.transport.write(
            line(codec.HANDSHAKE, {"starttls": "tls-v1", "version": "x"}, "beta-2222")
            + b"\x16\x03\x01\x00\x05hello"
            + b"\x00" * 64
        )
        await closed
        await self.settle()
        self.assertIn(
            "handshake with beta-2222 at 127.0.0.1 failed: TLS handshake failed", self.log.text()
        )
        self.assertEqual(len(self.a.admission._ips["127.0.0.1"].failures), 1)
        self.assertEqual(self.a.admission.inflight, 0)

    async def test_plaintext_after_starttls_is_a_tls_failure(self) -> None:
        client = FrameClient()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client
        )
        await client.next_line()
        closed: defer.Deferred[None] = defer.Deferred()
        client.connectionLost = lambda reason=None: closed.callback(None)  # type: ignore
        client.transport.write(
            line(codec.HANDSHAKE, {"starttls": "tls-v1"}, "beta-2222")
            + line(codec.HANDSHAKE, {"proof": "0" * 64}, "beta-2222")
        )
        await closed
        await self.settle()
        self.assertIn("failed: TLS handshake failed", self.log.text())
        self.assertEqual(self.a.mesh.connected_peers(), [])


class CredentialsTests(SynchronousTestCase):
    def test_made_once_then_reused(self) -> None:
        home = temp_home(self)
        first = ensure_credentials(home, "me-1")
        self.assertEqual(ensure_credentials(home, "me-1"), first)

    def test_corrupt_files_are_remade(self) -> None:
        home = temp_home(self)
        first = ensure_credentials(home, "me-1")
        (home.relay / KEY_FILE).write_bytes(b"garbage")
        again = ensure_credentials(home, "me-1")
        self.assertNotEqual(again, first)
        self.assertEqual(ensure_credentials(home, "me-1"), again)
        (home.relay / CERT_FILE).unlink()
        self.assertNotEqual(ensure_credentials(home, "me-1"), again)

    def test_channel_proof_binds_every_input(self) -> None:
        args = [b"k" * 32, "connector", b"e" * 32, "n" * 64, "c" * 64, "a-1", "b-2"]
        base = channel_proof(*args)  # type: ignore[arg-type]
        for i in range(len(args)):
            changed = list(args)
            changed[i] = (
                b"x" * 32
                if isinstance(args[i], bytes)
                else "listener"
                if i == 1
                else str(args[i]) + "x"
            )
            self.assertNotEqual(channel_proof(*changed), base, i)  # type: ignore[arg-type]


class IssuedNoncesTests(SynchronousTestCase):
    def test_expire_and_bound(self) -> None:
        t = [0.0]
        nonces = IssuedNonces(lambda: t[0], ttl=10, max_entries=3)
        nonces.add("a")
        self.assertTrue(nonces.issued("a"))
        self.assertFalse(nonces.issued("b"))
        t[0] = 11
        self.assertFalse(nonces.issued("a"))
        for n in "bcde":
            nonces.add(n)
        self.assertEqual(len(nonces), 3)
        self.assertFalse(nonces.issued("b"))
        self.assertTrue(nonces.issued("e"))
