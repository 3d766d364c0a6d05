#!/usr/bin/env python3
"""
Benchmark hive gossip and record the results.

    python scripts/bench_gossip.py [--quick] [--no-write] [--seed N] [--profile]

Three measurements, all in throw-away homes under a temporary directory,
on loopback only, every wait bounded:

1. Convergence: 16 ``claudectl relay serve`` processes, each linked to a few
   random others (a connected graph, at most ``max_peers`` = 8 links per
   node).  One new unit is written into one node's ``knowledge.jsonl``; we
   time until every node's store holds it -- from the write (this includes
   the service's 0.5 s file poll) and from the moment the first node's
   service sent it (its "sent ... knowledge unit(s)" log line).
2. Snapshot: a node holding 5,000 distinct units; a fresh node connects; we
   time until the new node's store holds all 5,000.
3. Simulation of the push-round rule on 10, 100 and 1,000 peers (random
   graphs of degree ~4-8, ``max_propagation`` 5): rounds, messages, bytes
   and coverage.  The round model is cross-checked against the real
   :class:`claudectl.hive.gossip.Gossip` engine on in-memory meshes.

It also times one hop inside the engine (receive a unit, merge it, forward
it to 5 peers) on the benchmark's disk and counts the fsyncs it costs.

Prints a table and replaces the ``## Gossip`` section of docs/performance.md
(creating the file if needed).  Every child process is killed at the end,
also on errors and on Ctrl+C.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import cProfile
import dataclasses
import datetime
import io
import json
import os
import platform
import pstats
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402
from zope.interface import implementer  # noqa: E402

from claudectl.config import Config, HiveConfig  # noqa: E402
from claudectl.control import commands as C  # noqa: E402
from claudectl.control.client import call_control  # noqa: E402
from claudectl.hive import gossip as gossip_mod  # noqa: E402
from claudectl.hive.gossip import Gossip  # noqa: E402
from claudectl.hive.store import KNOWLEDGE, hive_file, read_units_file, store_transaction  # noqa: E402
from claudectl.hive.units import KnowledgeUnit  # noqa: E402
from claudectl.home import Home  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.interfaces import IMesh  # noqa: E402
from claudectl.relay.keystore import KeyStore  # noqa: E402

MESH_NODES = 16
DIALS_PER_NODE = 3
MAX_PEERS = 8  # the [relay] max_peers default
MAX_PROPAGATION = HiveConfig().max_propagation
SNAPSHOT_UNITS = 5_000
POLL_STEP = 0.005  # how often the benchmark looks at the other nodes' files
TARGET_CONVERGENCE_P50 = 0.250
TARGET_SNAPSHOT = 1.0
NOW = 1_800_000_000  # the fixed clock of the in-process simulations


# --- units and graphs ----------------------------------------------------------------


def unit_json(uid: str, source: str, command: str, now: int) -> dict[str, Any]:
    """A shareable local pattern unit (enough evidence to leave the machine)."""
    return {
        "id": uid, "scope": {"type": "universal"}, "category": "best_practice",
        "content": {"type": "pattern", "tool": "Bash", "command_pattern": command,
                    "preferred_action": "approve", "accept_rate": 0.9,
                    "sample_count": 12, "conditions": []},
        "evidence_count": 12, "confidence": 0.9, "source_peer": source,
        "originated_at": now, "last_validated_at": now,
        "propagation_count": 0, "version": 1,
    }


def add_units(home: Home, local_id: str, units: list[dict[str, Any]], now: int) -> None:
    with store_transaction(home, local_id=local_id, now=now) as store:
        for u in units:
            store.insert(KnowledgeUnit.from_json(u))


def random_mesh(n: int, dials: int, max_degree: int, rnd: random.Random
                ) -> list[tuple[int, int]]:
    """
    Undirected edges ``(dialer, listener)``: every node dials up to ``dials``
    random others, no node exceeds ``max_degree`` links, the graph is connected.
    """
    for _ in range(200):
        adj: list[set[int]] = [set() for _ in range(n)]
        edges: list[tuple[int, int]] = []
        order = list(range(n))
        rnd.shuffle(order)
        for a in order:
            made = 0
            for _ in range(20 * dials):
                if made >= dials or len(adj[a]) >= max_degree:
                    break
                b = rnd.randrange(n)
                if b == a or b in adj[a] or len(adj[b]) >= max_degree:
                    continue
                adj[a].add(b)
                adj[b].add(a)
                edges.append((a, b))
                made += 1
        if all(d is not None for d in distances(n, edges, 0)):
            return edges
    raise RuntimeError(f"no connected graph of {n} nodes after 200 tries")


def adjacency(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    return adj


def distances(n: int, edges: list[tuple[int, int]], source: int) -> list[int | None]:
    adj = adjacency(n, edges)
    dist: list[int | None] = [None] * n
    dist[source] = 0
    queue = collections.deque([source])
    while queue:
        a = queue.popleft()
        for b in adj[a]:
            if dist[b] is None:
                dist[b] = dist[a] + 1  # type: ignore[operator]
                queue.append(b)
    return dist


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


# --- 3. simulation ----------------------------------------------------------------------


@dataclasses.dataclass
class SimResult:
    peers: int
    links: int
    rounds: int
    messages: int
    bytes: int
    reached: int
    within_limit: int  # nodes at most max_propagation hops from the source
    max_hops: int

    @property
    def coverage(self) -> float:
        return self.reached / self.peers

    @property
    def duplicates(self) -> int:
        return self.messages - (self.reached - 1)


def sync_frame_bytes(unit: dict[str, Any], sender: str) -> int:
    """Bytes on the wire of a knowledge_sync frame carrying ``unit`` (NDJSON line)."""
    env = codec.EnvelopeFactory(sender, clock=lambda: NOW).make(
        codec.KNOWLEDGE_SYNC, {"sync_epoch": NOW, "units": [unit]})
    return len(codec.encode(env))


def simulate_model(n: int, edges: list[tuple[int, int]], source: int, max_prop: int,
                   frame_bytes: int, rnd: random.Random) -> SimResult:
    """
    The push-round rule of gossip.py, one round per network hop:

    * a node pushes a unit to every neighbour that has not had that unit from
      it and did not send it to it, except the unit's originator;
    * a receiver stores the unit with ``propagation_count + 1`` if it is new
      (a copy of a unit already held is a duplicate: stored, not forwarded)
      and pushes it on while the stored count is below ``max_propagation``.

    Messages of one round are delivered in random order, as the engine's
    would arrive; a node that accepts a unit pushes at once, so it may still
    send to a neighbour whose copy is already on its way to it.
    """
    adj = adjacency(n, edges)
    hops: dict[int, int] = {source: 0}
    had: list[set[int]] = [set() for _ in range(n)]  # peers a node sent to / got it from
    queue: list[tuple[int, int, int]] = []  # (from, to, propagation_count as sent)

    def push(node: int) -> None:
        if hops[node] >= max_prop:
            return
        for peer in adj[node]:
            if peer not in had[node] and peer != source:
                had[node].add(peer)
                queue.append((node, peer, hops[node]))

    push(source)
    rounds = messages = 0
    max_hops = 0
    while queue:
        current, queue = queue, []
        rnd.shuffle(current)
        rounds += 1
        for frm, to, count in current:
            messages += 1
            had[to].add(frm)
            if to in hops:
                continue
            hops[to] = count + 1
            max_hops = max(max_hops, count + 1)
            push(to)
    within = sum(1 for d in distances(n, edges, source) if d is not None and d <= max_prop)
    return SimResult(n, len(edges), rounds, messages, messages * frame_bytes, len(hops),
                     within, max_hops)


@implementer(IMesh)
class BusMesh:
    """One node's IMesh on an in-memory bus: frames wait for the next round."""

    def __init__(self, bus: Bus, identity: str) -> None:
        self.bus = bus
        self.identity = identity
        self.peers: list[str] = []
        self.handlers: dict[str, list[Any]] = {}
        self.envelopes = codec.EnvelopeFactory(identity, clock=lambda: NOW)

    def send(self, peer_id: str, msg_type: str, payload: Any) -> bool:
        if peer_id not in self.peers:
            return False
        env = self.envelopes.make(msg_type, payload)
        self.bus.queue.append((self.identity, peer_id, env))
        if msg_type == codec.KNOWLEDGE_SYNC:
            self.bus.messages += 1
            self.bus.bytes += len(codec.encode(env))
        return True

    def connected_peers(self) -> list[str]:
        return sorted(self.peers)

    def add_handler(self, msg_type: str, handler: Any) -> None:
        self.handlers.setdefault(msg_type, []).append(handler)

    def add_link_observer(self, on_up: Any, on_down: Any) -> None:
        pass  # links are up from the start and stay up

    def peer_mode(self, peer_id: str) -> str | None:
        return "mutual" if peer_id in self.peers else None


