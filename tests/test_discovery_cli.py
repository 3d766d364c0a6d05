"""
`relay discover` (in-process) against real `relay serve` processes on
loopback: the default scan finds a service that announces only every 600 s,
and `--json` carries the paired flag.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from claudectl.relay.keystore import KeyStore
from tests.cli_harness import run_command
from tests.common import ServeProcess, temp_home
from tests.test_discovery_query import free_port_pair
from tests.test_pairing_cli import write_config


class DiscoverFindsServe(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.port = free_port_pair()
        self.settings = {
            "lan_broadcast_port": self.port,
            "lan_broadcast_addr": "127.255.255.255",  # stay on loopback
            "lan_announce_interval": 600,
        }
        self.servers = []
        for _ in range(2):
            home = temp_home(self)
            write_config(home, **self.settings)
            proc = ServeProcess(
                home,
                [
                    "-m",
                    "claudectl",
                    "--home",
                    str(home.root),
                    "relay",
                    "serve",
                    "--listen",
                    "tcp:0:interface=127.0.0.1",
                ],
            )
            self.addCleanup(proc.stop)
            self.servers.append((proc, home))
        self.tcp_ports = [proc.port() for proc, _ in self.servers]
        self.ids = [KeyStore(home).identity() for _, home in self.servers]
        self.home = temp_home(self)
        write_config(self.home, **self.settings)
        KeyStore(self.home).save_key(self.ids[0], bytes(32))

    async def test_default_scan_finds_every_instance_and_marks_the_paired_one(self) -> None:
        """One test for both forms: each test starts two real services (the
        slow part); `discover` itself runs in-process (tests.cli_harness)."""
        await deferLater(reactor, 0.5, lambda: None)  # their first announcement is over
        result = await run_command(self.home, "relay", "discover", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = json.loads(result.stdout)
        expected = sorted(
            [
                {
                    "identity": self.ids[0],
                    "addr": f"127.0.0.1:{self.tcp_ports[0]}",
                    "version": "0.64.0",
                    "paired": True,
                },
                {
                    "identity": self.ids[1],
                    "addr": f"127.0.0.1:{self.tcp_ports[1]}",
                    "version": "0.64.0",
                    "paired": False,
                },
            ],
            key=lambda r: r["identity"],
        )
        self.assertEqual(rows, expected)

        result = await run_command(self.home, "relay", "discover", "--timeout", "1")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(
            lines[:3],
            ["Scanning LAN for claudectl instances (1 second)...", "", "Found 2 instance(s):"],
        )
        mine = [ln for ln in lines if ln.strip().startswith(self.ids[0])]
        theirs = [ln for ln in lines if ln.strip().startswith(self.ids[1])]
        self.assertTrue(mine[0].endswith("v0.64.0 (paired)"), lines)
        self.assertTrue(theirs[0].endswith("v0.64.0"), lines)
