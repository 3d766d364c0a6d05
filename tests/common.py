"""Shared helpers for the trial suite: test vectors, temporary homes, fakes."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from zope.interface import implementer

from claudectl.home import Home
from claudectl.relay.codec import Envelope, encode
from claudectl.relay.interfaces import IMesh

_HERE = Path(__file__).resolve().parent
#: A copy of the shared spec's ``vectors.json`` (claudectl 0.64), kept in the
#: repository so the suite runs on any checkout; ``test_vectors_copy`` checks
#: it still matches the shared one when that is present.
VECTORS_FILE = _HERE / "data" / "vectors.json"
SHARED_VECTORS_FILE = _HERE.parent.parent / "shared" / "spec" / "vectors.json"


def vectors(area: str | None = None, kind: str | None = None) -> dict[str, dict[str, Any]]:
    """The vectors (by name) of one area and kind."""
    data = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    return {
        v["name"]: v
        for v in data["vectors"]
        if (area is None or v["area"] == area) and (kind is None or v["kind"] == kind)
    }


def vector(name: str) -> dict[str, Any]:
    return vectors()[name]


def temp_home(testcase: Any) -> Home:
    """A fresh, empty home directory for one test."""
    path = Path(testcase.mktemp()).absolute()
    path.mkdir(parents=True)
    return Home(path)


def bench_tmp(testcase: Any, prefix: str = "cb-") -> Path:
    """
    A temporary directory for a benchmark script run as a child (its
    ``TMPDIR``), removed after the test -- and, first, any process still
    running from it: a script killed by the test's timeout leaves the
    services it started (each in its own session) behind otherwise.
    """
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    testcase.addCleanup(shutil.rmtree, tmp, True)
    testcase.addCleanup(kill_strays, str(tmp))
    return tmp


def kill_strays(marker: str) -> int:
    """SIGKILL every other process whose command line mentions ``marker``."""
    import signal

    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def subprocess_env(home: Home, **extra: str) -> dict[str, str]:
    """An environment built from scratch for a child ``claudectl`` process."""
    import sys

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home.root),
        "CLAUDECTL_HOME": str(home.root),
        "LANG": "C.UTF-8",
        # Children that die by a re-raised signal (twistd does) lose buffered output.
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in [str(_HERE.parent)] + sys.path if p),
    }
    for name in ("COVERAGE_PROCESS_START", "COVERAGE_FILE"):
        # .ci/run measures the children too (see .coveragerc).
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


@implementer(IMesh)
class FakeMesh:
    """An in-memory IMesh: records what is sent, lets tests deliver frames."""

    def __init__(self, identity: str = "me-00000000", peers: list[str] | None = None) -> None:
        self.identity = identity
        self.peers: dict[str, str] = {p: "mutual" for p in (peers or [])}
        #: ``peer_transport`` answers; peers not listed are "tls1.3".
        self.transports: dict[str, str] = {}
        #: peer -> "outbound" (we dialed) / "inbound"; unset = unknown.
        self.directions: dict[str, str] = {}
        #: (peer, reason) of every disconnect the layer above asked for.
        self.closed: list[tuple[str, str]] = []
        self.sent: list[tuple[str, str, Any]] = []
        #: Peers whose frames the layer above asked to put on the wire at once.
        self.flushed: list[str] = []
        #: ``hold_reading`` calls: (peer, held).
        self.holds: list[tuple[str, bool]] = []
        #: ``unsent_bytes`` answers (what a peer has not read); unset = 0.
        self.unsent: dict[str, int] = {}
        self.handlers: dict[str, list[Any]] = {}
        self.up: list[Any] = []
        self.down: list[Any] = []
        self._seq = 0

    def send(self, peer_id: str, msg_type: str, payload: Any) -> bool:
        if peer_id not in self.peers:
            return False
        self.sent.append((peer_id, msg_type, payload))
        return True

    def flush(self, peer_id: str) -> None:
        self.flushed.append(peer_id)

    def hold_reading(self, peer_id: str, held: bool) -> None:
        if peer_id in self.peers:
            self.holds.append((peer_id, held))

    def connected_peers(self) -> list[str]:
        return sorted(self.peers)

    def add_handler(self, msg_type: str, handler: Any) -> None:
        self.handlers.setdefault(msg_type, []).append(handler)

    def add_payload_reader(self, msg_type: str, reader: Any) -> None:
        pass  # frames arrive here as envelopes: nothing to read

    def add_link_observer(self, on_up: Any, on_down: Any) -> None:
        if on_up:
            self.up.append(on_up)
        if on_down:
            self.down.append(on_down)

    def peer_mode(self, peer_id: str) -> str | None:
        return self.peers.get(peer_id)

    def peer_transport(self, peer_id: str) -> str | None:
        if peer_id not in self.peers:
            return None
        return self.transports.get(peer_id, "tls1.3")

    def peer_direction(self, peer_id: str) -> str | None:
        return self.directions.get(peer_id) if peer_id in self.peers else None

    def unsent_bytes(self, peer_id: str) -> int:
        return self.unsent.get(peer_id, 0) if peer_id in self.peers else 0

    def disconnect(self, peer_id: str, reason: str = "test") -> None:
        if peer_id in self.peers:
            self.closed.append((peer_id, reason))
        self.peers.pop(peer_id, None)
        self.directions.pop(peer_id, None)
        for cb in self.down:
            cb(peer_id)

    # --- test drivers ---
    def connect(self, peer_id: str, mode: str = "mutual", direction: str | None = None) -> None:
        self.peers[peer_id] = mode
        if direction is not None:
            self.directions[peer_id] = direction
        for cb in self.up:
            cb(peer_id)

    def deliver(
        self, peer_id: str, msg_type: str, payload: Any, from_peer: str | None = None
    ) -> None:
        self._seq += 1
        env = Envelope(
            f"msg_test_{self._seq}",
            msg_type,
            peer_id if from_peer is None else from_peer,
            0,
            payload,
        )
        # As off the wire: the frame's size, which the layers charge for it.
        line = encode(env)
        env = dataclasses.replace(
            env,
            wire_bytes=len(line),
            wire_nodes=line.count(b"{") + line.count(b"[") + line.count(b","),
        )
        for h in self.handlers.get(msg_type, []):
            h(peer_id, env)


def make_node(
    testcase: Any,
    identity: str,
    reactor: Any = None,
    home: Home | None = None,
    tls: bool = False,
    **relay: Any,
) -> Any:
    """
    A RelayNode in a fresh temporary home, on ``reactor`` (default: a
    MemoryReactorClock).  TLS is off unless asked for: the in-memory
    transports (StringTransport, iosim) cannot run a real TLS handshake; the
    TLS tests use real TCP on loopback.
    """
    import dataclasses

    from twisted.internet.testing import MemoryReactorClock

    from claudectl.config import Config
    from claudectl.pairing.invites import InviteStore
    from claudectl.pairing.pake import PakeResponder
    from claudectl.relay.keystore import KeyStore
    from claudectl.relay.node import RelayNode

    if reactor is None:
        reactor = MemoryReactorClock()
    config = Config()
    relay.setdefault("lan_discovery", False)
    config = dataclasses.replace(config, relay=dataclasses.replace(config.relay, **relay))
    home = home or temp_home(testcase)
    # Wired as the composition root wires it: invites over the node's keys.
    keystore = KeyStore(home)
    invites = InviteStore(home, keystore)
    node = RelayNode(
        home,
        config,
        reactor,
        identity=identity,
        jitter=lambda: 0.0,
        tls=tls,
        keystore=keystore,
        invites=invites,
        pake=PakeResponder(invites, reactor),
    )
    return node


def wrong_password_naming(
    password: bytes, host: str = "10.0.0.1", port: int = 9900, other: bool = False
) -> bytes:
    """
    A wrong code password whose invite selector is the same as ``password``'s
    (a mistyped code that still names the invite), or with ``other`` a
    different one (a code that names no invite).  Its relay code is unambiguous.
    """
    from claudectl.pairing import codes
    from claudectl.pairing.detect import relay_code_is_ambiguous
    from claudectl.pairing.invites import invite_selector

    want = invite_selector(password)
    for n in range(1, 1 << 20):
        candidate = bytes(a ^ b for a, b in zip(password, n.to_bytes(4, "big"), strict=True))
        if (invite_selector(candidate) == want) != other and not relay_code_is_ambiguous(
            codes.relay_code(host, port, candidate)
        ):
            return candidate
    raise AssertionError("no such password")


def pair_nodes(a: Any, b: Any, psk: bytes = b"k" * 32) -> bytes:
    """Store the same key on both sides, each under the other's identity."""
    a.keystore.save_key(b.identity, psk)
    b.keystore.save_key(a.identity, psk)
    return psk


