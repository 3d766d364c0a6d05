"""
Where the service dials, and what it says about it: ``relay connect`` to a
new address, ``auto_connect = ["host:port"]`` for a peer never seen there,
``relay disconnect``.  Real ``relay serve`` processes on loopback, driven by
the real CLI; the key choice toward a claudectl-style listener runs on real
nodes in this process.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.relay.handshake import HandshakeFailed
from claudectl.relay.keystore import KeyStore, PeerMeta
from claudectl.relay.node import RelayFactory
from tests.common import ServeProcess, make_node, run_cli, temp_home


def ok(result: Any) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout  # type: ignore[no-any-return]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pair(ha: Any, hb: Any) -> tuple[str, str]:
    """A runs `relay pair`, B `relay accept`; returns (A's id, B's id)."""
    out = ok(run_cli(ha, "relay", "pair"))
    code = out.splitlines()[2].split("PAIR CODE: ")[1]
    ida = ok(run_cli(ha, "relay", "identity")).strip()
    idb = ok(run_cli(hb, "relay", "identity")).strip()
    ok(run_cli(hb, "relay", "accept", code, ida))
    return ida, idb


def peer_row(home: Any, peer: str) -> dict[str, Any]:
    rows = json.loads(ok(run_cli(home, "relay", "peers", "--json")))
    return {r["identity"]: r for r in rows}[peer]  # type: ignore[no-any-return]


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met in {timeout} s")
        time.sleep(0.3)


class Forwarder:
    """A loopback TCP port that forwards every connection to ``target``: a second address of A."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inner, _ = self.sock.accept()
            except OSError:
                return
            outer = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class TwoServices(SynchronousTestCase):
    """A and B paired with `relay pair` / `relay accept`, both serving, B connected to A."""

    def start(self, connect: bool = True) -> None:
        self.ha, self.hb = temp_home(self), temp_home(self)
        self.ida, self.idb = pair(self.ha, self.hb)
        self.a = ServeProcess.serve(self.ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.a.stop)
        self.b = ServeProcess.serve(self.hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.b.stop)
        self.port = self.a.port()
        self.b.port()
        self.where = f"127.0.0.1:{self.port}"
        if connect:
            ok(run_cli(self.hb, "relay", "connect", self.where))
            self.a.expect(f"{self.idb} authenticated")


