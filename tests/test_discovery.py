"""Tests for claudectl.discovery.protocol: announcing and scanning over UDP."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import FakeDatagramTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.config import RelayConfig
from claudectl.discovery.beacon import DiscoveryTable, encode_beacon
from claudectl.discovery.protocol import (
    Announcer,
    BeaconListener,
    DiscoveryError,
    announcer_service,
    broadcast_target,
    scan,
)
from tests.common import subprocess_env, temp_home


class RecordingTransport(FakeDatagramTransport):
    def __init__(self, fail_with: Exception | None = None) -> None:
        super().__init__()
        self.broadcast = False
        self.fail_with = fail_with

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast = enabled

    def write(self, packet: bytes, addr: Any = None) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        super().write(packet, addr)


class FakeUDPPort:
    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.stopped = False

    def stopListening(self) -> None:
        self.stopped = True
        self.proto.doStop()


class UDPClock(Clock):
    """A Clock that can also 'listen' on UDP (MemoryReactor cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, Any, FakeUDPPort, RecordingTransport]] = []
        self.shared: list[tuple[int, Any, FakeUDPPort, RecordingTransport]] = []
        self.busy: set[int] = set()

    def listenUDP(
        self, port: int, proto: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        transport = RecordingTransport()
        proto.makeConnection(transport)
        p = FakeUDPPort(proto)
        self.udp.append((port, proto, p, transport))
        return p

    def listenMulticast(
        self,
        port: int,
        proto: Any,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> FakeUDPPort:
        """A shared port (``listenMultiple``), as the query responder binds it."""
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        assert listenMultiple, "the query port must be shareable"
        transport = RecordingTransport()
        proto.makeConnection(transport)
        p = FakeUDPPort(proto)
        self.shared.append((port, proto, p, transport))
        return p


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AnnouncerUnit(SynchronousTestCase):
    def test_announce_sends_claudectl_datagram_to_broadcast(self) -> None:
        a = Announcer(("255.255.255.255", 9848), "desk-1", 9847, version="0.64.0")
        t = RecordingTransport()
        a.makeConnection(t)
        self.assertTrue(t.broadcast)
        a.announce()
        self.assertEqual(
            t.written, [(encode_beacon("desk-1", 9847, "0.64.0"), ("255.255.255.255", 9848))]
        )
        self.assertEqual(a.sent, 1)

    def test_port_callable(self) -> None:
        ports = [None, 9999]
        a = Announcer(("10.255.255.255", 9848), "desk-1", lambda: ports[0])
        t = RecordingTransport()
        a.makeConnection(t)
        a.announce()
        self.assertEqual(t.written, [], "nothing is announced before the relay listens")
        ports[0] = 9999
        a.announce()
        self.assertIn(b'"port":9999', t.written[0][0])

    def test_send_errors_are_counted_not_raised(self) -> None:
        a = Announcer(("255.255.255.255", 9848), "desk-1", 9847)
        a.makeConnection(RecordingTransport(fail_with=OSError(101, "Network is unreachable")))
        a.announce()
        a.announce()
        self.assertEqual((a.sent, a.errors), (0, 2))

    def test_announce_without_transport_is_harmless(self) -> None:
        Announcer(("255.255.255.255", 9848), "desk-1", 9847).announce()

    def test_broadcast_target_must_be_ipv4(self) -> None:
        self.assertEqual(broadcast_target(RelayConfig()), ("255.255.255.255", 9848))
        for bad in ("my-lan", "ff02::1", "300.1.1.1"):
            self.assertRaises(DiscoveryError, broadcast_target, RelayConfig(lan_broadcast_addr=bad))


class AnnouncerServiceTests(SynchronousTestCase):
    def test_announces_every_interval_until_stopped(self) -> None:
        clock = UDPClock()
        cfg = RelayConfig(
            lan_broadcast_addr="192.168.1.255", lan_broadcast_port=9848, lan_announce_interval=10
        )
        svc = announcer_service(cfg, "desk-1", 9847, clock)
        svc.startService()
        [(port, proto, udp, transport)] = clock.udp
        self.assertEqual(port, 0, "announcements go out from an ephemeral port")
        self.assertEqual(len(transport.written), 1, "one announcement right away")
        self.assertEqual(transport.written[0][1], ("192.168.1.255", 9848))
        clock.advance(9.9)
        self.assertEqual(len(transport.written), 1)
        clock.advance(0.1)
        clock.advance(10)
        self.assertEqual(len(transport.written), 3)
        [(qport, _, responder_udp, _)] = clock.shared
        self.assertEqual(qport, 9849, "queries are answered on the announcement port + 1")
        svc.stopService()
        self.assertTrue(udp.stopped)
        self.assertTrue(responder_udp.stopped)
        clock.advance(60)
        self.assertEqual(len(transport.written), 3)

    def test_bad_address_fails_at_build_time(self) -> None:
        self.assertRaises(
            DiscoveryError,
            announcer_service,
            RelayConfig(lan_broadcast_addr="lan"),
            "desk-1",
            9847,
            UDPClock(),
        )


class ListenerUnit(SynchronousTestCase):
    def test_datagrams_fill_the_table(self) -> None:
        clock = Clock()
        table = DiscoveryTable(own_identity="me-1")
        listener = BeaconListener(table, clock)
        listener.datagramReceived(encode_beacon("desk-1", 9847, "0.64.0"), ("10.0.0.5", 9848))
        listener.datagramReceived(b"BADDATA", ("10.0.0.6", 9848))
        listener.datagramReceived(encode_beacon("me-1", 9847, "0.64.0"), ("10.0.0.7", 9848))
        self.assertEqual([r.address for r in table.rows(0)], ["10.0.0.5:9847"])
        self.assertEqual(table.rejected_total, 1)


class Loopback(TestCase):
    """Real UDP on the loopback interface."""

    timeout = 20

    def config(self, port: int) -> RelayConfig:
        return RelayConfig(
            lan_broadcast_addr="127.255.255.255", lan_broadcast_port=port, lan_announce_interval=1
        )

    @defer.inlineCallbacks
    def test_announce_and_scan(self) -> Any:
        port = free_udp_port()
        cfg = self.config(port)
        svc = announcer_service(cfg, "desk-1a2b", 9870, reactor)
        own = announcer_service(cfg, "me-0000", 9871, reactor)
        # Two scanners on one machine, one port: both hear the broadcasts.
        scans = [scan(reactor, cfg, 1.5, "me-0000"), scan(reactor, cfg, 1.5, "me-0000")]
        svc.startService()
        own.startService()
        try:
            results = yield defer.gatherResults(scans)
        finally:
            yield svc.stopService()
            yield own.stopService()
        for rows in results:
            self.assertEqual(
                [(r.identity, r.address, r.version) for r in rows],
                [("desk-1a2b", "127.0.0.1:9870", "0.64.0")],
            )

    @defer.inlineCallbacks
    def test_scan_ignores_garbage(self) -> Any:
        port = free_udp_port()
        d = scan(reactor, self.config(port), 0.5, None)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"CCTLnot json", ("127.0.0.1", port))
            s.sendto(b"CCTL" + b"x" * 3000, ("127.0.0.1", port))
            s.sendto(encode_beacon("ok-1", 9847, "0.64.0"), ("127.0.0.1", port))
        rows = yield d
        self.assertEqual([r.identity for r in rows], ["ok-1"])

    def test_busy_port_is_a_clear_error(self) -> Any:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("", 0))  # no SO_REUSEADDR/SO_REUSEPORT: nobody can share it
            port = s.getsockname()[1]
            d = scan(reactor, self.config(port), 0.2, None)
        f = self.failureResultOf(d, DiscoveryError)
        self.assertIn(f"UDP port {port}", str(f.value))


