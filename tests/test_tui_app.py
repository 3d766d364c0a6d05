"""
``claudectl tui`` on a real pseudo-terminal, read back with pyte: two real
``relay serve`` processes on loopback (temporary homes), the dashboard on
one of them, driven by keys.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.home import Home
from tests.common import ServeProcess, run_cli, subprocess_env, temp_home
from tests.ptyterm import PtyScreen

FAKE_CLAUDE = str(Path(__file__).resolve().parent / "fake_claude.py")
ESC = "\x1b"


def ok(result: Any) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout  # type: ignore[no-any-return]


def start_tui(
    testcase: SynchronousTestCase, home: Home, cols: int = 80, rows: int = 24, **env: str
) -> PtyScreen:
    term = PtyScreen(
        [sys.executable, "-m", "claudectl", "--home", str(home.root), "tui"],
        subprocess_env(home, **env),
        cols,
        rows,
        cwd=str(home.root),
    )
    testcase.addCleanup(term.stop)
    return term


def peer_line(peer: str, state: str, trust: str = "0.5") -> str:
    glyph = {"connected": "●", "connecting": "◐", "offline": "○"}[state]
    return (
        rf"{glyph} {re.escape(peer)}\s+{state}\s+trust:{re.escape(trust)}\s+"
        r"↑[\d.]+ ↓[\d.]+ kb"
    )


class Uncut:
    def assert_uncut(self: Any, term: PtyScreen) -> None:
        """Every line of every box reaches the right border; nothing wraps or spills."""
        boxes = 0
        for i, line in enumerate(term.screen.display):
            text = line.rstrip()
            if text[:1] in ("┌", "│", "└"):
                boxes += 1
                self.assertEqual(len(text), term.cols, f"line {i} cut: {text!r}")
                self.assertIn(text[-1], "┐│┘", f"line {i} cut: {text!r}")
            self.assertLessEqual(len(text), term.cols)
        self.assertGreater(boxes, 6)


class PeersPanelStoryTests(SynchronousTestCase, Uncut):
    """The issue's "done when", on two real services."""

    def setUp(self) -> None:
        self.ha, self.hb = temp_home(self), temp_home(self)
        self.proj = Path(self.mktemp()).absolute()
        self.proj.mkdir()
        for home in (self.ha, self.hb):
            home.config_file.parent.mkdir(parents=True, exist_ok=True)
            home.config_file.write_text(
                "[delegation]\n"
                f"allowed_dirs = [{json.dumps(str(self.proj))}]\n"
                f"claude_command = {json.dumps(sys.executable)}\n"
                f"claude_args = [{json.dumps(FAKE_CLAUDE)}]\n"
                "stop_grace_secs = 2\n"
            )
        code = ok(run_cli(self.ha, "relay", "pair")).splitlines()[2].split("PAIR CODE: ")[1]
        self.ida = ok(run_cli(self.ha, "relay", "identity")).strip()
        self.idb = ok(run_cli(self.hb, "relay", "identity")).strip()
        ok(run_cli(self.hb, "relay", "accept", code, self.ida))
        self.a = ServeProcess.serve(self.ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.a.stop)
        self.b = ServeProcess.serve(self.hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.b.stop)
        self.port = self.a.port()
        self.b.port()

    def connect(self) -> None:
        out = ok(run_cli(self.hb, "relay", "connect", f"127.0.0.1:{self.port}"))
        self.assertIn(f"Connected to {self.ida}", out)

    def test_peers_panel_live_toggle_offline_resize(self) -> None:
        term = start_tui(self, self.ha)
        term.wait_for("relay service: attached")
        term.wait_for(r"No peers yet|○ " + re.escape(self.idb))
        self.connect()
        term.wait_for(peer_line(self.idb, "connected") + r"\s+TLS 1\.3\s+seen \d+s ago")
        term.wait_for(r"Peers \(1\)")
        term.settle()
        self.assert_uncut(term)

        term.send("T")  # set trust from the keyboard: written, then pushed back
        term.wait_for(r"Trust for .* 0\.0 - 1\.0")
        term.send("0.9\r")
        term.wait_for(re.escape(self.idb) + r"\s+connected\s+trust:0\.9\s")
        self.assertIn("0.9", (self.ha.hive / "trust.json").read_text())

        term.send("p")  # hide ...
        term.wait_for(
            lambda s: (
                "Peers (" not in s
                and self.idb + " " not in s.split("Hive")[0]
                and "Remote tasks" in s
            )
        )
        term.send("p")  # ... and show again
        term.wait_for(peer_line(self.idb, "connected", "0.9"))

        self.assertEqual(self.b.stop(), 0)  # the other service goes away
        offline = peer_line(self.idb, "offline", "0.9")
        term.wait_for(offline)

        term.resize(200, 60)
        term.wait_for(lambda s: len(term.lines()[1]) == 200)
        term.settle()
        self.assert_uncut(term)
        # At 200 columns the address shows too.
        term.wait_for(offline + r"\s+-\s+seen \d+s ago\s+127\.0\.0\.1:\d+")

        term.resize(80, 24)
        term.wait_for(lambda s: len(term.lines()[1]) == 80)
        term.settle()
        self.assert_uncut(term)
        self.assertEqual(term.stop(), 0)
        self.assertNotIn(b"Traceback", bytes(term.raw))

    def test_dialer_side_shows_connecting_then_connected_again(self) -> None:
        self.connect()  # B dials A and keeps dialing it
        term = start_tui(self, self.hb)
        term.wait_for(peer_line(self.ida, "connected"))
        self.assertEqual(self.a.stop(), 0)
        term.wait_for(peer_line(self.ida, "connecting"))
        again = ServeProcess.serve(self.ha, "--listen", f"tcp:{self.port}:interface=127.0.0.1")
        self.addCleanup(again.stop)
        again.port()
        term.wait_for(peer_line(self.ida, "connected"), timeout=30)  # B's backoff: 5 s
        self.assertEqual(term.stop(), 0)

    def test_task_state_changes_on_screen(self) -> None:
        self.connect()
        term = start_tui(self, self.ha)
        term.wait_for(peer_line(self.idb, "connected"))
        out = json.loads(
            ok(
                run_cli(
                    self.ha,
                    "--json",
                    "relay",
                    "delegate",
                    self.idb,
                    "--cwd",
                    str(self.proj),
                    "fake:hang forever",
                )
            )
        )
        task = out["task_id"]
        term.wait_for(r"→ running\s+" + re.escape(self.idb))
        term.send("\t")  # to the tasks panel
        term.settle()
        term.send("\r")  # open the task
        term.wait_for(r"State: running")
        term.wait_for(re.escape(task))
        term.send(ESC)
        term.settle()
        term.send("s")  # stop, which asks first
        term.wait_for(r"Stop task .*\?")
        term.send("y")
        term.wait_for(r"stop sent to " + re.escape(self.idb))
        term.wait_for(r"→ (stopped|failed)\s+" + re.escape(self.idb))
        self.assertEqual(term.stop(), 0)

    def test_task_window_shows_the_live_tail(self) -> None:
        self.connect()
        term = start_tui(self, self.ha)
        term.wait_for(peer_line(self.idb, "connected"))
        out = json.loads(
            ok(
                run_cli(
                    self.ha,
                    "--json",
                    "relay",
                    "delegate",
                    self.idb,
                    "--cwd",
                    str(self.proj),
                    "fake:busy then hang",
                )
            )
        )
        task = out["task_id"]
        term.wait_for(r"→ running\s+" + re.escape(self.idb))
        term.send("\t")  # to the tasks panel
        term.settle()
        term.send("\r")  # open the task
        term.wait_for(r"State: running")
        term.wait_for(r"Recent activity:")
        term.wait_for(r"\d\d:\d\d:\d\d  Bash: pytest -q tests/")
        term.wait_for(r"\d\d:\d\d:\d\d  Running the tests now")
        term.wait_for(r"\d\d:\d\d:\d\d  Working on it")
        # A line that appears while the window is open is pushed into it.
        ok(run_cli(self.ha, "relay", "interrupt", task, "nudge", "hello", "there"))
        term.wait_for(r"\d\d:\d\d:\d\d  nudge delivered: hello there")
        self.assertIn(task, term.text())
        term.send(ESC)
        term.settle()
        ok(run_cli(self.ha, "relay", "interrupt", task, "stop", "enough"))
        term.wait_for(r"→ (stopped|failed)\s+" + re.escape(self.idb))
        self.assertEqual(term.stop(), 0)
        self.assertNotIn(b"Traceback", bytes(term.raw))


