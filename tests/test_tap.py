"""The twistd plugin's options, the service tree makeService builds, and the dialers' backoff."""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from claudectl.control.paths import control_socket_path
from claudectl.relay import tap
from claudectl.relay.keystore import KeyStore, PeerMeta
from tests.common import make_node, temp_home


def parse(*args: str) -> tap.Options:
    opts = tap.Options()
    opts.parseOptions(list(args))
    return opts


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        opts = parse()
        self.assertIsNone(opts["listen"])
        self.assertIsNone(opts["port"])
        self.assertEqual(opts["config"], [])

    def test_port(self) -> None:
        self.assertEqual(parse("--port", "9999")["port"], 9999)
        self.assertRaises(usage.UsageError, parse, "--port", "x")
        self.assertRaises(usage.UsageError, parse, "--port", "70000")

    def test_listen_and_port_exclusive(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--listen", "tcp:1", "--port", "2")

    def test_missing_config_file(self) -> None:
        self.assertRaises(usage.UsageError, parse, "--config", "/nonexistent/x.toml")


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.reactor = MemoryReactorClock()

    def make(self, *args: str) -> tap.RelayService:
        svc = tap.makeService(parse("--home", str(self.home.root), "--no-discovery", *args),
                              reactor=self.reactor)
        assert isinstance(svc, tap.RelayService)
        return svc

    def test_nothing_listens_before_start(self) -> None:
        self.make("--port", "0")
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.reactor.unixServers, [])

    def test_listeners_after_start(self) -> None:
        svc = self.make("--listen", "tcp:0:interface=127.0.0.1")
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        [(port, _factory, _backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        [unix] = self.reactor.unixServers
        self.assertEqual(unix[0], str(control_socket_path(self.home)))
        self.assertEqual(unix[3], 0o600)

    def test_config_port_and_addr(self) -> None:
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text('[relay]\nlisten_port = 19001\nlisten_addr = "127.0.0.1"\n')
        svc = self.make()
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(self.reactor.tcpServers[0][0], 19001)
        self.assertEqual(self.reactor.tcpServers[0][3], "127.0.0.1")

    def test_port_option_wins_over_config(self) -> None:
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text("[relay]\nlisten_port = 19001\n")
        svc = self.make("--port", "19002")
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(self.reactor.tcpServers[0][0], 19002)

    def test_bad_config_is_a_usage_error(self) -> None:
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text("[relay]\nmax_peers = \"lots\"\n")
        e = self.assertRaises(usage.UsageError, self.make)
        self.assertIn("relay.max_peers", str(e))
        self.assertIn(str(self.home.config_file), str(e))

    def test_dials_known_peers_and_auto_connect(self) -> None:
        ks = KeyStore(self.home)
        ks.save_key("peer-a", b"a" * 32)
        ks.save_meta("peer-a", PeerMeta("127.0.0.1:7001", 0))
        ks.save_key("peer-b", b"b" * 32)
        ks.save_meta("peer-b", PeerMeta("127.0.0.1:7002", 0))
        ks.save_key("peer-c", b"c" * 32)  # no address: listener-only peer
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text(
            '[relay]\nauto_connect = ["peer-c@127.0.0.1:7003", "127.0.0.2:1"]\n')
        svc = self.make("--port", "0")
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        dialed = sorted((host, port) for host, port, *_ in self.reactor.tcpClients)
        self.assertEqual(dialed, [("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003),
                                  ("127.0.0.2", 1)])
        self.assertEqual(sorted(svc.node.dialers), ["peer-a", "peer-b", "peer-c"])
        # Nobody was seen at 127.0.0.2:1: its key is chosen by the identity
        # the listener there announces.
        self.assertEqual(sorted(svc.node.address_dialers), ["127.0.0.2:1"])


class BackoffTests(SynchronousTestCase):
    def test_schedule_5_10_20_40_60(self) -> None:
        self.assertEqual(self.delays(60), [5, 10, 20, 40, 60, 60])

    def test_capped_by_reconnect_max_secs(self) -> None:
        self.assertEqual(self.delays(30), [5, 10, 20, 30, 30, 30])

    def delays(self, max_secs: int) -> list[float]:
        from twisted.application.service import MultiService

        reactor = MemoryReactorClock()
        node = make_node(self, "me-1", reactor, reconnect_max_secs=max_secs)
        node.keystore.save_key("peer-x", b"x" * 32)
        parent = MultiService()
        parent.startService()
        self.addCleanup(parent.stopService)
        node.ensure_dialer("peer-x", "127.0.0.1:7009", parent)
        delays = []
        for _ in range(6):
            self.assertEqual(len(reactor.tcpClients), len(delays) + 1)
            factory = reactor.tcpClients[-1][2]
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
            [call] = [c for c in reactor.getDelayedCalls() if c.active()]
            delay = call.getTime() - reactor.seconds()
            delays.append(delay)
            reactor.advance(delay)
        return delays
