#!/usr/bin/env python3
"""
Loopback benchmark of the relay core (issue 2, "Performance").

Measures, on 127.0.0.1 only and in throw-away homes under a temporary
directory (never ``~``):

* handshake latency: TCP connect until the link is authenticated (mutual
  mode), sequential, each link closed before the next;
* request -> reply latency: a ``knowledge_request`` answered by an ``ack``
  on one authenticated link, sequential;
* one-way throughput: heartbeat-size frames on one link, counted by the
  receiver's mesh handler;
* memory per idle authenticated link: growth of the listener's ``VmRSS``
  (``/proc/self/status``, after ``gc.collect()``) over N idle links.

The listener runs in a child process (this script with ``--role server``),
so the numbers include real cross-process loopback TCP and the listener's
memory is measured without the clients in it.  The parent is the client and
talks to the child over its stdin/stdout (one command per line).

Run from the repository root::

    python scripts/bench_relay.py            # full run, about a minute
    python scripts/bench_relay.py --quick    # smaller counts, a few seconds
    python scripts/bench_relay.py --json     # machine-readable results
    python scripts/bench_relay.py --profile  # cProfile both processes

Exit status: 0 when every target is met, 1 when one is missed, 2 when the
benchmark itself failed.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import math
import os
import platform
import pstats
import shutil
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
from twisted.internet import defer, stdio, task  # noqa: E402
from twisted.internet.endpoints import serverFromString  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.logger import (  # noqa: E402
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver  # noqa: E402

from claudectl.config import Config  # noqa: E402
from claudectl.home import Home  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.codec import Envelope  # noqa: E402
from claudectl.relay.handshake import MUTUAL, KeyAuth  # noqa: E402
from claudectl.relay.keystore import KeyStore  # noqa: E402
from claudectl.relay.node import RelayFactory, RelayNode  # noqa: E402

SERVER_ID = "bench-server"
CLIENT_ID = "bench-client"
IDLE_PREFIX = "bench-idle-"
WARMUP_IDLE = 16
#: The listener admits at most 16 handshakes in flight.
BATCH = 16
PHASE_TIMEOUT_SECS = 120.0

#: Targets on the 2-core reference machine (issue 2).
HANDSHAKE_P50_MS = 3.0
RTT_P50_MS = 1.0
THROUGHPUT_MSGS = 50_000.0
IDLE_LINK_KIB = 64.0


@dataclass(frozen=True)
class Sizes:
    handshakes: int
    round_trips: int
    messages: int
    idle_links: int
    repeats: int = 3
    send_batch: int = 1000


FULL = Sizes(handshakes=500, round_trips=2000, messages=100_000, idle_links=200)
QUICK = Sizes(handshakes=100, round_trips=500, messages=20_000, idle_links=50, repeats=1)
#: Just enough to prove the script still works (the test suite runs this).
SMOKE = Sizes(handshakes=5, round_trips=20, messages=500, idle_links=4, repeats=1,
              send_batch=100)


@dataclass
class Row:
    metric: str
    value: str
    target: str
    passed: bool
    data: dict[str, Any] = field(default_factory=dict)
    #: CPU time per operation in each process: robust on a busy machine.
    cpu: str = ""


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def rss_kib() -> int:
    """This process's resident set size (``VmRSS``) in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def machine() -> dict[str, str]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": str(os.cpu_count()), "cpu": model,
            "python": platform.python_version(), "twisted": twisted.__version__}


def relay_config(max_peers: int) -> Config:
    base = Config()
    relay = dataclasses.replace(base.relay, max_peers=max_peers, lan_discovery=False)
    return dataclasses.replace(base, relay=relay)


