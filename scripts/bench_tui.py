#!/usr/bin/env python3
"""
Push latency of ``claudectl tui`` (issue 14): how long after a peer's link
comes up (or goes down) does the dashboard's peers line change on screen?

Everything is real and on 127.0.0.1 only, in throw-away homes under a
temporary directory (never ``~``):

* two ``claudectl relay serve`` processes, A and B, paired with
  ``relay pair`` / ``relay accept``;
* ``claudectl tui`` on A, on a pseudo-terminal, its screen kept by pyte;
* this script talks to B's control socket with a minimal blocking AMP
  client and, N times: asks B to ``Disconnect`` from A and waits for A's
  line to read ``offline``; then asks B to ``Connect`` and waits for
  ``connected``.

For "up" it reports two times per round: from sending the Connect request
to the screen change (an upper bound of "A's link up -> screen": it also
holds B's TCP and TLS handshake), and from B's answer (B's link is up) to
the screen change.  For "down": from sending Disconnect to ``offline``.
The screen time is when the bytes that completed the line were read from
the terminal.

Run from the repository root::

    python scripts/bench_tui.py            # 30 rounds
    python scripts/bench_tui.py --quick    # 5 rounds
    python scripts/bench_tui.py --json

Exit status: 0 when the p50 of "connect request -> screen" is <= 100 ms,
1 when not, 2 when the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOAL_P50_MS = 100.0


# --- a blocking AMP client (enough for Connect / Disconnect) -------------------------


class AmpClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.n = 0
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("control socket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _box(self) -> dict[bytes, bytes]:
        box = {}
        while True:
            (klen,) = struct.unpack("!H", self._read(2))
            if klen == 0:
                return box
            key = self._read(klen)
            (vlen,) = struct.unpack("!H", self._read(2))
            box[key] = self._read(vlen)

    def call(self, command: str, **args: str) -> dict[bytes, bytes]:
        self.n += 1
        ask = str(self.n).encode()
        box = {
            b"_command": command.encode(),
            b"_ask": ask,
            **{k.encode(): v.encode() for k, v in args.items()},
        }
        self.sock.sendall(
            b"".join(
                struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v
                for k, v in box.items()
            )
            + b"\x00\x00"
        )
        while True:
            reply = self._box()
            if reply.get(b"_answer") == ask:
                return reply
            if reply.get(b"_error") == ask:
                raise RuntimeError(reply.get(b"_error_description", b"?").decode())


# --- processes -------------------------------------------------------------------------


def env_for(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDECTL_HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
    }


def cli(home: Path, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "claudectl", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_for(home),
        cwd=str(home),
    )
    if r.returncode != 0:
        raise RuntimeError(f"claudectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


class Serve:
    def __init__(self, home: Path) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "claudectl",
                "--home",
                str(home),
                "relay",
                "serve",
                "--no-discovery",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env_for(home),
            cwd=str(home),
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def port(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = "".join(self.lines)
            m = re.search(r"listening on .*:(\d+)\s*$", text, re.M)
            if m and re.search(r"relay .* ready", text):
                return int(m.group(1))
            time.sleep(0.05)
        raise RuntimeError("relay serve did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Terminal:
    def __init__(self, argv: list[str], env: dict[str, str], cols: int, rows: int) -> None:
        import pyte

        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(env, TERM="xterm-256color"),
            start_new_session=True,
        )
        os.close(slave)
        self.master = master

    def wait_for(self, pattern: str, timeout: float = 30) -> float:
        """Monotonic time of the read after which ``pattern`` is on screen."""
        deadline = time.monotonic() + timeout
        while True:
            if re.search(pattern, "\n".join(self.screen.display)):
                return self.last_read
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"screen never showed {pattern!r}:\n" + "\n".join(self.screen.display)
                )
            r, _, _ = select.select([self.master], [], [], min(left, 0.05))
            if r:
                data = os.read(self.master, 65536)
                self.last_read = time.monotonic()
                if not data:
                    raise RuntimeError("the dashboard exited")
                self.stream.feed(data)

    last_read = 0.0

    def stop(self) -> None:
        try:
            os.write(self.master, b"q")
            self.proc.wait(10)
        except Exception:
            os.killpg(self.proc.pid, signal.SIGKILL)
        os.close(self.master)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p90_ms": round(pct(values, 90), 1),
        "max_ms": round(max(values), 1),
        "min_ms": round(min(values), 1),
    }


def run(rounds: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-tui-"))
    procs: list[Any] = []
    try:
        ha, hb = tmp / "a", tmp / "b"
        ha.mkdir()
        hb.mkdir()
        code = cli(ha, "relay", "pair").splitlines()[2].split("PAIR CODE: ")[1]
        ida = cli(ha, "relay", "identity").strip()
        idb = cli(hb, "relay", "identity").strip()
        cli(hb, "relay", "accept", code, ida)
        a, b = Serve(ha), Serve(hb)
        procs += [a, b]
        port = a.port()
        b.port()
        term = Terminal(
            [sys.executable, "-m", "claudectl", "--home", str(ha), "tui"], env_for(ha), 120, 30
        )
        procs.append(term)
        term.wait_for("relay service: attached")
        sys.path.insert(0, str(ROOT))
        from claudectl.control.paths import control_socket_path
        from claudectl.home import Home

        ctl = AmpClient(str(control_socket_path(Home(hb))))
        address = f"127.0.0.1:{port}"
        ctl.call("Connect", address=address, peer=ida)
        line = re.escape(idb)
        term.wait_for(rf"● {line}\s+connected")
        up_req, up_ans, down = [], [], []
        for _ in range(rounds):
            t0 = time.monotonic()
            ctl.call("Disconnect", peer=ida)
            t1 = term.wait_for(rf"○ {line}\s+offline")
            down.append((t1 - t0) * 1000)
            time.sleep(0.2)  # let both sides settle
            t0 = time.monotonic()
            ctl.call("Connect", address=address, peer=ida)
            t_ans = time.monotonic()
            t1 = term.wait_for(rf"● {line}\s+connected")
            up_req.append((t1 - t0) * 1000)
            up_ans.append(max(0.0, (t1 - t_ans) * 1000))
            time.sleep(0.2)
        return {
            "rounds": rounds,
            "up_from_connect_request": summary(up_req),
            "up_from_connect_answer": summary(up_ans),
            "down_from_disconnect_request": summary(down),
            "goal_p50_ms": GOAL_P50_MS,
            "loadavg": os.getloadavg(),
        }
    finally:
        for p in reversed(procs):
            try:
                p.stop()
            except Exception:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 30")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 30)
    try:
        result = run(rounds)
    except Exception as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 2
    met = result["up_from_connect_request"]["p50_ms"] <= GOAL_P50_MS
    result["goal_met"] = met
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"TUI push latency, {rounds} rounds (load average "
            f"{', '.join(f'{x:.2f}' for x in result['loadavg'])})"
        )
        for key, label in (
            ("up_from_connect_request", "link up: connect request -> screen"),
            ("up_from_connect_answer", "link up: B connected -> screen"),
            ("down_from_disconnect_request", "link down: disconnect request -> screen"),
        ):
            s = result[key]
            print(
                f"  {label:<42} p50 {s['p50_ms']:7.1f} ms  p90 {s['p90_ms']:7.1f} ms  "
                f"max {s['max_ms']:7.1f} ms"
            )
        print(f"  goal: p50 <= {GOAL_P50_MS:.0f} ms: {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
