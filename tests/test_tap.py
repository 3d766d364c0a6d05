"""The twistd plugin's options, the service tree makeService builds, and the dialers' backoff."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from claudectl.control.paths import control_socket_path
from claudectl.relay.keystore import KeyStore, PeerMeta
from claudectl.service import compose as tap
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
        svc = tap.makeService(
            parse("--home", str(self.home.root), "--no-discovery", *args), reactor=self.reactor
        )
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
        [(port, _factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        # A burst of peers waits in the kernel's queue, not in SYN retries.
        self.assertEqual(backlog, 1024)
        [unix] = self.reactor.unixServers
        self.assertEqual(unix[0], str(control_socket_path(self.home)))
        self.assertEqual(unix[3], 0o600)

    def test_config_port_and_addr(self) -> None:
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text(
            '[relay]\nlisten_port = 19001\nlisten_addr = "127.0.0.1"\n'
        )
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
        self.home.config_file.write_text('[relay]\nmax_peers = "lots"\n')
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
            '[relay]\nauto_connect = ["peer-c@127.0.0.1:7003", "127.0.0.2:1"]\n'
        )
        svc = self.make("--port", "0")
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        dialed = sorted((host, port) for host, port, *_ in self.reactor.tcpClients)
        self.assertEqual(
            dialed,
            [("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003), ("127.0.0.2", 1)],
        )
        self.assertEqual(sorted(svc.node.dialers), ["peer-a", "peer-b", "peer-c"])
        # Nobody was seen at 127.0.0.2:1: its key is chosen by the identity
        # the listener there announces.
        self.assertEqual(sorted(svc.node.address_dialers), ["127.0.0.2:1"])


class UDPMemoryReactor(MemoryReactorClock):
    """A MemoryReactorClock that can also 'listen' on UDP (LAN discovery)."""

    def __init__(self) -> None:
        super().__init__()
        self.udp: list[tuple[int, Any]] = []

    def listenUDP(
        self, port: int, proto: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:
        return self._udp(port, proto)

    def listenMulticast(
        self,
        port: int,
        proto: Any,
        interface: str = "",
        maxPacketSize: int = 8192,
        listenMultiple: bool = False,
    ) -> Any:
        return self._udp(port, proto)

    def _udp(self, port: int, proto: Any) -> Any:
        from twisted.internet.testing import FakeDatagramTransport

        class Port:
            def stopListening(self) -> None:
                proto.doStop()

        transport = FakeDatagramTransport()
        transport.setBroadcastAllowed = lambda enabled: None  # type: ignore[attr-defined]
        proto.makeConnection(transport)
        self.udp.append((port, proto))
        return Port()


class CompositionRootTests(SynchronousTestCase):
    """What the one makeService builds, and how the pieces are handed to each other."""

    def setUp(self) -> None:
        self.home = temp_home(self)

    def make(self, reactor: Any, *args: str) -> tap.RelayService:
        svc = tap.makeService(
            parse("--home", str(self.home.root), "--listen", "tcp:0:interface=127.0.0.1", *args),
            reactor=reactor,
        )
        assert isinstance(svc, tap.RelayService)
        return svc

    def test_service_tree(self) -> None:
        svc = self.make(MemoryReactorClock(), "--no-discovery")
        self.assertEqual(
            [child.name for child in svc],
            [
                "state-writer",
                "state-watcher",
                "listener",
                "control",
                "hive",
                "delegation",
                "events",
            ],
        )
        hive = svc.getServiceNamed("hive")
        self.assertEqual(
            [child.name for child in hive],  # type: ignore[attr-defined]
            ["gossip", "hive-distill"],  # change notices, no poll
        )

    def test_invites_are_kept_over_the_node_keystore(self) -> None:
        """
        The listener accepts a joiner through an invite made on the node's
        own invite store (an invite store built over anything but the
        node's keystore -- a config, say -- fails here).
        """
        from claudectl.pairing.invites import InviteStore
        from claudectl.pairing.pake import PakeResponder
        from claudectl.relay.node import ListenerKeys

        node = self.make(MemoryReactorClock(), "--no-discovery").node
        self.assertIsInstance(node.invites, InviteStore)
        assert isinstance(node.invites, InviteStore)
        self.assertIs(node.invites.keystore, node.keystore)
        self.assertIsInstance(node.pake, PakeResponder)
        invite = node.invites.create(node.identity, "127.0.0.1", 9900, 600, node.clock.seconds())
        keys = ListenerKeys(node)
        [label] = [lab for lab, psk in keys.pending_candidates() if psk == invite.link_psk]
        self.assertTrue(keys.claim("joiner-0a1b2c3d", label, invite.link_psk))
        self.assertEqual(node.keystore.key("joiner-0a1b2c3d"), invite.link_psk)
        self.assertEqual(node.invites.list(node.clock.seconds())[0].used_by, "joiner-0a1b2c3d")

    def test_seams_are_provided(self) -> None:
        """The node, its invite store and its protocols provide the relay's seams."""
        from zope.interface.verify import verifyObject

        from claudectl.relay.interfaces import IInviteBook, ILinkHost, IMesh
        from claudectl.relay.links import ILink
        from claudectl.relay.node import RelayFactory

        node = self.make(MemoryReactorClock(), "--no-discovery").node
        self.assertTrue(verifyObject(ILinkHost, node))
        self.assertTrue(verifyObject(IMesh, node.mesh))
        self.assertTrue(verifyObject(IInviteBook, node.invites))
        self.assertTrue(verifyObject(ILink, RelayFactory(node).buildProtocol(None)))

    def test_lan_discovery_starts_once_the_listener_is_bound(self) -> None:
        reactor = UDPMemoryReactor()
        svc = self.make(reactor)
        self.assertNotIn("announcer", [child.name for child in svc])
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertIn("announcer", [child.name for child in svc])
        self.assertTrue(svc.getServiceNamed("announcer").running)
        self.assertGreaterEqual(len(reactor.udp), 1)

    def test_no_discovery(self) -> None:
        reactor = UDPMemoryReactor()
        svc = self.make(reactor, "--no-discovery")
        svc.privilegedStartService()
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertNotIn("announcer", [child.name for child in svc])
        self.assertEqual(reactor.udp, [])

    def test_layers_registered_with_the_control_socket(self) -> None:
        svc = self.make(MemoryReactorClock(), "--no-discovery")
        control = svc.getServiceNamed("control")
        locator = control.factory.buildProtocol(None).locator  # type: ignore[attr-defined]
        answer = self.successResultOf(locator.locateResponder(b"Status")({}))
        status = json.loads(answer[b"status_json"])
        self.assertIn("hive", status)
        self.assertIn("delegation", status)
        self.assertEqual(status["dashboards"], 0)


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


class OrdinaryMistakeTests(SynchronousTestCase):
    """Issue 12 item 3: every ordinary mistake is a usage error when the
    options are parsed, before twistd (or `relay serve`) starts anything."""

    def setUp(self) -> None:
        self.home = temp_home(self)

    def config(self, text: str) -> None:
        self.home.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.home.config_file.write_text(text)

    def refused(self, *args: str) -> str:
        e = self.assertRaises(usage.UsageError, parse, "--home", str(self.home.root), *args)
        return str(e)

    def test_config_mistakes(self) -> None:
        for text, expect in [
            ("[relay\n", "not valid TOML"),
            ('[relay]\nmax_peers = "lots"\n', "relay.max_peers"),
            ("[relay]\nlisten_port = 99999\n", "relay.listen_port"),
            ('[relay]\nlisten_addr = "not-an-ip"\n', "listen_addr 'not-an-ip' is not an IP"),
            ("[relay]\nheartbeat_interval_secs = 0\n", "relay.heartbeat_interval_secs"),
            ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ]:
            self.config(text)
            message = self.refused()
            self.assertIn(expect, message)
            self.assertIn(str(self.home.config_file), message)

    def test_listen_mistakes(self) -> None:
        for listen, expect in [
            ("garbage", "Unknown endpoint type"),
            ("tcp:abc", "invalid literal"),
            ("ssl:0:privateKey=/nonexistent/k.pem", "/nonexistent/k.pem"),
        ]:
            message = self.refused("--listen", listen)
            self.assertIn(f"--listen {listen!r} is not a usable endpoint", message)
            self.assertIn(expect, message)

    def test_ssl_without_pyopenssl(self) -> None:
        import sys
        from unittest import mock

        import twisted.internet

        # As if pyOpenSSL were missing: importing twisted.internet.ssl fails.
        patcher = mock.patch.dict(sys.modules, {"twisted.internet.ssl": None})
        patcher.start()
        self.addCleanup(patcher.stop)
        if hasattr(twisted.internet, "ssl"):
            saved = twisted.internet.ssl
            del twisted.internet.ssl
            self.addCleanup(setattr, twisted.internet, "ssl", saved)
        message = self.refused("--listen", "ssl:0")
        self.assertIn("--listen 'ssl:0' needs a module that is not installed", message)
        self.assertIn("install pyOpenSSL", message)

    def test_home_is_a_file(self) -> None:
        f = self.home.root / "file"
        f.write_text("")
        e = self.assertRaises(usage.UsageError, parse, "--home", str(f))
        self.assertIn(f"home {f} is not a directory", str(e))

    def test_read_only_home(self) -> None:
        import os

        self.patch(os, "access", lambda path, mode: False)
        self.assertIn("is not writable", self.refused())

    def test_good_options_keep_what_they_resolved(self) -> None:
        opts = parse("--home", str(self.home.root), "--listen", "tcp:0:interface=127.0.0.1")
        home, config, listen = opts.resolved
        self.assertEqual((home.root, listen), (self.home.root, "tcp:0:interface=127.0.0.1"))


class OrdinaryMistakeProcessTests(SynchronousTestCase):
    """The same mistakes through the real commands: one line, no traceback."""

    def run_cli(self, home, *args: str):  # type: ignore[no-untyped-def]
        import subprocess
        import sys

        from tests.common import subprocess_env

        return subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            env=subprocess_env(home),
            cwd=str(home.root),
            timeout=60,
        )

    def test_relay_serve_and_twistd(self) -> None:
        from tests.test_twistd import TWISTD

        home = temp_home(self)
        home.config_file.parent.mkdir(parents=True)
        cases = [
            ('[relay]\nmax_peers = "lots"\n', [], "relay.max_peers"),
            ('[relay]\nlisten_addr = "not-an-ip"\n', [], "not an IP address"),
            ("", ["--listen", "tcp:abc"], "--listen 'tcp:abc' is not a usable endpoint"),
        ]
        for text, extra, expect in cases:
            home.config_file.write_text(text)
            r = self.run_cli(
                home,
                "-m",
                "claudectl",
                "--home",
                str(home.root),
                "relay",
                "serve",
                "--no-discovery",
                *extra,
            )
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertNotIn("Traceback", r.stdout + r.stderr)
            [line] = r.stderr.splitlines()
            self.assertTrue(line.startswith("Error: "), line)
            self.assertIn(expect, line)
            r = self.run_cli(
                home,
                "-c",
                TWISTD,
                "-n",
                "--pidfile=",
                "claudectl-relay",
                "--home",
                str(home.root),
                "--no-discovery",
                *extra,
            )
            self.assertNotEqual(r.returncode, 0)
            self.assertNotIn("Traceback", r.stdout + r.stderr)
            self.assertIn(expect, r.stdout + r.stderr)

    def test_home_that_is_a_file_or_holds_a_file(self) -> None:
        home = temp_home(self)
        afile = home.root / "afile"
        afile.write_text("")
        for args in (
            ["relay", "pair"],
            ["relay", "peers"],
            ["hive", "status"],
            ["relay", "serve", "--port", "0"],
        ):
            r = self.run_cli(home, "-m", "claudectl", "--home", str(afile), *args)
            self.assertEqual(r.returncode, 1, args)
            self.assertEqual(
                r.stderr,
                f"Error: home {afile} is not a directory (check --home / CLAUDECTL_HOME)\n",
            )
        # A home whose .claudectl is a file: the OS error, in one line.
        (home.root / ".claudectl").write_text("")
        r = self.run_cli(home, "-m", "claudectl", "--home", str(home.root), "relay", "pair")
        self.assertEqual(r.returncode, 1)
        self.assertNotIn("Traceback", r.stderr)
        [line] = r.stderr.splitlines()
        self.assertIn("Error: Not a directory", line)
        r = self.run_cli(
            home, "-m", "claudectl", "--home", str(home.root), "--json", "relay", "identity"
        )
        self.assertEqual(r.returncode, 1)
        self.assertIn("Not a directory", json.loads(r.stdout)["error"])


