"""
`relay connect | peers | disconnect | forget | status | interrupt | delegate`
in-process (tests.cli_harness) against real services on loopback, also in
this process: what each prints and exits with, with and without a service.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from claudectl.relay.keystore import KeyStore
from tests.cli_harness import CliResult, run_command
from tests.common import temp_home
from tests.test_services import RunningService, wait_for


class TwoHomes(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.a = RunningService(temp_home(self))
        self.b = RunningService(temp_home(self))
        self.ida = KeyStore(self.a.home).ensure_identity()
        self.idb = KeyStore(self.b.home).ensure_identity()
        psk = bytes(range(32))
        KeyStore(self.a.home).save_key(self.idb, psk)
        KeyStore(self.b.home).save_key(self.ida, psk)

    def start(self, s: RunningService) -> None:
        s.start()
        self.addCleanup(s.stop)

    async def ok(self, s: RunningService, *args: str) -> CliResult:
        r = await run_command(s.home, *args)
        self.assertEqual(r.code, 0, r.err)
        self.assertEqual(r.err, "")
        return r

    async def failing(self, s: RunningService, *args: str, code: int = 1) -> str:
        r = await run_command(s.home, *args)
        self.assertEqual((r.code, r.out), (code, ""), r.err)
        self.assertTrue(r.err.startswith("Error: "), r.err)
        self.assertEqual(r.err.count("\n"), 1, r.err)
        return r.err

    async def states(self, s: RunningService) -> dict[str, Any]:
        rows = (await self.ok(s, "relay", "peers", "--json")).json()
        return {r["identity"]: r for r in rows}


class ServiceConnectTests(TwoHomes):
    async def test_connect_peers_disconnect_through_the_service(self) -> None:
        self.start(self.a)
        self.start(self.b)
        address = f"127.0.0.1:{self.a.port}"
        out = (await self.ok(self.b, "relay", "connect", address)).out
        self.assertEqual(
            out,
            f"Connected to {self.ida} ({address}), mutual authentication. The relay "
            "service keeps the link up.\n",
        )
        await wait_for(lambda: self.a.node.mesh.is_connected(self.idb))
        again = (await self.ok(self.b, "relay", "connect", address, "--json")).json()
        self.assertEqual(
            (again["peer"], again["already"], again["kept_by_service"], again["state"]),
            (self.ida, True, True, "connected"),
        )
        self.assertIn("Already connected", (await self.ok(self.b, "relay", "connect", address)).out)
        row = (await self.states(self.b))[self.ida]
        self.assertEqual(
            (row["state"], row["transport"], row["address"]), ("connected", "tls1.3", address)
        )
        table = (await self.ok(self.a, "relay", "peers")).out.splitlines()
        self.assertTrue(table[0].startswith("IDENTITY"), table)
        self.assertTrue(table[2].startswith(f"● {self.idb}"), table)
        self.assertIn("connected", table[2])
        self.assertIn("TLS 1.3", table[2])
        self.assertNotIn("service is not running", "\n".join(table))

        out = (await self.ok(self.b, "relay", "disconnect", self.ida)).out
        self.assertEqual(
            out,
            f"Disconnected from {self.ida}; the service stopped redialing it (until it restarts).\n",
        )
        data = (await self.ok(self.b, "relay", "disconnect", self.ida, "--json")).json()
        # (A may have dialed B back meanwhile: B told A where it listens.)
        self.assertEqual(data["peer"], self.ida)
        self.assertFalse(data["stopped_dialer"])
        self.assertEqual(data["dropped_link"], data["was_connected"])
        # A's side: B dialed it, so A only drops the link.
        await self.ok(self.b, "relay", "connect", address)
        await wait_for(lambda: self.a.node.mesh.is_connected(self.idb))
        out = (await self.ok(self.a, "relay", "disconnect", self.idb)).out
        self.assertIn(f"Disconnected from {self.idb}. The service was not dialing it", out)

    async def test_service_errors_are_one_line(self) -> None:
        self.start(self.b)
        err = await self.failing(self.b, "relay", "connect", "not an address")
        self.assertIn("Error: ", err)
        # Nothing listens there: the service says the link failed.
        KeyStore(self.b.home).forget(self.ida)
        self.start(self.a)
        err = await self.failing(self.b, "relay", "connect", f"127.0.0.1:{self.a.port}")
        self.assertIn("not paired with", err)
        # A typo'd peer is an error, as `relay forget` says (review 14).
        err = await self.failing(self.b, "relay", "disconnect", "nobody-00000000")
        self.assertEqual(
            err, "Error: unknown peer 'nobody-00000000' (see `claudectl relay peers`)\n"
        )

    async def test_forget_tells_the_service(self) -> None:
        self.start(self.a)
        self.start(self.b)
        await self.ok(self.b, "relay", "connect", f"127.0.0.1:{self.a.port}")
        await wait_for(lambda: self.a.node.mesh.is_connected(self.idb))
        data = (await self.ok(self.b, "relay", "forget", self.ida, "--json")).json()
        self.assertEqual(data, {"peer": self.ida, "forgotten": True})
        await wait_for(lambda: not self.b.node.mesh.is_connected(self.ida))
        self.assertNotIn(self.ida, await self.states(self.b))
        err = await self.failing(self.b, "relay", "forget", "../x")
        self.assertEqual(err, "Error: invalid peer id '../x'\n")


class OneShotConnectTests(TwoHomes):
    """No service on B's home: `relay connect` authenticates once and says so."""

    async def test_one_shot(self) -> None:
        self.start(self.a)
        address = f"127.0.0.1:{self.a.port}"
        out = (await self.ok(self.b, "relay", "connect", address)).out.splitlines()
        self.assertEqual(
            out[:2],
            [
                f"Authenticated with {self.ida} ({address}), mutual authentication.",
                "No relay service is running for this home, so the link was closed again.",
            ],
        )
        data = (
            await self.ok(self.b, "relay", "connect", address, "--peer", self.ida, "--json")
        ).json()
        self.assertEqual(
            data,
            {
                "peer": self.ida,
                "address": address,
                "mode": "mutual",
                "state": "verified",
                "kept_by_service": False,
            },
        )
        # Let A see both links end before the test does.
        await wait_for(lambda: not self.a.node.mesh.connected_peers())
        await deferLater(reactor, 0, lambda: None)

    async def test_one_shot_failures(self) -> None:
        self.start(self.a)
        KeyStore(self.b.home).save_key(self.ida, b"\x01" * 32)  # the wrong key
        err = await self.failing(self.b, "relay", "connect", f"127.0.0.1:{self.a.port}")
        self.assertTrue(err.startswith("Error: connection failed"), err)
        await wait_for(lambda: not self.a.node.mesh.connected_peers())
        KeyStore(self.b.home).forget(self.ida)
        err = await self.failing(self.b, "relay", "connect", f"127.0.0.1:{self.a.port}")
        self.assertTrue(err.startswith("Error: "), err)


