"""
A real terminal for the dashboard tests: the program runs on a
pseudo-terminal and pyte (a VT100 emulator) keeps the screen it draws.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from typing import Any

import pyte


class PtyScreen:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cols: int = 80,
        rows: int = 24,
        cwd: str | None = None,
    ) -> None:
        self.cols, self.rows = cols, rows
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        master, slave = os.openpty()
        self._winsize(slave, cols, rows)
        env = dict(env, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))

        def controlling_tty() -> None:
            # A session of its own with the pty as controlling terminal, as a
            # login shell has: Ctrl+C then raises SIGINT, resizes SIGWINCH.
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            preexec_fn=controlling_tty,
            close_fds=True,
        )
        os.close(slave)
        self.master = master
        self.raw = bytearray()
        self.closed = False

    @staticmethod
    def _winsize(fd: int, cols: int, rows: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def pump(self, timeout: float = 0.05) -> bool:
        """Read what the program wrote (up to ``timeout``); False at EOF."""
        if self.closed:
            return False
        r, _, _ = select.select([self.master], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.raw += data
        self.stream.feed(data)
        return True

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait_for(self, check: str | Callable[[str], Any], timeout: float = 20.0) -> Any:
        """Pump until ``check`` (a regex, or a function of the screen text) holds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            found = re.search(check, text) if isinstance(check, str) else check(text)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"screen never matched {check!r}; screen:\n{text}\n"
                    f"tail of output: {bytes(self.raw[-400:])!r}"
                )
            if not self.pump(0.05) and self.proc.poll() is not None:
                raise AssertionError(
                    f"the program exited ({self.proc.returncode}) before "
                    f"{check!r}; screen:\n{text}\nraw tail: "
                    f"{bytes(self.raw[-800:])!r}"
                )

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Pump until nothing new arrives for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = len(self.raw)
            end = time.monotonic() + quiet
            while time.monotonic() < end:
                self.pump(0.05)
            if len(self.raw) == before:
                return

    def send(self, keys: str | bytes) -> None:
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.screen.resize(rows, cols)
        self._winsize(self.master, cols, rows)
        os.killpg(self.proc.pid, signal.SIGWINCH)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            try:
                self.send("q")
            except OSError:
                pass
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.pump(0.05)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        while self.pump(0.02):
            pass
        try:
            os.close(self.master)
        except OSError:
            pass
        return self.proc.returncode