class Bus:
    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.meshes: dict[str, BusMesh] = {}
        self.queue: list[tuple[str, str, codec.Envelope]] = []
        self.messages = 0
        self.bytes = 0

    def run(self, max_rounds: int = 100) -> int:
        rounds = 0
        while self.queue and rounds < max_rounds:
            current, self.queue = self.queue, []
            self.rnd.shuffle(current)
            rounds += 1
            for frm, to, env in current:
                for handler in self.meshes[to].handlers.get(env.msg_type, []):
                    handler(frm, env)
        return rounds


def simulate_engine(n: int, edges: list[tuple[int, int]], source: int, base: Path,
                    rnd: random.Random) -> SimResult:
    """The same experiment with one real Gossip engine (and home) per node."""
    bus = Bus(rnd)
    ids = [f"sim{i:04d}" for i in range(n)]
    config = Config()
    engines: list[Gossip] = []
    for i, ident in enumerate(ids):
        mesh = BusMesh(bus, ident)
        bus.meshes[ident] = mesh
        home = Home(base / f"n{i:04d}")
        engine = Gossip(home, config, mesh, ident, lambda: NOW)
        engine.register()
        engines.append(engine)
    for a, b in edges:
        bus.meshes[ids[a]].peers.append(ids[b])
        bus.meshes[ids[b]].peers.append(ids[a])
    uid = "ku_sim_1"
    add_units(engines[source].home, ids[source],
              [unit_json(uid, ids[source], "cargo test --sim", NOW)], NOW)
    engines[source].push_all()
    rounds = bus.run()
    reached = 0
    max_hops = 0
    for e in engines:
        units = {u.id: u for u in read_units_file(hive_file(e.home, KNOWLEDGE)).store.units()}
        if uid in units:
            reached += 1
            max_hops = max(max_hops, units[uid].propagation_count)
    within = sum(1 for d in distances(n, edges, source)
                 if d is not None and d <= MAX_PROPAGATION)
    return SimResult(n, len(edges), rounds, bus.messages, bus.bytes, reached, within, max_hops)