def start_logging(path: Path) -> None:
    """Info and up to a file, as ``twistd --logfile`` would; nothing kept in memory."""
    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    observer = FilteringLogObserver(textFileLogObserver(out),
                                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def dump_profile(source: cProfile.Profile | str, title: str, limit: int = 25) -> str:
    """The ``limit`` functions with the most own time, from a profiler or a stats file."""
    buf = io.StringIO()
    stats = pstats.Stats(source, stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    return f"--- cProfile: {title} (sorted by tottime) ---\n{buf.getvalue()}"


# --- the listener (child process) ------------------------------------------------------


class ServerCommands(LineReceiver):
    """
    The child's stdin/stdout: one command per line, one answer per line.

    ``rss`` -> ``rss <KiB>`` after a full collection; ``links`` -> ``links
    <n>``; ``cpu`` -> ``cpu <seconds>`` (this process's CPU time so far); ``expect <n>`` -> ``got <n> <first> <last> <cpu>`` once ``n``
    heartbeats arrived since the ``expect`` (monotonic seconds of the first and
    the last, CPU seconds this process used meanwhile); ``quit``.
    """

    delimiter = b"\n"

    def __init__(self, node: RelayNode, port: int, reactor: Any,
                 profiler: cProfile.Profile | None, profile_out: str | None) -> None:
        self.node = node
        self.port = port
        self.reactor = reactor
        self.profiler = profiler
        self.profile_out = profile_out
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.expected: int | None = None
        self.cpu_start = 0.0
        self.finished: defer.Deferred[None] = defer.Deferred()
        node.mesh.add_handler(codec.KNOWLEDGE_REQUEST, self._answer)
        node.mesh.add_handler(codec.HEARTBEAT, self._count)

    def connectionMade(self) -> None:
        self._say(f"port {self.port}")

    def connectionLost(self, reason: Any = None) -> None:
        # The parent said quit, or went away: stop.
        if not self.finished.called:
            self.finished.callback(None)

    def _say(self, text: str) -> None:
        self.transport.write(text.encode("ascii") + b"\n")

    def _answer(self, peer_id: str, env: Envelope) -> None:
        self.node.mesh.send(peer_id, codec.ACK, {"ack_id": env.id})

    def _count(self, peer_id: str, env: Envelope) -> None:
        now = time.monotonic()
        if self.count == 0:
            self.first = now
        self.count += 1
        self.last = now
        if self.expected is not None and self.count >= self.expected:
            self.expected = None
            cpu = time.process_time() - self.cpu_start
            self._say(f"got {self.count} {self.first!r} {self.last!r} {cpu!r}")

    def lineReceived(self, line: bytes) -> None:
        cmd, _, arg = line.decode("ascii").strip().partition(" ")
        if cmd == "rss":
            gc.collect()
            self._say(f"rss {rss_kib()}")
        elif cmd == "cpu":
            self._say(f"cpu {time.process_time()!r}")
        elif cmd == "links":
            self._say(f"links {self.node.mesh.connected_count()}")
        elif cmd == "expect":
            self.count = 0
            self.expected = int(arg)
            self.cpu_start = time.process_time()
        elif cmd == "quit":
            if self.profiler is not None and self.profile_out:
                self.profiler.disable()
                self.profiler.dump_stats(self.profile_out)
            self._say("bye")
            self.transport.loseConnection()
        else:
            self._say(f"error unknown command {cmd!r}")


async def run_server(reactor: Any, args: argparse.Namespace) -> None:
    home = Home(Path(args.home))
    start_logging(Path(args.home) / "relay.log")
    profiler = cProfile.Profile() if args.profile_out else None
    node = RelayNode(home, relay_config(args.max_peers), reactor, identity=SERVER_ID)
    listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        RelayFactory(node))
    commands = ServerCommands(node, listening.getHost().port, reactor, profiler, args.profile_out)
    stdio.StandardIO(commands, reactor=reactor)
    if profiler is not None:
        profiler.enable()
    await commands.finished


# --- the client (parent process) -------------------------------------------------------


class ServerProcess(ProcessProtocol):
    """The parent's handle on the child listener."""

    def __init__(self) -> None:
        self._buffer = b""
        self._waiting: list[defer.Deferred[str]] = []
        self.port: defer.Deferred[int] = defer.Deferred()
        self.exited: defer.Deferred[int] = defer.Deferred()
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.decode("ascii")
            if text.startswith("port ") and not self.port.called:
                self.port.callback(int(text.split()[1]))
            elif self._waiting:
                self._waiting.pop(0).callback(text)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        sys.stderr.buffer.write(data)

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        for d in [self.port, *self._waiting]:
            if not d.called:
                d.errback(RuntimeError(f"benchmark listener exited ({code})"))
        self._waiting = []
        self.exited.callback(code or 0)

    def ask(self, command: str) -> defer.Deferred[str]:
        d: defer.Deferred[str] = defer.Deferred()
        self._waiting.append(d)
        self.transport.write(command.encode("ascii") + b"\n")
        return d


async def spawn_server(reactor: Any, tmp: Path, name: str, max_peers: int,
                       profile_out: Path | None,
                       no_fsync: bool = False) -> tuple[ServerProcess, int]:
    home = tmp / name
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", "server",
            "--home", str(home), "--max-peers", str(max_peers)]
    if profile_out is not None:
        argv += ["--profile-out", str(profile_out)]
    if no_fsync:
        argv.append("--no-fsync")
    env = dict(os.environ, HOME=str(home), CLAUDECTL_HOME=str(home))
    proc = ServerProcess()
    reactor.spawnProcess(proc, sys.executable, argv, env=env)
    port = await proc.port.addTimeout(30, reactor)
    return proc, port