SCANNER = textwrap.dedent("""
    import json, sys
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react
    from claudectl.config import RelayConfig
    from claudectl.discovery.protocol import scan

    async def main(reactor):
        rows = await scan(reactor, RelayConfig(lan_broadcast_port=int(sys.argv[1])),
                          float(sys.argv[2]), "scanner-1")
        print(json.dumps([r.to_json() for r in rows]))

    react(lambda reactor: ensureDeferred(main(reactor)))
""")

ANNOUNCER = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from claudectl.config import RelayConfig
    from claudectl.discovery.protocol import announcer_service

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    interval = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    cfg = RelayConfig(lan_broadcast_port=int(sys.argv[1]), lan_announce_interval=interval)
    svc = announcer_service(cfg, "netns-peer-1", 9847, reactor)
    svc.startService()
    reactor.callLater(float(sys.argv[2]), reactor.stop)
    reactor.run()
""")


def _netns_skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the network-namespace broadcast test needs root"
    if shutil.which("ip") is None:
        return "the network-namespace broadcast test needs the `ip` command"
    return None


class NetnsBroadcast(TestCase):
    """A real 255.255.255.255 broadcast between two network namespaces
    joined by a veth pair (root and `ip netns` only)."""

    timeout = 40

    def setUp(self) -> None:
        reason = _netns_skip_reason()
        if reason:
            raise self.skipTest(reason)
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"cctl-a{tag}", f"cctl-b{tag}")
        veth = (f"cva{tag}", f"cvb{tag}")
        self.addCleanup(self._cleanup)
        commands = [
            ["ip", "netns", "add", self.ns[0]],
            ["ip", "netns", "add", self.ns[1]],
            [
                "ip",
                "link",
                "add",
                veth[0],
                "netns",
                self.ns[0],
                "type",
                "veth",
                "peer",
                "name",
                veth[1],
                "netns",
                self.ns[1],
            ],
        ]
        for ns, dev, ip in (
            (self.ns[0], veth[0], "10.77.0.1/24"),
            (self.ns[1], veth[1], "10.77.0.2/24"),
        ):
            commands += [
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "-n", ns, "addr", "add", ip, "dev", dev],
                ["ip", "-n", ns, "link", "set", dev, "up"],
                ["ip", "-n", ns, "route", "add", "default", "dev", dev],
            ]
        for cmd in commands:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                raise self.skipTest(
                    f"cannot set up network namespaces: {' '.join(cmd)}: {result.stderr.strip()}"
                )

    def _cleanup(self) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    @defer.inlineCallbacks
    def test_broadcast_reaches_the_other_namespace(self) -> Any:
        env = subprocess_env(temp_home(self))
        port = "9848"
        scanner = getProcessOutputAndValue(
            "ip",
            ["netns", "exec", self.ns[0], sys.executable, "-c", SCANNER, port, "3"],
            env=env,
            reactor=reactor,
        )
        yield deferLater(reactor, 0.3, lambda: None)
        announcer = getProcessOutputAndValue(
            "ip",
            ["netns", "exec", self.ns[1], sys.executable, "-c", ANNOUNCER, port, "3.5"],
            env=env,
            reactor=reactor,
        )
        out, err, code = yield scanner
        a_out, a_err, a_code = yield announcer
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(a_code, 0, a_err.decode())
        rows = json.loads(out.decode())
        self.assertEqual(
            rows, [{"identity": "netns-peer-1", "addr": "10.77.0.2:9847", "version": "0.64.0"}]
        )

    @defer.inlineCallbacks
    def test_query_finds_a_rare_announcer_in_the_other_namespace(self) -> Any:
        """An instance announcing every 600 s is found by a 1 s scan: it answers the query."""
        env = subprocess_env(temp_home(self))
        port = "9848"
        announcer = Watched.spawn(
            self,
            env,
            "ip",
            "netns",
            "exec",
            self.ns[1],
            sys.executable,
            "-c",
            ANNOUNCER,
            port,
            "60",
            "600",
        )
        yield announcer.wait_for("QueryResponder starting on")  # it has announced already
        yield deferLater(reactor, 0.3, lambda: None)
        out, err, code = yield getProcessOutputAndValue(
            "ip",
            ["netns", "exec", self.ns[0], sys.executable, "-c", SCANNER, port, "1"],
            env=env,
            reactor=reactor,
        )
        a_out, a_code = yield announcer.stop()
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(a_code, 0, a_out)
        self.assertEqual(
            json.loads(out.decode()),
            [{"identity": "netns-peer-1", "addr": "10.77.0.2:9847", "version": "0.64.0"}],
        )


class Watched(ProcessProtocol):
    """A child process whose output (stdout and stderr together) a test can wait on."""

    def __init__(self) -> None:
        self.output = ""
        self._waiting: list[tuple[str, defer.Deferred[None]]] = []
        self.ended: defer.Deferred[int] = defer.Deferred()

    @classmethod
    def spawn(cls, testcase: TestCase, env: dict[str, str], *argv: str) -> Watched:
        proto = cls()
        reactor.spawnProcess(proto, argv[0], list(argv), env=env)
        testcase.addCleanup(proto.stop)
        return proto

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        for item in [w for w in self._waiting if w[0] in self.output]:
            self._waiting.remove(item)
            item[1].callback(None)

    def wait_for(self, text: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if text in self.output:
            d.callback(None)
        else:
            self._waiting.append((text, d))
        return d

    def processEnded(self, reason: Any) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"the process ended; output:\n{self.output}"))
        self._waiting.clear()
        self.ended.callback(reason.value.exitCode)

    def stop(self) -> defer.Deferred[tuple[str, int]]:
        """SIGTERM (the reactor stops cleanly); fires with (output, exit code)."""
        if not self.ended.called:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("TERM")
        d: defer.Deferred[tuple[str, int]] = defer.Deferred()
        self.ended.addBoth(lambda code: (d.callback((self.output, code)), code)[1])
        return d


class NetnsNoRoute(TestCase):
    """An announcer in a namespace with no route at all, then with one."""

    timeout = 40

    def setUp(self) -> None:
        reason = _netns_skip_reason()
        if reason:
            raise self.skipTest(reason)
        self.ns = f"cctl-n{os.getpid() % 100000}"
        self.addCleanup(
            subprocess.run, ["ip", "netns", "del", self.ns], capture_output=True, timeout=10
        )
        result = subprocess.run(
            ["ip", "netns", "add", self.ns], capture_output=True, text=True, timeout=10
        )
        if result.returncode != 0:
            raise self.skipTest(f"cannot add a network namespace: {result.stderr.strip()}")

    def add_route(self) -> str | None:
        """Give the namespace a default route (a veth pair inside it); an error text or None."""
        for cmd in (
            ["link", "add", "cnra", "type", "veth", "peer", "name", "cnrb"],
            ["addr", "add", "10.78.0.1/24", "dev", "cnra"],
            ["link", "set", "cnrb", "up"],
            ["link", "set", "cnra", "up"],
            ["route", "add", "default", "dev", "cnra"],
        ):
            result = subprocess.run(
                ["ip", "-n", self.ns, *cmd], capture_output=True, text=True, timeout=10
            )
            if result.returncode != 0:
                return f"ip {' '.join(cmd)}: {result.stderr.strip()}"
        return None

    @defer.inlineCallbacks
    def test_one_warning_then_one_recovery_line(self) -> Any:
        env = subprocess_env(temp_home(self))
        announcer = Watched.spawn(
            self, env, "ip", "netns", "exec", self.ns, sys.executable, "-c", ANNOUNCER, "9848", "60"
        )
        yield announcer.wait_for("failed again")  # two failed announcements at least
        yield deferLater(reactor, 1.1, lambda: None)  # and a third
        error = self.add_route()
        if error is None:
            yield announcer.wait_for("work again")
            yield deferLater(reactor, 1.1, lambda: None)  # and it stays quiet
        out, code = yield announcer.stop()
        if error:
            raise self.skipTest(f"cannot add a route: {error}")
        self.assertEqual(code, 0, out)
        lines = out.splitlines()
        failed = [ln for ln in lines if "Announcer#" in ln and "failed" in ln]
        warned = [ln for ln in lines if "Announcer#warn" in ln]
        recovered = [ln for ln in lines if "Announcer#info" in ln and "work again" in ln]
        self.assertGreaterEqual(len(failed), 3, out)
        self.assertEqual(len(warned), 1, out)
        self.assertIn("Network is unreachable", warned[0])
        self.assertEqual(len(recovered), 1, out)