def engine_base_dir(tmp: Path) -> Path:
    """tmpfs when there is one: the simulation counts frames, it does not time disks."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="bench-gossip-sim-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="sim-", dir=tmp))


@dataclasses.dataclass
class HopCost:
    ms: float
    fsyncs: int
    profile: str


@contextlib.contextmanager
def counting_fsyncs() -> Iterator[list[int]]:
    """Count os.fsync calls in this process (the real fsync still runs)."""
    real = os.fsync
    count = [0]

    def fsync(fd: Any) -> None:
        count[0] += 1
        real(fd)

    os.fsync = fsync  # type: ignore[assignment]
    try:
        yield count
    finally:
        os.fsync = real  # type: ignore[assignment]


def hop_cost(base: Path, runs: int, profile: bool) -> HopCost:
    """
    One hop inside the engine, on ``base``'s file system: a node with 5 peers
    receives one new unit from one of them, merges it and forwards it to the
    other 4 (best of ``runs``; fresh unit each time).
    """
    bus = Bus(random.Random(1))
    mesh = BusMesh(bus, "hop-node")
    mesh.peers = [f"hop-peer{i}" for i in range(5)]
    engine = Gossip(Home(base / "hop"), Config(), mesh, "hop-node", lambda: NOW)
    engine.register()
    times: list[float] = []
    fsyncs = 0
    prof = cProfile.Profile() if profile else None
    for i in range(runs + 1):  # the first one warms caches and creates files
        raw = unit_json(f"ku_hop_{i}", "hop-origin", f"make target{i}", NOW)
        raw["propagation_count"] = 1
        with counting_fsyncs() as count:
            if prof is not None and i:
                prof.enable()
            t0 = time.perf_counter()
            engine.receive("hop-peer0", [raw])
            elapsed = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
        bus.queue.clear()
        if i:
            times.append(elapsed)
            fsyncs = count[0]
    text = ""
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(18)
        text = out.getvalue()
    return HopCost(min(times) * 1000, fsyncs, text)


# --- child processes -------------------------------------------------------------------


class Child:
    """One ``claudectl relay serve`` process; its output lines carry arrival times."""

    def __init__(self, name: str, home: Home, argv: list[str]) -> None:
        self.name = name
        self.home = home
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home.root),
            "CLAUDECTL_HOME": str(home.root),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(ROOT),
        }
        self.proc = subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=str(home.root), text=True,
            start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            stamp = time.monotonic()
            with self._lock:
                self.lines.append((stamp, text.rstrip("\n")))

    def find(self, pattern: str, start: int = 0) -> tuple[float, re.Match[str]] | None:
        rx = re.compile(pattern)
        with self._lock:
            lines = self.lines[start:]
        for stamp, text in lines:
            m = rx.search(text)
            if m:
                return stamp, m
        return None

    def count(self, pattern: str, start: int = 0) -> int:
        rx = re.compile(pattern)
        with self._lock:
            return sum(1 for _, text in self.lines[start:] if rx.search(text))

    def mark(self) -> int:
        with self._lock:
            return len(self.lines)

    def tail(self, n: int = 15) -> str:
        with self._lock:
            return "\n".join(t for _, t in self.lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 5 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(2)


class Fleet:
    """Every child we started; ``stop_all`` runs on every way out."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def serve(self, name: str, home: Home) -> Child:
        child = Child(name, home, [
            "-m", "claudectl", "--home", str(home.root), "relay", "serve",
            "--listen", "tcp:0:interface=127.0.0.1", "--no-discovery"])
        self.children.append(child)
        return child

    def stop(self, children: list[Child]) -> None:
        for c in children:  # signal all first, then wait: faster than one by one
            if c.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        for c in children:
            c.stop()
            if c in self.children:
                self.children.remove(c)

    def stop_all(self) -> None:
        self.stop(list(self.children))


