"""
The CLI's hub parts (claudectl/cli/hub_cmds.py, ``relay invite --hub``):
errors are one clear line, and an invite naming a hub has the link only.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.pairing import codes
from tests.common import run_cli, temp_home


class InviteHubTests(SynchronousTestCase):
    def test_invite_naming_a_hub(self) -> None:
        home = temp_home(self)
        r = run_cli(home, "relay", "invite", "--hub", "203.0.113.7:9849")
        self.assertEqual(r.returncode, 1)
        self.assertIn("[relay] hubs", r.stderr)
        home.config_file.parent.mkdir(parents=True, exist_ok=True)
        home.config_file.write_text('[relay]\nhubs = ["203.0.113.7:9849"]\nhub_token = "t"\n')
        r = run_cli(home, "relay", "invite", "--hub", "hub.example.org:9849")
        self.assertEqual(r.returncode, 1)
        self.assertIn("IP address", r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        r = run_cli(home, "--json", "relay", "invite", "--hub", "203.0.113.7:9849")
        self.assertEqual(r.returncode, 0, r.stderr)
        inv = json.loads(r.stdout)
        self.assertIsNone(inv["relay_code"])
        self.assertIsNone(inv["word_phrase"])
        self.assertIn("hub", inv["code_unavailable"])
        # claudectl 0.64's link grammar: it parses, and names the hub's address.
        link = codes.parse_link(inv["invite_link"])
        self.assertEqual((link.identity, str(link.address)), (inv["identity"], "203.0.113.7:9849"))
        text = run_cli(home, "relay", "invite", "--hub", "203.0.113.7:9849").stdout
        self.assertIn("RELAY CODE:  (none: the invite names a hub", text)

    def test_status_of_a_hub_that_is_not_there(self) -> None:
        home = temp_home(self)
        r = run_cli(home, "relay", "hub", "--status", "--hub", "127.0.0.1:1")
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.startswith("Error: cannot reach the hub at 127.0.0.1:1"), r.stderr)
        r = run_cli(home, "--json", "relay", "hub", "--status", "--hub", "127.0.0.1:1")
        self.assertEqual(json.loads(r.stdout)["exit_code"], 1)

    def test_bad_hub_options_are_usage_errors(self) -> None:
        home = temp_home(self)
        r = run_cli(home, "relay", "hub", "--listen", "nonsense:")
        self.assertEqual(r.returncode, 1)
        self.assertIn("not a usable endpoint", r.stderr)
        self.assertNotIn("Traceback", r.stderr)


class TwistdHubTests(SynchronousTestCase):
    def test_twistd_claudectl_hub_runs_in_the_foreground_and_stops_on_sigterm(self) -> None:
        from tests.common import ServeProcess
        from tests.test_twistd import TWISTD

        home = temp_home(self)
        proc = ServeProcess(
            home,
            [
                "-c",
                TWISTD,
                "-n",
                "--pidfile=",
                "--logfile=-",
                "claudectl-hub",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--token",
                "t",
            ],
        )
        self.addCleanup(proc.stop)
        line = proc.expect("claudectl hub listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        proc.expect("hub status: 0 registration")  # the reactor runs
        r = run_cli(
            home, "--json", "relay", "hub", "--status", "--hub", f"127.0.0.1:{port}", "--token", "t"
        )
        self.assertEqual(json.loads(r.stdout)["registrations"], 0)
        self.assertIn(proc.stop(), (0, -15))
        proc.expect("Server Shut Down")
        self.assertNotIn("Traceback", "\n".join(proc.lines))


class InProcessStatusTests(TestCase):
    """``relay hub --status`` through the CLI dispatcher, against a hub on loopback."""

    async def test_status_text_and_json(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        from claudectl.hub.server import Hub, HubFactory
        from tests.cli_harness import run_command

        hub = Hub(reactor, "tok")
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(HubFactory(hub))
        self.addCleanup(port.stopListening)
        hub.stats.bytes_forwarded = 1234
        address = f"127.0.0.1:{port.getHost().port}"
        home = temp_home(self)
        r = await run_command(home, "relay", "hub", "--status", "--hub", address, "--token", "tok")
        self.assertEqual(r.code, 0, r.err)
        self.assertIn(f"Hub {address}", r.out)
        self.assertIn("1,234 forwarded", r.out)
        r = await run_command(
            home, "--json", "relay", "hub", "--status", "--hub", address, "--token", "tok"
        )
        self.assertEqual(r.json()["bytes_forwarded"], 1234)
        r = await run_command(home, "relay", "hub", "--status", "--hub", address)
        self.assertEqual(r.code, 1)
        self.assertIn("refused: wrong hub token (bad_token)", r.err)


class HostileHubStatusTests(TestCase):
    async def test_a_hubs_text_stays_on_its_line(self) -> None:
        """A hub's status fields and refusal reach the terminal one line each (review 15)."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.protocol import Factory, Protocol

        from claudectl.hub import wire
        from tests.cli_harness import run_command

        answers = [
            {
                "op": "status",
                "registrations": "RED\nX",
                "channels": True,
                "pending": 1,
                "bytes_forwarded": "\r\nfake: 1",
            },
            {"op": wire.ERROR, "reason": "a\nb", "message": "line one\nline two"},
        ]

        class Fake(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(wire.greeting())  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(wire.encode(answers[0]))  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        factory = Factory.forProtocol(Fake)
        factory.noisy = False
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        home = temp_home(self)
        r = await run_command(home, "relay", "hub", "--status", "--hub", address, "--token", "t")
        self.assertEqual(r.code, 0, r.err)
        self.assertEqual(
            r.out.splitlines()[1:],
            [
                "  registrations: ?",
                "  channels:      ? open, 1 waiting",
                "  bytes:         ? forwarded",
            ],
        )
        answers.pop(0)
        r = await run_command(home, "relay", "hub", "--status", "--hub", address, "--token", "t")
        self.assertEqual(r.code, 1)
        self.assertEqual(len(r.err.splitlines()), 1, r.err)
        self.assertIn("line one line two (a b)", r.err)