class StartWarningTests(SynchronousTestCase):
    """Issue 12 item 6 / issue 11 item 11: what the service warns about at start."""

    def start(self, home, *args: str) -> list[str]:  # type: ignore[no-untyped-def]
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        class Reactor(MemoryReactorClock):
            """Its ports report the interface they were asked for."""

            def listenTCP(self, port, factory, backlog=50, interface=""):  # type: ignore
                from twisted.internet.address import IPv4Address
                from twisted.internet.testing import _FakePort

                super().listenTCP(port, factory, backlog, interface)
                return _FakePort(IPv4Address("TCP", interface or "0.0.0.0", port))

        reactor = Reactor()
        svc = tap.makeService(
            parse("--home", str(home.root), "--no-discovery", *args), reactor=reactor
        )
        with capturedLogs() as events:
            svc.privilegedStartService()
            svc.startService()
        self.addCleanup(svc.stopService)
        return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    def test_unknown_keys_and_risky_settings(self) -> None:
        home = temp_home(self)
        home.config_file.parent.mkdir(parents=True)
        home.config_file.write_text(
            '[relay]\nlisten_prot = 9900\n[delegation]\nallowed_dirs = ["/"]\n'
        )
        warnings = self.start(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn(
            "unknown key 'relay.listen_prot' is ignored; did you mean 'relay.listen_port'?",
            warnings[0],
        )
        self.assertIn("allowed_dirs contains '/'", warnings[1])

    def test_every_interface_without_require_encryption(self) -> None:
        home = temp_home(self)
        [warning] = self.start(home, "--listen", "tcp:0")
        self.assertIn(
            "listening on every interface (0.0.0.0:0) while [relay] require_encryption is off",
            warning,
        )
        self.assertEqual(self.start(home, "--listen", "tcp:0:interface=127.0.0.1"), [])
        home.config_file.parent.mkdir(parents=True)
        home.config_file.write_text("[relay]\nrequire_encryption = true\n")
        self.assertEqual(self.start(home, "--listen", "tcp:0"), [])
