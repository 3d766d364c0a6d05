#!/usr/bin/env python3
"""
Loopback benchmark of real ``claudectl relay serve`` processes, plaintext and
TLS 1.3 side by side (issues 10 and 16; figures in docs/performance.md).

The server is the real service, started and paired through the real CLI in
a throw-away home under a ``tempfile.mkdtemp()`` directory (never ``~``)::

    python -m claudectl --home S relay serve --no-discovery \\
        --listen tcp:0:interface=127.0.0.1

S's hive is seeded with ``claudectl --home S hive import units.json``.  Each
measuring client has its own home, paired with ``relay pair`` on S and
``relay accept <code> <S id>`` on the client's home, and its first connect
claims the pair code.  The client runs in this process: a ``RelayNode`` on
the real reactor, ``tls=True`` for the TLS rows and ``tls=False`` for the
plaintext rows (a plaintext connector: S then links in plaintext).  Plaintext
and TLS use separate client identities: S refuses a plaintext link from an
identity it has seen over TLS (no downgrade).

Rows, each for plaintext and TLS, each the median and range (min-max) over
``--runs`` runs (default 5), next to the server's CPU time per operation
(``/proc/<pid>/stat`` utime + stime: steady on a loaded machine):

1. link set-up: TCP connect until authenticated both ways, sequential
   connects (each closed before the next), p50 and p99 per run;
2. request -> reply: ``knowledge_request`` ``{"since_epoch": 0}`` answered by
   the service's gossip layer with a ``knowledge_snapshot`` of its store;
3. one-way heartbeats per second parsed by the service: frames encoded
   beforehand and written in bulk on one link; the service's count is read
   from its control socket (``Peers``: the link's ``bytes_down``);
4. memory per idle authenticated link: growth of a fresh service's
   ``VmRSS`` (``/proc/<pid>/status``) over N idle links, each from its own
   identity, opened after a warm-up.  That service has an empty hive and a
   config file raising ``[relay] max_peers``; the fleet's keys are written as
   files (``peers/<id>.key``, mode 0600: what ``relay accept`` writes, and
   what S writes when a pair code is claimed).

Run from the repository root::

    python scripts/bench_relay.py             # full run, a few minutes
    python scripts/bench_relay.py --quick     # small counts, used by the smoke test
    python scripts/bench_relay.py --json      # machine-readable results
    python scripts/bench_relay.py --runs 7    # more runs per row
    python scripts/bench_relay.py --profile   # S under cProfile; prints its hot spots
    python scripts/bench_relay.py --only-setup   # the link set-up rows alone
    python scripts/bench_relay.py --only-setup --after-storms  # ... after the storms
    python scripts/bench_relay.py --only-setup --profile  # S's profile of those rows alone
    python scripts/bench_relay.py --only-floor   # the issue-16 rows (minimal client, floor)
    python scripts/bench_relay.py --only-request # of those, request -> snapshot alone

The storms of the issue-16 rows close about 10,000 loopback connections, which
the kernel keeps in TIME_WAIT for 60 s; connections made meanwhile cost more
(``ss -s`` shows the count).  The full run measures those rows last, and runs
back to back (A/B) should be a minute apart.

Everything is on 127.0.0.1, every count and wait is bounded, and the child
processes and the temporary directory are removed on every way out.

Exit status: 0 when every target is met, 1 when one is missed, 2 when the
benchmark itself failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import platform
import pstats
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import twisted  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.error import ConnectionDone, ConnectionLost  # noqa: E402
from twisted.logger import (  # noqa: E402
    FileLogObserver,
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)

from claudectl import COMPAT_VERSION  # noqa: E402
from claudectl.config import Config  # noqa: E402
from claudectl.control import commands as C  # noqa: E402
from claudectl.control.client import ServiceNotRunning, call_control  # noqa: E402
from claudectl.control.paths import control_socket_path  # noqa: E402
from claudectl.home import Home  # noqa: E402
from claudectl.hub.peer import client_endpoint  # noqa: E402
from claudectl.lines import LineSplitter  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.binding import PLAINTEXT, TLS13  # noqa: E402
from claudectl.relay.codec import Envelope, EnvelopeFactory  # noqa: E402
from claudectl.relay.crypto import proof  # noqa: E402
from claudectl.relay.handshake import (  # noqa: E402
    CAP_MUTUAL,
    CAP_PAKE,
    MUTUAL,
    KeyAuth,
    ListenerHandshake,
    listener_proof,
)
from claudectl.relay.keystore import KeyStore  # noqa: E402
from claudectl.relay.node import RelayNode  # noqa: E402
from claudectl.text import classic_log_text  # noqa: E402

TRANSPORTS = (PLAINTEXT, TLS13)
LISTEN = "tcp:0:interface=127.0.0.1"
#: Links the service opens and closes before the idle-memory baseline.
WARMUP_IDLE = 16
#: The service admits at most 16 handshakes in flight.
BATCH = 16
#: Heartbeats per write (one write per reactor turn).
WRITE_FRAMES = 1000
#: The gossip layer's push round after a link comes up (LINKUP_PUSH_DELAY_SECS)
#: has run by then: the idle links are measured in their steady state.
IDLE_SETTLE_SECS = 3.5
STEP_TIMEOUT_SECS = 30.0
#: SO_RCVTIMEO / SO_SNDTIMEO of the minimal client's blocking sockets.
_TIMEVAL = struct.pack("ll", int(STEP_TIMEOUT_SECS), 0)
PHASE_TIMEOUT_SECS = 300.0
CLI_TIMEOUT_SECS = 60.0

#: claudectl 0.64 on loopback (a local build of its relay code; issue 16's anchors).
ANCHOR_HANDSHAKE_MS = 150.0
ANCHOR_REQUEST_MS = 1000.0
#: Concurrency levels of the handshake scaling table.
STORM_LEVELS = (1, 10, 100)

#: Targets.  TLS: issue 10.  Plaintext: issue 2's (the first round), where
#: it set one; request -> reply on a real snapshot has no target yet.
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "setup_p50_ms": {TLS13: ("<=", 3.0), PLAINTEXT: ("<=", 3.0)},
    "msgs_per_s": {TLS13: (">=", 100_000.0), PLAINTEXT: (">=", 50_000.0)},
    "kib_per_idle_link": {TLS13: ("<=", 64.0), PLAINTEXT: ("<=", 64.0)},
}


@dataclass(frozen=True)
class Sizes:
    connects: int  # sequential link set-ups per run and transport
    requests: int  # knowledge_request round trips per run and transport
    messages: int  # one-way heartbeats per run and transport
    idle_links: int  # idle links per run and transport
    units: int  # knowledge units in S's store
    runs: int
    warmup_connects: int = 10
    warmup_requests: int = 20
    mini_connects: int = 500  # sequential minimal-client handshakes per run
    mini_messages: int = 1_000_000  # one-way heartbeats per run (minimal client)
    storm_levels: tuple[int, ...] = STORM_LEVELS
    storm_rounds: int = 10  # handshakes per client at each concurrency level
    storm_min: int = 300  # ... and at least this many


FULL = Sizes(connects=200, requests=100, messages=200_000, idle_links=200, units=500, runs=5)
QUICK = Sizes(
    connects=15,
    requests=10,
    messages=5_000,
    idle_links=8,
    units=20,
    runs=1,
    warmup_connects=3,
    warmup_requests=3,
    mini_connects=20,
    mini_messages=5_000,
    storm_levels=(1, 10),
    storm_rounds=2,
    storm_min=10,
)


# --- small helpers ---------------------------------------------------------------------


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def proc_rss_kib(pid: int) -> int:
    """``VmRSS`` of a process, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_secs(pid: int) -> float:
    """utime + stime of a process (``/proc/<pid>/stat``), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5); the list starts at field 3 (state).
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_cpu_exact(pid: int) -> float:
    """
    CPU seconds of every thread of a process so far, to the nanosecond (the
    scheduler's ``/proc/<pid>/task/*/schedstat``): rows whose operations cost
    well under a clock tick (``proc_cpu_secs`` counts 10 ms ticks) use it.
    Falls back to ``proc_cpu_secs`` where schedstat is missing.
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0])
    except OSError:
        return proc_cpu_secs(pid)
    return total / 1e9