class WithoutServiceTests(SynchronousTestCase, Uncut):
    def test_says_how_to_start_and_shows_the_local_hive(self) -> None:
        from claudectl.hive.units import dumps_line
        from tests.test_hive_units import make_unit

        home = temp_home(self)
        me = ok(run_cli(home, "relay", "identity")).strip()
        home.hive.mkdir(parents=True, exist_ok=True)
        units = [
            make_unit(1, source_peer=me),
            make_unit(2, source_peer=me),
            make_unit(3, source_peer="laptop-a3f29b1c"),
        ]
        (home.hive / "knowledge.jsonl").write_text("".join(dumps_line(u) for u in units))
        term = start_tui(self, home, NO_COLOR="1")
        term.wait_for(r"relay service: not running")
        term.wait_for(r"claudectl relay serve")
        term.wait_for(r"Hive \(3 units\)")
        term.wait_for(r"3 units: 2 local, 1 from 1 peer\(s\)")
        term.wait_for(r"laptop-a3f29b1c\s+Suggested 0\.5\s+1 unit\b")
        self.assert_uncut(term)
        # NO_COLOR: no colour escapes at all (bold/reverse only).
        self.assertIsNone(re.search(rb"\x1b\[[0-9;]*(3[0-7]|9[0-7]|38;5)[;m]", bytes(term.raw)))
        term.send("?")
        term.wait_for(r"Help")
        for _ in range(3):
            term.send(ESC + "[6~")  # PgDn
            term.settle(0.2)
        term.wait_for(r"Peer states: ● connected\s+◐ connecting\s+○ offline")
        self.assertEqual(term.stop(), 0)

    def test_enabled_starts_the_service_in_its_own_process(self) -> None:
        home = temp_home(self)
        home.config_file.parent.mkdir(parents=True, exist_ok=True)
        home.config_file.write_text(
            '[relay]\nenabled = true\nlisten_addr = "127.0.0.1"\n'
            "listen_port = 0\nlan_discovery = false\n"
        )
        term = start_tui(self, home)
        term.wait_for(r"relay service: running in this process")
        running = run_cli(home, "relay", "status")
        self.assertEqual(running.returncode, 0, running.stderr)
        self.assertNotIn("not running", running.stdout + running.stderr)
        self.assertEqual(term.stop(), 0)
        r = run_cli(home, "relay", "status")
        self.assertIn("not running", r.stdout + r.stderr)

    def test_ctrl_c_and_sigterm_restore_the_terminal(self) -> None:
        import os
        import signal
        import time

        for stop in ("ctrl-c", "sigterm"):
            home = temp_home(self)
            term = start_tui(self, home)
            term.wait_for(r"Hive \(0 units\)")
            term.settle()
            if stop == "ctrl-c":
                term.send("\x03")
            else:
                os.kill(term.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while term.proc.poll() is None and time.monotonic() < deadline:
                term.pump(0.05)
            self.assertEqual(term.proc.poll(), 0, stop)
            term.stop()
            raw = bytes(term.raw)
            # The alternate screen is left and the cursor shown again, last.
            self.assertIn(b"\x1b[?1049l", raw[-80:], stop)
            self.assertTrue(raw.rstrip().endswith(b"\x1b[?25h"), stop)
            self.assertNotIn(b"Traceback", raw)
            self.assertNotIn(b"Error", raw[raw.rfind(b"\x1b[?1049l") :])

    def test_enabled_but_the_port_is_taken(self) -> None:
        import socket

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        home = temp_home(self)
        home.config_file.parent.mkdir(parents=True, exist_ok=True)
        home.config_file.write_text(
            '[relay]\nenabled = true\nlisten_addr = "127.0.0.1"\n'
            f"listen_port = {holder.getsockname()[1]}\nlan_discovery = false\n"
        )
        term = start_tui(self, home)
        term.wait_for(r"relay service: not running")
        term.wait_for(r"claudectl relay serve")  # falls back to the files, says how
        log = (home.run_dir / "tui.log").read_text()
        self.assertIn("starting the relay service in the dashboard failed", log)
        self.assertEqual(term.stop(), 0)
        self.assertNotIn(b"Traceback", bytes(term.raw))

    def test_reattaches_when_the_service_comes_back(self) -> None:
        home = temp_home(self)
        serve = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(serve.stop)
        serve.port()
        term = start_tui(self, home)
        term.wait_for(r"relay service: attached")
        self.assertEqual(serve.stop(), 0)
        term.wait_for(r"relay service: not running")
        term.wait_for(r"The relay service stopped; showing the files")
        again = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(again.stop)
        again.port()
        term.wait_for(r"Attached to the relay service again", timeout=30)
        term.wait_for(r"relay service: attached")
        self.assertEqual(term.stop(), 0)

    def test_needs_a_terminal(self) -> None:
        r = run_cli(temp_home(self), "tui")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr.strip().splitlines()[0][:6], "Error:")
        self.assertNotIn("Traceback", r.stderr)
