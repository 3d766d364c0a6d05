"""
The relay CLI as a user meets it: commands in-process (tests.cli_harness)
where they need no service, and real ``python -m claudectl`` processes in
temporary homes with real services on loopback for the stories.
"""

from __future__ import annotations

import json
import os
import stat
import time

from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay.crypto import psk_from_code
from claudectl.relay.keystore import KeyStore
from tests.cli_harness import run_now
from tests.common import ServeProcess, run_cli, temp_home


def ok(result: object) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)  # type: ignore[attr-defined]
    return result.stdout  # type: ignore[attr-defined,no-any-return]


class OfflineCommandsTests(SynchronousTestCase):
    """Commands that need no service, run in-process (tests.cli_harness)."""

    def setUp(self) -> None:
        self.home = temp_home(self)

    def test_identity_created_once(self) -> None:
        first = ok(run_now(self.home, "relay", "identity")).strip()
        self.assertRegex(first, r"^[a-z0-9_-]+-[0-9a-f]{8}$")
        self.assertEqual(ok(run_now(self.home, "relay", "identity")).strip(), first)
        self.assertEqual(self.home.identity_file.read_text(), first)  # no trailing newline
        self.assertEqual(
            json.loads(ok(run_now(self.home, "--json", "relay", "identity"))), {"identity": first}
        )

    def test_a_damaged_identity_is_one_error_line(self) -> None:
        self.home.relay.mkdir(parents=True)
        self.home.identity_file.write_bytes(b"\xff\xfe")
        for args in (["relay", "identity"], ["relay", "pair"], ["hive", "status"]):
            r = run_now(self.home, *args)
            self.assertEqual(r.code, 1, args)
            self.assertEqual(len(r.err.splitlines()), 1, r.err)
            self.assertIn("identity is damaged: it is not UTF-8 text", r.err)
        self.assertEqual(self.home.identity_file.read_bytes(), b"\xff\xfe")
        self.home.identity_file.write_text("my laptop")
        r = run_now(self.home, "relay", "pair")
        self.assertEqual(r.code, 1)
        self.assertIn("'my laptop' is not an id peers accept", r.err)
        self.assertIsNone(KeyStore(self.home).pending_key())

    def test_accept_names_the_reserved_id(self) -> None:
        r = run_now(self.home, "relay", "accept", "a3f2-9b1c-d4e5-f678", "_pending")
        self.assertEqual(r.code, 1)
        self.assertIn("'_pending' is reserved", r.err)

    def test_a_damaged_key_is_a_warning_in_peers(self) -> None:
        """Review 14: the peer vanished from `relay peers` without a word."""
        ok(run_now(self.home, "relay", "accept", "a3f2-9b1c-d4e5-f678", "peer-one"))
        (self.home.peers / "peer-one.key").write_text("garbage")
        r = run_now(self.home, "relay", "peers", "--json")
        self.assertEqual((r.code, json.loads(r.out)), (0, []))
        self.assertEqual(len(r.err.splitlines()), 1, r.err)
        self.assertIn("peer-one.key holds no key, so peer-one is not paired now", r.err)
        ok(run_now(self.home, "relay", "forget", "peer-one"))
        self.assertEqual(run_now(self.home, "relay", "peers").err, "")

    def test_a_damaged_trust_file_is_a_warning_in_peers(self) -> None:
        ok(run_now(self.home, "relay", "accept", "a3f2-9b1c-d4e5-f678", "peer-one"))
        self.home.hive.mkdir(parents=True, exist_ok=True)
        (self.home.hive / "trust.json").write_text("{bad")
        r = run_now(self.home, "relay", "peers", "--json")
        self.assertEqual(r.code, 0, r.err)
        self.assertEqual(json.loads(r.out)[0]["trust"], 0.5)
        self.assertEqual(len(r.err.splitlines()), 1, r.err)
        self.assertIn("trust.json is damaged", r.err)

    def test_pair_writes_pending_key(self) -> None:
        out = ok(run_now(self.home, "relay", "pair"))
        ident = KeyStore(self.home).identity()
        lines = out.splitlines()
        self.assertEqual(lines[0], f"Your identity: {ident}")
        code = lines[2].split("PAIR CODE: ")[1]
        self.assertRegex(code, r"^[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}$")
        self.assertEqual(lines[-1], f"They should run: claudectl relay accept {code} {ident}")
        pending = self.home.peers / "_pending.key"
        self.assertEqual(pending.read_text(), psk_from_code(code).hex())
        self.assertEqual(stat.S_IMODE(os.stat(pending).st_mode), 0o600)
        data = json.loads(ok(run_now(self.home, "relay", "pair", "--json")))
        self.assertEqual(set(data), {"identity", "pair_code"})

    def test_accept_stores_key(self) -> None:
        out = ok(run_now(self.home, "relay", "accept", "0123-4567-89AB-CDEF", "desk-9f8e7d6c"))
        self.assertIn("Paired with peer: desk-9f8e7d6c", out)
        key = self.home.peers / "desk-9f8e7d6c.key"
        self.assertEqual(
            key.read_text(), "0123456789abcdef0cefa825d0c8e8e9532ee8a118abe7d8570762cd38be9818"
        )
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

    def test_accept_errors(self) -> None:
        r = run_now(self.home, "relay", "accept", "abcd", "desk")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Error: invalid PSK code: expected 16 hex chars, got 4", r.stderr)
        r = run_now(self.home, "relay", "accept", "zzzz-1234", "desk")
        self.assertEqual(r.returncode, 1)
        self.assertIn("got 4 ('z' is not a hex digit and was ignored)", r.stderr)
        r = run_now(self.home, "relay", "accept", "0123456789abcdef", "../etc")
        self.assertEqual(r.returncode, 1)
        self.assertIn("invalid peer id", r.stderr)
        self.assertFalse((self.home.peers).exists() and any(self.home.peers.glob("*.key")))

    def test_accept_does_not_silently_replace(self) -> None:
        ok(run_now(self.home, "relay", "accept", "0123456789abcdef", "desk"))
        r = run_now(self.home, "relay", "accept", "fedcba9876543210", "desk")
        self.assertEqual(r.returncode, 1)
        self.assertIn("already paired", r.stderr)
        self.assertEqual(KeyStore(self.home).key("desk"), psk_from_code("0123456789abcdef"))

    def test_peers_without_service(self) -> None:
        ok(run_now(self.home, "relay", "accept", "0123456789abcdef", "desk"))
        rows = json.loads(ok(run_now(self.home, "relay", "peers", "--json")))
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["identity"], "desk")
        self.assertEqual(rows[0]["state"], "disconnected")
        for key in ("identity", "state", "address", "last_seen"):
            self.assertIn(key, rows[0])
        text = ok(run_now(self.home, "relay", "peers"))
        self.assertIn("service is not running", text)

    def test_forget(self) -> None:
        ok(run_now(self.home, "relay", "accept", "0123456789abcdef", "desk"))
        ok(run_now(self.home, "relay", "forget", "desk"))
        self.assertEqual(KeyStore(self.home).known_peers(), [])
        r = run_now(self.home, "relay", "forget", "desk")
        self.assertEqual(r.returncode, 1)
        self.assertIn("unknown peer 'desk'", r.stderr)

    def test_disconnect_needs_service(self) -> None:
        r = run_now(self.home, "relay", "disconnect", "desk")
        self.assertEqual(r.returncode, 1)
        self.assertIn("not running", r.stderr)

    def test_unknown_config_key_warns(self) -> None:
        """Issue 12 item 6: a typo'd key is named, with the key it probably meant."""
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text("[hive]\nmax_unit = 3\n")
        r = run_now(self.home, "hive", "status")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(
            r.stderr,
            f"Warning: {self.home.config_file}: unknown key "
            f"'hive.max_unit' is ignored; did you mean 'hive.max_units'?\n",
        )

    def test_bad_config_names_key_and_file(self) -> None:
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text("[relay]\nheartbeat_interval_secs = -3\n")
        r = run_now(self.home, "relay", "serve")
        self.assertEqual(r.returncode, 1)
        self.assertIn("relay.heartbeat_interval_secs", r.stderr)
        self.assertIn(str(self.home.config_file), r.stderr)


