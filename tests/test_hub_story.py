"""
Issue 17's done-when story, as a user runs it: three processes on loopback --
a hub and two peers with no direct route (the inviter registers at the hub;
the joiner listens on no TCP port and never learns the inviter's address) --
pair with an invite that names the hub, link through it (TLS, `via` the hub),
gossip a unit, run a delegated task, and the hub's capture holds nothing but
TLS records after the first flight.  Killing and restarting the hub, the link
comes back on its own.

Slow (about 20-40 s, real processes): the story is what it proves.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.common import ServeProcess, run_cli, subprocess_env, temp_home

FAKE_CLAUDE = str(Path(__file__).resolve().parent / "fake_claude.py")
TOKEN = "story-token-0123456789"


def ok(result: Any) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout  # type: ignore[no-any-return]


def start_hub(home: Any, capture: Path, port: int = 0) -> tuple[ServeProcess, int]:
    hub = ServeProcess(
        home,
        [
            "-m",
            "claudectl",
            "--home",
            str(home.root),
            "relay",
            "hub",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--token",
            TOKEN,
            "--capture-dir",
            str(capture),
        ],
        env=subprocess_env(home),
    )
    line = hub.expect(r"claudectl hub listening on")
    m = re.search(r":(\d+)\s*$", line)
    assert m, line
    return hub, int(m.group(1))


def tls_records_only(data: bytes) -> int:
    """The number of TLS records ``data`` is made of; fails on anything else."""
    n = 0
    while data:
        assert len(data) >= 5, data[:16]
        ctype, major, minor, length = data[0], data[1], data[2], int.from_bytes(data[3:5], "big")
        assert ctype in (20, 21, 22, 23), f"not a TLS record: {data[:16]!r}"
        assert (major, minor) in ((3, 1), (3, 3)), data[:16]
        assert length <= 2**14 + 256, length
        assert len(data) >= 5 + length, "truncated record"
        data = data[5 + length :]
        n += 1
    return n


class HubStoryTests(SynchronousTestCase):
    def test_pair_link_gossip_delegate_through_hub(self) -> None:
        hub_home, a, b = temp_home(self), temp_home(self), temp_home(self)
        capture = Path(self.mktemp()).absolute()
        capture.mkdir()
        hub, hub_port = start_hub(hub_home, capture)
        self.addCleanup(lambda: hub_box[0].stop())
        hub_box = [hub]
        hub_addr = f"127.0.0.1:{hub_port}"
        proj = Path(self.mktemp()).absolute()
        proj.mkdir()
        for home, extra in (
            (a, f'hubs = ["{hub_addr}"]\nhub_token = "{TOKEN}"\n'),
            (b, ""),
        ):
            home.config_file.parent.mkdir(parents=True, exist_ok=True)
            home.config_file.write_text(
                "[relay]\nreconnect_max_secs = 2\n" + extra + "[delegation]\n"
                f"allowed_dirs = [{json.dumps(str(proj))}]\n"
                f"claude_command = {json.dumps(sys.executable)}\n"
                f"claude_args = [{json.dumps(FAKE_CLAUDE)}]\n"
            )
        # A (the inviter) registers at the hub; B listens on no TCP port at all.
        pa = ServeProcess.serve(a, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(pa.stop)
        pa.expect("registered at hub")
        sockdir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(sockdir, ignore_errors=True))
        pb = ServeProcess.serve(b, "--listen", f"unix:{sockdir}/b.sock")
        self.addCleanup(pb.stop)
        pb.expect("relay .* ready")

        inv = json.loads(ok(run_cli(a, "--json", "relay", "invite", "--hub", hub_addr)))
        self.assertIn(f"@{hub_addr}/k/", inv["invite_link"])
        self.assertIsNone(inv["relay_code"])
        a_id = inv["identity"]
        ok(run_cli(b, "relay", "join", inv["invite_link"]))
        b_id = ok(run_cli(b, "relay", "identity")).strip()

        def peer_row(home: Any, peer: str) -> dict[str, Any]:
            rows = json.loads(ok(run_cli(home, "--json", "relay", "peers")))
            return next(r for r in rows if r["identity"] == peer)

        row = peer_row(b, a_id)
        self.assertEqual(
            (row["state"], row["transport"], row["via"]), ("connected", "tls1.3", hub_addr)
        )
        self.assertEqual(row["address"], hub_addr)  # the only address B knows for A
        row = peer_row(a, b_id)
        self.assertEqual(
            (row["state"], row["transport"], row["via"]), ("connected", "tls1.3", hub_addr)
        )
        self.assertIn(f"via {hub_addr}", ok(run_cli(b, "relay", "peers")))

        # Gossip: A distills a unit, B receives it over the spliced link.
        ok(
            run_cli(
                a, "hive", "record", "--tool", "Bash", "--command", "cargo test", "--count", "10"
            )
        )
        ok(run_cli(a, "hive", "distill"))
        deadline = time.monotonic() + 30
        while True:
            units = json.loads(ok(run_cli(b, "--json", "hive", "knowledge")))
            units = units.get("units", units) if isinstance(units, dict) else units
            if any(a_id in json.dumps(u) for u in units):
                break
            self.assertLess(time.monotonic(), deadline, f"no unit from A at B: {units}")
            time.sleep(0.5)

        # A delegated task: B asks A to run the fake Claude Code.
        out = ok(
            run_cli(
                b,
                "relay",
                "delegate",
                a_id,
                "--cwd",
                str(proj),
                "--wait",
                "fake:succeed fake:edit write the file",
            )
        )
        self.assertIn("completed", out)
        self.assertTrue((proj / "fake-claude.txt").exists())

        # The operator's view: registrations, channels, bytes.
        status = json.loads(
            ok(
                run_cli(
                    hub_home,
                    "--json",
                    "relay",
                    "hub",
                    "--status",
                    "--hub",
                    hub_addr,
                    "--token",
                    TOKEN,
                )
            )
        )
        self.assertEqual((status["registrations"], status["channels"]), (1, 1))
        self.assertGreater(status["bytes_forwarded"], 1000)
        refused = run_cli(hub_home, "relay", "hub", "--status", "--hub", hub_addr, "--token", "x")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("bad_token", refused.stderr)

        # The hub saw the first flight (challenge, starttls line), then TLS records only.
        self.check_capture(capture)

        # Kill the hub, start it again on the same port: the link comes back by itself.
        self.assertEqual(hub.stop(), 0)
        deadline = time.monotonic() + 20
        while peer_row(b, a_id)["state"] == "connected":
            self.assertLess(time.monotonic(), deadline, "link survived the hub")
            time.sleep(0.3)
        hub_box[0], _ = start_hub(hub_home, capture, hub_port)
        deadline = time.monotonic() + 45
        while True:
            row = peer_row(b, a_id)
            if row["state"] == "connected":
                break
            self.assertLess(time.monotonic(), deadline, f"link not back: {row}")
            time.sleep(0.5)
        self.assertEqual((row["transport"], row["via"]), ("tls1.3", hub_addr))

    def check_capture(self, capture: Path) -> None:
        dialers = sorted(capture.glob("channel-*-dialer.bin"))
        self.assertTrue(dialers)
        records = 0
        for dialer_file in dialers:
            target_file = Path(str(dialer_file).replace("-dialer.bin", "-target.bin"))
            dialer, target = dialer_file.read_bytes(), target_file.read_bytes()
            # Target (relay listener): its challenge line, then TLS.
            first, _, rest = target.partition(b"\n")
            self.assertEqual(json.loads(first)["msg_type"], "challenge")
            records += tls_records_only(rest)
            # Dialer: its starttls handshake line, then TLS.
            first, _, rest = dialer.partition(b"\n")
            self.assertEqual(json.loads(first)["payload"]["starttls"], "tls-v1")
            records += tls_records_only(rest)
        self.assertGreater(records, 10)