class Timeout(Exception):
    pass


async def until(reactor: Any, cond: Callable[[], Any], timeout: float, what: str,
                step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:.0f} s waiting for {what}")
        await task.deferLater(reactor, step, lambda: None)


async def wait_ready(reactor: Any, children: list[Child], timeout: float) -> dict[str, int]:
    """Wait for every child's "listening on" and "ready" lines; return the ports."""
    def ready() -> bool:
        for c in children:
            if not c.alive():
                raise RuntimeError(f"{c.name} exited:\n{c.tail()}")
        return all(c.find(r"relay .* ready") for c in children)

    await until(reactor, ready, timeout, "the services to start", step=0.05)
    ports = {}
    for c in children:
        found = c.find(r"listening on .*:(\d+)\s*$")
        assert found is not None, c.tail()
        ports[c.name] = int(found[1].group(1))
    return ports


def new_home(tmp: Path, name: str) -> tuple[Home, str]:
    home = Home(tmp / name)
    home.root.mkdir(parents=True)
    ident = KeyStore(home).ensure_identity(environ={"HOSTNAME": name})
    return home, ident


def pair(a: Home, a_id: str, b: Home, b_id: str, rnd: random.Random) -> None:
    psk = rnd.randbytes(32)
    KeyStore(a).save_key(b_id, psk)
    KeyStore(b).save_key(a_id, psk)


async def connect(reactor: Any, home: Home, port: int, peer: str) -> None:
    """``relay connect 127.0.0.1:PORT --peer ID`` through the control socket (2 tries)."""
    for attempt in (1, 2):
        try:
            await call_control(reactor, home, C.Connect, address=f"127.0.0.1:{port}", peer=peer)
            return
        except Exception:
            if attempt == 2:
                raise
            await task.deferLater(reactor, 0.5, lambda: None)


async def peers_of(reactor: Any, home: Home) -> list[dict[str, Any]]:
    reply = await call_control(reactor, home, C.Peers)
    return json.loads(reply["peers_json"])


class FileWatch:
    """Cheap repeated checks of one knowledge.jsonl (stat first, read on change)."""

    def __init__(self, home: Home) -> None:
        self.path = hive_file(home, KNOWLEDGE)
        self._sig: tuple[int, int, int] | None = None
        self.data = b""

    def refresh(self) -> bytes:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.data
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig != self._sig:
            self._sig = sig
            with contextlib.suppress(FileNotFoundError):
                self.data = self.path.read_bytes()
        return self.data


# --- 1. convergence ----------------------------------------------------------------------


@dataclasses.dataclass
class Convergence:
    from_write: list[float]
    from_send: list[float]
    first_peer: list[float]
    hops_ok: bool
    eccentricity: int
    links: int
    degrees: tuple[int, int, float]
    frames_per_run: float
    bytes_per_run: float
    setup_secs: float