class ServeProcess:
    """``python -m claudectl relay serve`` (or ``twistd``) in a subprocess, in its own home."""

    def __init__(self, home: Home, argv: list[str], env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys
        import threading

        self.home = home
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or subprocess_env(home),
            cwd=str(home.root),
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def serve(cls, home: Home, *args: str) -> ServeProcess:
        return cls(
            home,
            [
                "-m",
                "claudectl",
                "--home",
                str(home.root),
                "relay",
                "serve",
                "--no-discovery",
                *args,
            ],
        )

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            with self._cond:
                self.lines.append(text.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def expect(self, needle: str, timeout: float = 20.0) -> str:
        """Wait for a line containing ``needle`` (like tahoe's expect())."""
        import re
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for text in self.lines[seen:]:
                    if re.search(needle, text):
                        return text
                seen = len(self.lines)
                left = deadline - time.monotonic()
                done = not self._reader.is_alive()  # EOF: everything has been read
                if left <= 0 or (done and seen == len(self.lines)):
                    raise AssertionError(f"{needle!r} not seen; output:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.2))

    def port(self) -> int:
        import re

        line = self.expect(r"listening on ")
        m = re.search(r"listening on .*:(\d+)\s*$", line)
        assert m, line
        self.expect(r"relay .* ready")  # the reactor runs: signals are handled
        return int(m.group(1))

    def stop(self, sig: int = 15) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


def run_cli(
    home: Home,
    *args: str,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``python -m claudectl --home HOME ARGS`` and return the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "claudectl", "--home", str(home.root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env or subprocess_env(home),
        cwd=str(home.root),
    )


def control_with_events(node: Any, tasks: Any = None) -> tuple[Any, Any]:
    """
    ``(event_hub, control_factory)`` of ``node`` wired as the composition
    root wires them (without the hive's trust book: every peer has the
    configured default trust).
    """
    from claudectl.control import events as E
    from claudectl.control.server import ControlFactory, ControlRegistry

    default = node.config.hive.default_trust
    registry = ControlRegistry(trust_of=lambda _peer: default)
    events = E.events_service(node, registry, tasks)
    registry.add_connection_locator(events.locator_for)
    registry.add_status(events.status)
    return events.hub, ControlFactory(node, registry=registry)
