"""
Two real relay services on loopback (port 0, temporary homes), driven through
the real control socket: connect, see each other, drop, reconnect.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from claudectl.control import commands as C
from claudectl.control.client import ServiceNotRunning, call_control
from claudectl.home import Home
from claudectl.relay.keystore import KeyStore
from claudectl.relay.runinfo import running_port
from claudectl.service import compose as tap
from tests.common import temp_home


async def wait_for(predicate: Any, timeout: float = 10.0, step: float = 0.05) -> None:
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, step, lambda: None)
        waited += step


class RunningService:
    """A makeService tree on the real reactor, in its own home."""

    def __init__(self, home: Home, listen: str = "tcp:0:interface=127.0.0.1") -> None:
        self.home = home
        self.listen = listen
        self.svc: tap.RelayService | None = None

    def start(self) -> tap.RelayService:
        opts = tap.Options()
        opts.parseOptions(
            ["--home", str(self.home.root), "--listen", self.listen, "--no-discovery"]
        )
        svc = tap.makeService(opts, reactor=reactor)
        assert isinstance(svc, tap.RelayService)
        svc.privilegedStartService()
        svc.startService()
        self.svc = svc
        return svc

    @property
    def node(self) -> Any:
        assert self.svc is not None
        return self.svc.node

    @property
    def port(self) -> int:
        return self.node.listening_ports[0].getHost().port

    def stop(self) -> defer.Deferred[Any]:
        svc, self.svc = self.svc, None
        if svc is None or not svc.running:
            return defer.succeed(None)
        return defer.maybeDeferred(svc.stopService)


class TwoServicesTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.a = RunningService(temp_home(self))
        self.b = RunningService(temp_home(self))
        for s in (self.a, self.b):
            KeyStore(s.home).ensure_identity()
        ida, idb = KeyStore(self.a.home).identity(), KeyStore(self.b.home).identity()
        assert ida and idb
        self.ida, self.idb = ida, idb
        psk = bytes(range(32))
        KeyStore(self.a.home).save_key(idb, psk)
        KeyStore(self.b.home).save_key(ida, psk)

    async def start_both(self) -> None:
        self.a.start()
        self.addCleanup(self.a.stop)
        self.b.start()
        self.addCleanup(self.b.stop)
        await wait_for(lambda: self.a.node.listening_ports and self.b.node.listening_ports)

    async def peers(self, s: RunningService) -> list[dict[str, Any]]:
        r = await call_control(reactor, s.home, C.Peers)
        return json.loads(r["peers_json"])

    async def test_connect_and_see_each_other(self) -> None:
        await self.start_both()
        r = await call_control(reactor, self.b.home, C.Connect, address=f"127.0.0.1:{self.a.port}")
        self.assertEqual((r["peer"], r["mode"], r["already"]), (self.ida, "mutual", False))
        await wait_for(lambda: self.a.node.mesh.is_connected(self.idb))
        [pa] = await self.peers(self.a)
        [pb] = await self.peers(self.b)
        self.assertEqual((pa["identity"], pa["state"]), (self.idb, "connected"))
        self.assertEqual(
            (pb["identity"], pb["state"], pb["address"]),
            (self.ida, "connected", f"127.0.0.1:{self.a.port}"),
        )
        # The connector remembered the address (claudectl's .meta format).
        meta = KeyStore(self.b.home).meta(self.ida)
        assert meta is not None
        self.assertEqual(meta.addr, f"127.0.0.1:{self.a.port}")
        # Asking again is harmless.
        r2 = await call_control(reactor, self.b.home, C.Connect, address=f"127.0.0.1:{self.a.port}")
        self.assertTrue(r2["already"])

    async def test_connect_unpaired_address_is_an_error(self) -> None:
        await self.start_both()
        KeyStore(self.b.home).forget(self.ida)
        # A announces its identity; B holds no key for it and sends no proof.
        with self.assertRaises(C.LinkFailed) as cm:
            await call_control(reactor, self.b.home, C.Connect, address=f"127.0.0.1:{self.a.port}")
        self.assertIn(f"is {self.ida}, a peer this instance is not paired with", str(cm.exception))
        self.assertEqual(self.a.node.mesh.connected_peers(), [])

    async def test_wrong_key_is_refused(self) -> None:
        await self.start_both()
        KeyStore(self.b.home).save_key(self.ida, b"\x01" * 32)
        with self.assertRaises(C.LinkFailed) as cm:
            await call_control(reactor, self.b.home, C.Connect, address=f"127.0.0.1:{self.a.port}")
        self.assertIn("denied", str(cm.exception))
        self.assertEqual(self.a.node.mesh.connected_peers(), [])

    async def test_link_comes_back_after_listener_restart(self) -> None:
        await self.start_both()
        port = self.a.port
        await call_control(reactor, self.b.home, C.Connect, address=f"127.0.0.1:{port}")
        await wait_for(lambda: self.a.node.mesh.is_connected(self.idb))
        await self.a.stop()
        await wait_for(lambda: not self.b.node.mesh.is_connected(self.ida))
        self.assertEqual(self.b.node.mesh.peer_status(self.ida), "connecting")
        # Restart the listener on the same port: the dialer's first retry is
        # 5 s (+ up to 1 s jitter) after the drop.
        self.a = RunningService(self.a.home, f"tcp:{port}:interface=127.0.0.1")
        self.a.start()
        self.addCleanup(self.a.stop)
        await wait_for(lambda: self.b.node.mesh.is_connected(self.ida), timeout=15)
        await wait_for(lambda: self.a.node.mesh.is_connected(self.idb))

    async def test_disconnect_and_service_not_running(self) -> None:
        await self.start_both()
        await call_control(reactor, self.b.home, C.Connect, address=f"127.0.0.1:{self.a.port}")
        r = await call_control(reactor, self.b.home, C.Disconnect, peer=self.ida)
        self.assertEqual(
            (r["was_connected"], r["dropped_link"], r["stopped_dialer"]), (True, True, True)
        )
        await wait_for(lambda: not self.a.node.mesh.is_connected(self.idb))
        self.assertNotIn(self.ida, self.b.node.dialers)
        self.assertEqual(running_port(self.b.home), self.b.port)
        await self.b.stop()
        self.assertIsNone(running_port(self.b.home))
        with self.assertRaises(ServiceNotRunning):
            await call_control(reactor, self.b.home, C.Peers)