async def bench_convergence(reactor: Any, tmp: Path, fleet: Fleet, runs: int,
                            rnd: random.Random) -> Convergence:
    t_setup = time.monotonic()
    homes: list[Home] = []
    ids: list[str] = []
    for i in range(MESH_NODES):
        home, ident = new_home(tmp, f"node{i:02d}")
        homes.append(home)
        ids.append(ident)
    edges = random_mesh(MESH_NODES, DIALS_PER_NODE, MAX_PEERS, rnd)
    for a, b in edges:
        pair(homes[a], ids[a], homes[b], ids[b], rnd)
    children = [fleet.serve(f"node{i:02d}", h) for i, h in enumerate(homes)]
    ports = await wait_ready(reactor, children, 90)
    await defer.gatherResults([
        defer.ensureDeferred(connect(reactor, homes[a], ports[f"node{b:02d}"], ids[b]))
        for a, b in edges], consumeErrors=True)
    degree = [len(x) for x in adjacency(MESH_NODES, edges)]

    async def all_links_up() -> bool:
        for i, home in enumerate(homes):
            rows = await peers_of(reactor, home)
            if sum(1 for r in rows if r["state"] == "connected") != degree[i]:
                return False
        return True

    deadline = time.monotonic() + 30
    while not await all_links_up():
        if time.monotonic() > deadline:
            raise Timeout("links did not all come up")
        await task.deferLater(reactor, 0.2, lambda: None)
    setup = time.monotonic() - t_setup

    watches = [FileWatch(h) for h in homes]
    from_write: list[float] = []
    from_send: list[float] = []
    first_peer: list[float] = []
    hops_ok = True
    ecc = 0
    frames = 0
    bytes_before = await total_bytes(reactor, homes)
    for run in range(runs + 1):  # run 0 warms up every node's code paths
        src = rnd.randrange(MESH_NODES)
        dist = distances(MESH_NODES, edges, src)
        uid = f"ku_bench_{run}_{rnd.getrandbits(32):08x}"
        needle = f'"{uid}"'.encode()
        marks = [c.mark() for c in children]
        now = int(time.time())
        add_units(homes[src], ids[src], [unit_json(uid, ids[src], f"bench cmd {uid}", now)], now)
        t_write = time.monotonic()
        seen: dict[int, float] = {}
        deadline = t_write + 15
        while len(seen) < MESH_NODES - 1:
            for i, w in enumerate(watches):
                if i != src and i not in seen and needle in w.refresh():
                    seen[i] = time.monotonic()
            if time.monotonic() > deadline:
                missing = [ids[i] for i in range(MESH_NODES) if i != src and i not in seen]
                raise Timeout(f"unit {uid} never reached {missing}")
            await task.deferLater(reactor, POLL_STEP, lambda: None)
        t_all = max(seen.values())
        sent = children[src].find(r"sent \d+ knowledge unit", marks[src])
        if sent is None:  # the reader thread may lag a little behind the files
            await until(reactor, lambda: children[src].find(r"sent \d+ knowledge unit",
                                                              marks[src]), 2, "the sent line")
            sent = children[src].find(r"sent \d+ knowledge unit", marks[src])
        assert sent is not None
        for i in range(MESH_NODES):
            if i == src:
                continue
            u = {x.id: x for x in read_units_file(watches[i].path).store.units()}[uid]
            hops_ok = hops_ok and u.propagation_count == dist[i]
        if run == 0:
            bytes_before = await total_bytes(reactor, homes)
            continue
        ecc = max(ecc, max(d for d in dist if d is not None))
        from_write.append(t_all - t_write)
        from_send.append(t_all - sent[0])
        first_peer.append(min(seen.values()) - sent[0])
        await task.deferLater(reactor, 0.3, lambda: None)  # let the last pushes finish
        frames += sum(c.count(r"sent \d+ knowledge unit", m) for c, m in zip(children, marks))
        await task.deferLater(reactor, rnd.uniform(0.0, 0.5), lambda: None)
    bytes_after = await total_bytes(reactor, homes)
    fleet.stop(children)
    return Convergence(from_write, from_send, first_peer, hops_ok, ecc, len(edges),
                       (min(degree), max(degree), sum(degree) / len(degree)),
                       frames / runs, (bytes_after - bytes_before) / runs, setup)


async def total_bytes(reactor: Any, homes: list[Home]) -> int:
    total = 0
    for home in homes:
        total += sum(r.get("bytes_up", 0) for r in await peers_of(reactor, home))
    return total


# --- 2. snapshot ---------------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    seconds: list[float]
    auth_secs: list[float]
    bytes_down: int
    units_frames: str
    default_config_kept: int | None