def machine() -> dict[str, str]:
    model = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "system": f"{platform.system()} {platform.machine()}",
    }


def start_logging(path: Path) -> None:
    """The client's log (info and up) goes to a file in the temporary directory."""
    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    # The lines `relay serve` writes, formatted as it does (the client stands
    # for a dialing service).
    observer = FilteringLogObserver(
        FileLogObserver(out, classic_log_text),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def sleep(reactor: Any, secs: float) -> None:
    await task.deferLater(reactor, secs, lambda: None)


def within(d: defer.Deferred[Any], secs: float, reactor: Any) -> defer.Deferred[Any]:
    return d.addTimeout(secs, reactor)


async def until(
    reactor: Any, check: Callable[[], Any], timeout: float, what: str, step: float = 0.02
) -> Any:
    """Poll ``check`` (sync or async) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if isinstance(value, defer.Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        await sleep(reactor, step)


class BenchError(Exception):
    """The benchmark could not measure something."""


# --- the service and the CLI ----------------------------------------------------------


def child_env(home: Path) -> dict[str, str]:
    """
    A minimal environment for a CLI child: this checkout, the given home,
    nothing of ~.  TMPDIR is passed on: a home too deep for a UNIX socket
    path has its control socket under the temp dir, and both sides must
    agree on it.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CLAUDECTL_HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(_REPO),
        "HOSTNAME": home.name,
    }
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