class StoryTests(SynchronousTestCase):
    """
    The issue's "done when": two instances (two homes, two ports), paired with
    `relay pair` / `relay accept`, connected, both connected in `relay peers`;
    one is killed and restarted and the link comes back on the backoff
    schedule.  Real `relay serve` processes and real `claudectl` processes for
    everything that talks to them (the offline pairing steps run in-process).
    """

    def test_pair_connect_kill_restart(self) -> None:
        ha, hb = temp_home(self), temp_home(self)
        out = ok(run_now(ha, "relay", "pair"))
        code = out.splitlines()[2].split("PAIR CODE: ")[1]
        ida = ok(run_now(ha, "relay", "identity")).strip()
        idb = ok(run_now(hb, "relay", "identity")).strip()
        ok(run_now(hb, "relay", "accept", code, ida))

        a = ServeProcess.serve(ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(a.stop)
        b = ServeProcess.serve(hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(b.stop)
        port = a.port()
        b.port()

        out = ok(run_cli(hb, "relay", "connect", f"127.0.0.1:{port}"))
        self.assertIn(f"Connected to {ida}", out)
        a.expect(f"{idb} authenticated")

        def state(home: object, peer: str) -> str:
            rows = json.loads(ok(run_cli(home, "relay", "peers", "--json")))  # type: ignore[arg-type]
            return {r["identity"]: r["state"] for r in rows}[peer]

        self.assertEqual(state(ha, idb), "connected")
        self.assertEqual(state(hb, ida), "connected")
        # Two instances of this project: the link is TLS 1.3 on both sides.
        for home, peer in ((ha, idb), (hb, ida)):
            rows = json.loads(ok(run_cli(home, "relay", "peers", "--json")))
            self.assertEqual({r["identity"]: r["transport"] for r in rows}[peer], "tls1.3")
        self.assertIn("TLS 1.3", ok(run_cli(ha, "relay", "peers")))
        # The pending key was claimed by B's identity.
        self.assertFalse((ha.peers / "_pending.key").exists())
        self.assertTrue((ha.peers / f"{idb}.key").exists())

        self.assertEqual(a.stop(), 0)  # SIGTERM: clean exit
        b.expect(f"{ida} disconnected")
        self.assertEqual(state(hb, ida), "connecting")
        b.expect(r"Scheduling retry 1 .* in 5\.")
        a2 = ServeProcess.serve(ha, "--listen", f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(a2.stop)
        a2.port()
        deadline = time.monotonic() + 30
        while state(hb, ida) != "connected":
            self.assertLess(time.monotonic(), deadline, "link did not come back")
            time.sleep(0.5)
        a2.expect(f"{idb} authenticated")
        # Issue 12 item 11: the link B re-dialed by itself is dropped, and said so.
        self.assertEqual(
            ok(run_cli(hb, "relay", "disconnect", ida)),
            f"Disconnected from {ida}; the service stopped redialing it (until it restarts).\n",
        )
        self.assertEqual(state(hb, ida), "disconnected")
        self.assertEqual(
            ok(run_cli(hb, "relay", "disconnect", ida)),
            f"{ida} was not connected, and the service was not dialing it: nothing to do.\n",
        )
        self.assertEqual(b.stop(), 0)


class ClaudectlPeerTests(SynchronousTestCase):
    """A claudectl 0.64-style connector (plaintext, one-way proof) against a real service."""

    def test_plaintext_peer_pairs_connects_and_is_labelled(self) -> None:
        import socket

        from claudectl.relay.crypto import proof, psk_from_code

        home = temp_home(self)
        out = ok(run_now(home, "relay", "pair"))
        code = out.splitlines()[2].split("PAIR CODE: ")[1]
        serve = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(serve.stop)
        port = serve.port()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        reader = sock.makefile("rb")
        challenge = json.loads(reader.readline())
        self.assertIn("tls-v1", challenge["payload"]["caps"])
        frame = {
            "id": "msg_1_0",
            "msg_type": "handshake",
            "from_peer": "claude-rs-01",
            "timestamp": 1,
            "payload": {
                "proof": proof(psk_from_code(code), challenge["payload"]["nonce"]),
                "version": "0.64.0",
            },
        }
        sock.sendall(json.dumps(frame, separators=(",", ":")).encode() + b"\n")
        ack = json.loads(reader.readline())
        self.assertEqual(ack["payload"], {"status": "ok"})
        serve.expect("claude-rs-01 authenticated")
        rows = json.loads(ok(run_cli(home, "relay", "peers", "--json")))
        row = {r["identity"]: r for r in rows}["claude-rs-01"]
        self.assertEqual(
            (row["state"], row["transport"], row["mode"]), ("connected", "plaintext", "oneway")
        )
        serve.expect("link to claude-rs-01 is not encrypted")


class OneServicePerHomeTests(SynchronousTestCase):
    """Issue 12 items 7 and 10: a second `relay serve`, `-v`, a quiet log."""

    def test_second_serve_and_verbose_log(self) -> None:
        home = temp_home(self)
        a = ServeProcess(
            home,
            [
                "-m",
                "claudectl",
                "-v",
                "--home",
                str(home.root),
                "relay",
                "serve",
                "--no-discovery",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
        )
        self.addCleanup(a.stop)
        port = a.port()
        ident = KeyStore(home).identity()
        r = run_cli(home, "relay", "serve", "--port", "0")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(
            r.stderr,
            f"Error: the relay service ({ident}) is already running for home {home.root} "
            f"(pid {a.proc.pid}, listening on port {port}); stop it with Ctrl+C in its "
            f"terminal or `kill {a.proc.pid}`, or use another --home\n",
        )
        self.assertNotIn("--pidfile", r.stdout + r.stderr)
        ok(run_cli(home, "relay", "peers"))
        ok(run_cli(home, "relay", "status"))
        self.assertEqual(a.stop(), 0)
        log = "\n".join(a.lines)
        self.assertNotIn("selected twice", log)
        self.assertEqual(log.count("listening on 127.0.0.1"), 1, log)
        self.assertEqual(log.count("Server Shut Down"), 1, log)
        self.assertNotIn("connection established", log)
        self.assertNotIn("connection lost", log)
        self.assertNotIn("Starting factory", log)


class ServeUsageErrorTests(SynchronousTestCase):
    def test_a_log_file_that_cannot_be_made_is_a_plain_error(self) -> None:
        """Review 14: it was reported as "internal error: UsageError: ..."."""
        home = temp_home(self)
        missing = home.root / "nonexist" / "dir" / "x.log"
        r = run_cli(home, "relay", "serve", "--port", "0", "--logfile", str(missing))
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertEqual(
            r.stderr, f"Error: cannot create the log file {missing}: No such file or directory\n"
        )


class DaemonLogfileTests(SynchronousTestCase):
    def test_daemon_logfile_is_private(self) -> None:
        """Issue 12 item 10: twistd opens its log before its 0077 umask."""
        import signal
        import subprocess
        import sys

        from tests.common import subprocess_env
        from tests.test_twistd import TWISTD

        home = temp_home(self)
        pidfile, logfile = home.root / "relay.pid", home.root / "relay.log"
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                TWISTD,
                f"--pidfile={pidfile}",
                f"--logfile={logfile}",
                "--umask=0022",
                "claudectl-relay",
                "--home",
                str(home.root),
                "--no-discovery",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
            capture_output=True,
            text=True,
            env=subprocess_env(home),
            cwd=str(home.root),
            timeout=60,
        )
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        self.addCleanup(lambda: os.path.exists(f"/proc/{pid}") and os.kill(pid, signal.SIGKILL))
        self.assertEqual(stat.S_IMODE(os.stat(logfile).st_mode), 0o600)
        while "ready" not in logfile.read_text():
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        os.kill(pid, signal.SIGTERM)
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)


class SeveralPairCodesTests(SynchronousTestCase):
    """Issue 12 item 15: a second `relay pair` does not void the first, unused code."""

    def test_two_codes_both_pair(self) -> None:
        ha, hb, hc = temp_home(self), temp_home(self), temp_home(self)
        first = run_now(ha, "relay", "pair")
        code1 = ok(first).splitlines()[2].split("PAIR CODE: ")[1]
        self.assertEqual(first.stderr, "")
        second = run_now(ha, "relay", "pair")
        code2 = ok(second).splitlines()[2].split("PAIR CODE: ")[1]
        self.assertIn("Note: 1 earlier unused pair code(s) stay valid", second.stderr)
        ida = ok(run_now(ha, "relay", "identity")).strip()
        ok(run_now(hb, "relay", "accept", code1, ida))
        ok(run_now(hc, "relay", "accept", code2, ida))
        listed = json.loads(ok(run_now(ha, "relay", "invite", "--list", "--json")))
        self.assertEqual(
            [(i["kind"], i["state"]) for i in listed], [("pair", "open"), ("pair", "open")]
        )

        a = ServeProcess.serve(ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(a.stop)
        port = a.port()
        idb = ok(run_now(hb, "relay", "identity")).strip()
        idc = ok(run_now(hc, "relay", "identity")).strip()
        # B holds the first (older) code: no longer in _pending.key, still accepted.
        r = run_cli(hb, "relay", "connect", f"127.0.0.1:{port}")
        self.assertIn(f"{ida}", ok(r))
        a.expect(f"{idb} authenticated")
        r = run_cli(hc, "relay", "connect", f"127.0.0.1:{port}")
        self.assertIn(f"{ida}", ok(r))
        a.expect(f"{idc} authenticated")
        ks = KeyStore(ha)
        self.assertEqual(ks.key(idb), psk_from_code(code1))
        self.assertEqual(ks.key(idc), psk_from_code(code2))
        self.assertFalse((ha.peers / "_pending.key").exists())
        listed = json.loads(ok(run_now(ha, "relay", "invite", "--list", "--json")))
        self.assertEqual(
            sorted((i["state"], i["used_by"]) for i in listed),
            sorted([("used", idb), ("used", idc)]),
        )


class RelayServiceCmdlineTests(SynchronousTestCase):
    def test_only_relay_services_count(self) -> None:
        from claudectl.cli.relay_cmds import _is_relay_service

        def cmd(*args: str) -> bytes:
            return b"\0".join(a.encode() for a in args) + b"\0"

        for yes in (
            cmd("/v/bin/python", "/v/bin/claudectl", "--home", "/h", "relay", "serve"),
            cmd("python3", "-m", "claudectl", "relay", "serve", "--port", "0"),
            cmd("/usr/bin/python3", "/v/bin/twistd", "-n", "claudectl-relay", "--home", "/h"),
        ):
            self.assertTrue(_is_relay_service(yes), yes)
        for no in (
            # A test runner whose temp directory is named after the project.
            cmd("python", "-m", "twisted.trial", "--temp-directory=/tmp/claudectl-ci", "tests"),
            cmd("/v/bin/claudectl", "relay", "peers"),
            cmd("vim", "claudectl/relay/serve.py"),
        ):
            self.assertFalse(_is_relay_service(no), no)


class StalePidTests(SynchronousTestCase):
    def test_pid_of_another_program_does_not_block(self) -> None:
        from claudectl.cli.base import CliContext
        from claudectl.cli.relay_cmds import _refuse_second_service

        home = temp_home(self)
        home.ensure_private_dir(home.run_dir)
        # This test process is alive but is not a relay service.
        (home.run_dir / "relay.pid").write_text(f"{os.getpid()}\n")
        _refuse_second_service(CliContext(home=home))
        (home.run_dir / "relay.pid").write_text("999999999\n")  # no such process
        _refuse_second_service(CliContext(home=home))