async def bench_snapshot(reactor: Any, tmp: Path, fleet: Fleet, runs: int,
                         rnd: random.Random, with_defaults: bool) -> Snapshot:
    xhome, xid = new_home(tmp, "snapx")
    now = int(time.time())
    add_units(xhome, xid, [unit_json(f"ku_snap_{i}", xid, f"snapshot command {i}", now)
                           for i in range(SNAPSHOT_UNITS)], now)
    x = fleet.serve("snapx", xhome)
    ports = await wait_ready(reactor, [x], 60)
    seconds: list[float] = []
    auth: list[float] = []
    bytes_down = 0
    frames = ""
    kept_with_defaults: int | None = None
    for run in range(runs + (1 if with_defaults else 0)):
        defaults = run == runs
        yhome, yid = new_home(tmp, f"snapy{run}")
        pair(xhome, xid, yhome, yid, rnd)
        if not defaults:
            # A 5,000-unit store needs room: the defaults keep 500 peer units
            # (max_units) and accept 1,000 units per peer per day.
            cfg = yhome.root / ".config" / "claudectl" / "config.toml"
            cfg.parent.mkdir(parents=True)
            cfg.write_text("[hive]\nmax_units = 0\nmax_units_per_peer_per_day = 1000000\n")
        y = fleet.serve(f"snapy{run}", yhome)
        await wait_ready(reactor, [y], 60)
        watch = FileWatch(yhome)
        mark = x.mark()
        t0 = time.monotonic()
        await connect(reactor, yhome, ports["snapx"], xid)
        t_auth = time.monotonic()
        if defaults:
            # Wait for both transfers to be answered, then count what was kept.
            await until(reactor, lambda: x.find(r"answered a knowledge request", mark), 20,
                        "the snapshot answer")
            await task.deferLater(reactor, 2.0, lambda: None)
            kept_with_defaults = watch.refresh().count(b"\n")
        else:
            await until(reactor, lambda: watch.refresh().count(b"\n") >= SNAPSHOT_UNITS, 30,
                        "5,000 units on the new node", step=POLL_STEP)
            seconds.append(time.monotonic() - t0)
            auth.append(t_auth - t0)
            await task.deferLater(reactor, 1.0, lambda: None)  # let duplicates settle
            rows = await peers_of(reactor, yhome)
            bytes_down = max(bytes_down, sum(r.get("bytes_down", 0) for r in rows))
            pushes = [int(m.group(1)) for m in (
                re.search(r"sent (\d+) knowledge unit", t) for _, t in x.lines[mark:]) if m]
            answers = [m.group(1, 2) for m in (
                re.search(r"answered .*: (\d+) unit\(s\) in (\d+) page", t)
                for _, t in x.lines[mark:]) if m]
            frames = (f"pushed {sum(pushes)} unit(s) as knowledge_sync, then answered the "
                      f"request with " + ", ".join(f"{u} unit(s) in {p} page(s)"
                                                   for u, p in answers))
        fleet.stop([y])
    fleet.stop([x])
    return Snapshot(seconds, auth, bytes_down, frames, kept_with_defaults)


# --- reporting -------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import twisted

    return (f"{os.cpu_count()} CPU(s) (nproc), {cpu}, Python {platform.python_version()}, "
            f"Twisted {twisted.__version__}, {platform.system()} {platform.machine()}")


def verdict(value: float, target: float) -> str:
    return "pass" if value <= target else "**FAIL**"