class ConnectAddressTests(TwoServices):
    """Issue 12, item 2: a new address replaces a known one only once a handshake confirms it."""

    def assert_untouched(self) -> None:
        row = peer_row(self.hb, self.ida)
        self.assertEqual((row["state"], row["address"]), ("connected", self.where))
        meta = KeyStore(self.hb).meta(self.ida)
        assert meta is not None
        self.assertEqual(meta.addr, self.where)
        self.assertFalse(
            any(f"{self.ida} disconnected" in line for line in self.b.lines),
            "\n".join(self.b.lines),
        )

    def test_wrong_port_fails_and_keeps_the_link(self) -> None:
        self.start()
        wrong = f"127.0.0.1:{free_port()}"
        r = run_cli(self.hb, "relay", "connect", wrong, "--peer", self.ida)
        self.assertEqual(r.returncode, 1, (r.stdout, r.stderr))
        self.assertEqual(r.stdout, "")
        self.assertIn(f"Error: connect to {wrong}: ", r.stderr)
        self.assertIn("Nothing changed: ", r.stderr)
        self.assertIn(
            f"the link to {self.ida} stays up and the service keeps dialing {self.where}", r.stderr
        )
        time.sleep(1.0)  # a redirected dialer would have dropped the link by now
        self.assert_untouched()
        # Asking for the address it has is still "already connected".
        out = ok(run_cli(self.hb, "relay", "connect", self.where, "--peer", self.ida))
        self.assertIn(f"Already connected to {self.ida} at {self.where}", out)
        self.assert_untouched()

    def test_port_of_another_instance_fails_before_any_proof(self) -> None:
        self.start()
        hc = temp_home(self)
        c = ServeProcess.serve(hc, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(c.stop)
        idc = ok(run_cli(hc, "relay", "identity")).strip()
        wrong = f"127.0.0.1:{c.port()}"
        r = run_cli(self.hb, "relay", "connect", wrong, "--peer", self.ida, "--json")
        self.assertEqual(r.returncode, 1, (r.stdout, r.stderr))
        error = json.loads(r.stdout)["error"]  # --json: the error is JSON on stdout
        self.assertIn(f"the listener at this address is {idc}, not {self.ida}", error)
        self.assertIn(f"the link to {self.ida} stays up", error)
        self.assert_untouched()
        # C never saw a proof: the connector hung up after the challenge.
        self.assertFalse(
            any("wrong proof" in line or "authenticated" in line for line in c.lines),
            "\n".join(c.lines),
        )

    def test_confirmed_new_address_replaces_the_old(self) -> None:
        self.start()
        fwd = Forwarder(self.port)
        self.addCleanup(fwd.close)
        new = f"127.0.0.1:{fwd.port}"
        out = ok(run_cli(self.hb, "relay", "connect", new, "--peer", self.ida))
        self.assertIn(f"Connected to {self.ida} ({new})", out)
        self.assertIn(f"the service dials it there from now on (instead of {self.where})", out)
        # What `relay peers` shows is what the service dials, and is stored
        # (the old link may still be closing when the command returns).
        deadline = time.monotonic() + 10
        while True:
            row = peer_row(self.hb, self.ida)
            if (row["state"], row["address"]) == ("connected", new) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(
            (row["state"], row["address"]), ("connected", new), "\n".join(self.b.lines)
        )
        meta = KeyStore(self.hb).meta(self.ida)
        assert meta is not None
        self.assertEqual(meta.addr, new)
        self.b.expect(f"{self.ida} confirmed at {new}: dialed there from now on")


class AutoConnectTests(SynchronousTestCase):
    """Issue 12, item 9: `auto_connect = ["host:port"]` for a peer never seen there."""

    def test_key_chosen_by_the_identity_the_listener_announces(self) -> None:
        ha, hb = temp_home(self), temp_home(self)
        ida, idb = pair(ha, hb)
        # A second paired peer without an address: the old rule ("the only
        # peer without an address") could not choose.
        KeyStore(hb).save_key("other-peer-1", b"\x07" * 32)
        a = ServeProcess.serve(ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(a.stop)
        port = a.port()
        self.assertIsNone(KeyStore(hb).meta(ida))  # B never dialed A
        hb.config_file.parent.mkdir(parents=True, exist_ok=True)
        hb.config_file.write_text(f'[relay]\nauto_connect = ["127.0.0.1:{port}"]\n')
        b = ServeProcess.serve(hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(b.stop)
        b.port()
        b.expect(f"127.0.0.1:{port} announces itself as {ida}: using that peer's key")
        a.expect(f"{idb} authenticated")
        b.expect(f"auto_connect 127.0.0.1:{port}: the peer there is {ida}")
        row = peer_row(hb, ida)
        self.assertEqual(
            (row["state"], row["address"], row["transport"]),
            ("connected", f"127.0.0.1:{port}", "tls1.3"),
        )
        meta = KeyStore(hb).meta(ida)
        assert meta is not None
        self.assertEqual(meta.addr, f"127.0.0.1:{port}")
        # The dialer is A's now: it redials after A restarts.
        self.assertEqual(a.stop(), 0)
        b.expect(f"{ida} disconnected")
        a2 = ServeProcess.serve(ha, "--listen", f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(a2.stop)
        a2.port()
        a2.expect(f"{idb} authenticated", timeout=60)

    def test_unpaired_identity_is_not_dialed_with_any_key(self) -> None:
        ha, hb = temp_home(self), temp_home(self)
        KeyStore(hb).save_key("other-peer-1", b"\x07" * 32)
        a = ServeProcess.serve(ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(a.stop)
        port = a.port()
        ida = ok(run_cli(ha, "relay", "identity")).strip()
        hb.config_file.parent.mkdir(parents=True, exist_ok=True)
        hb.config_file.write_text(f'[relay]\nauto_connect = ["127.0.0.1:{port}"]\n')
        b = ServeProcess.serve(hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(b.stop)
        b.port()
        b.expect(f"is {ida}, a peer this instance is not paired with")
        self.assertFalse(
            any("wrong proof" in line or "no key for this peer" in line for line in a.lines),
            "\n".join(a.lines),
        )


class DisconnectTests(TwoServices):
    """Issue 12, item 11: `relay disconnect` says what the service did."""

    def test_link_the_service_redialed_by_itself(self) -> None:
        self.start()
        # B restarts: its dialer reconnects to A by itself (from the stored address).
        self.assertEqual(self.b.stop(), 0)
        self.b = ServeProcess.serve(self.hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.b.stop)
        self.b.port()
        wait_until(lambda: peer_row(self.hb, self.ida)["state"] == "connected", what="B redials A")
        out = ok(run_cli(self.hb, "relay", "disconnect", self.ida))
        self.assertEqual(
            out.strip(),
            f"Disconnected from {self.ida}; the service stopped redialing it (until it restarts).",
        )
        self.assertEqual(peer_row(self.hb, self.ida)["state"], "disconnected")
        again = json.loads(ok(run_cli(self.hb, "relay", "disconnect", self.ida, "--json")))
        self.assertEqual(
            again,
            {
                "peer": self.ida,
                "was_connected": False,
                "dropped_link": False,
                "stopped_dialer": False,
            },
        )
        self.assertIn(
            "was not connected, and the service was not dialing it",
            ok(run_cli(self.hb, "relay", "disconnect", self.ida)),
        )

    def test_link_the_peer_dialed(self) -> None:
        self.start()
        wait_until(lambda: peer_row(self.ha, self.idb)["state"] == "connected", what="A sees B")
        out = ok(run_cli(self.ha, "relay", "disconnect", self.idb))
        self.assertIn(f"Disconnected from {self.idb}. The service was not dialing it", out)


class ClaudectlListenerKeyTests(TestCase):
    """
    Toward a listener that announces no identity (claudectl 0.64 speaks
    plaintext and sends none: a node without TLS stands in), the key is the
    one today's rule picks -- or none, clearly.
    """

    timeout = 30

    def setUp(self) -> Any:
        self.a = make_node(self, "listener-1111", reactor, tls=False)
        self.b = make_node(self, "dialer-2222", reactor, tls=True)
        self.psk = b"\x05" * 32
        self.a.keystore.save_key(self.b.identity, self.psk)
        self.b.keystore.save_key(self.a.identity, self.psk)
        d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(RelayFactory(self.a))

        def listening(port: Any) -> None:
            self.address = f"127.0.0.1:{port.getHost().port}"
            self.addCleanup(port.stopListening)

        return d.addCallback(listening)

    def tearDown(self) -> Any:
        return defer.gatherResults([self.a.close_all(), self.b.close_all()])

    async def test_only_peer_without_an_address(self) -> None:
        self.b.keystore.save_key("elsewhere-3", b"\x09" * 32)
        self.b.keystore.save_meta("elsewhere-3", PeerMeta("127.0.0.1:1", 0))
        proto = await self.b.open_link(self.address, self.b.key_by_identity(self.address))
        self.assertEqual(
            (proto.result.peer_id, proto.result.transport), (self.a.identity, "plaintext")
        )

    async def test_ambiguous_fails_clearly(self) -> None:
        self.b.keystore.save_key("unaddressed-3", b"\x09" * 32)
        with self.assertRaises(HandshakeFailed) as cm:
            await self.b.open_link(self.address, self.b.key_by_identity(self.address))
        self.assertIn("does not announce its identity", str(cm.exception))
        self.assertIn("several paired peers have no address yet", str(cm.exception))
        self.assertEqual(self.a.mesh.connected_peers(), [])


def pending(transport: Any) -> int:
    """Bytes written to a link and not handed to the kernel yet: in a TLS
    layer's batch of small writes, or in the buffers of the TCP transport."""
    from claudectl.relay.links import unsent_bytes

    # A TCP transport that started TLS writes through the TLS layer beneath it.
    layer = getattr(transport, "protocol", transport)
    batch = getattr(getattr(layer, "_aggregator", None), "_buffer", [])
    return sum(len(x) for x in batch) + unsent_bytes(transport)


class NoDelayTests(TestCase):
    """Both ends of a link send each frame at once (TCP_NODELAY), TLS or not."""

    timeout = 30

    async def check(self, tls: bool) -> None:
        a = make_node(self, "nodelay-a-1111", reactor, tls=tls)
        b = make_node(self, "nodelay-b-2222", reactor, tls=tls)
        psk = b"\x06" * 32
        a.keystore.save_key(b.identity, psk)
        b.keystore.save_key(a.identity, psk)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(RelayFactory(a))
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: defer.gatherResults([a.close_all(), b.close_all()]))
        address = f"127.0.0.1:{port.getHost().port}"
        proto = await b.open_link(address, b.key_by_identity(address))
        self.assertEqual(proto.result.transport, "tls1.3" if tls else "plaintext")
        for node in (a, b):
            [link] = node.mesh.links.values()
            transport = link.protocol.transport
            # A TCP transport holds its socket; a TLS layer over one holds that transport.
            sock = getattr(transport, "socket", None) or transport.transport.socket
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        # A frame sent and flushed is with the kernel at once, not on the
        # reactor's next poll.
        [link] = b.mesh.links.values()
        b.mesh.send(a.identity, "heartbeat", {})
        self.assertGreater(pending(link.protocol.transport), 0)
        b.mesh.flush(a.identity)
        self.assertEqual(pending(link.protocol.transport), 0)

    async def test_plaintext(self) -> None:
        await self.check(tls=False)

    async def test_tls(self) -> None:
        await self.check(tls=True)


class AddressDialerTests(SynchronousTestCase):
    """The dialer of an auto_connect address becomes its peer's dialer, never a second one."""

    def test_connect_to_the_same_address_adopts_it(self) -> None:
        from twisted.application.service import MultiService
        from twisted.internet.testing import MemoryReactorClock

        node = make_node(self, "me-1111", MemoryReactorClock())
        node.keystore.save_key("peer-a", b"a" * 32)
        node.keystore.save_key("peer-b", b"b" * 32)
        node.keystore.save_meta("peer-a", PeerMeta("127.0.0.1:7001", 0))
        parent = MultiService()
        parent.startService()
        self.addCleanup(parent.stopService)
        old = node.ensure_dialer("peer-a", "127.0.0.1:7001", parent)
        pending = node.ensure_dialer(None, "127.0.0.1:7002", parent)
        self.assertIsNone(pending.peer_id)
        self.assertEqual(node.mesh.peer_status("peer-a"), "connecting")
        # The handshake at 127.0.0.1:7002 proved peer-a (relay connect, say).
        self.assertIs(node.ensure_dialer("peer-a", "127.0.0.1:7002", parent), pending)
        self.assertEqual((pending.peer_id, node.address_dialers), ("peer-a", {}))
        self.assertEqual(node.dialers, {"peer-a": pending})
        self.assertNotIn(old.service, list(parent))
        self.assertEqual(node.mesh.state("peer-a").address, "127.0.0.1:7002")
        meta = node.keystore.meta("peer-a")
        assert meta is not None
        self.assertEqual(meta.addr, "127.0.0.1:7002")
        self.assertEqual(node.dial_address("peer-a"), "127.0.0.1:7002")


class GuardedEndpointTests(SynchronousTestCase):
    """A dial that waited for the peer's own link to drop, cancelled once it
    started (the service stopping): cancelled once, the attempt with it."""

    def test_cancel_after_the_attempt_started(self) -> None:
        from claudectl.relay.node import _GuardedEndpoint

        waiters: list[Any] = []

        class Keys:
            def key(self, peer_id: str) -> bytes:
                return b"k" * 32

        class Mesh:
            def is_connected(self, peer_id: str) -> bool:
                return True

        class Node:
            keystore = Keys()
            mesh = Mesh()

            def wait_for_down(self, peer_id: str, fn: Any) -> None:
                waiters.append(fn)

            def cancel_wait_for_down(self, peer_id: str, fn: Any) -> None:
                if fn in waiters:
                    waiters.remove(fn)

        attempts: list[defer.Deferred[Any]] = []

        class Endpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                d: defer.Deferred[Any] = defer.Deferred()
                attempts.append(d)
                return d

        class Dialer:
            peer_id = "peer-b-00000000"
            address = "127.0.0.1:1"

        guarded = _GuardedEndpoint(Node(), Dialer(), Endpoint())  # type: ignore[arg-type]
        waiting = guarded.connect(object())
        self.assertEqual(len(waiters), 1)
        waiters[0]()  # the peer's link went down: the dial starts
        self.assertEqual(len(attempts), 1)
        failures: list[Any] = []
        waiting.addErrback(failures.append)
        waiting.cancel()  # before it connected: the service stops
        self.assertEqual(len(failures), 1)
        failures[0].trap(defer.CancelledError)
        self.assertTrue(attempts[0].called)  # the attempt was cancelled with it


class QuietConnectTests(TestCase):
    async def test_no_factory_lines_per_connection(self) -> None:
        """A hub channel each stranger opens cost two log lines (review 15)."""
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory, Protocol
        from twisted.logger import globalLogPublisher

        from claudectl.relay.links import connect_quietly

        server = Factory.forProtocol(Protocol)
        server.noisy = False
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(server)
        self.addCleanup(port.stopListening)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        for _ in range(3):
            proto = Protocol()
            connected = await connect_quietly(endpoint, proto)
            self.assertIs(connected, proto)
            proto.transport.loseConnection()
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0.1, lambda: None)  # the "Stopping factory" moment
        texts = [str(e.get("log_format", "")) + str(e.get("log_text", "")) for e in events]
        self.assertFalse([t for t in texts if "factory" in t.lower()], texts)