async def stop_server(proc: ServerProcess, reactor: Any) -> None:
    with_timeout = proc.exited.addTimeout(30, reactor)
    try:
        await proc.ask("quit")
    except Exception:
        pass
    await with_timeout


class LinkWatch:
    """Fires a Deferred when a node's link to a peer goes down."""

    def __init__(self, node: RelayNode) -> None:
        self._waiting: dict[str, defer.Deferred[None]] = {}
        node.mesh.add_link_observer(None, self._down)

    def expect_down(self, peer_id: str) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting[peer_id] = d
        return d

    def _down(self, peer_id: str) -> None:
        d = self._waiting.pop(peer_id, None)
        if d is not None:
            d.callback(None)


async def close_cleanly(proto: Any, watch: LinkWatch, reactor: Any) -> None:
    """Half-close our side and wait until the listener has closed its side too."""
    down = watch.expect_down(SERVER_ID)
    proto.transport.loseWriteConnection()
    await down.addTimeout(10, reactor)


def client_node(home: Home, reactor: Any, identity: str) -> RelayNode:
    return RelayNode(home, relay_config(8), reactor, identity=identity)


class CpuMeter:
    """CPU seconds used by this process and by the listener between two points."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.ours = self.theirs = 0.0

    async def _theirs(self) -> float:
        return float((await self.server.ask("cpu")).split()[1])

    async def start(self) -> None:
        self.ours, self.theirs = time.process_time(), await self._theirs()

    async def stop(self, n: int) -> dict[str, float]:
        ours = time.process_time() - self.ours
        theirs = await self._theirs() - self.theirs
        return {"client_cpu_us_per_op": ours / n * 1e6, "listener_cpu_us_per_op": theirs / n * 1e6}


def cpu_text(d: dict[str, float]) -> str:
    return (f"client {d['client_cpu_us_per_op']:.0f} us, "
            f"listener {d['listener_cpu_us_per_op']:.0f} us")


async def bench_handshakes(reactor: Any, home: Home, address: str, psk: bytes,
                           server: ServerProcess, n: int, warmup: int = 20) -> Row:
    """Sequential handshakes; each link is closed (by both sides) before the next."""
    node = client_node(home, reactor, CLIENT_ID)
    watch = LinkWatch(node)
    samples: list[float] = []
    modes: set[str] = set()
    meter = CpuMeter(server)
    for i in range(warmup + n):
        if i == warmup:
            await meter.start()
        t0 = time.perf_counter()
        proto = await node.open_link(address, KeyAuth(psk, SERVER_ID)).addTimeout(10, reactor)
        elapsed = time.perf_counter() - t0
        assert proto.result is not None
        modes.add(proto.result.mode)
        await close_cleanly(proto, watch, reactor)
        if i >= warmup:
            samples.append(elapsed)
    cpu = await meter.stop(n)
    p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
    return Row(f"handshake, connect -> authenticated (n={n})",
               f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", f"p50 <= {HANDSHAKE_P50_MS:g} ms",
               p50 <= HANDSHAKE_P50_MS and modes == {MUTUAL},
               {"n": n, "p50_ms": p50, "p99_ms": p99, "mean_ms": sum(samples) / n * 1e3,
                "modes": sorted(modes), **cpu},
               cpu_text(cpu) + " per connect+close")


async def open_one(reactor: Any, home: Home, address: str, psk: bytes,
                   identity: str) -> tuple[RelayNode, Any]:
    node = client_node(home, reactor, identity)
    proto = await node.open_link(address, KeyAuth(psk, SERVER_ID)).addTimeout(10, reactor)
    return node, proto


async def bench_round_trips(reactor: Any, node: RelayNode, server: ServerProcess,
                            n: int, warmup: int = 100) -> Row:
    pending: list[defer.Deferred[str]] = []

    def on_ack(peer_id: str, env: Envelope) -> None:
        if pending:
            pending.pop().callback(env.payload.get("ack_id"))

    node.mesh.add_handler(codec.ACK, on_ack)
    samples: list[float] = []
    meter = CpuMeter(server)
    for i in range(warmup + n):
        if i == warmup:
            await meter.start()
        d: defer.Deferred[str] = defer.Deferred()
        pending.append(d)
        t0 = time.perf_counter()
        if not node.mesh.send(SERVER_ID, codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}):
            raise RuntimeError("link to the listener is down")
        await d.addTimeout(10, reactor)
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    cpu = await meter.stop(n)
    p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3
    return Row(f"request -> reply, knowledge_request/ack (n={n})",
               f"p50 {p50:.3f} ms, p99 {p99:.3f} ms", f"p50 <= {RTT_P50_MS:g} ms",
               p50 <= RTT_P50_MS,
               {"n": n, "p50_ms": p50, "p99_ms": p99, "mean_ms": sum(samples) / n * 1e3, **cpu},
               cpu_text(cpu) + " per round trip")


async def _one_way(reactor: Any, server: ServerProcess, n: int,
                   send_batch: Callable[[int], None], batch: int) -> dict[str, float]:
    """Send ``n`` heartbeats in batches; the listener's handler times their arrival."""
    got = server.ask(f"expect {n}")
    await task.deferLater(reactor, 0.05)  # the child has read the command
    start, cpu_start = time.monotonic(), time.process_time()
    sent = 0
    while sent < n:
        k = min(batch, n - sent)
        send_batch(k)
        sent += k
        await task.deferLater(reactor, 0)  # let the reactor write
    sender_done = time.monotonic()
    answer = await got.addTimeout(PHASE_TIMEOUT_SECS, reactor)
    sender_cpu = time.process_time() - cpu_start
    _, count, first, last, cpu = answer.split()
    count_i, first_f, last_f = int(count), float(first), float(last)
    return {"receiver_msgs_per_s": (count_i - 1) / (last_f - first_f),
            "end_to_end_msgs_per_s": count_i / (last_f - start),
            "sender_secs": sender_done - start, "receiver_secs": last_f - first_f,
            "client_cpu_us_per_op": sender_cpu / n * 1e6,
            "listener_cpu_us_per_op": float(cpu) / count_i * 1e6}