def cli(home: Path, *args: str) -> Any:
    """``python -m claudectl --home HOME ARGS --json``: the parsed answer."""
    argv = [sys.executable, "-m", "claudectl", "--home", str(home), *args, "--json"]
    done = subprocess.run(
        argv,
        env=child_env(home),
        cwd=str(home),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECS,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise BenchError(
            f"`claudectl {' '.join(args)}` exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-300:]}"
        )
    return json.loads(done.stdout) if done.stdout.strip() else None


class Children:
    """Every service we started; all of them are stopped on every way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        #: Every pid we started (the smoke test checks that none is left).
        self.started: list[int] = []
        #: The floor's pids (issue 16).
        self.floor_started: list[int] = []

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self, timeout: float = 5.0) -> None:
        """The last resort, with the reactor stopped: SIGTERM, then SIGKILL."""
        for proc in list(self.procs):
            self.stop(proc, timeout)


CHILDREN = Children()
#: Control socket directories: outside the home when its path is too long.
SOCKET_DIRS: list[Path] = []


@dataclass
class Service:
    """One running ``claudectl relay serve``."""

    home: Home
    identity: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return proc_cpu_secs(self.pid)

    def rss(self) -> int:
        return proc_rss_kib(self.pid)

    def tail(self, n: int = 12) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    async def peers(self, reactor: Any) -> list[dict[str, Any]]:
        reply = await within(
            defer.Deferred.fromCoroutine(call_control(reactor, self.home, C.Peers)),
            STEP_TIMEOUT_SECS,
            reactor,
        )
        rows: list[dict[str, Any]] = json.loads(reply["peers_json"])
        return rows

    async def row(self, reactor: Any, peer: str) -> dict[str, Any]:
        for r in await self.peers(reactor):
            if r["identity"] == peer:
                return r
        raise BenchError(f"the service does not list {peer}")

    async def status(self, reactor: Any) -> dict[str, Any]:
        reply = await within(
            defer.Deferred.fromCoroutine(call_control(reactor, self.home, C.Status)),
            STEP_TIMEOUT_SECS,
            reactor,
        )
        data: dict[str, Any] = json.loads(reply["status_json"])
        return data

    async def connected(self, reactor: Any) -> int:
        # Status, not Peers: with a few hundred known peers the Peers answer
        # is longer than an AMP value may be (64 KiB).
        return len((await self.status(reactor))["connected"])


def new_home(tmp: Path, name: str, config: str | None = None) -> Home:
    home = Home(tmp / name)
    home.root.mkdir(parents=True)
    SOCKET_DIRS.append(control_socket_path(home).parent)
    if config is not None:
        home.config_file.parent.mkdir(parents=True)
        home.config_file.write_text(config, encoding="utf-8")
    return home


#: ``python -c`` wrapper of a service profiled from a later point on
#: (``--profile --after-storms``): SIGUSR1 starts cProfile, SIGUSR2 stops it
#: and writes the profile to ``argv[1]``; then claudectl runs as ``-m`` would.
PROFILE_ON_SIGNAL = """
import cProfile, runpy, signal, sys
out = sys.argv[1]
del sys.argv[1]
prof = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
def stop(*_):
    prof.disable()
    prof.dump_stats(out)
signal.signal(signal.SIGUSR2, stop)
sys.argv[0] = "claudectl"
runpy.run_module("claudectl", run_name="__main__", alter_sys=True)
"""


async def start_service(
    reactor: Any,
    home: Home,
    profile_out: Path | None = None,
    env: dict[str, str] | None = None,
    profile_on_signal: bool = False,
) -> Service:
    """
    Start ``relay serve`` in ``home``; wait until its control socket answers.
    ``profile_out``: under cProfile from the start (written when it stops),
    or with ``profile_on_signal`` between SIGUSR1 and SIGUSR2.
    """
    log = home.root / "serve.log"
    prefix: list[str] = []
    if profile_out is not None:
        prefix = (
            ["-c", PROFILE_ON_SIGNAL, str(profile_out)]
            if profile_on_signal
            else ["-m", "cProfile", "-o", str(profile_out), "-m", "claudectl"]
        )
    argv = [
        sys.executable,
        *(prefix or ["-m", "claudectl"]),
        "--home",
        str(home.root),
        "relay",
        "serve",
        "--no-discovery",
        "--listen",
        LISTEN,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            env={**child_env(home.root), **(env or {})},
            cwd=str(home.root),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    CHILDREN.procs.append(proc)
    CHILDREN.started.append(proc.pid)
    info_path = home.run_dir / "service.json"

    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise BenchError(
                f"relay serve exited ({proc.returncode}):\n"
                + log.read_text(errors="replace")[-1500:]
            )
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            return None
        return info if info.get("pid") == proc.pid and info.get("ports") else None

    info = await until(reactor, ready, 60, "relay serve to listen", step=0.05)
    service = Service(home, info["identity"], proc, int(info["ports"][0]), log)

    async def answers() -> bool:
        try:
            await service.status(reactor)
        except (ServiceNotRunning, ConnectionDone, ConnectionLost):
            # service.json is written before the control socket is up.
            return False
        return True

    try:
        await until(reactor, answers, 30, "the control socket", step=0.05)
    except BenchError as e:
        raise BenchError(f"{e}; the service's log ends:\n{service.tail()}") from None
    return service


async def stop_service(reactor: Any, service: Service, timeout: float = 20.0) -> None:
    """
    SIGTERM, and keep the reactor running while the service shuts down: it
    closes its links gracefully (a TLS close_notify each), which our side
    of those links has to answer.
    """
    proc = service.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(BenchError):
            await until(
                reactor, lambda: proc.poll() is not None, timeout, "relay serve to stop", step=0.05
            )
    CHILDREN.stop(proc)  # SIGKILL if it is still there; forget it


# --- clients ---------------------------------------------------------------------------


def client_config() -> Config:
    base = Config()
    import dataclasses

    return dataclasses.replace(base, relay=dataclasses.replace(base.relay, lan_discovery=False))


@dataclass
class Client:
    """A measuring client: a RelayNode in its own home, paired with S."""

    transport: str
    home: Home
    node: RelayNode
    server_id: str
    psk: bytes
    downs: dict[str, list[defer.Deferred[None]]] = field(default_factory=dict)

    @classmethod
    def make(
        cls, reactor: Any, transport: str, home: Home, server_id: str, identity: str | None = None
    ) -> Client:
        # Dials as relay serve's dialer does: through the hub-aware endpoint
        # (it reads the listener's first line before the relay protocol runs).
        node = RelayNode(
            home,
            client_config(),
            reactor,
            identity=identity,
            tls=transport == TLS13,
            dial_via=client_endpoint,
        )
        psk = KeyStore(home).key(server_id)
        if psk is None:
            raise BenchError(f"{home.root} holds no key for {server_id}")
        client = cls(transport, home, node, server_id, psk)
        node.mesh.add_link_observer(None, client._down)
        node.mesh.add_handler(codec.KNOWLEDGE_SYNC, client._ack_sync)
        return client

    def _ack_sync(self, peer_id: str, env: Envelope) -> None:
        """
        Acknowledge pushed units as a peer of this project does once it has
        merged them (``ack``, docs/gossip.md): S then counts them delivered
        and does not push its whole store again at every new link.
        """
        payload = env.payload if isinstance(env.payload, dict) else {}
        pairs = [
            [u.get("id"), u.get("version")]
            for u in payload.get("units") or []
            if isinstance(u, dict)
        ]
        for i in range(0, len(pairs), 4096):
            self.node.mesh.send(
                peer_id, codec.ACK, {"ack_id": env.id, "knowledge": pairs[i : i + 4096]}
            )

    @property
    def identity(self) -> str:
        return self.node.identity

    def _down(self, peer_id: str) -> None:
        for d in self.downs.pop(peer_id, []):
            d.callback(None)

    async def open(self, reactor: Any, address: str) -> Any:
        proto = await within(
            self.node.open_link(address, KeyAuth(self.psk, self.server_id)),
            STEP_TIMEOUT_SECS,
            reactor,
        )
        if proto.result is None or proto.result.mode != MUTUAL:
            raise BenchError(f"link from {self.identity} is not mutual: {proto.result}")
        if proto.result.transport != self.transport:
            raise BenchError(
                f"{self.identity} expected a {self.transport} link, got {proto.result.transport}"
            )
        return proto

    async def close(self, reactor: Any, proto: Any) -> None:
        """
        Close and wait until the service has closed its side too: a half-close
        in plaintext (the service answers EOF by closing), a TLS close_notify
        exchange on TLS links (ours completes when the service's arrives).
        """
        down: defer.Deferred[None] = defer.Deferred()
        self.downs.setdefault(self.server_id, []).append(down)
        if self.transport == TLS13:
            proto.transport.loseConnection()
        else:
            proto.transport.loseWriteConnection()
        await within(down, STEP_TIMEOUT_SECS, reactor)
        await within(proto.when_closed(), STEP_TIMEOUT_SECS, reactor)


async def pair_client(reactor: Any, service: Service, home: Home, transport: str) -> Client:
    """
    ``relay pair`` on S, ``relay accept <code> <S id>`` on the client's home,
    then a first connect that claims the code (only one pending code exists
    at a time: it is claimed before the next one is made).
    """
    code = cli(service.home.root, "relay", "pair")["pair_code"]
    cli(home.root, "relay", "accept", code, service.identity)
    client = Client.make(reactor, transport, home, service.identity)
    proto = await client.open(reactor, service.address)
    await client.close(reactor, proto)
    return client


# --- measurements ------------------------------------------------------------------------


@dataclass
class Sample:
    """One run of one row for one transport."""

    values: dict[str, float]
    server_cpu_us: float | None = None
    client_cpu_us: float | None = None


async def measure_setup(
    reactor: Any, service: Service, client: Client, n: int, warmup: int
) -> Sample:
    """Sequential connects; each link is closed on both sides before the next."""
    samples: list[float] = []
    cpu0 = ours0 = 0.0
    for i in range(warmup + n):
        if i == warmup:
            cpu0, ours0 = service.cpu(), time.process_time()
        t0 = time.perf_counter()
        proto = await client.open(reactor, service.address)
        elapsed = time.perf_counter() - t0
        await client.close(reactor, proto)
        if i >= warmup:
            samples.append(elapsed * 1e3)
    return Sample(
        {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)},
        (service.cpu() - cpu0) / n * 1e6,
        (time.process_time() - ours0) / n * 1e6,
    )


class SnapshotWaiter:
    """Fires the waiting Deferred on the last page of a knowledge_snapshot."""

    def __init__(self, client: Client) -> None:
        self.waiting: defer.Deferred[int] | None = None
        self.units = 0
        client.node.mesh.add_handler(codec.KNOWLEDGE_SNAPSHOT, self._page)

    def _page(self, peer_id: str, env: Envelope) -> None:
        payload = env.payload if isinstance(env.payload, dict) else {}
        self.units += len(payload.get("units") or [])
        if payload.get("page") == payload.get("total_pages") and self.waiting is not None:
            d, self.waiting = self.waiting, None
            units, self.units = self.units, 0
            d.callback(units)


async def measure_requests(
    reactor: Any,
    service: Service,
    client: Client,
    waiter: SnapshotWaiter,
    n: int,
    warmup: int,
    units: int,
) -> Sample:
    samples: list[float] = []
    cpu0 = ours0 = 0.0
    for i in range(warmup + n):
        if i == warmup:
            cpu0, ours0 = service.cpu(), time.process_time()
        d: defer.Deferred[int] = defer.Deferred()
        waiter.waiting = d
        t0 = time.perf_counter()
        if not client.node.mesh.send(service.identity, codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}):
            raise BenchError("the link to the service is down")
        got = await within(d, STEP_TIMEOUT_SECS, reactor)
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1e3)
        if got != units:
            raise BenchError(f"the snapshot held {got} unit(s), not {units}")
    return Sample(
        {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99)},
        (service.cpu() - cpu0) / n * 1e6,
        (time.process_time() - ours0) / n * 1e6,
    )


async def measure_one_way(
    reactor: Any, service: Service, client: Client, proto: Any, n: int
) -> Sample:
    """
    ``n`` heartbeats encoded before the clock starts, written in bulk
    (``WRITE_FRAMES`` per reactor turn); done when the service's count of
    bytes received on the link (parsed lines) reaches the total.
    """
    frames = [codec.encode(client.node.envelopes.make(codec.HEARTBEAT, {})) for _ in range(n)]
    chunks = [b"".join(frames[i : i + WRITE_FRAMES]) for i in range(0, n, WRITE_FRAMES)]
    total = sum(len(c) for c in chunks)
    before = await service.row(reactor, client.identity)
    want = before["bytes_down"] + total
    cpu0, ours0 = service.cpu(), time.process_time()
    t0 = time.perf_counter()
    for chunk in chunks:
        proto.transport.write(chunk)
        await sleep(reactor, 0)

    async def arrived() -> dict[str, Any] | None:
        row = await service.row(reactor, client.identity)
        return row if row["bytes_down"] >= want else None

    # Each poll is a control-socket call the service answers: not too often.
    row = await until(reactor, arrived, PHASE_TIMEOUT_SECS, "the heartbeats to arrive", step=0.02)
    elapsed = time.perf_counter() - t0
    if row.get("frames_bad", 0) != before.get("frames_bad", 0):
        raise BenchError("the service counted bad frames among the heartbeats")
    return Sample(
        {"msgs_per_s": n / elapsed, "secs": elapsed, "frame_bytes": total / n},
        (service.cpu() - cpu0) / n * 1e6,
        (time.process_time() - ours0) / n * 1e6,
    )


async def open_many(reactor: Any, clients: Sequence[Client], address: str) -> list[Any]:
    protos: list[Any] = []
    for i in range(0, len(clients), BATCH):
        batch = clients[i : i + BATCH]
        protos += await defer.gatherResults(
            [defer.Deferred.fromCoroutine(c.open(reactor, address)) for c in batch],
            consumeErrors=True,
        )
    return protos


async def measure_idle_memory(
    reactor: Any, home: Home, fleet: list[Client], warm: list[Client], profile_out: Path | None
) -> Sample:
    """A fresh service: warm-up links opened and closed, then ``len(fleet)`` idle links."""
    service = await start_service(reactor, home, profile_out)
    try:
        for c in warm + fleet:
            c.server_id = service.identity
        for proto in await open_many(reactor, warm, service.address):
            proto.transport.loseConnection()
        await until(
            reactor,
            lambda: _count_is(reactor, service, 0),
            STEP_TIMEOUT_SECS,
            "the warm-up links to close",
            step=0.05,
        )
        await sleep(reactor, 0.5)
        before = service.rss()
        protos = await open_many(reactor, fleet, service.address)
        await until(
            reactor,
            lambda: _count_is(reactor, service, len(fleet)),
            STEP_TIMEOUT_SECS,
            "the idle links to be up",
            step=0.05,
        )
        await sleep(reactor, IDLE_SETTLE_SECS)
        after = service.rss()
        connected = await service.connected(reactor)
        if connected != len(fleet):
            raise BenchError(f"{connected} of {len(fleet)} idle links stayed up")
        for proto in protos:
            proto.transport.loseConnection()
        await until(
            reactor,
            lambda: _count_is(reactor, service, 0),
            STEP_TIMEOUT_SECS,
            "the idle links to close",
            step=0.05,
        )
        return Sample(
            {
                "kib_per_idle_link": (after - before) / len(fleet),
                "rss_before_kib": before,
                "rss_after_kib": after,
            }
        )
    finally:
        await stop_service(reactor, service)


async def _count_is(reactor: Any, service: Service, n: int) -> bool:
    return await service.connected(reactor) == n


# --- rows --------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    title: str
    unit: str
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {t: [] for t in TRANSPORTS})
    value_key: str = ""
    cpu_label: str = ""

    def values(self, transport: str) -> list[float]:
        return [s.values[self.value_key] for s in self.samples[transport]]

    def stats(self, transport: str) -> dict[str, Any]:
        vals = self.values(transport)
        cpus = [s.server_cpu_us for s in self.samples[transport] if s.server_cpu_us is not None]
        ours = [s.client_cpu_us for s in self.samples[transport] if s.client_cpu_us is not None]
        out: dict[str, Any] = {
            "median": statistics.median(vals),
            "min": min(vals),
            "max": max(vals),
            "runs": vals,
        }
        if cpus:
            out["server_cpu_us_per_op"] = statistics.median(cpus)
            out["server_cpu_us_runs"] = cpus
        if ours:
            out["client_cpu_us_per_op"] = statistics.median(ours)
        extra = [s.values for s in self.samples[transport]]
        out["detail"] = extra
        return out

    def target(self, transport: str) -> tuple[str, float] | None:
        return TARGETS.get(self.key, {}).get(transport)

    def passed(self, transport: str) -> bool | None:
        tgt = self.target(transport)
        if tgt is None:
            return None
        op, limit = tgt
        med = self.stats(transport)["median"]
        return med <= limit if op == "<=" else med >= limit


def make_rows(sizes: Sizes) -> dict[str, Row]:
    return {
        "setup_p50_ms": Row(
            "setup_p50_ms",
            "link set-up p50, TCP connect -> authenticated "
            f"both ways ({sizes.connects} sequential per run)",
            "ms",
            value_key="p50_ms",
            cpu_label="per set-up + close",
        ),
        "setup_p99_ms": Row("setup_p99_ms", "link set-up p99", "ms", value_key="p99_ms"),
        "request_p50_ms": Row(
            "request_p50_ms",
            "knowledge_request -> knowledge_snapshot "
            f"({sizes.units} units) p50 ({sizes.requests} per run)",
            "ms",
            value_key="p50_ms",
            cpu_label="per request",
        ),
        "request_p99_ms": Row(
            "request_p99_ms",
            "knowledge_request -> knowledge_snapshot p99",
            "ms",
            value_key="p99_ms",
        ),
        "msgs_per_s": Row(
            "msgs_per_s",
            f"one-way heartbeats parsed by the service ({sizes.messages:,} per run)",
            "msg/s",
            value_key="msgs_per_s",
            cpu_label="per message",
        ),
        "kib_per_idle_link": Row(
            "kib_per_idle_link",
            f"memory per idle authenticated link ({sizes.idle_links} links, VmRSS growth)",
            "KiB",
            value_key="kib_per_idle_link",
        ),
    }


# --- the run -----------------------------------------------------------------------------


def unit_records(origin: str, n: int, now: int, tag: str = "bench") -> list[dict[str, Any]]:
    """
    Shareable pattern units that originated at ``origin`` (``hive import`` of
    one's own export); ``tag`` makes them new (another id) for every set.
    """
    return [
        {
            "id": f"ku_{tag}_{i:06d}",
            "scope": {"type": "universal"},
            "category": "best_practice",
            "content": {
                "type": "pattern",
                "tool": "Bash",
                "command_pattern": f"{tag} command {i} --flag",
                "preferred_action": "approve",
                "accept_rate": 0.9,
                "sample_count": 12,
                "conditions": [],
            },
            "evidence_count": 12,
            "confidence": 0.9,
            "source_peer": origin,
            "originated_at": now,
            "last_validated_at": now,
            "propagation_count": 0,
            "version": 1,
        }
        for i in range(n)
    ]


def fleet_clients(
    reactor: Any, tmp: Path, transport: str, server_home: Home, prefix: str, count: int
) -> list[Client]:
    """
    Idle-link identities whose keys are written as files: ``peers/<id>.key``
    on the service's home (what claiming a pair code writes there) and
    ``peers/<S id>.key`` on the fleet's home (what ``relay accept`` writes).
    """
    home = new_home(tmp, f"fleet-{transport}-{prefix}")
    server_id = KeyStore(server_home).ensure_identity(environ={"HOSTNAME": "bench-idle"})
    psk = os.urandom(32)
    KeyStore(home).save_key(server_id, psk)
    clients = []
    for i in range(count):
        ident = f"bench-{prefix}-{'tls' if transport == TLS13 else 'plain'}-{i:03d}"
        KeyStore(server_home).save_key(ident, psk)
        clients.append(Client.make(reactor, transport, home, server_id, identity=ident))
    return clients


@dataclass
class Run:
    sizes: Sizes
    rows: dict[str, Row]
    setup: dict[str, Any] = field(default_factory=dict)
    profiles: list[tuple[str, Path]] = field(default_factory=list)
    mini: dict[str, MiniRow] = field(default_factory=dict)


async def bench(
    reactor: Any,
    tmp: Path,
    sizes: Sizes,
    profile: bool,
    say: Callable[[str], None],
    only_floor: bool = False,
    only_setup: bool = False,
    after_storms: bool = False,
    only_request: bool = False,
) -> Run:
    run = Run(sizes, make_rows(sizes), mini=make_mini_rows(sizes))
    rows = run.rows
    now = int(time.time())

    # S: a home, a hive seeded through `hive import`, the service.
    # max_peers: the storm rows link up to 100 minimal clients at once.
    shome = new_home(tmp, "server", f"[relay]\nmax_peers = {max(sizes.storm_levels) + 32}\n")
    sid = cli(shome.root, "relay", "identity")["identity"]
    units_file = tmp / "units.json"
    units_file.write_text(json.dumps({"units": unit_records(sid, sizes.units, now)}))
    cli(shome.root, "hive", "import", str(units_file))
    prof_s = tmp / "server.prof" if profile else None
    service = await start_service(reactor, shome, prof_s, profile_on_signal=only_setup)
    say(f"service {sid} on {service.address} (pid {service.pid})")
    run.setup["server"] = {"identity": sid, "units": sizes.units}
    try:
        if only_floor or only_request or after_storms:
            # --after-storms: the issue-16 rows first.  Their storms close
            # ~10,000 loopback connections in a minute, and the kernel keeps
            # each in TIME_WAIT for 60 s: connections made meanwhile cost the
            # kernel more (issue 10: TLS set-up p50 +0.8 ms right after the
            # storms, none once they expired).  The full run measures them last.
            await bench_mini(reactor, tmp, sizes, service, run, say, only_request)
        if only_floor or only_request:
            return run
        clients = {
            t: await pair_client(reactor, service, new_home(tmp, f"client-{t}"), t)
            for t in TRANSPORTS
        }
        seen = {r["identity"]: r for r in cli(shome.root, "relay", "peers")}
        run.setup["clients"] = {
            t: {"identity": c.identity, "relay_peers_mode": seen[c.identity]["mode"]}
            for t, c in clients.items()
        }

        def order(i: int) -> Sequence[str]:
            return TRANSPORTS if i % 2 == 0 else TRANSPORTS[::-1]

        if only_setup and prof_s is not None:
            os.kill(service.pid, signal.SIGUSR1)  # profile the set-up rows alone

        # 1. Link set-up.
        for i in range(sizes.runs):
            for t in order(i):
                s = await measure_setup(
                    reactor, service, clients[t], sizes.connects, sizes.warmup_connects
                )
                rows["setup_p50_ms"].samples[t].append(s)
                rows["setup_p99_ms"].samples[t].append(s)
            say(f"link set-up run {i + 1}/{sizes.runs} done")
        if only_setup:
            if prof_s is not None:
                os.kill(service.pid, signal.SIGUSR2)
                await until(reactor, prof_s.exists, 30, "the profile", step=0.05)
            return run

        # 2 and 3 on one link per transport.
        protos = {t: await clients[t].open(reactor, service.address) for t in TRANSPORTS}
        peers_now = {r["identity"]: r for r in cli(shome.root, "relay", "peers")}
        for t, c in clients.items():
            shown = peers_now[c.identity]["transport"]
            run.setup["clients"][t]["relay_peers_transport"] = shown
            if shown != t:
                raise BenchError(f"relay peers shows {shown} for the {t} client")
        waiters = {t: SnapshotWaiter(clients[t]) for t in TRANSPORTS}
        for i in range(sizes.runs):
            for t in order(i):
                s = await measure_requests(
                    reactor,
                    service,
                    clients[t],
                    waiters[t],
                    sizes.requests,
                    sizes.warmup_requests,
                    sizes.units,
                )
                rows["request_p50_ms"].samples[t].append(s)
                rows["request_p99_ms"].samples[t].append(s)
            for t in order(i):
                rows["msgs_per_s"].samples[t].append(
                    await measure_one_way(reactor, service, clients[t], protos[t], sizes.messages)
                )
            say(f"request and one-way run {i + 1}/{sizes.runs} done")
        for t in TRANSPORTS:
            await clients[t].close(reactor, protos[t])
        # The issue-16 rows (minimal client, floor, storms) last on S: see above.
        await bench_mini(reactor, tmp, sizes, service, run, say)
    finally:
        await stop_service(reactor, service)
        if prof_s is not None:
            run.profiles.append(
                (
                    "relay serve S (set-up rows)"
                    if only_setup
                    else "relay serve S (set-up, requests, one-way, issue-16 rows)",
                    prof_s,
                )
            )

    # 4. Memory per idle link: a fresh service per run and transport.
    mhome = new_home(tmp, "idle", f"[relay]\nmax_peers = {sizes.idle_links + WARMUP_IDLE + 8}\n")
    fleets = {
        t: fleet_clients(reactor, tmp, t, mhome, "idle", sizes.idle_links) for t in TRANSPORTS
    }
    warms = {t: fleet_clients(reactor, tmp, t, mhome, "warm", WARMUP_IDLE) for t in TRANSPORTS}
    run.setup["idle"] = {
        "max_peers": sizes.idle_links + WARMUP_IDLE + 8,
        "warmup_links": WARMUP_IDLE,
        "settle_secs": IDLE_SETTLE_SECS,
    }
    for i in range(sizes.runs):
        for t in order(i):
            prof_m = tmp / f"idle-{t}-{i}.prof" if profile and i == 0 else None
            rows["kib_per_idle_link"].samples[t].append(
                await measure_idle_memory(reactor, mhome, fleets[t], warms[t], prof_m)
            )
            if prof_m is not None:
                run.profiles.append((f"relay serve, idle links ({t})", prof_m))
        say(f"idle-link run {i + 1}/{sizes.runs} done")
    return run


# --- issue 16: a minimal client, the floor, handshake storms ----------------------------

#: Issue 16's goals for the minimal-client rows: (op, limit, limit as a multiple of the floor).
MINI_TARGETS: dict[str, tuple[str, float | None, float | None]] = {
    "mini_handshake_p50_ms": ("<=", 0.25, 2.0),
    "mini_handshake_cpu_us": ("<=", 120.0, None),
    "mini_request_p50_ms": ("<=", None, 1.3),
    "mini_msgs_per_s": (">=", 500_000.0, None),
    "storm_100_resets": ("<=", 0.0, None),
    "storm_100_p99_ms": ("<=", 50.0, None),
    "storm_100_per_s": (">=", 3000.0, None),
}


class MiniLink:
    """One blocking socket and the shared line splitter."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines = LineSplitter(codec.MAX_LINE_BYTES)
        self.queue: collections.deque[bytes] = collections.deque()

    def read_line(self) -> bytes:
        while not self.queue:
            data = self.sock.recv(1 << 18)
            if not data:
                raise BenchError("the server closed the link")
            self.queue.extend(ln for ln in self.lines.feed(data) if ln)
        return self.queue.popleft()

    def close(self) -> None:
        """Half-close, read to the server's EOF (it closes on ours), close."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(1 << 18):
                pass
        self.sock.close()


class MiniHandshake:
    """
    The connector's side of the plaintext mutual handshake, written out from
    docs/protocol.md as a minimal client would (issue 16's): the challenge's
    nonce answered with ``proof`` and a ``cnonce``; the ack must say ``ok``
    and carry the listener's ``sproof`` over both nonces, checked.  Frames
    are parsed with ``json.loads`` (the sans-IO machine of this project and
    ``codec.decode``'s checks cost the client about 30 µs per handshake, in
    the measured time of both servers).
    """

    __slots__ = ("client", "nonce", "cnonce")

    def __init__(self, client: MiniClient) -> None:
        self.client = client
        self.nonce = ""
        self.cnonce = ""

    def answer(self, line: bytes) -> bytes:
        """The ``handshake`` frame answering the ``challenge`` line."""
        msg = json.loads(line)
        payload = msg.get("payload") if msg.get("msg_type") == codec.CHALLENGE else None
        nonce = payload.get("nonce") if isinstance(payload, dict) else None
        if not isinstance(nonce, str):
            raise BenchError(f"expected a challenge, got {line[:80]!r}")
        self.nonce, self.cnonce = nonce, os.urandom(32).hex()
        c = self.client
        body = {
            "proof": proof(c.psk, nonce),
            "cnonce": self.cnonce,
            "version": COMPAT_VERSION,
            "caps": [CAP_MUTUAL, CAP_PAKE],
        }
        return codec.encode(c.envelopes.make(codec.HANDSHAKE, body))

    def check_ack(self, line: bytes) -> None:
        """Raise unless ``line`` is the listener's ``ok`` with a valid ``sproof``."""
        msg = json.loads(line)
        payload = msg.get("payload") if msg.get("msg_type") == codec.HANDSHAKE_ACK else None
        if not isinstance(payload, dict) or payload.get("status") != "ok":
            raise BenchError(f"handshake refused: {line[:120]!r}")
        if payload.get("sproof") != listener_proof(self.client.psk, self.cnonce, self.nonce):
            raise BenchError("the listener's proof (sproof) is wrong")


class MiniClient:
    """
    A minimal client written from docs/protocol.md: a blocking socket per
    link, the plaintext mutual handshake (:class:`MiniHandshake`), no
    reactor, no logging, no files.  It measures ``relay serve`` and the
    floor alike.
    """

    def __init__(self, identity: str, psk: bytes, server_id: str) -> None:
        self.identity = identity
        self.psk = psk
        self.server_id = server_id
        self.envelopes = EnvelopeFactory(identity)

    def machine(self) -> MiniHandshake:
        return MiniHandshake(self)

    def connect(self, address: tuple[str, int]) -> tuple[MiniLink, float]:
        """A new authenticated link and the time it took (TCP connect included)."""
        t0 = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Blocking, with the kernel's timeouts: a Python-level timeout would
        # poll() before every recv and send (two system calls each).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(address)
            link = MiniLink(sock)
            hs = self.machine()
            sock.sendall(hs.answer(link.read_line()))
            hs.check_ack(link.read_line())
        except BaseException:
            sock.close()
            raise
        return link, time.perf_counter() - t0

    def request(self, link: MiniLink) -> tuple[float, int, list[bytes]]:
        """knowledge_request -> the last snapshot page: (secs, units, the pages' lines)."""
        frame = codec.encode(self.envelopes.make(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}))
        t0 = time.perf_counter()
        link.sock.sendall(frame)
        units, pages = 0, []
        while True:
            line = link.read_line()
            env = codec.decode(line)
            if env.msg_type != codec.KNOWLEDGE_SNAPSHOT:
                continue
            pages.append(line)
            payload = env.payload if isinstance(env.payload, dict) else {}
            units += len(payload.get("units") or [])
            if payload.get("page") == payload.get("total_pages"):
                return time.perf_counter() - t0, units, pages

    def one_way(self, link: MiniLink, n: int) -> float:
        """``n`` empty heartbeats written in bulk, then a request: secs until its reply."""
        frames = [codec.encode(self.envelopes.make(codec.HEARTBEAT, {})) for _ in range(n)]
        chunks = [b"".join(frames[i : i + WRITE_FRAMES]) for i in range(0, n, WRITE_FRAMES)]
        t0 = time.perf_counter()
        for chunk in chunks:
            link.sock.sendall(chunk)
        self.request(link)
        return time.perf_counter() - t0


@dataclass
class _Attempt:
    client: MiniClient
    sock: socket.socket
    machine: MiniHandshake
    lines: LineSplitter
    t0: float
    done: bool = False


def storm(
    clients: Sequence[MiniClient], address: tuple[str, int], concurrency: int, total: int
) -> dict[str, float]:
    """
    ``concurrency`` links in set-up at every moment (one per client, each
    client reconnecting once its previous link is closed) until ``total``
    succeeded: per-handshake p50/p99, handshakes per second, connections
    reset or closed by the server before the ack.
    """
    sel = selectors.DefaultSelector()
    idle = collections.deque(clients[:concurrency])
    times: list[float] = []
    resets = 0
    started = time.perf_counter()
    deadline = started + PHASE_TIMEOUT_SECS

    def start(client: MiniClient) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = _Attempt(client, sock, client.machine(), LineSplitter(codec.MAX_LINE_BYTES), 0.0)
        a.t0 = time.perf_counter()
        sock.connect_ex(address)
        sel.register(sock, selectors.EVENT_READ, a)

    def finish(a: _Attempt) -> None:
        sel.unregister(a.sock)
        a.sock.close()
        idle.append(a.client)

    in_flight = 0
    while len(times) < total:
        while idle and in_flight + len(times) < total and in_flight < concurrency:
            start(idle.popleft())
            in_flight += 1
        if time.perf_counter() > deadline:
            raise BenchError(f"handshake storm ({concurrency} at once) timed out")
        for key, _ in sel.select(1.0):
            a: _Attempt = key.data
            try:
                data = a.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:  # reset, refused
                data = None
            if not data:
                if not a.done:
                    resets += 1  # reset, or closed before the ack: tried again
                    in_flight -= 1
                finish(a)
                continue
            if a.done:
                continue  # frames after the ack; waiting for the server's EOF
            for line in a.lines.feed(data):
                if not line:
                    continue
                if not a.machine.nonce:
                    try:
                        a.sock.send(a.machine.answer(line))
                    except OSError:
                        break  # reset: the next read says so
                    continue
                try:
                    a.machine.check_ack(line)
                except BenchError as e:
                    raise BenchError(f"in the storm: {e}") from None
                times.append((time.perf_counter() - a.t0) * 1e3)
                a.done = True
                in_flight -= 1
                with contextlib.suppress(OSError):
                    a.sock.shutdown(socket.SHUT_WR)
                break
    elapsed = time.perf_counter() - started
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return {
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "per_s": len(times) / elapsed,
        "resets": float(resets),
        "resets_per_success": resets / len(times),
    }


# --- the floor ---------------------------------------------------------------------------


def floor_main(config_path: str) -> int:
    """
    The floor (``--floor CONFIG``, started by the benchmark): a bare
    LineReceiver speaking the same exchange as ``relay serve`` -- the sans-IO
    listener handshake with in-memory keys, a pre-encoded snapshot (the
    service's own reply, recorded), ``json.loads`` per heartbeat -- with no
    logging, no files, no admission, no checks beyond the handshake's.
    """
    from twisted.internet import protocol, reactor
    from twisted.protocols.basic import LineReceiver

    cfg = json.loads(Path(config_path).read_text())
    keys = {peer: bytes.fromhex(k) for peer, k in cfg["keys"].items()}
    snapshot = b"".join(ln + b"\n" for ln in map(bytes.fromhex, cfg["snapshot_lines"]))
    envelopes = EnvelopeFactory(cfg["identity"])

    class Keys:
        stored_key = staticmethod(keys.get)

        def pending_candidates(self) -> list[tuple[str, bytes]]:
            return []

        def claim(self, peer_id: str, label: str, psk: bytes) -> bool:
            return False

        def store_new_key(self, peer_id: str, psk: bytes) -> bool:
            return False

        def is_mutual(self, peer_id: str) -> bool:
            return False

        def is_tls(self, peer_id: str) -> bool:
            return False

        def closed_candidates(self) -> list[tuple[str, bytes]]:
            return []

    lookup = Keys()
    loads = json.loads

    class Floor(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = codec.MAX_LINE_BYTES

        def connectionMade(self) -> None:
            self.machine: ListenerHandshake | None = ListenerHandshake(envelopes, lookup)
            self.transport.write(b"".join(codec.encode(e) for e in self.machine.start()))

        def lineReceived(self, line: bytes) -> None:
            if self.machine is None:
                if loads(line)["msg_type"] == codec.KNOWLEDGE_REQUEST:
                    self.transport.write(snapshot)
                return
            step = self.machine.receive(codec.decode(line))
            if step.send:
                self.transport.write(b"".join(codec.encode(e) for e in step.send))
            if step.failed is not None:
                self.transport.loseConnection()
            elif step.done is not None:
                self.machine = None

    factory = protocol.Factory.forProtocol(Floor)
    port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    tmp = Path(cfg["port_file"] + ".tmp")
    tmp.write_text(str(port.getHost().port))
    tmp.replace(cfg["port_file"])
    reactor.run()  # type: ignore[attr-defined]
    return 0


async def start_floor(
    reactor: Any, tmp: Path, identity: str, keys: dict[str, bytes], snapshot_lines: list[bytes]
) -> tuple[subprocess.Popen[bytes], int]:
    cfg = tmp / "floor.json"
    port_file = tmp / "floor.port"
    cfg.write_text(
        json.dumps(
            {
                "identity": identity,
                "keys": {p: k.hex() for p, k in keys.items()},
                "snapshot_lines": [ln.hex() for ln in snapshot_lines],
                "port_file": str(port_file),
            }
        )
    )
    with open(tmp / "floor.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--floor", str(cfg)],
            env=child_env(tmp),
            cwd=str(tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    CHILDREN.procs.append(proc)
    CHILDREN.floor_started.append(proc.pid)

    def ready() -> int | None:
        if proc.poll() is not None:
            raise BenchError("the floor exited:\n" + (tmp / "floor.log").read_text()[-1000:])
        try:
            return int(port_file.read_text())
        except (OSError, ValueError):
            return None

    port = await until(reactor, ready, 30, "the floor to listen", step=0.05)
    return proc, port


@dataclass
class MiniRow:
    """An issue-16 row: the service and the floor, each a list of per-run values."""

    key: str
    title: str
    unit: str
    anchor: float | None = None
    values: dict[str, list[float]] = field(default_factory=lambda: {"service": [], "floor": []})

    def stats(self, who: str) -> dict[str, Any]:
        vals = self.values[who]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}

    def ratio(self) -> float | None:
        floor = statistics.median(self.values["floor"]) if self.values["floor"] else 0.0
        if not floor:
            return None
        return statistics.median(self.values["service"]) / floor

    def anchor_ratio(self) -> float | None:
        if self.anchor is None:
            return None
        return statistics.median(self.values["service"]) / self.anchor

    def target(self) -> tuple[str, float | None, float | None] | None:
        return MINI_TARGETS.get(self.key)

    def passed(self) -> bool | None:
        tgt = self.target()
        if tgt is None:
            return None
        op, limit, floor_x = tgt
        med = statistics.median(self.values["service"])
        ok = True
        if limit is not None:
            ok = ok and (med <= limit if op == "<=" else med >= limit)
        ratio = self.ratio()
        if floor_x is not None and ratio is not None:
            ok = ok and (ratio <= floor_x if op == "<=" else ratio >= floor_x)
        return ok

    def goal_text(self) -> str:
        tgt = self.target()
        if tgt is None:
            return ""
        op, limit, floor_x = tgt
        parts = []
        if limit is not None:
            parts.append(f"{op} {fmt(limit, self.unit)}")
        if floor_x is not None:
            parts.append(f"{op} {floor_x:g}x floor")
        return ", ".join(parts)


def make_mini_rows(sizes: Sizes) -> dict[str, MiniRow]:
    rows = [
        MiniRow(
            "mini_handshake_p50_ms",
            f"handshake p50, minimal client ({sizes.mini_connects} sequential)",
            "ms",
            ANCHOR_HANDSHAKE_MS,
        ),
        MiniRow("mini_handshake_p99_ms", "handshake p99, minimal client", "ms"),
        MiniRow("mini_handshake_cpu_us", "server CPU per handshake + close", "µs"),
        MiniRow(
            "mini_request_p50_ms",
            f"knowledge_request -> snapshot of {sizes.units} units p50 ({sizes.requests} per run)",
            "ms",
            ANCHOR_REQUEST_MS,
        ),
        MiniRow("mini_request_cpu_us", "server CPU per request", "µs"),
        MiniRow(
            "mini_msgs_per_s",
            f"one-way empty heartbeats parsed ({sizes.mini_messages:,} per run)",
            "msg/s",
        ),
    ]
    for c in sizes.storm_levels:
        rows += [
            MiniRow(f"storm_{c}_p50_ms", f"{c} clients at once: handshake p50", "ms"),
            MiniRow(f"storm_{c}_p99_ms", f"{c} clients at once: handshake p99", "ms"),
            MiniRow(f"storm_{c}_per_s", f"{c} clients at once: handshakes per second", "/s"),
            MiniRow(f"storm_{c}_resets", f"{c} clients at once: connections reset", "n"),
        ]
    return {r.key: r for r in rows}


def mini_runs(
    rows: dict[str, MiniRow],
    who: str,
    address: tuple[str, int],
    pid: int,
    clients: Sequence[MiniClient],
    sizes: Sizes,
    only_request: bool = False,
) -> None:
    """One run of every minimal-client row against one server (blocking)."""
    client = clients[0]
    times: list[float] = []
    for i in range(0 if only_request else sizes.warmup_connects + sizes.mini_connects):
        if i == sizes.warmup_connects:
            cpu0 = proc_cpu_secs(pid)
        link, secs = client.connect(address)
        link.close()
        if i >= sizes.warmup_connects:
            times.append(secs * 1e3)
    if times:
        rows["mini_handshake_cpu_us"].values[who].append(
            (proc_cpu_secs(pid) - cpu0) / sizes.mini_connects * 1e6
        )
        rows["mini_handshake_p50_ms"].values[who].append(percentile(times, 50))
        rows["mini_handshake_p99_ms"].values[who].append(percentile(times, 99))

    link, _ = client.connect(address)
    try:
        times = []
        for i in range(sizes.warmup_requests + sizes.requests):
            if i == sizes.warmup_requests:
                cpu0 = proc_cpu_exact(pid)
            secs, units, _ = client.request(link)
            if units != sizes.units:
                raise BenchError(f"{who}: the snapshot held {units} unit(s), not {sizes.units}")
            if i >= sizes.warmup_requests:
                times.append(secs * 1e3)
        rows["mini_request_cpu_us"].values[who].append(
            (proc_cpu_exact(pid) - cpu0) / sizes.requests * 1e6
        )
        rows["mini_request_p50_ms"].values[who].append(percentile(times, 50))
        if not only_request:
            rows["mini_msgs_per_s"].values[who].append(
                sizes.mini_messages / client.one_way(link, sizes.mini_messages)
            )
    finally:
        link.close()
    for c in () if only_request else sizes.storm_levels:
        got = storm(clients, address, c, max(c * sizes.storm_rounds, sizes.storm_min))
        rows[f"storm_{c}_p50_ms"].values[who].append(got["p50_ms"])
        rows[f"storm_{c}_p99_ms"].values[who].append(got["p99_ms"])
        rows[f"storm_{c}_per_s"].values[who].append(got["per_s"])
        rows[f"storm_{c}_resets"].values[who].append(got["resets"])


def mini_clients(sizes: Sizes, service: Service) -> tuple[list[MiniClient], tuple[str, int]]:
    """The minimal clients, their keys on S, each linked once; and S's address."""
    count = max(sizes.storm_levels)
    clients = [
        MiniClient(f"bench-mini-{i:03d}", os.urandom(32), service.identity) for i in range(count)
    ]
    ks = KeyStore(service.home)
    for c in clients:
        ks.save_key(c.identity, c.psk)  # what claiming a pair code writes on S
    address = ("127.0.0.1", service.port)
    # Each identity's first link writes its mutual marker (once per new
    # peer, with an fsync): done before measuring, the rows are the steady state.
    for c in clients:
        link, _ = c.connect(address)
        link.close()
    return clients, address


async def bench_mini(
    reactor: Any,
    tmp: Path,
    sizes: Sizes,
    service: Service,
    run: Run,
    say: Callable[[str], None],
    only_request: bool = False,
) -> None:
    """The issue-16 rows: a minimal client against ``relay serve`` and the floor."""
    clients, address = mini_clients(sizes, service)
    link, _ = clients[0].connect(address)
    _, units, pages = clients[0].request(link)
    link.close()
    if units != sizes.units:
        raise BenchError(f"the service's snapshot held {units} unit(s), not {sizes.units}")
    proc, fport = await start_floor(
        reactor, tmp, service.identity, {c.identity: c.psk for c in clients}, pages
    )
    try:
        targets = {"service": (address, service.pid), "floor": (("127.0.0.1", fport), proc.pid)}
        for i in range(sizes.runs):
            for who in ("service", "floor") if i % 2 == 0 else ("floor", "service"):
                addr, pid = targets[who]
                mini_runs(run.mini, who, addr, pid, clients, sizes, only_request)
                await sleep(reactor, 0)
            say(f"minimal-client run {i + 1}/{sizes.runs} done (service and floor)")
    finally:
        CHILDREN.stop(proc)


# --- report ------------------------------------------------------------------------------


def fmt(value: float, unit: str) -> str:
    if unit in ("msg/s", "/s", "n"):
        return f"{value:,.0f}"
    if unit == "µs":
        return f"{value:,.1f}"
    if unit == "KiB":
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def cell(row: Row, t: str) -> str:
    st = row.stats(t)
    if len(st["runs"]) == 1:
        return fmt(st["median"], row.unit)
    return f"{fmt(st['median'], row.unit)} ({fmt(st['min'], row.unit)}-{fmt(st['max'], row.unit)})"


def target_text(row: Row) -> str:
    parts = []
    for t in (TLS13, PLAINTEXT):
        tgt = row.target(t)
        if tgt is not None:
            parts.append(f"{'TLS' if t == TLS13 else 'plain'} {tgt[0]} {fmt(tgt[1], row.unit)}")
    return ", ".join(parts)


def verdict(row: Row) -> str:
    out = []
    for t in TRANSPORTS:
        p = row.passed(t)
        if p is not None:
            out.append(f"{'TLS' if t == TLS13 else 'plain'} {'pass' if p else 'MISS'}")
    return ", ".join(out)


def cpu_text(row: Row) -> str:
    if not row.cpu_label:
        return ""
    parts = []
    for t in TRANSPORTS:
        st = row.stats(t)
        if "server_cpu_us_per_op" in st:
            us = st["server_cpu_us_per_op"]
            parts.append(f"{'TLS' if t == TLS13 else 'plain'} {us:,.1f} µs")
    return " / ".join(parts) + f" {row.cpu_label}"


def report_json(run: Run, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "sizes": vars(run.sizes),
        "setup": run.setup,
        "service_pids": CHILDREN.started,
        "rows": [
            {
                "key": r.key,
                "title": r.title,
                "unit": r.unit,
                **{
                    t: {**r.stats(t), "target": r.target(t), "passed": r.passed(t)}
                    for t in TRANSPORTS
                },
            }
            for r in run.rows.values()
            if r.values(PLAINTEXT)
        ],
        "floor_rows": [
            {
                "key": r.key,
                "title": r.title,
                "unit": r.unit,
                "service": r.stats("service"),
                "floor": r.stats("floor"),
                "ratio_to_floor": r.ratio(),
                "anchor": r.anchor,
                "ratio_to_anchor": r.anchor_ratio(),
                "target": r.target(),
                "passed": r.passed(),
            }
            for r in run.mini.values()
            if r.values["service"]
        ],
        "floor_pids": CHILDREN.floor_started,
        "passed": all_passed(run),
    }


def all_passed(run: Run) -> bool:
    return all(
        r.passed(t) is not False for r in run.rows.values() for t in TRANSPORTS if r.values(t)
    ) and all(r.passed() is not False for r in run.mini.values() if r.values["service"])


def mini_cell(row: MiniRow, who: str) -> str:
    st = row.stats(who)
    if len(st["runs"]) == 1:
        return fmt(st["median"], row.unit)
    return f"{fmt(st['median'], row.unit)} ({fmt(st['min'], row.unit)}-{fmt(st['max'], row.unit)})"


def print_mini_table(run: Run) -> None:
    rows = [r for r in run.mini.values() if r.values["service"]]
    if not rows:
        return
    print()
    print(
        "issue 16 rows: a minimal client (blocking socket, plaintext handshake written out) "
        "against relay serve and the floor, same run, alternating"
    )
    headers = (
        "measure",
        "unit",
        "relay serve",
        "floor",
        "x floor",
        "x claudectl 0.64",
        "goal",
        "met?",
    )
    table = [headers]
    for r in rows:
        ratio, anchor = r.ratio(), r.anchor_ratio()
        passed = r.passed()
        table.append(
            (
                r.title,
                r.unit,
                mini_cell(r, "service"),
                mini_cell(r, "floor"),
                "" if ratio is None else f"{ratio:.2f}",
                "" if anchor is None else f"{anchor:.4f} (anchor {fmt(r.anchor or 0, r.unit)})",
                r.goal_text(),
                "" if passed is None else ("pass" if passed else "MISS"),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for j, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_table(run: Run, meta: dict[str, Any]) -> None:
    m = meta["machine"]
    print(
        f"claudectl relay benchmark ({meta['mode']}, {run.sizes.runs} run(s) per row): "
        f"{meta['date']}; {m['nproc']} CPU(s), {m['cpu']}, Python {m['python']}, "
        f"Twisted {m['twisted']}"
    )
    la0, la1 = meta["load_average_start"], meta["load_average_end"]
    print(
        "load average (1/5/15 min): start "
        + " ".join(f"{x:.2f}" for x in la0)
        + ", end "
        + " ".join(f"{x:.2f}" for x in la1)
    )
    print(f"command: {meta['command']}")
    print("cells: median (min-max) over the runs")
    if not run.rows["setup_p50_ms"].values(PLAINTEXT):  # --only-floor
        print_mini_table(run)
        return
    headers = (
        "measure",
        "unit",
        "plaintext",
        "TLS 1.3",
        "target",
        "result",
        "server CPU per operation (median)",
    )
    table = [headers] + [
        (
            r.title,
            r.unit,
            cell(r, PLAINTEXT),
            cell(r, TLS13),
            target_text(r),
            verdict(r),
            cpu_text(r),
        )
        for r in run.rows.values()
        if r.values(PLAINTEXT)  # --only-setup: the set-up rows alone
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for j, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for line in notes(run):
        print(line)
    print_mini_table(run)


def notes(run: Run) -> list[str]:
    """Figures that do not depend on the load: CPU time, what it allows."""
    out = []
    one_way = run.rows["msgs_per_s"]
    caps = []
    for t in TRANSPORTS:
        us = one_way.stats(t).get("server_cpu_us_per_op") if one_way.values(t) else None
        if us:
            caps.append(f"{'TLS' if t == TLS13 else 'plain'} {1e6 / us:,.0f} msg/s")
    if caps:
        out.append(
            "service CPU-bound capacity, one way (1 / its CPU time per message): " + ", ".join(caps)
        )
    for key in ("setup_p50_ms", "request_p50_ms", "msgs_per_s"):
        row = run.rows[key]
        parts = []
        for t in TRANSPORTS:
            if not row.values(t):
                continue
            st = row.stats(t)
            if "client_cpu_us_per_op" in st:
                parts.append(
                    f"{'TLS' if t == TLS13 else 'plain'} {st['client_cpu_us_per_op']:,.1f} µs"
                )
        if parts:
            out.append(f"client (this process) CPU {row.cpu_label}: " + " / ".join(parts))
    return out


def dump_profile(path: Path, title: str, limit: int = 30) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    return f"--- cProfile: {title} (sorted by own time) ---\n{buf.getvalue()}"


# --- entry point -------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small counts and one run (a few seconds of measuring; the smoke "
        "test runs this): the figures are not meaningful",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        metavar="N",
        help=f"runs per row (default {FULL.runs}; {QUICK.runs} with --quick)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the services under cProfile (python -m cProfile -o; written "
        "when SIGTERM stops them) and print their hot spots; timings then "
        "include the profiler's overhead",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    p.add_argument(
        "--only-setup",
        action="store_true",
        help="only the link set-up rows (plaintext and TLS), for A/B runs of issue 10's target",
    )
    p.add_argument(
        "--after-storms",
        action="store_true",
        help="with --only-setup: run the issue-16 rows (minimal client, floor, "
        "storms) against S first (the kernel then holds their ~10,000 closed "
        "connections in TIME_WAIT for 60 s)",
    )
    p.add_argument(
        "--only-floor",
        action="store_true",
        help="only the issue-16 rows (minimal client against relay serve and the floor)",
    )
    p.add_argument(
        "--only-request",
        action="store_true",
        help="only the minimal client's knowledge_request -> snapshot rows (relay serve "
        "and the floor): --only-floor without the handshakes, heartbeats and storms",
    )
    p.add_argument("--floor", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.after_storms and not args.only_setup:
        p.error("--after-storms goes with --only-setup")
    if args.runs is not None and not 1 <= args.runs <= 50:
        p.error("--runs must be between 1 and 50")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.floor:
        return floor_main(args.floor)
    if not sys.platform.startswith("linux"):
        print(
            "Error: bench_relay.py reads /proc/<pid>/status and stat: Linux only", file=sys.stderr
        )
        return 2
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        import dataclasses

        sizes = dataclasses.replace(sizes, runs=args.runs)
    tmp = Path(tempfile.mkdtemp(prefix="claudectl-bench-relay-"))
    status: list[int] = []
    load_start = os.getloadavg()
    command = "python scripts/bench_relay.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )

    def say(text: str) -> None:
        if not args.json:
            print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    async def go(reactor: Any) -> None:
        start_logging(tmp / "client.log")
        run = await bench(
            reactor,
            tmp,
            sizes,
            args.profile,
            say,
            args.only_floor,
            args.only_setup,
            args.after_storms,
            args.only_request,
        )
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "mode": "quick" if args.quick else "full",
            "machine": machine(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "command": command,
            "profiled": args.profile,
        }
        if args.json:
            print(json.dumps(report_json(run, meta), indent=2))
        else:
            print_table(run, meta)
        for title, path in run.profiles:
            if path.exists():
                print(dump_profile(path, title), file=sys.stderr if args.json else sys.stdout)
        status.append(0 if all_passed(run) else 1)

    def failed(reason: Any) -> None:
        # One line for the user; the traceback goes to the log in the temporary
        # directory (kept with --keep).
        print(f"Error: benchmark failed: {reason.getErrorMessage()}", file=sys.stderr)
        with contextlib.suppress(OSError), open(tmp / "client.log", "a") as f:
            reason.printTraceback(file=f)
        status.append(2)

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)).addErrback(failed))
    except SystemExit:
        pass
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
    finally:
        CHILDREN.stop_all()
        for d in SOCKET_DIRS:
            if tmp not in d.parents:
                shutil.rmtree(d, ignore_errors=True)
        if args.keep:
            print(f"(kept {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not status:
        print("Error: the benchmark was stopped before it finished", file=sys.stderr)
    return status[0] if status else 2


if __name__ == "__main__":
    sys.exit(main())