def render(conv: Convergence, snap: Snapshot, sims: list[tuple[str, SimResult, SimResult | None]],
           hop_disk: HopCost, hop_tmpfs: HopCost | None, runs: int) -> list[str]:
    out = ["| measurement | p50 | p90 | target | result |", "|---|---:|---:|---:|---|"]
    w50, w90 = percentile(conv.from_write, 50), percentile(conv.from_write, 90)
    s50, s90 = percentile(conv.from_send, 50), percentile(conv.from_send, 90)
    f50, f90 = percentile(conv.first_peer, 50), percentile(conv.first_peer, 90)
    out.append(f"| convergence, 16 processes, from the write into knowledge.jsonl "
               f"({runs} runs) | {ms(w50)} | {ms(w90)} | <= 250 ms | "
               f"{verdict(w50, TARGET_CONVERGENCE_P50)} |")
    out.append(f"| convergence, from the source service's first send | {ms(s50)} | {ms(s90)} "
               f"| <= 250 ms | {verdict(s50, TARGET_CONVERGENCE_P50)} |")
    out.append(f"| first neighbour has it, from the first send | {ms(f50)} | {ms(f90)} | | |")
    sn50 = percentile(snap.seconds, 50)
    out.append(f"| snapshot of 5,000 units to a new peer, connect -> stored "
               f"({len(snap.seconds)} run(s)) | {ms(sn50)} | {ms(max(snap.seconds))} "
               f"| <= 1000 ms | {verdict(sn50, TARGET_SNAPSHOT)} |")
    out.append(f"| of which connect + authenticate | {ms(percentile(snap.auth_secs, 50))} | "
               f"{ms(max(snap.auth_secs))} | | |")
    tm = f"{hop_tmpfs.ms:.1f} ms on tmpfs" if hop_tmpfs else "no tmpfs"
    out.append(f"| one hop in the engine (merge 1 unit, forward to 4 peers) | "
               f"{hop_disk.ms:.1f} ms | | | {hop_disk.fsyncs} fsyncs; {tm} |")
    out += ["", "| simulated peers (links) | rounds | sync frames | bytes | reached | "
                "within 5 hops | max hops | engine check |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, model, engine in sims:
        check = "" if engine is None else (
            f"{engine.rounds} rounds, {engine.messages} frames, {engine.bytes:,} B, "
            f"{engine.reached} reached")
        out.append(f"| {label} ({model.links}) | {model.rounds} | {model.messages:,} | "
                   f"{model.bytes:,} | {model.reached} ({model.coverage:.1%}) | "
                   f"{model.within_limit} | {model.max_hops} | {check} |")
    return out


def write_section(table: list[str], notes: list[str], machine: str, date: str,
                  quick: bool) -> Path:
    path = ROOT / "docs" / "performance.md"
    section = "\n".join([
        "## Gossip", "",
        f"`python scripts/bench_gossip.py{' --quick' if quick else ''}` on {date}; {machine}.",
        "", *table, "", *notes, ""])
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# Performance\n\nBenchmarks of claudectl's relay and hive, run by the scripts in "
        f"`scripts/`. Machine of the first run: {machine}; {date}. Each section says how "
        "and when its numbers were taken.\n")
    pattern = re.compile(r"^## Gossip\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def notes_for(conv: Convergence, snap: Snapshot, hop_disk: HopCost,
              hop_tmpfs: HopCost | None) -> list[str]:
    lo, hi, avg = conv.degrees
    hops = "matched" if conv.hops_ok else "did NOT match"
    notes = [
        f"* Mesh: {MESH_NODES} `relay serve` processes, {conv.links} links "
        f"(each node dialed up to {DIALS_PER_NODE}; {lo}-{hi} links per node, "
        f"{avg:.1f} on average; max_peers {MAX_PEERS}); farthest node "
        f"{conv.eccentricity} hops from a source. Every node's `propagation_count` "
        f"{hops} its hop distance. Set-up (start + link) took {conv.setup_secs:.1f} s.",
        f"* Per run: {conv.frames_per_run:.1f} knowledge_sync frames and "
        f"{conv.bytes_per_run:,.0f} bytes on all links (heartbeats included).",
        f"* \"From the write\" includes the service's {gossip_mod.POLL_SECS:g} s poll of "
        "knowledge.jsonl (on average half a period): units written by another process "
        "(distillation, `hive import`) wait for it. \"From the first send\" is the time "
        "from the source's first \"sent ... knowledge unit(s)\" log line to the last "
        "node's store write.",
        f"* One hop costs {hop_disk.ms:.0f} ms here, mostly fsync: {hop_disk.fsyncs} "
        "fsyncs per received unit (trust.json twice, knowledge.jsonl, the merge log, "
        "sync_state.json once per forwarded peer, each an atomic write with a "
        "file and a directory fsync)"
        + (f"; the same hop takes {hop_tmpfs.ms:.1f} ms on tmpfs." if hop_tmpfs else "."),
        "* Snapshot: the new node runs with `[hive] max_units = 0` and "
        "`max_units_per_peer_per_day = 1000000`. On the link coming up the old node "
        f"{snap.units_frames}: every unit crosses twice. "
        f"{snap.bytes_down:,} bytes reached the new node.",
    ]
    if snap.default_config_kept is not None:
        notes.append(
            f"* With the default `[hive]` settings the new node keeps "
            f"{snap.default_config_kept:,} of the 5,000 units: `max_units` (500) caps "
            "peer units and `max_units_per_peer_per_day` (1,000) drops the rest.")
    notes.append(
        "* Simulation: a round model of the push rule (a node pushes a unit to every "
        "neighbour that has not had it from it, except its originator; a receiver keeps "
        "new units with `propagation_count + 1` and pushes on while it is below "
        f"`max_propagation` = {MAX_PROPAGATION}; copies of a unit already held are not "
        "pushed on). Each node dials up to 3 random others (2 for the sparse row), at "
        "most 8 links. \"Engine check\" runs the real `Gossip` engine, one home per "
        "node, on an in-memory mesh for the same graph. Bytes are whole NDJSON frames of "
        "one unit. max_propagation bounds reach: nodes more than 5 hops from the source "
        "never get the unit.")
    return notes