def _median_run(runs: list[dict[str, float]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["receiver_msgs_per_s"])
    best = dict(ordered[len(ordered) // 2])
    best["all_receiver_msgs_per_s"] = [r["receiver_msgs_per_s"] for r in runs]
    return best


async def bench_throughput(reactor: Any, node: RelayNode, server: ServerProcess,
                           n: int, batch: int, repeats: int) -> Row:
    """The real path: ``mesh.send`` (make, encode, write) to the listener's handler."""
    def send(k: int) -> None:
        for _ in range(k):
            node.mesh.send(SERVER_ID, codec.HEARTBEAT, {})

    runs = [await _one_way(reactor, server, n, send, batch) for _ in range(repeats)]
    m = _median_run(runs)
    frame = len(codec.encode(node.envelopes.make(codec.HEARTBEAT, {})))
    rate = m["receiver_msgs_per_s"]
    return Row(f"one-way throughput, mesh.send of {frame}-byte heartbeats (n={n}, "
               f"median of {repeats})",
               f"{rate:,.0f} msg/s at the receiver ({m['end_to_end_msgs_per_s']:,.0f} end to end)",
               f">= {THROUGHPUT_MSGS:,.0f} msg/s", rate >= THROUGHPUT_MSGS,
               {"n": n, "frame_bytes": frame, "repeats": repeats, **m},
               f"sender {m['client_cpu_us_per_op']:.1f} us, "
               f"receiver {m['listener_cpu_us_per_op']:.1f} us per message")


def _writer(proto: Any, chunks: list[bytes]) -> Callable[[int], None]:
    it = iter(chunks)
    return lambda _count: proto.transport.write(next(it))


async def bench_receive_path(reactor: Any, node: RelayNode, proto: Any, server: ServerProcess,
                             n: int, batch: int, repeats: int) -> Row:
    """
    The listener's receive path alone: frames encoded before the clock starts
    and written in bulk, so the sender is never the bottleneck.  Informative
    (no target): it shows how much of the throughput the receiver could take.
    """
    runs = []
    for _ in range(repeats):
        chunks = [b"".join(codec.encode(node.envelopes.make(codec.HEARTBEAT, {}))
                           for _ in range(min(batch, n - i)))
                  for i in range(0, n, batch)]
        runs.append(await _one_way(reactor, server, n, _writer(proto, chunks), batch))
    m = _median_run(runs)
    rate = m["receiver_msgs_per_s"]
    return Row(f"receive path only, pre-encoded heartbeats (n={n}, median of {repeats})",
               f"{rate:,.0f} msg/s at the receiver", "(information)", True,
               {"n": n, "repeats": repeats, "informational": True, **m},
               f"receiver {m['listener_cpu_us_per_op']:.1f} us per message")


async def open_batch(reactor: Any, home: Home, address: str, psk: bytes,
                     ids: Sequence[str]) -> list[tuple[RelayNode, Any]]:
    links: list[tuple[RelayNode, Any]] = []
    for i in range(0, len(ids), BATCH):
        chunk = ids[i:i + BATCH]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(open_one(reactor, home, address, psk, ident))
             for ident in chunk], consumeErrors=True)
        links.extend(results)
    return links


async def wait_links(server: ServerProcess, reactor: Any, want: int) -> int:
    for _ in range(200):
        answer = await server.ask("links")
        have = int(answer.split()[1])
        if have == want:
            return have
        await task.deferLater(reactor, 0.05)
    return have


async def bench_idle_memory(reactor: Any, home: Home, address: str, psk: bytes,
                            server: ServerProcess, n: int) -> Row:
    # Warm up: import and cache everything a link touches, then let go.
    warm = await open_batch(reactor, home, address, psk,
                            [f"{IDLE_PREFIX}w{i:03d}" for i in range(WARMUP_IDLE)])
    for _, proto in warm:
        proto.transport.loseConnection()
    await wait_links(server, reactor, 0)
    before = int((await server.ask("rss")).split()[1])
    links = await open_batch(reactor, home, address, psk,
                             [f"{IDLE_PREFIX}{i:03d}" for i in range(n)])
    await task.deferLater(reactor, 0.5)
    connected = await wait_links(server, reactor, n)
    after = int((await server.ask("rss")).split()[1])
    per_link = (after - before) / n
    for _, proto in links:
        proto.transport.loseConnection()
    await wait_links(server, reactor, 0)
    return Row(f"memory per idle authenticated link (n={n})",
               f"{per_link:.1f} KiB (listener VmRSS {before} -> {after} KiB)",
               f"<= {IDLE_LINK_KIB:g} KiB", per_link <= IDLE_LINK_KIB and connected == n,
               {"n": n, "connected": connected, "rss_before_kib": before,
                "rss_after_kib": after, "kib_per_link": per_link})


def prepare_homes(tmp: Path, psk: bytes, idle: int) -> tuple[Home, Home, Home]:
    """Pair the client home with both listener homes (same key, known ids)."""
    client, server, idle_server = Home(tmp / "client"), Home(tmp / "server"), Home(tmp / "idle")
    KeyStore(client).save_key(SERVER_ID, psk)
    KeyStore(server).save_key(CLIENT_ID, psk)
    idle_keys = KeyStore(idle_server)
    for ident in ([f"{IDLE_PREFIX}w{i:03d}" for i in range(WARMUP_IDLE)]
                  + [f"{IDLE_PREFIX}{i:03d}" for i in range(idle)]):
        idle_keys.save_key(ident, psk)
    return client, server, idle_server


async def run_client(reactor: Any, args: argparse.Namespace) -> int:
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="claudectl-bench-"))
    profiler = cProfile.Profile() if args.profile else None
    rows: list[Row] = []
    try:
        start_logging(tmp / "client.log")
        psk = os.urandom(32)
        client_home, _, _ = prepare_homes(tmp, psk, sizes.idle_links)
        prof_a = tmp / "server-a.prof" if args.profile else None
        prof_b = tmp / "idle-b.prof" if args.profile else None

        server, port = await spawn_server(reactor, tmp, "server", 8, prof_a, args.no_fsync)
        address = f"127.0.0.1:{port}"
        if profiler is not None:
            profiler.enable()
        rows.append(await bench_handshakes(reactor, client_home, address, psk, server,
                                           sizes.handshakes))
        node, proto = await open_one(reactor, client_home, address, psk, CLIENT_ID)
        rows.append(await bench_round_trips(reactor, node, server, sizes.round_trips))
        rows.append(await bench_throughput(reactor, node, server, sizes.messages,
                                           sizes.send_batch, sizes.repeats))
        rows.append(await bench_receive_path(reactor, node, proto, server, sizes.messages,
                                             sizes.send_batch, sizes.repeats))
        if profiler is not None:
            profiler.disable()
        proto.transport.loseConnection()
        await stop_server(server, reactor)

        server, port = await spawn_server(reactor, tmp, "idle", sizes.idle_links + WARMUP_IDLE,
                                          prof_b, args.no_fsync)
        rows.append(await bench_idle_memory(reactor, client_home, f"127.0.0.1:{port}", psk,
                                            server, sizes.idle_links))
        await stop_server(server, reactor)
        report(rows, args, load_start, os.getloadavg())
        if profiler is not None:
            print(dump_profile(profiler, "client (handshake, round trips, throughput)"))
            for path, title in ((prof_a, "listener (handshake, round trips, throughput)"),
                                (prof_b, "listener (idle links)")):
                if path is not None and path.exists():
                    print(dump_profile(str(path), title))
    finally:
        if args.keep:
            print(f"(kept {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r.passed for r in rows) else 1


def report(rows: list[Row], args: argparse.Namespace,
           load_start: tuple[float, float, float], load_end: tuple[float, float, float]) -> None:
    info = machine()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.json:
        print(json.dumps({"machine": info, "mode": mode, "profiled": bool(args.profile),
                          "fsync_disabled": bool(args.no_fsync),
                          "date": time.strftime("%Y-%m-%d"),
                          "load_average_start": load_start, "load_average_end": load_end,
                          "results": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return
    flags = (", under cProfile" if args.profile else "") + (", fsync disabled" if args.no_fsync else "")
    print(f"claudectl relay benchmark ({mode} run{flags})"
          f" on {info['cpus']} CPU(s), {info['cpu']}, Python {info['python']},"
          f" Twisted {info['twisted']}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("load average (1/5/15 min): start " + " ".join(f"{x:.2f}" for x in load_start)
          + ", end " + " ".join(f"{x:.2f}" for x in load_end)
          + (" -- other work was running, expect noise" if load_start[0] > 0.5 else ""))
    headers = ("metric", "result", "target", "", "CPU time (client/sender, listener)")
    table = [headers] + [(r.metric, r.value, r.target,
                          "info" if r.data.get("informational") else
                          "PASS" if r.passed else "FAIL", r.cpu) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for j, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


# --- entry point -----------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smaller run: {QUICK.handshakes} handshakes, {QUICK.round_trips} "
                        f"round trips, {QUICK.messages:,} messages, {QUICK.idle_links} idle links")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run that only checks the benchmark works (numbers meaningless)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--profile", action="store_true",
                   help="run both processes under cProfile and print the hot spots "
                        "(the timings then include the profiler's overhead)")
    p.add_argument("--no-fsync", action="store_true",
                   help="diagnostic: make os.fsync a no-op in both processes, to tell disk "
                        "latency (key and meta files are written with fsync) from relay cost")
    p.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    # Internal: the listener child.
    p.add_argument("--role", choices=("client", "server"), default="client",
                   help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    p.add_argument("--max-peers", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.no_fsync:
        os.fsync = lambda fd: None  # diagnostic only; these homes are thrown away
    if args.role == "server":
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run_server(reactor, args)))
        return
    if not sys.platform.startswith("linux"):
        sys.exit("bench_relay.py reads /proc/self/status: Linux only")
    status: list[int] = []

    async def client(reactor: Any) -> None:
        status.append(await run_client(reactor, args))

    def failed(reason: Any) -> None:
        print(f"benchmark failed: {reason.getErrorMessage()}", file=sys.stderr)
        reason.printTraceback(file=sys.stderr)
        status.append(2)

    def go(reactor: Any) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(client(reactor)).addErrback(failed)

    try:
        task.react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(status[0] if status else 2)


if __name__ == "__main__":
    main()