class DelegationCommandsTests(TwoHomes):
    async def test_with_a_service(self) -> None:
        self.start(self.b)
        out = (await self.ok(self.b, "relay", "status")).out
        self.assertIn("No delegated tasks", out)
        self.assertNotIn("not running", out)
        data = (await self.ok(self.b, "relay", "status", "--json")).json()
        service = data.pop("service")
        self.assertEqual(data, {"tasks": [], "incoming": [], "service_running": True})
        # The service's own status, with the gossip engine's counters.
        self.assertEqual(service["identity"], self.idb)
        self.assertEqual(service["hive"]["duplicate_units"], 0)
        self.assertEqual(service["connected"], [])
        err = await self.failing(self.b, "relay", "status", "task_9_9")
        self.assertIn("no delegated task 'task_9_9'", err)
        err = await self.failing(self.b, "relay", "interrupt", "task_9_9", "stop")
        self.assertTrue(err.startswith("Error: "), err)
        # A paired peer that is not connected: the service refuses at once.
        err = await self.failing(self.b, "relay", "delegate", self.ida, "do", "it")
        self.assertTrue(err.startswith("Error: "), err)
        r = await run_command(self.b.home, "--json", "relay", "delegate", "nobody-1", "hi")
        self.assertEqual(r.code, 1)
        self.assertEqual(r.json()["kind"], "error")