# --- main --------------------------------------------------------------------------------


async def run_all(reactor: Any, args: argparse.Namespace, tmp: Path, fleet: Fleet) -> int:
    rnd = random.Random(args.seed)
    quick = args.quick
    conv_runs = 5 if quick else 10
    snap_runs = 1 if quick else 3
    t0 = time.monotonic()

    print("simulation ...", flush=True)
    sim_base = engine_base_dir(tmp)
    try:
        sims = []
        frame = sync_frame_bytes(unit_json("ku_sim_1", "sim0000", "cargo test --sim", NOW),
                                 "sim0000")
        sizes = [(10, 3, True), (100, 3, True), (1000, 3, not quick), (1000, 2, False)]
        for n, dials, with_engine in sizes:
            edges = random_mesh(n, dials, MAX_PEERS, rnd)
            src = rnd.randrange(n)
            model = simulate_model(n, edges, src, MAX_PROPAGATION, frame, rnd)
            engine = None
            if with_engine:
                engine = simulate_engine(n, edges, src, sim_base / f"g{n}-{dials}", rnd)
            label = f"{n:,}" + (" sparse" if dials == 2 else "")
            sims.append((label, model, engine))
        hop_tmpfs = hop_cost(sim_base, 3, False) if str(sim_base).startswith("/dev/shm") \
            else None
    finally:
        shutil.rmtree(sim_base, ignore_errors=True)
    hop_disk = hop_cost(tmp, 3 if quick else 5, args.profile)
    print(f"  done in {time.monotonic() - t0:.1f} s", flush=True)

    print(f"convergence: starting {MESH_NODES} services ...", flush=True)
    conv = await bench_convergence(reactor, tmp, fleet, conv_runs, rnd)
    print(f"  done in {time.monotonic() - t0:.1f} s", flush=True)

    print("snapshot ...", flush=True)
    snap = await bench_snapshot(reactor, tmp, fleet, snap_runs, rnd, with_defaults=not quick)
    print(f"  done in {time.monotonic() - t0:.1f} s", flush=True)

    machine = machine_line()
    date = datetime.date.today().isoformat()
    table = render(conv, snap, sims, hop_disk, hop_tmpfs, conv_runs)
    notes = notes_for(conv, snap, hop_disk, hop_tmpfs)
    print(f"\nGossip benchmark -- {machine}, {date}")
    print("\n".join(table))
    print()
    print("\n".join(notes))
    print("\nconvergence from the write (ms):", [round(x * 1000) for x in conv.from_write])
    print("convergence from the send  (ms):", [round(x * 1000) for x in conv.from_send])
    if args.profile and hop_disk.profile:
        print("\nprofile of one engine hop (on disk):\n" + hop_disk.profile)
    if not args.no_write:
        print(f"updated {write_section(table, notes, machine, date, quick)}")
    print(f"total {time.monotonic() - t0:.1f} s")
    ok = (percentile(conv.from_write, 50) <= TARGET_CONVERGENCE_P50
          and percentile(snap.seconds, 50) <= TARGET_SNAPSHOT)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--quick", action="store_true",
                    help="fewer runs, smaller simulation checks (about a minute)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    ap.add_argument("--seed", type=int, default=6, help="random seed (graphs, sources, keys)")
    ap.add_argument("--profile", action="store_true",
                    help="print a cProfile of one engine hop on disk")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-gossip-"))
    fleet = Fleet()

    def cleanup() -> None:
        fleet.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    status = [1]

    async def body(reactor: Any) -> None:
        reactor.addSystemEventTrigger("before", "shutdown", fleet.stop_all)
        try:
            status[0] = await run_all(reactor, args, tmp, fleet)
        except Timeout as e:
            print(f"benchmark failed: {e}", file=sys.stderr)
            for c in fleet.children:
                if c.alive():
                    continue
                print(f"--- {c.name} exited early:\n{c.tail()}", file=sys.stderr)
            status[0] = 2
        finally:
            fleet.stop_all()

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 2
    finally:
        cleanup()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
