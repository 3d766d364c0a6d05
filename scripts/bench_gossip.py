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
   the service noticing the change: inotify through ``claudectl.changes``,
   ``gossip.POLL_SECS`` only without it) and from the moment the
   first node's service sent it (its "sent ... knowledge unit(s)" log line).
   Frames, duplicate copies, bytes and resolution log lines are counted.
2. Snapshot: a node holding 5,000 distinct units; a fresh node connects; we
   time until the new node's store holds all 5,000, then watch the pair past
   the engine's fallback push and count from the services' log lines what
   crossed: the answer's units and pages, knowledge_sync pushes, the batches
   the new node merged and the duplicates among them.  The same exchange
   also runs between two in-process engines (no sockets) to time the
   engines alone.
3. Simulation of the push-round rule on 10, 100 and 1,000 peers (random
   graphs of degree ~4-8, ``max_propagation`` 5): rounds, messages, bytes
   and coverage, pushing at once and coalesced per round.  The round model
   is cross-checked against the real :class:`claudectl.hive.gossip.Gossip`
   engine on in-memory meshes.

It also times one hop inside the engine (receive a unit, merge it, forward
it to 4 peers; then a copy by a longer path) on the benchmark's disk and
counts the fsyncs and file writes it costs.

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
import math
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
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, endpoints, task  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402
from zope.interface import implementer  # noqa: E402

from claudectl.config import Config, HiveConfig  # noqa: E402
from claudectl.control import commands as C  # noqa: E402
from claudectl.control.client import call_control  # noqa: E402
from claudectl.hive import gossip as gossip_mod  # noqa: E402
from claudectl.hive.gossip import Gossip  # noqa: E402
from claudectl.hive.store import (  # noqa: E402
    KNOWLEDGE,
    RESOLUTIONS,
    hive_file,
    read_units_file,
    store_transaction,
)
from claudectl.hive.units import KnowledgeUnit, paginate  # noqa: E402
from claudectl.home import Home  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.interfaces import IMesh  # noqa: E402
from claudectl.relay.keystore import KeyStore  # noqa: E402

MESH_NODES = 16
DIALS_PER_NODE = 3
MAX_PEERS = 8  # the [relay] max_peers default
MAX_PROPAGATION = HiveConfig().max_propagation
SNAPSHOT_UNITS = 5_000
#: Units every node holds in the second convergence phase and in the loaded engine hop:
#: most of the default max_units (500); they stay local (hop limit reached).
FILL_UNITS = 400
SIM_SOURCES = 20  # extra random sources per simulated graph (coverage spread)
POLL_STEP = 0.005  # how often the benchmark looks at the other nodes' files
SENT_RX = r"sent \d+ knowledge unit"  # Gossip._push's log line
TARGET_CONVERGENCE_P50 = 0.250
TARGET_SNAPSHOT = 1.0
NOW = 1_800_000_000  # the fixed clock of the in-process simulations


# --- units and graphs ----------------------------------------------------------------


def unit_json(uid: str, source: str, command: str, now: int) -> dict[str, Any]:
    """A shareable local pattern unit (enough evidence to leave the machine)."""
    return {
        "id": uid,
        "scope": {"type": "universal"},
        "category": "best_practice",
        "content": {
            "type": "pattern",
            "tool": "Bash",
            "command_pattern": command,
            "preferred_action": "approve",
            "accept_rate": 0.9,
            "sample_count": 12,
            "conditions": [],
        },
        "evidence_count": 12,
        "confidence": 0.9,
        "source_peer": source,
        "originated_at": now,
        "last_validated_at": now,
        "propagation_count": 0,
        "version": 1,
    }


def filler_units(n: int, now: int) -> list[dict[str, Any]]:
    """
    ``n`` peer units at the hop limit: they make a store as big as a busy
    node's, and no node sends them anywhere.
    """
    units = []
    for i in range(n):
        u = unit_json(f"ku_fill_{i}", "hive-filler", f"filler command {i}", now)
        u["propagation_count"] = MAX_PROPAGATION
        units.append(u)
    return units


def add_units(home: Home, local_id: str, units: list[dict[str, Any]], now: int) -> None:
    with store_transaction(home, local_id=local_id, now=now) as store:
        for u in units:
            store.insert(KnowledgeUnit.from_json(u))


def random_mesh(n: int, dials: int, max_degree: int, rnd: random.Random) -> list[tuple[int, int]]:
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
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
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
    stored = KnowledgeUnit.from_json(unit).to_json()  # the unit as the engine sends it
    env = codec.EnvelopeFactory(sender, clock=lambda: NOW).make(
        codec.KNOWLEDGE_SYNC, {"sync_epoch": NOW, "units": [stored]}
    )
    return len(codec.encode(env))


def simulate_model(
    n: int,
    edges: list[tuple[int, int]],
    source: int,
    max_prop: int,
    frame_bytes: int,
    rnd: random.Random,
    coalesce: bool = False,
) -> SimResult:
    """
    The push-round rule of gossip.py, one round per network hop:

    * a node pushes a unit to every neighbour that has not had that unit from
      it and did not send it to it, except the unit's originator;
    * a receiver stores the unit with ``propagation_count + 1`` if it is new
      and pushes it on while the stored count is below ``max_propagation``;
    * a later copy of a unit already held is a duplicate: it is not pushed
      on, but when it came by a shorter path its (smaller) count is kept, so
      the stored count is the smallest count that arrived.

    Messages of one round are delivered in random order, as the engine's
    would arrive.  Without ``coalesce`` a node that accepts a unit pushes at
    once, so it may still send to a neighbour whose copy is already on its
    way to it; with ``coalesce`` it pushes after all of the round's messages
    were delivered (the engine's ``callLater(0)`` push round when every
    copy arrives in the same reactor turn: the best case).
    """
    adj = [sorted(a) for a in adjacency(n, edges)]  # the engine walks its peers sorted
    stored: dict[int, int] = {source: 0}  # the smallest count that reached a node
    had: list[set[int]] = [set() for _ in range(n)]  # peers a node sent to / got it from
    queue: list[tuple[int, int, int]] = []  # (from, to, propagation_count as sent)

    def push(node: int) -> None:
        if stored[node] >= max_prop:
            return
        for peer in adj[node]:
            if peer not in had[node] and peer != source:
                had[node].add(peer)
                queue.append((node, peer, stored[node]))

    push(source)
    rounds = messages = 0
    while queue:
        current, queue = queue, []
        rnd.shuffle(current)
        rounds += 1
        accepted: list[int] = []
        for frm, to, count in current:
            messages += 1
            had[to].add(frm)
            if to in stored:
                stored[to] = min(stored[to], count + 1)
                continue
            stored[to] = count + 1
            if coalesce:
                accepted.append(to)
            else:
                push(to)
        for node in accepted:
            push(node)
    within = sum(1 for d in distances(n, edges, source) if d is not None and d <= max_prop)
    return SimResult(
        n,
        len(edges),
        rounds,
        messages,
        messages * frame_bytes,
        len(stored),
        within,
        max(stored.values()),
    )


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
        size = len(codec.encode(env))
        self.bus.frames[msg_type] += 1
        self.bus.frame_bytes[msg_type] += size
        if msg_type == codec.KNOWLEDGE_SYNC:
            self.bus.messages += 1
            self.bus.bytes += size
        return True

    def flush(self, peer_id: str) -> None:
        pass  # the bus delivers in rounds

    def hold_reading(self, peer_id: str, held: bool) -> None:
        pass  # the bus delivers in rounds: nothing piles up between them

    def connected_peers(self) -> list[str]:
        return sorted(self.peers)

    def add_handler(self, msg_type: str, handler: Any) -> None:
        self.handlers.setdefault(msg_type, []).append(handler)

    def add_payload_reader(self, msg_type: str, reader: Any) -> None:
        pass  # frames arrive here as envelopes: nothing to read

    def add_link_observer(self, on_up: Any, on_down: Any) -> None:
        pass  # links are up from the start and stay up

    def peer_mode(self, peer_id: str) -> str | None:
        return "mutual" if peer_id in self.peers else None


class Bus:
    """
    Rounds of frame delivery.  ``clock`` is the engines' ``callLater``: its
    zero-delay calls (coalesced push rounds, link-up work) run after each
    round's deliveries, as a reactor runs them after the reads of one turn.
    """

    def __init__(self, rnd: random.Random, ordered: bool = False) -> None:
        self.rnd = rnd
        #: Deliver each round's frames in the order sent (as one TCP link
        #: does) instead of shuffled across links.
        self.ordered = ordered
        self.clock = task.Clock()
        self.meshes: dict[str, BusMesh] = {}
        self.queue: list[tuple[str, str, codec.Envelope]] = []
        self.messages = 0  # knowledge_sync frames
        self.bytes = 0
        self.frames: collections.Counter[str] = collections.Counter()
        self.frame_bytes: collections.Counter[str] = collections.Counter()

    def run(self, max_rounds: int = 100) -> int:
        rounds = 0
        self.clock.advance(0)
        while self.queue and rounds < max_rounds:
            current, self.queue = self.queue, []
            if not self.ordered:
                self.rnd.shuffle(current)
            # Acknowledgements are bookkeeping, not a round of gossip.
            if any(env.msg_type != codec.ACK for _, _, env in current):
                rounds += 1
            for frm, to, env in current:
                for handler in self.meshes[to].handlers.get(env.msg_type, []):
                    handler(frm, env)
            self.clock.advance(0)
        return rounds


def simulate_engine(
    n: int,
    edges: list[tuple[int, int]],
    source: int,
    base: Path,
    rnd: random.Random,
    coalesce: bool = False,
) -> SimResult:
    """
    The same experiment with one real Gossip engine (and home) per node;
    with ``coalesce`` the engines get the bus clock's ``callLater``, as in
    the service, so a push round runs after the round's deliveries.
    """
    bus = Bus(rnd)
    ids = [f"sim{i:04d}" for i in range(n)]
    config = Config()
    engines: list[Gossip] = []
    for i, ident in enumerate(ids):
        mesh = BusMesh(bus, ident)
        bus.meshes[ident] = mesh
        home = Home(base / f"n{i:04d}")
        engine = Gossip(
            home, config, mesh, ident, lambda: NOW, bus.clock.callLater if coalesce else None
        )
        engine.register()
        engines.append(engine)
    for a, b in edges:
        bus.meshes[ids[a]].peers.append(ids[b])
        bus.meshes[ids[b]].peers.append(ids[a])
    uid = "ku_sim_1"
    add_units(
        engines[source].home,
        ids[source],
        [unit_json(uid, ids[source], "cargo test --sim", NOW)],
        NOW,
    )
    engines[source].push_all()
    rounds = bus.run()
    reached = 0
    max_hops = 0
    for e in engines:
        units = {u.id: u for u in read_units_file(hive_file(e.home, KNOWLEDGE)).store.units()}
        if uid in units:
            reached += 1
            max_hops = max(max_hops, units[uid].propagation_count)
    within = sum(1 for d in distances(n, edges, source) if d is not None and d <= MAX_PROPAGATION)
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
    writes: int  # files replaced (atomic writes)
    duplicate_ms: float
    duplicate_fsyncs: int
    duplicate_writes: int
    profile: str


@contextlib.contextmanager
def counting_file_ops() -> Iterator[dict[str, int]]:
    """Count os.fsync and os.replace calls in this process (the real calls still run)."""
    real_fsync, real_replace = os.fsync, os.replace
    count = {"fsync": 0, "replace": 0}

    def fsync(fd: Any) -> None:
        count["fsync"] += 1
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        count["replace"] += 1
        real_replace(src, dst, **kw)

    os.fsync = fsync  # type: ignore[assignment]
    os.replace = replace  # type: ignore[assignment]
    try:
        yield count
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
        os.replace = real_replace  # type: ignore[assignment]


def profile_text(prof: cProfile.Profile, lines: int = 20) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def hop_cost(base: Path, runs: int, profile: bool, store_units: int = 0) -> HopCost:
    """
    One hop inside the engine, on ``base``'s file system: a node with 5 peers
    receives one new unit from one of them, merges it and forwards it to the
    other 4 (one push round); then a second copy of it arrives from another
    peer by a longer path (best of ``runs``; a fresh unit each time).

    With ``store_units`` the node's store holds that many more units (the
    FILL_UNITS kind), recorded in sync_state.json as sent to every peer, as
    on a node that has shared its store with its peers.
    """
    bus = Bus(random.Random(1))
    mesh = BusMesh(bus, "hop-node")
    mesh.peers = [f"hop-peer{i}" for i in range(5)]
    home = Home(base / f"hop-{store_units}")
    if store_units:
        fill = filler_units(store_units, NOW)
        add_units(home, "hop-node", fill, NOW)
        state = gossip_mod.SyncState(home)
        for peer in mesh.peers:
            state.peer(peer).sent.update((u["id"], u["version"]) for u in fill)
        state.save()
    engine = Gossip(home, Config(), mesh, "hop-node", lambda: NOW)
    engine.register()
    first: list[tuple[float, int, int]] = []
    copy: list[tuple[float, int, int]] = []
    forwarded: list[int] = []
    prof = cProfile.Profile() if profile else None
    for i in range(runs + 1):  # the first one warms caches and creates files
        raw = unit_json(f"ku_hop_{i}", "hop-origin", f"make target{i}", NOW)
        for sender, hops, into in (("hop-peer0", 1, first), ("hop-peer1", 2, copy)):
            raw["propagation_count"] = hops
            frames = bus.messages
            with counting_file_ops() as count:
                if prof is not None and i:
                    prof.enable()
                t0 = time.perf_counter()
                engine.receive(sender, [raw])
                elapsed = time.perf_counter() - t0
                if prof is not None:
                    prof.disable()
            if into is first:
                forwarded.append(bus.messages - frames)
            bus.queue.clear()
            if i:
                into.append((elapsed * 1000, count["fsync"], count["replace"]))
    if set(forwarded) != {4}:
        raise RuntimeError(f"engine hop: forwarded to {forwarded} peers, expected 4 each time")
    f, c = min(first), min(copy)
    return HopCost(
        f[0], f[1], f[2], c[0], c[1], c[2], profile_text(prof) if prof is not None else ""
    )


@dataclasses.dataclass
class EngineSnapshot:
    seconds: float  # link-up -> Y holds every unit (the engines' work, no sockets)
    frames: dict[str, int]  # frames by message type, including the fallback push
    units_sent: int  # units that crossed in snapshot and sync frames
    profile: str


def snapshot_in_process(base: Path, profile: bool, units: int = SNAPSHOT_UNITS) -> EngineSnapshot:
    """
    The snapshot with two real engines and no sockets: X holds ``units``,
    Y is new; the link comes up on both sides, frames are delivered until
    none are left, then the clock passes the fallback push delay.  Times the
    engines alone (JSON, merge, files).
    """
    # Two engines, one link: frames arrive in the order they were sent
    # (shuffled, a snapshot's last page could overtake the others).
    bus = Bus(random.Random(2), ordered=True)
    roomy = dataclasses.replace(
        Config(),
        hive=dataclasses.replace(HiveConfig(), max_units=0, max_units_per_peer_per_day=1_000_000),
    )
    engines = {}
    for ident in ("snap-x", "snap-y"):
        mesh = BusMesh(bus, ident)
        bus.meshes[ident] = mesh
        engines[ident] = Gossip(
            Home(base / ident), roomy, mesh, ident, lambda: NOW, bus.clock.callLater
        )
        engines[ident].register()
    add_units(
        engines["snap-x"].home,
        "snap-x",
        [unit_json(f"ku_snap_{i}", "snap-x", f"snapshot command {i}", NOW) for i in range(units)],
        NOW,
    )
    bus.meshes["snap-x"].peers.append("snap-y")
    bus.meshes["snap-y"].peers.append("snap-x")
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    t0 = time.perf_counter()
    engines["snap-y"].on_link_up("snap-x")
    engines["snap-x"].on_link_up("snap-y")
    bus.run()
    elapsed = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    bus.clock.advance(gossip_mod.LINKUP_PUSH_DELAY_SECS + 0.1)  # the fallback push rounds
    bus.run()
    held = len(read_units_file(hive_file(engines["snap-y"].home, KNOWLEDGE)).store)
    if held != units:
        raise RuntimeError(f"in-process snapshot: Y holds {held} of {units} units")
    units_sent = engines["snap-x"].state.peer("snap-y").units_up
    for e in engines.values():
        e.stop()
    return EngineSnapshot(
        elapsed, dict(bus.frames), units_sent, profile_text(prof, 25) if prof is not None else ""
    )


# --- child processes -------------------------------------------------------------------


class Child:
    """One ``claudectl relay serve`` process; its output lines carry arrival times."""

    def __init__(
        self, name: str, home: Home, argv: list[str], log_path: Path | None = None
    ) -> None:
        self.name = name
        self.home = home
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        #: With a log file (as a daemon's) no thread of ours reads the output
        #: while the service is timed; its lines are read when asked for.
        self.log_path = log_path
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home.root),
            "CLAUDECTL_HOME": str(home.root),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        out: Any = subprocess.PIPE if log_path is None else open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(home.root),
            text=log_path is None,
            start_new_session=True,
        )
        if log_path is not None:
            out.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        if log_path is None:
            self._reader.start()

    def _from_file(self) -> None:
        if self.log_path is None:
            return
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            with self._lock:
                stamp = time.monotonic()
                self.lines.extend((stamp, t) for t in text[len(self.lines) :])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            stamp = time.monotonic()
            with self._lock:
                self.lines.append((stamp, text.rstrip("\n")))

    def find(self, pattern: str, start: int = 0) -> tuple[float, re.Match[str]] | None:
        self._from_file()
        rx = re.compile(pattern)
        with self._lock:
            lines = self.lines[start:]
        for stamp, text in lines:
            m = rx.search(text)
            if m:
                return stamp, m
        return None

    def matches(self, pattern: str, start: int = 0) -> list[tuple[float, re.Match[str]]]:
        """Every match of ``pattern`` in the lines from ``start`` on, with arrival times."""
        rx = re.compile(pattern)
        with self._lock:
            lines = self.lines[start:]
        return [(t, m) for t, m in ((t, rx.search(text)) for t, text in lines) if m]

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
        if self._reader.is_alive():
            self._reader.join(2)


# The services' log lines the benchmark reads (claudectl/hive/gossip.py):
def batch_rx(peer: str | None) -> str:
    """Gossip.receive's log line for a batch from ``peer`` (None: any): groups 1-6 are its counts."""
    who = r"\S+" if peer is None else re.escape(peer)
    return (
        r"knowledge from " + who + r": (\d+) new, (\d+) updated, "
        r"(\d+) rejected, (\d+) duplicate, (\d+) invalid, (\d+) dropped"
    )


def answer_rx(peer: str) -> str:
    """Gossip.on_request's log line: group 1 = units, group 2 = pages."""
    return (
        r"answered a knowledge request from " + re.escape(peer) + r": (\d+) unit\(s\) in (\d+) page"
    )


def sent_rx(peer: str) -> str:
    """Gossip._push's log line (knowledge_sync frames): group 1 = units."""
    return r"sent (\d+) knowledge unit\(s\) to " + re.escape(peer)


class Fleet:
    """Every child we started; ``stop_all`` runs on every way out."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def serve(self, name: str, home: Home, log_path: Path | None = None) -> Child:
        child = Child(
            name,
            home,
            [
                "-m",
                "claudectl",
                "--home",
                str(home.root),
                "relay",
                "serve",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--no-discovery",
            ],
            log_path,
        )
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


async def until(
    reactor: Any, cond: Callable[[], Any], timeout: float, what: str, step: float = 0.02
) -> Any:
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


def holds(watch: FileWatch, units: int) -> bool:
    return watch.refresh().count(b"\n") >= units


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
class ConvPhase:
    store_units: int  # units each node held besides the test units
    from_write: list[float]
    from_send: list[float]
    first_peer: list[float]
    hops_above: int  # node-runs whose stored propagation_count exceeds the hop distance
    hops_total: int
    copies_per_run: float  # units received again (the services' "duplicate_units" counters)
    resolutions: int  # lines added to resolutions.jsonl on all nodes during the runs
    eccentricity: int
    frames_per_run: float
    bytes_per_run: float
    #: CPU time (user + system) all the mesh's services used per run, in seconds.
    cpu_per_run: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Convergence:
    links: int
    degrees: tuple[int, int, float]
    setup_secs: float
    phases: list[ConvPhase]


@dataclasses.dataclass
class Mesh:
    homes: list[Home]
    ids: list[str]
    edges: list[tuple[int, int]]
    children: list[Child]


async def bench_convergence(
    reactor: Any, tmp: Path, fleet: Fleet, runs: int, rnd: random.Random
) -> Convergence:
    """
    Start the mesh, then time ``runs`` units with empty stores and ``runs``
    more after every store got FILL_UNITS units that stay local.
    """
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
    await defer.gatherResults(
        [
            defer.ensureDeferred(connect(reactor, homes[a], ports[f"node{b:02d}"], ids[b]))
            for a, b in edges
        ],
        consumeErrors=True,
    )
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
    mesh = Mesh(homes, ids, edges, children)
    phases = [await convergence_runs(reactor, mesh, runs, rnd, 0)]
    now = int(time.time())
    for home, ident in zip(homes, ids, strict=True):
        add_units(home, ident, filler_units(FILL_UNITS, now), now)
    await task.deferLater(reactor, 3 * gossip_mod.POLL_SECS + 0.3, lambda: None)  # polls
    phases.append(await convergence_runs(reactor, mesh, runs, rnd, FILL_UNITS))
    fleet.stop(children)
    return Convergence(
        len(edges), (min(degree), max(degree), sum(degree) / len(degree)), setup, phases
    )


async def convergence_runs(
    reactor: Any,
    mesh: Mesh,
    runs: int,
    rnd: random.Random,
    store_units: int,
    pause: float = 0.5,
    timeout: float = 15.0,
) -> ConvPhase:
    homes, ids, edges, children = mesh.homes, mesh.ids, mesh.edges, mesh.children
    nodes = len(homes)
    watches = [FileWatch(h) for h in homes]
    from_write: list[float] = []
    from_send: list[float] = []
    first_peer: list[float] = []
    hops_above = hops_total = 0
    ecc = 0
    bytes_before = await total_bytes(reactor, homes)
    units_before = await total_units_sent(reactor, homes)
    copies_before = await hive_counter(reactor, homes, "duplicate_units")
    resolutions_before = count_lines(homes, RESOLUTIONS)
    cpu_runs: list[float] = []
    for run in range(runs + 1):  # run 0 warms up every node's code paths
        cpu_before = sum(proc_cpu_secs(c.proc.pid) for c in children[:nodes])
        src = rnd.randrange(nodes)
        dist = distances(nodes, edges, src)
        uid = f"ku_bench_{store_units}_{run}_{rnd.getrandbits(32):08x}"
        needle = f'"{uid}"'.encode()
        marks = [c.mark() for c in children]
        now = int(time.time())
        add_units(homes[src], ids[src], [unit_json(uid, ids[src], f"bench cmd {uid}", now)], now)
        t_write = time.monotonic()
        seen: dict[int, float] = {}
        deadline = t_write + timeout
        while len(seen) < nodes - 1:
            for i, w in enumerate(watches):
                if i != src and i not in seen and needle in w.refresh():
                    seen[i] = time.monotonic()
            if time.monotonic() > deadline:
                missing = [ids[i] for i in range(nodes) if i != src and i not in seen]
                raise Timeout(f"unit {uid} never reached {missing}")
            await task.deferLater(reactor, POLL_STEP, lambda: None)
        t_all = max(seen.values())
        # The reader thread may lag a little behind the files.
        sent = await until(
            reactor, partial(children[src].find, SENT_RX, marks[src]), 2, "the source's sent line"
        )
        await task.deferLater(reactor, 0.3, lambda: None)  # let the last copies arrive
        cpu_runs.append(sum(proc_cpu_secs(c.proc.pid) for c in children[:nodes]) - cpu_before)
        if run == 0:
            bytes_before = await total_bytes(reactor, homes)
            units_before = await total_units_sent(reactor, homes)
            copies_before = await hive_counter(reactor, homes, "duplicate_units")
            resolutions_before = count_lines(homes, RESOLUTIONS)
            continue
        for i in range(nodes):
            if i == src:
                continue
            u = {x.id: x for x in read_units_file(watches[i].path).store.units()}[uid]
            hops_total += 1
            hops_above += u.propagation_count > dist[i]  # type: ignore[operator]
        ecc = max(ecc, max(d for d in dist if d is not None))
        from_write.append(t_all - t_write)
        from_send.append(t_all - sent[0])
        first_peer.append(min(seen.values()) - sent[0])
        await task.deferLater(reactor, rnd.uniform(0.0, pause), lambda: None)
    bytes_after = await total_bytes(reactor, homes)
    # Each knowledge_sync frame of a run carries the one unit: frames = units sent.
    frames = await total_units_sent(reactor, homes) - units_before
    copies = await hive_counter(reactor, homes, "duplicate_units") - copies_before
    resolutions = count_lines(homes, RESOLUTIONS) - resolutions_before
    return ConvPhase(
        store_units,
        from_write,
        from_send,
        first_peer,
        hops_above,
        hops_total,
        copies / runs,
        resolutions,
        ecc,
        frames / runs,
        (bytes_after - bytes_before) / runs,
        cpu_runs[1:],
    )


def count_lines(homes: list[Home], name: str) -> int:
    total = 0
    for home in homes:
        with contextlib.suppress(FileNotFoundError):
            total += hive_file(home, name).read_bytes().count(b"\n")
    return total


async def total_bytes(reactor: Any, homes: list[Home]) -> int:
    total = 0
    for home in homes:
        total += sum(r.get("bytes_up", 0) for r in await peers_of(reactor, home))
    return total


async def total_units_sent(reactor: Any, homes: list[Home]) -> int:
    """Units the services sent their peers (``units_up`` of ``relay peers``)."""
    total = 0
    for home in homes:
        total += sum(r.get("units_up", 0) for r in await peers_of(reactor, home))
    return total


async def hive_counter(reactor: Any, homes: list[Home], name: str) -> int:
    """The sum of one gossip counter (``relay status --json``, "hive") over ``homes``."""
    total = 0
    for home in homes:
        reply = await call_control(reactor, home, C.Status)
        total += json.loads(reply["status_json"]).get("hive", {}).get(name, 0)
    return total


# --- 2. snapshot ---------------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    seconds: list[float]  # connect -> all 5,000 stored
    auth_secs: list[float]  # connect -> the Connect call returned (link authenticated)
    quiet_secs: list[float]  # connect -> the new node's last knowledge batch
    baseline_auth: float  # the same Connect to the same node while its store was empty
    batches: list[int]  # "knowledge from X" batches merged on the new node, per run
    bytes_down: int  # frame bytes the new node received from X (largest run)
    pushed_units: int  # units X sent in knowledge_sync frames after link-up (largest run)
    answered_units: int  # units in X's knowledge_snapshot answer
    answered_pages: int
    duplicates: int  # units the new node received again (largest run)
    default_config_kept: int | None


ROOMY_CONFIG = "[hive]\nmax_units = 0\nmax_units_per_peer_per_day = 1000000\n"
#: After a connect, the benchmark watches the pair this long: past the
#: engine's fallback push round, so anything sent twice is seen.
SNAPSHOT_WATCH_SECS = gossip_mod.LINKUP_PUSH_DELAY_SECS + 1.0


async def bench_snapshot(
    reactor: Any, tmp: Path, fleet: Fleet, runs: int, rnd: random.Random, with_defaults: bool
) -> Snapshot:
    """
    X starts empty; a first new node connects to it (the baseline connect
    time), then X gets 5,000 units and each further new node connects in
    turn.  All processes start together to save time.  After each connect
    the pair is watched for SNAPSHOT_WATCH_SECS and what crossed is counted
    from both services' log lines: X's answer (units, pages) and pushes, the
    new node's merged batches (new / duplicate units).
    """
    xhome, xid = new_home(tmp, "snapx")
    names = (
        ["snapy-base"]
        + [f"snapy{r}" for r in range(runs)]
        + (["snapy-defaults"] if with_defaults else [])
    )
    ys: dict[str, tuple[Home, str]] = {}
    for name in names:
        yhome, yid = new_home(tmp, name)
        pair(xhome, xid, yhome, yid, rnd)
        if name != "snapy-defaults":
            # A 5,000-unit store needs room: the defaults keep 500 peer units
            # (max_units) and accept 1,000 units per peer per day.
            cfg = yhome.root / ".config" / "claudectl" / "config.toml"
            cfg.parent.mkdir(parents=True)
            cfg.write_text(ROOMY_CONFIG)
        ys[name] = (yhome, yid)
    x = fleet.serve("snapx", xhome)
    children = {name: fleet.serve(name, ys[name][0]) for name in names}
    ports = await wait_ready(reactor, [x, *children.values()], 90)
    xport = ports["snapx"]

    t0 = time.monotonic()
    await connect(reactor, ys["snapy-base"][0], xport, xid)
    baseline = time.monotonic() - t0
    fleet.stop([children.pop("snapy-base")])
    now = int(time.time())
    add_units(
        xhome,
        xid,
        [
            unit_json(f"ku_snap_{i}", xid, f"snapshot command {i}", now)
            for i in range(SNAPSHOT_UNITS)
        ],
        now,
    )
    await task.deferLater(reactor, 3 * gossip_mod.POLL_SECS + 0.2, lambda: None)  # X's poll

    result = Snapshot([], [], [], baseline, [], 0, 0, 0, 0, 0, None)
    for name, y in children.items():
        yhome, yid = ys[name]
        watch = FileWatch(yhome)
        xmark, ymark = x.mark(), y.mark()
        t0 = time.monotonic()
        await connect(reactor, yhome, xport, xid)
        t_auth = time.monotonic()
        if name != "snapy-defaults":
            await until(
                reactor,
                partial(holds, watch, SNAPSHOT_UNITS),
                30,
                "5,000 units on the new node",
                step=POLL_STEP,
            )
            result.seconds.append(time.monotonic() - t0)
            result.auth_secs.append(t_auth - t0)
        await until(
            reactor,
            partial(x.find, answer_rx(yid), xmark),
            30,
            "the old node's answer to the knowledge request",
        )
        await until(
            reactor,
            partial(y.find, batch_rx(xid), ymark),
            30,
            "a knowledge batch merged on the new node",
        )
        # Watch on past the fallback push round: whatever else crosses is counted.
        rest = t0 + SNAPSHOT_WATCH_SECS - time.monotonic()
        if rest > 0:
            await task.deferLater(reactor, rest, lambda: None)
        batches = y.matches(batch_rx(xid), ymark)
        answers = [m for _, m in x.matches(answer_rx(yid), xmark)]
        pushed = sum(int(m.group(1)) for _, m in x.matches(sent_rx(yid), xmark))
        if name == "snapy-defaults":
            result.default_config_kept = watch.refresh().count(b"\n")
        else:
            result.quiet_secs.append(batches[-1][0] - t0)
            result.batches.append(len(batches))
            rows = await peers_of(reactor, yhome)
            result.bytes_down = max(result.bytes_down, sum(r.get("bytes_down", 0) for r in rows))
            result.pushed_units = max(result.pushed_units, pushed)
            result.answered_units = max(
                result.answered_units, sum(int(m.group(1)) for m in answers)
            )
            result.answered_pages = max(
                result.answered_pages, sum(int(m.group(2)) for m in answers)
            )
            # Batches of copies only are counted by the service, not logged.
            dups = await hive_counter(reactor, [yhome], "duplicate_units")
            result.duplicates = max(result.duplicates, dups)
        fleet.stop([y])
    fleet.stop([x])
    return result


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

    return (
        f"{os.cpu_count()} CPU(s) (nproc), {cpu}, Python {platform.python_version()}, "
        f"Twisted {twisted.__version__}, {platform.system()} {platform.machine()}"
    )


def load_average() -> str:
    with contextlib.suppress(OSError, AttributeError):
        return f"{os.getloadavg()[0]:.1f}"
    return "?"


def verdict(value: float, target: float) -> str:
    return "pass" if value <= target else "**FAIL**"


@dataclasses.dataclass
class Results:
    conv: Convergence
    snap: Snapshot
    sims: list[Sim]
    hop_disk: HopCost
    hop_loaded: HopCost  # on disk, FILL_UNITS units in the store
    hop_tmpfs: HopCost | None
    inproc: EngineSnapshot
    conv_runs: int


def render(r: Results) -> list[str]:
    conv, snap = r.conv, r.snap
    out = ["| measurement | p50 | p90 (max) | target | result |", "|---|---:|---:|---:|---|"]

    def row(name: str, values: list[float], target: float | None = None) -> None:
        p50, p90 = percentile(values, 50), percentile(values, 90)
        tgt = "" if target is None else f"<= {target * 1000:.0f} ms"
        res = "" if target is None else verdict(p50, target)
        out.append(f"| {name} | {ms(p50)} | {ms(p90)} | {tgt} | {res} |")

    for ph in conv.phases:
        stores = "empty stores" if not ph.store_units else f"stores of {ph.store_units} units"
        row(
            f"convergence, {stores}: write into one node's knowledge.jsonl -> on all "
            f"{MESH_NODES} nodes ({r.conv_runs} runs)",
            ph.from_write,
            TARGET_CONVERGENCE_P50,
        )
        row(
            f"convergence, {stores}: source service's first send -> on all nodes",
            ph.from_send,
            TARGET_CONVERGENCE_P50,
        )
        row(f"convergence, {stores}: first send -> on the first neighbour (one hop)", ph.first_peer)
    row(
        f"snapshot: connect -> 5,000 units stored on the new node ({len(snap.seconds)} run(s))",
        snap.seconds,
        TARGET_SNAPSHOT,
    )
    row(
        f"snapshot: connect -> link authenticated (empty store: {ms(snap.baseline_auth)})",
        snap.auth_secs,
    )
    batches = ", ".join(str(b) for b in snap.batches)
    row(
        f"snapshot: connect -> last knowledge batch merged (batches per run: {batches})",
        snap.quiet_secs,
    )
    out.append(
        f"| snapshot, engines alone (in one process, no sockets): link-up -> 5,000 "
        f"units stored | {ms(r.inproc.seconds)} | | | |"
    )
    for label, h, tmpfs in (
        ("empty store", r.hop_disk, r.hop_tmpfs),
        (f"store of {FILL_UNITS} units", r.hop_loaded, None),
    ):
        tm = f"; tmpfs: {tmpfs.ms:.1f} / {tmpfs.duplicate_ms:.1f} ms" if tmpfs else ""
        out.append(
            f"| engine, one hop, {label}: merge 1 new unit + forward to 4 peers / a "
            f"copy by a longer path | {h.ms:.1f} ms / {h.duplicate_ms:.1f} ms | | | "
            f"{h.fsyncs} / {h.duplicate_fsyncs} fsyncs, {h.writes} / "
            f"{h.duplicate_writes} file writes{tm} |"
        )
    out += [
        "",
        "| simulated peers (links) | rounds | sync frames: push at once / coalesced | "
        "bytes (at once) | reached | within 5 hops | max stored hops | real engine, "
        "same graph and source (at once / coalesced) | coverage from "
        f"{SIM_SOURCES} other sources: mean (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for sim in r.sims:
        model, co, cov = sim.model, sim.coalesced, sim.coverages
        check = ""
        if sim.engine is not None and sim.engine_coalesced is not None:
            e, ec = sim.engine, sim.engine_coalesced
            check = (
                f"{e.rounds} / {ec.rounds} rounds, {e.messages:,} / {ec.messages:,} "
                f"frames, {e.bytes:,} / {ec.bytes:,} B, {e.reached:,} / {ec.reached:,} "
                f"reached, max hops {e.max_hops} / {ec.max_hops}"
            )
        out.append(
            f"| {sim.label} ({model.links:,}) | {model.rounds} | {model.messages:,} / "
            f"{co.messages:,} | {model.bytes:,} | {model.reached:,} "
            f"({model.coverage:.1%}) | {model.within_limit:,} | {model.max_hops} | "
            f"{check} | {sum(cov) / len(cov):.1%} ({min(cov):.1%}-{max(cov):.1%}) |"
        )
    return out


def notes_for(r: Results) -> list[str]:
    conv, snap, h, hl = r.conv, r.snap, r.hop_disk, r.hop_loaded
    lo, hi, avg = conv.degrees
    empty, loaded = conv.phases[0], conv.phases[-1]
    ecc = max(ph.eccentricity for ph in conv.phases)

    def per_hop(ph: ConvPhase) -> str:
        return f"{percentile(ph.from_send, 50) * 1000 / max(1, ph.eccentricity):.0f} ms"

    def traffic(ph: ConvPhase) -> str:
        return (
            f"{ph.frames_per_run:.0f} knowledge_sync frames per run (a unit reaches each "
            f"node {ph.frames_per_run / (MESH_NODES - 1):.1f} times; "
            f"{ph.copies_per_run:.0f} copies merged as duplicates), "
            f"{ph.bytes_per_run:,.0f} bytes on all links, {ph.resolutions} lines added to "
            f"resolutions.jsonl, and in {ph.hops_above} of {ph.hops_total} node-runs a "
            "stored `propagation_count` above the node's hop distance"
        )

    notes = [
        f"* Mesh: {MESH_NODES} `relay serve` processes, {conv.links} links (each node "
        f"dialed up to {DIALS_PER_NODE} others; {lo}-{hi} links per node, {avg:.1f} on "
        f"average; max_peers {MAX_PEERS}); no node was more than {ecc} hops from a source. "
        f"Start and link-up took {conv.setup_secs:.1f} s. The same mesh ran {r.conv_runs} "
        f"units with empty stores, then {r.conv_runs} more after each node's store got "
        f"{FILL_UNITS} units that no node sends (peer units at the hop limit), as a busy "
        f"node's store would be (the default `max_units` is 500). The benchmark looks at "
        f"the files every {POLL_STEP * 1000:.0f} ms.",
        f"* Traffic, empty stores: {traffic(empty)}; stores of {loaded.store_units} units: "
        f"{traffic(loaded)}. A stored count above the hop distance means a node's first "
        "copy came the long way and was forwarded with that count before the shorter copy "
        "arrived: the shorter count is kept where it arrives but not sent again.",
        f'* "From the write" includes the service\'s {gossip_mod.POLL_SECS:g} s poll of '
        "knowledge.jsonl (half a period on average): units written by another process "
        '(distillation, `hive import`) wait for it. "From the first send" starts at the '
        'source\'s first "sent ... knowledge unit(s)" log line and ends at the last '
        f"node's store write: about {per_hop(empty)} per hop with empty stores, "
        f"{per_hop(loaded)} with {loaded.store_units} units.",
        f"* One hop inside the engine (a node with 5 peers, on disk) costs {h.ms:.0f} ms, "
        f"{h.fsyncs} fsyncs and {h.writes} file writes with an empty store: trust.json twice "
        "and knowledge.jsonl, each an atomic write with a file and a directory fsync, and "
        "sync_state.json (no fsync) after the merge and after the push round. A copy of "
        f"the unit by a longer path costs {h.duplicate_ms:.0f} ms, {h.duplicate_fsyncs} "
        f"fsyncs and {h.duplicate_writes} writes (trust.json for the daily rate count, "
        "sync_state.json); the store is not rewritten. With "
        f"{FILL_UNITS} units in the store (and in sync_state.json as sent to all 5 peers) "
        f"the same hop costs {hl.ms:.0f} ms and a copy {hl.duplicate_ms:.0f} ms: see "
        '"Where the time goes".',
    ]
    twice = snap.pushed_units + snap.answered_units > SNAPSHOT_UNITS or snap.duplicates
    batches = ", ".join(str(b) for b in snap.batches)
    notes.append(
        "* Snapshot: the new nodes run with `[hive] max_units = 0` and "
        "`max_units_per_peer_per_day = 1000000`; each pair was watched for "
        f"{SNAPSHOT_WATCH_SECS:g} s after the connect (past the "
        f"{gossip_mod.LINKUP_PUSH_DELAY_SECS:g} s fallback push). The old node answered "
        f"the new node's knowledge_request with {snap.answered_units:,} units in "
        f"{snap.answered_pages} knowledge_snapshot pages and sent {snap.pushed_units:,} "
        f"units in knowledge_sync frames; the new node merged {batches} batch(es) per run "
        f"and counted {snap.duplicates:,} duplicate unit(s): "
        + ("some units crossed twice" if twice else "no unit crossed twice")
        + f". {snap.bytes_down:,} frame bytes reached the new node. In one process the two "
        f"engines exchanged {r.inproc.frames.get(codec.KNOWLEDGE_REQUEST, 0)} "
        f"knowledge_request, {r.inproc.frames.get(codec.KNOWLEDGE_SNAPSHOT, 0)} "
        f"knowledge_snapshot and {r.inproc.frames.get(codec.KNOWLEDGE_SYNC, 0)} "
        f"knowledge_sync frames ({r.inproc.units_sent:,} units sent), fallback push "
        "included."
    )
    base, auth = snap.baseline_auth, percentile(snap.auth_secs, 50)
    if auth > 3 * base:
        notes.append(
            f"* Authentication toward the node holding 5,000 units took {ms(auth)} against "
            f"{ms(base)} when its store was empty."
        )
    if snap.default_config_kept is not None:
        notes.append(
            f"* With the default `[hive]` settings a new node keeps "
            f"{snap.default_config_kept:,} of the 5,000 units: `max_units_per_peer_per_day` "
            "(1,000) drops the rest of the batch and `max_units` (500) evicts beyond 500."
        )
    notes.append(
        "* Simulation: a round model of the push rule (one round per network hop; a node "
        "pushes a unit to every neighbour that has not had it from it, except its "
        "originator; a receiver keeps a new unit with `propagation_count + 1` and pushes "
        f"on while that is below `max_propagation` = {MAX_PROPAGATION}; later copies are "
        'not pushed on, a shorter path\'s count is kept). "At once": a node pushes as '
        'soon as it accepts a unit; "coalesced": after all of the round\'s frames arrived '
        "(the engine's `callLater(0)` push round when every copy comes in one reactor "
        "turn, the best case; the services are in between). Graphs: each node dials up "
        "to 3 random others (2 in the sparse row, about 4 links per node), at most 8 "
        "links per node. The real-engine column runs one `Gossip` engine and home per "
        "node on an in-memory mesh with the same graph and source, without and with a "
        "clock for its push rounds. Bytes are whole NDJSON frames of one unit. "
        "`max_propagation` bounds reach: nodes more than 5 hops from the source never "
        "get the unit"
        + "".join(
            f"; on the {sim.label} mesh a unit reaches "
            f"{sum(sim.coverages) / len(sim.coverages):.0%} of the nodes on average"
            for sim in r.sims
            if min(sim.coverages) < 1.0
        )
        + "."
    )
    notes.append(
        "* `--quick` runs fewer rounds (under a minute); `--profile` adds cProfile output "
        "for one engine hop and for the 5,000-unit snapshot between two in-process "
        "engines; `--no-write` leaves this file alone. Homes live in a temporary "
        "directory, every service listens on 127.0.0.1 only, and every child process is "
        "stopped when the script ends, fails or is interrupted."
    )
    return notes


def write_section(
    table: list[str], notes: list[str], header: str, path: Path = ROOT / "docs" / "performance.md"
) -> Path:
    """
    Replace (or add) the generated part of the ``## Gossip`` section: from
    its heading to its first ``###`` subsection (hand-written analysis,
    kept) or the next ``##`` section.  Everything else stays as it is.
    """
    section = "\n".join(["## Gossip", "", header, "", *table, "", *notes, ""])
    text = (
        path.read_text(encoding="utf-8")
        if path.exists()
        else (
            "# Performance\n\nBenchmarks of claudectl's relay and hive, run by the scripts in "
            "`scripts/`. Each section names its command, machine and date.\n"
        )
    )
    pattern = re.compile(r"^## Gossip\n.*?(?=^##[# ]|\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- issue 16: real services set up through the CLI -------------------------------------

#: claudectl 0.64 on the same machine (issue 16): knowledge_request -> snapshot.
ANCHOR_REQUEST_MS = 1000.0
#: Issue 16's goals.
TARGET_REQUEST_FLOOR_RATIO = 1.3
TARGET_SNAPSHOT_SECS = {5_000: 0.15, 50_000: 1.5}
TARGET_CONVERGENCE_SECS = {16: 0.040, 64: 0.150}
CONV_SIZES = (4, 8, 16, 32, 64)
SNAP_SIZES = (500, 5_000, 50_000)
REQUEST_UNITS = 500
CLI_WORKERS = 4  # CLI processes at once while pairing
CLI_TIMEOUT_SECS = 120.0


def child_env(home: Home) -> dict[str, str]:
    """A CLI or service child's whole environment: this checkout and ``home``, nothing of ~."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home.root),
        "CLAUDECTL_HOME": str(home.root),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        "HOSTNAME": home.root.name,
    }
    if "TMPDIR" in os.environ:  # a long home puts its control socket there
        env["TMPDIR"] = os.environ["TMPDIR"]
    return env


#: A persistent CLI process: reads JSON argv lines, runs ``claudectl``'s own
#: entry point (``claudectl.cli.main``) on each, answers one JSON line.  The
#: same commands as ``python -m claudectl ...`` without an interpreter start
#: per call (pairing a 64-node mesh takes hundreds of calls).
CLI_RUNNER = r"""
import contextlib, io, json, sys
from claudectl.cli import main
for line in sys.stdin:
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(json.loads(line))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.__stdout__.write(json.dumps([code, out.getvalue(), err.getvalue()]) + "\n")
    sys.__stdout__.flush()
"""


class CliPool:
    """A few CLI runner processes; ``run`` hands a command to a free one."""

    def __init__(self, size: int, env_home: Home) -> None:
        import queue

        self.free: queue.Queue[subprocess.Popen[str]] = queue.Queue()
        self.procs = []
        for _ in range(size):
            proc = subprocess.Popen(
                [sys.executable, "-c", CLI_RUNNER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=child_env(env_home),
                cwd=str(env_home.root),
                start_new_session=True,
            )
            self.procs.append(proc)
            self.free.put(proc)

    def run(self, home: Home, *args: str) -> Any:
        proc = self.free.get(timeout=CLI_TIMEOUT_SECS)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(["--home", str(home.root), *args, "--json"]) + "\n")
            proc.stdin.flush()
            code, out, err = json.loads(proc.stdout.readline())
        finally:
            self.free.put(proc)
        if code != 0:
            raise RuntimeError(
                f"`claudectl {' '.join(args)}` exited {code}: {(err or out).strip()[-300:]}"
            )
        return json.loads(out) if out.strip() else None

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


#: The pool every CLI call of the benchmark goes through (set up by main).
CLI_POOL: list[CliPool] = []


def cli(home: Home, *args: str) -> Any:
    """``claudectl --home HOME ARGS --json``: its parsed answer."""
    if CLI_POOL:
        return CLI_POOL[0].run(home, *args)
    done = subprocess.run(
        [sys.executable, "-m", "claudectl", "--home", str(home.root), *args, "--json"],
        env=child_env(home),
        cwd=str(home.root),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECS,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`claudectl {' '.join(args)}` exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-300:]}"
        )
    return json.loads(done.stdout) if done.stdout.strip() else None


def make_home(tmp: Path, name: str, config: str | None = None) -> Home:
    home = Home((tmp / name).resolve())  # the CLI runners' working directory is elsewhere
    home.root.mkdir(parents=True)
    if config is not None:
        home.config_file.parent.mkdir(parents=True, exist_ok=True)
        home.config_file.write_text(config, encoding="utf-8")
    return home


def pair_edges(homes: list[Home], edges: list[tuple[int, int]]) -> list[str]:
    """
    Pair every ``(dialer, listener)`` edge through the CLI: ``relay pair`` on
    the listener, ``relay accept <code> <listener id>`` on the dialer (the
    code is claimed by the dialer's first connect).  Calls on one home run
    one after another; different homes in parallel.  Returns the identities.
    """
    from concurrent.futures import ThreadPoolExecutor

    ids: list[str] = [""] * len(homes)
    codes: dict[tuple[int, int], str] = {}
    by_listener: dict[int, list[int]] = collections.defaultdict(list)
    by_dialer: dict[int, list[int]] = collections.defaultdict(list)
    for a, b in edges:
        by_listener[b].append(a)
        by_dialer[a].append(b)

    def make_codes(b: int) -> None:
        for a in by_listener[b]:
            reply = cli(homes[b], "relay", "pair")
            ids[b] = reply["identity"]
            codes[(a, b)] = reply["pair_code"]

    def accept(a: int) -> None:
        for b in by_dialer[a]:
            ids[a] = cli(homes[a], "relay", "accept", codes[(a, b)], ids[b])["identity"]

    with ThreadPoolExecutor(CLI_WORKERS) as pool:
        list(pool.map(make_codes, list(by_listener)))
        list(pool.map(accept, list(by_dialer)))
        missing = [i for i, ident in enumerate(ids) if not ident]
        for i, reply in zip(
            missing, pool.map(lambda i: cli(homes[i], "relay", "identity"), missing), strict=True
        ):
            ids[i] = reply["identity"]
    return ids


def nested_mesh(n: int, dials: int, max_degree: int, rnd: random.Random) -> list[tuple[int, int]]:
    """
    Edges ``(dialer, listener)`` where node ``i`` dials up to ``dials``
    random nodes among ``0..i-1`` (at most ``max_degree`` links each): the
    first ``k`` nodes form a connected mesh for every ``k``, so one pairing
    serves every mesh size.
    """
    degree = [0] * n
    edges: list[tuple[int, int]] = []
    for i in range(1, n):
        free = [j for j in range(i) if degree[j] < max_degree]
        if not free:
            free = list(range(i))
        for j in rnd.sample(free, min(dials, len(free))):
            edges.append((i, j))
            degree[i] += 1
            degree[j] += 1
    return edges


def proc_cpu_secs(pid: int) -> float:
    """
    CPU time of a process's live threads in seconds, to the nanosecond: the
    scheduler's run time of each ``/proc/<pid>/task/*/schedstat`` (the
    service's threads live as long as it does).  Where schedstat is missing,
    user + system time from ``/proc/<pid>/stat`` (clock ticks: 10 ms steps).
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        if total:
            return total / 1e9
    except (FileNotFoundError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def import_units(home: Home, units: list[dict[str, Any]]) -> None:
    """``claudectl hive import`` of units that originated at ``home``."""
    path = home.root / "units.json"
    path.write_text(json.dumps({"units": units}), encoding="utf-8")
    cli(home, "hive", "import", str(path))
    path.unlink()


def spread(values: list[float]) -> dict[str, Any]:
    """Median and range of per-run figures."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 6) for v in values],
    }


async def settle_links(
    reactor: Any, homes: list[Home], degree: list[int], timeout: float = 60.0
) -> None:
    """Wait until every node lists exactly ``degree[i]`` connected peers."""

    async def up() -> bool:
        for home, want in zip(homes, degree, strict=True):
            rows = await peers_of(reactor, home)
            if sum(1 for r in rows if r["state"] == "connected") != want:
                return False
        return True

    deadline = time.monotonic() + timeout
    while not await up():
        if time.monotonic() > deadline:
            raise Timeout("links did not all come up")
        await task.deferLater(reactor, 0.2, lambda: None)


async def bench_convergence_scaling(
    reactor: Any,
    tmp: Path,
    fleet: Fleet,
    sizes: tuple[int, ...],
    runs: int,
    rnd: random.Random,
    say: Callable[[str], None],
) -> dict[int, ConvPhase]:
    """
    One nested mesh of ``max(sizes)`` nodes, paired through the CLI; every
    store holds FILL_UNITS units that stay local.  The first ``sizes[0]``
    services start and link up, their convergence is timed, then the next
    nodes join, and so on: each size is a connected mesh of real services.
    """
    n = max(sizes)
    homes = [make_home(tmp, f"conv{i:02d}") for i in range(n)]
    edges = nested_mesh(n, DIALS_PER_NODE, MAX_PEERS, rnd)
    t0 = time.monotonic()
    ids = pair_edges(homes, edges)
    say(f"paired {len(edges)} links through the CLI in {time.monotonic() - t0:.0f} s")
    now = int(time.time())
    for home, ident in zip(homes, ids, strict=True):
        add_units(home, ident, filler_units(FILL_UNITS, now), now)
    children: list[Child] = []
    ports: dict[str, int] = {}
    phases: dict[int, ConvPhase] = {}
    try:
        for size in sizes:
            new = [fleet.serve(f"conv{i:02d}", homes[i]) for i in range(len(children), size)]
            ports.update(await wait_ready(reactor, new, 120))
            old = len(children)
            children += new
            links = [(a, b) for a, b in edges if a < size and b < size and max(a, b) >= old]
            await defer.gatherResults(
                [
                    defer.ensureDeferred(connect(reactor, homes[a], ports[f"conv{b:02d}"], ids[b]))
                    for a, b in links
                ],
                consumeErrors=True,
            )
            sub = [(a, b) for a, b in edges if a < size and b < size]
            await settle_links(reactor, homes[:size], [len(x) for x in adjacency(size, sub)])
            # Past the link-up requests and the fallback push round.
            await task.deferLater(reactor, gossip_mod.LINKUP_PUSH_DELAY_SECS + 0.5, lambda: None)
            mesh = Mesh(homes[:size], ids[:size], sub, children)
            phases[size] = await convergence_runs(
                reactor, mesh, runs, rnd, FILL_UNITS, pause=0.2, timeout=30.0
            )
            ph = phases[size]
            say(
                f"{size} services: from the first send p50 "
                f"{statistics.median(ph.from_send) * 1000:.0f} ms, from the write "
                f"{statistics.median(ph.from_write) * 1000:.0f} ms; CPU of all services "
                f"{statistics.median(ph.cpu_per_run) * 1000:.0f} ms per run"
            )
    finally:
        fleet.stop(children)
    return phases


ROOMY = "[hive]\nmax_units = 0\nmax_units_per_peer_per_day = 1000000\n"


async def bench_snapshot_scaling(
    reactor: Any,
    tmp: Path,
    fleet: Fleet,
    sizes: tuple[int, ...],
    runs: int,
    say: Callable[[str], None],
) -> dict[int, dict[str, list[float]]]:
    """
    Per size: X holds that many units (``hive import``); ``runs`` new nodes,
    each paired with X through the CLI, connect one after another; each is
    timed from the connect request until its knowledge.jsonl holds every unit.
    """
    out: dict[int, dict[str, list[float]]] = {}
    for units in sizes:
        xhome = make_home(tmp, f"snapx-{units}")
        yhomes = [make_home(tmp, f"snapy-{units}-{r}", ROOMY) for r in range(runs)]
        ids = pair_edges([xhome, *yhomes], [(r + 1, 0) for r in range(runs)])
        now = int(time.time())
        import_units(
            xhome,
            [unit_json(f"ku_snap_{i}", ids[0], f"snapshot command {i}", now) for i in range(units)],
        )
        x = fleet.serve(f"snapx-{units}", xhome)
        ys = [fleet.serve(f"snapy-{units}-{r}", h) for r, h in enumerate(yhomes)]
        try:
            ports = await wait_ready(reactor, [x, *ys], 120)
            await task.deferLater(reactor, 3 * gossip_mod.POLL_SECS + 0.2, lambda: None)
            secs: list[float] = []
            cpu_x: list[float] = []
            cpu_y: list[float] = []
            for r, yhome in enumerate(yhomes):
                watch = FileWatch(yhome)
                cx, cy = proc_cpu_secs(x.proc.pid), proc_cpu_secs(ys[r].proc.pid)
                t0 = time.monotonic()
                await connect(reactor, yhome, ports[x.name], ids[0])
                await until(
                    reactor,
                    partial(holds, watch, units),
                    120,
                    f"{units:,} units on the new node",
                    step=POLL_STEP,
                )
                secs.append(time.monotonic() - t0)
                # CPU moves much less with the machine's load than wall time.
                cpu_x.append(proc_cpu_secs(x.proc.pid) - cx)
                cpu_y.append(proc_cpu_secs(ys[r].proc.pid) - cy)
                fleet.stop([ys[r]])
            out[units] = {"seconds": secs, "cpu_old_node": cpu_x, "cpu_new_node": cpu_y}
            say(f"snapshot of {units:,} units: p50 {statistics.median(secs) * 1000:.0f} ms")
        finally:
            fleet.stop([x, *ys])
    return out


FLOOR_SERVER = r"""
import sys
from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver
frames = open(sys.argv[1], "rb").read()
class Bare(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20
    def lineReceived(self, line):
        self.transport.write(frames)
f = protocol.Factory.forProtocol(Bare)
port = reactor.listenTCP(0, f, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


class FloorClient(LineReceiver):
    """Asks with one line and parses every page with the codec, as a peer does."""

    delimiter = b"\n"
    MAX_LENGTH = codec.MAX_LINE_BYTES

    def __init__(self) -> None:
        self.waiting: defer.Deferred[int] | None = None
        self.units = 0

    def lineReceived(self, line: bytes) -> None:
        payload = codec.decode(line).payload
        self.units += len(payload["units"])
        if payload["page"] == payload["total_pages"] and self.waiting is not None:
            d, self.waiting, units, self.units = self.waiting, None, self.units, 0
            d.callback(units)


async def timed_requests(
    reactor: Any,
    send: Callable[[], Any],
    arm: Callable[[defer.Deferred[int]], None],
    n: int,
    warmup: int,
    units: int,
    pid: int | None = None,
    cpu_secs: Callable[[int], float] = proc_cpu_secs,
) -> tuple[float, float]:
    """
    p50 in seconds of ``n`` request -> last page round trips after ``warmup``,
    and the CPU seconds per request of the answering process ``pid`` (0.0
    without one).
    """
    samples: list[float] = []
    cpu0 = 0.0
    for i in range(warmup + n):
        if i == warmup and pid is not None:
            cpu0 = cpu_secs(pid)
        d: defer.Deferred[int] = defer.Deferred()
        arm(d)
        t0 = time.perf_counter()
        send()
        got = await d
        if got != units:
            raise RuntimeError(f"a snapshot held {got} unit(s), not {units}")
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    cpu = (cpu_secs(pid) - cpu0) / n if pid is not None else 0.0
    return statistics.median(samples), cpu


async def bench_request(
    reactor: Any,
    tmp: Path,
    fleet: Fleet,
    runs: int,
    n: int,
    warmup: int,
    say: Callable[[str], None],
) -> dict[str, list[float]]:
    """
    knowledge_request -> knowledge_snapshot of REQUEST_UNITS units: a measuring
    RelayNode (scripts/bench_relay.py's client, plaintext like a claudectl 0.64
    peer) against a real ``relay serve``, and the floor: a bare LineReceiver
    child writing the same pages pre-encoded, read by a client that parses
    each page with the codec.  Per run: the p50 of ``n`` sequential requests.
    """
    relay_bench = load_relay_bench()
    shome = make_home(tmp, "req-s")
    chome = make_home(tmp, "req-c")
    sid, _ = pair_edges([shome, chome], [(1, 0)])
    now = int(time.time())
    records = [
        unit_json(f"ku_req_{i:04d}", sid, f"request command {i} --flag", now)
        for i in range(REQUEST_UNITS)
    ]
    import_units(shome, records)
    # The floor's pages: what the service sends, encoded once up front.
    pages = paginate(
        [KnowledgeUnit.from_json(u).to_json() for u in records],
        size=lambda j: len(json.dumps(j, separators=(",", ":")).encode()),
    )
    factory = codec.EnvelopeFactory(sid)
    frames = b"".join(
        codec.encode(
            factory.make(
                codec.KNOWLEDGE_SNAPSHOT, {"page": k, "total_pages": len(pages), "units": p}
            )
        )
        for k, p in enumerate(pages, 1)
    )
    (tmp / "floor.ndjson").write_bytes(frames)
    floor_proc = subprocess.Popen(
        [sys.executable, "-c", FLOOR_SERVER, str(tmp / "floor.ndjson")],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(shome),
        start_new_session=True,
    )
    s = fleet.serve("req-s", shome, tmp / "req-s.log")
    try:
        assert floor_proc.stdout is not None
        floor_port = int(floor_proc.stdout.readline())
        ports = await wait_ready(reactor, [s], 60)
        service = relay_bench.Service(shome, sid, s.proc, ports["req-s"], shome.root / "none")
        client = relay_bench.Client.make(reactor, relay_bench.PLAINTEXT, chome, sid)
        await client.open(reactor, service.address)
        waiter = relay_bench.SnapshotWaiter(client)
        floor = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", floor_port), FloorClient()
        )
        ask = codec.encode(
            codec.EnvelopeFactory("floor").make(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0})
        )

        def arm_floor(d: defer.Deferred[int]) -> None:
            floor.waiting = d

        def arm_ours(d: defer.Deferred[int]) -> None:
            waiter.waiting = d

        ours: list[float] = []
        floors: list[float] = []
        cpu: dict[str, list[float]] = {"ours": [], "floor": []}
        for r in range(runs):
            # Alternate which goes first.
            order = ("ours", "floor") if r % 2 == 0 else ("floor", "ours")
            for which in order:
                if which == "floor":
                    p50, secs = await timed_requests(
                        reactor,
                        lambda: floor.transport.write(ask),
                        arm_floor,
                        n,
                        warmup,
                        REQUEST_UNITS,
                        floor_proc.pid,
                        relay_bench.proc_cpu_exact,
                    )
                    floors.append(p50)
                else:
                    p50, secs = await timed_requests(
                        reactor,
                        lambda: client.node.mesh.send(
                            sid, codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}
                        ),
                        arm_ours,
                        n,
                        warmup,
                        REQUEST_UNITS,
                        s.proc.pid,
                        relay_bench.proc_cpu_exact,
                    )
                    ours.append(p50)
                cpu[which].append(secs)
            say(
                f"request -> snapshot run {r + 1}: {ours[-1] * 1000:.2f} ms, CPU "
                f"{cpu['ours'][-1] * 1e6:.0f} us (floor {floors[-1] * 1000:.2f} ms, CPU "
                f"{cpu['floor'][-1] * 1e6:.0f} us)"
            )
        floor.transport.loseConnection()
        return {
            "ours": ours,
            "floor": floors,
            "cpu_ours": cpu["ours"],
            "cpu_floor": cpu["floor"],
            "bytes": [float(len(frames))],
        }
    finally:
        fleet.stop([s])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(floor_proc.pid, signal.SIGTERM)
        floor_proc.wait(10)


def load_relay_bench() -> Any:
    """scripts/bench_relay.py, for its measuring client (one client for both benchmarks)."""
    import importlib.util

    path = ROOT / "scripts" / "bench_relay.py"
    spec = importlib.util.spec_from_file_location("bench_relay", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get("bench_relay")
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_relay"] = module
        spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Issue16:
    request: dict[str, list[float]] | None  # None: not measured (--convergence)
    snapshots: dict[int, dict[str, list[float]]]
    convergence: dict[int, ConvPhase]


def issue16_json(r: Issue16) -> dict[str, Any]:
    out: dict[str, Any] = {"snapshot": {}, "convergence": {}}
    if r.request is not None:
        ours, floor = r.request["ours"], r.request["floor"]
        ratios = [o / f for o, f in zip(ours, floor, strict=True)]
        med = statistics.median(ours) * 1000
        out["request_snapshot_500"] = {
            "ms": spread([x * 1000 for x in ours]),
            "floor_ms": spread([x * 1000 for x in floor]),
            "ratio_to_floor": spread(ratios),
            "target_ratio_to_floor": TARGET_REQUEST_FLOOR_RATIO,
            "met": statistics.median(ratios) <= TARGET_REQUEST_FLOOR_RATIO,
            "claudectl_064_ms": ANCHOR_REQUEST_MS,
            "times_faster_than_claudectl_064": ANCHOR_REQUEST_MS / med,
            "frame_bytes": int(r.request["bytes"][0]),
            "cpu_us_per_request": spread([x * 1e6 for x in r.request.get("cpu_ours", [0.0])]),
            "floor_cpu_us_per_request": spread(
                [x * 1e6 for x in r.request.get("cpu_floor", [0.0])]
            ),
        }
    for units, v in r.snapshots.items():
        target = TARGET_SNAPSHOT_SECS.get(units)
        med_s = statistics.median(v["seconds"])
        out["snapshot"][str(units)] = {
            "ms": spread([x * 1000 for x in v["seconds"]]),
            "cpu_ms_old_node": spread([x * 1000 for x in v.get("cpu_old_node", [0.0])]),
            "cpu_ms_new_node": spread([x * 1000 for x in v.get("cpu_new_node", [0.0])]),
            "us_per_unit": med_s / units * 1e6,
            "target_ms": None if target is None else target * 1000,
            "met": None if target is None else med_s <= target,
        }
    for size, ph in r.convergence.items():
        target = TARGET_CONVERGENCE_SECS.get(size)
        med_s = statistics.median(ph.from_send)
        out["convergence"][str(size)] = {
            "from_first_send_ms": spread([x * 1000 for x in ph.from_send]),
            "from_write_ms": spread([x * 1000 for x in ph.from_write]),
            "one_hop_ms": spread([x * 1000 for x in ph.first_peer]),
            "max_hops": ph.eccentricity,
            "sync_frames_per_run": ph.frames_per_run,
            "service_cpu_ms_per_run": spread([x * 1000 for x in ph.cpu_per_run or [0.0]]),
            "target_ms": None if target is None else target * 1000,
            "met": None if target is None else med_s <= target,
        }
    return out


def issue16_table(data: dict[str, Any]) -> list[str]:
    TIMES = "\u00d7"
    MICRO = "\u00b5s"

    def cell(v: dict[str, Any], unit: str = "ms") -> str:
        return f"{v['median']:,.1f} {unit} ({v['min']:,.1f}\u2013{v['max']:,.1f})"

    def met(v: bool | None) -> str:
        return "" if v is None else ("yes" if v else "**no**")

    lines = ["| row | median (range) | goal | met? |", "|---|---|---|---|"]
    req = data.get("request_snapshot_500")
    if req is not None:
        lines += [
            f"| knowledge_request \u2192 snapshot, {REQUEST_UNITS} units, `relay serve` | "
            f"{cell(req['ms'])} | | |",
            f"| the same from the floor (bare LineReceiver, pre-encoded pages) | "
            f"{cell(req['floor_ms'])} | | |",
            f"| CPU per request: `relay serve` / the floor | "
            f"{cell(req['cpu_us_per_request'], MICRO)} / "
            f"{cell(req['floor_cpu_us_per_request'], MICRO)} | | |",
            f"| ratio to the floor (per run) | {cell(req['ratio_to_floor'], TIMES)} | "
            f"\u2264 {TARGET_REQUEST_FLOOR_RATIO}\u00d7 | {met(req['met'])} |",
            f"| claudectl 0.64: {ANCHOR_REQUEST_MS:,.0f} ms | "
            f"{req['times_faster_than_claudectl_064']:,.0f}\u00d7 faster | | |",
        ]
    for units, v in data["snapshot"].items():
        goal = "" if v["target_ms"] is None else f"\u2264 {v['target_ms']:,.0f} ms"
        lines.append(
            f"| snapshot merged by a new peer: connect \u2192 {int(units):,} units stored | "
            f"{cell(v['ms'])}; {v['us_per_unit']:,.0f} \u00b5s/unit; CPU: old node "
            f"{cell(v['cpu_ms_old_node'])}, new node {cell(v['cpu_ms_new_node'])} | "
            f"{goal} | {met(v['met'])} |"
        )
    for size, v in data["convergence"].items():
        goal = "" if v["target_ms"] is None else f"\u2264 {v['target_ms']:,.0f} ms"
        lines.append(
            f"| convergence, {size} processes, {FILL_UNITS}-unit stores: first send \u2192 "
            f"on all (write \u2192 on all: {cell(v['from_write_ms'])}; {v['max_hops']} hops max; "
            f"CPU of all services per run {cell(v['service_cpu_ms_per_run'])}) | "
            f"{cell(v['from_first_send_ms'])} | {goal} | {met(v['met'])} |"
        )
    return lines


# --- main --------------------------------------------------------------------------------


@dataclasses.dataclass
class Sim:
    label: str
    model: SimResult  # push at once
    coalesced: SimResult  # push after each round
    engine: SimResult | None  # the real engine on the same graph and source
    engine_coalesced: SimResult | None
    coverages: list[float]  # the model from SIM_SOURCES other random sources


def run_simulation(tmp: Path, quick: bool, rnd: random.Random) -> tuple[list[Sim], HopCost | None]:
    base = engine_base_dir(tmp)
    try:
        frame = sync_frame_bytes(
            unit_json("ku_sim_1", "sim0000", "cargo test --sim", NOW), "sim0000"
        )
        sims: list[Sim] = []
        for n, dials, with_engine in [
            (10, 3, True),
            (100, 3, True),
            (1000, 3, not quick),
            (1000, 2, False),
        ]:
            edges = random_mesh(n, dials, MAX_PEERS, rnd)
            src = rnd.randrange(n)
            seed = rnd.getrandbits(32)  # the same delivery order for model and engine
            model = simulate_model(n, edges, src, MAX_PROPAGATION, frame, random.Random(seed))
            coalesced = simulate_model(
                n, edges, src, MAX_PROPAGATION, frame, random.Random(seed), coalesce=True
            )
            engine = engine_co = None
            if with_engine:
                engine = simulate_engine(n, edges, src, base / f"g{n}-{dials}", random.Random(seed))
                engine_co = simulate_engine(
                    n, edges, src, base / f"g{n}-{dials}-c", random.Random(seed), coalesce=True
                )
            others = [
                simulate_model(n, edges, rnd.randrange(n), MAX_PROPAGATION, frame, rnd)
                for _ in range(SIM_SOURCES)
            ]
            sims.append(
                Sim(
                    f"{n:,}" + (" sparse" if dials == 2 else ""),
                    model,
                    coalesced,
                    engine,
                    engine_co,
                    [o.coverage for o in others],
                )
            )
        hop_tmpfs = hop_cost(base, 3, False) if str(base).startswith("/dev/shm") else None
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return sims, hop_tmpfs


def targets_met(r: Results) -> bool:
    return (
        all(
            percentile(ph.from_write, 50) <= TARGET_CONVERGENCE_P50
            and percentile(ph.from_send, 50) <= TARGET_CONVERGENCE_P50
            for ph in r.conv.phases
        )
        and percentile(r.snap.seconds, 50) <= TARGET_SNAPSHOT
    )


async def run_all(reactor: Any, args: argparse.Namespace, tmp: Path, fleet: Fleet) -> int:
    rnd = random.Random(args.seed)
    conv_runs = 5 if args.quick else 10
    snap_runs = 1 if args.quick else 3
    t0 = time.monotonic()
    load_before = load_average()

    def step(text: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f} s] {text}", flush=True)

    step("simulation and engine hop ...")
    sims, hop_tmpfs = run_simulation(tmp, args.quick, rnd)
    # Timed without the profiler; --profile repeats the hops under it below.
    hop_disk = hop_cost(tmp, 3 if args.quick else 5, False)
    hop_loaded = hop_cost(tmp, 3 if args.quick else 5, False, FILL_UNITS)
    step("snapshot between two in-process engines ...")
    inproc = snapshot_in_process(tmp / "inproc", False)
    step(f"convergence: {MESH_NODES} services, {conv_runs} runs ...")
    conv = await bench_convergence(reactor, tmp, fleet, conv_runs, rnd)
    step(f"snapshot: {snap_runs} run(s) ...")
    snap = await bench_snapshot(reactor, tmp, fleet, snap_runs, rnd, with_defaults=not args.quick)
    step("done")

    results = Results(conv, snap, sims, hop_disk, hop_loaded, hop_tmpfs, inproc, conv_runs)
    machine = machine_line()
    date = datetime.date.today().isoformat()
    command = "python scripts/bench_gossip.py" + (" --quick" if args.quick else "")
    header = (
        f"`{command}` on {date}; {machine}; load average {load_before} before the "
        f"run, {load_average()} after (the machine was shared); "
        f"{time.monotonic() - t0:.0f} s in all."
    )
    table = render(results)
    notes = notes_for(results)
    print(f"\n{header}\n")
    print("\n".join(table))
    print()
    print("\n".join(notes))
    for ph in conv.phases:
        print(
            f"\nstores of {ph.store_units} units: convergence from the write (ms):",
            [round(x * 1000) for x in ph.from_write],
        )
        print(
            f"stores of {ph.store_units} units: convergence from the send  (ms):",
            [round(x * 1000) for x in ph.from_send],
        )
    print("snapshot (ms):", [round(x * 1000) for x in snap.seconds])
    if args.profile:
        print(
            "\nprofile of one engine hop (new unit, then a copy; on disk):\n"
            + hop_cost(tmp / "profile", 5, True).profile
        )
        print(
            f"profile of one engine hop with {FILL_UNITS} units in the store:\n"
            + hop_cost(tmp / "profile", 5, True, FILL_UNITS).profile
        )
        profiled = snapshot_in_process(tmp / "inproc-profile", True)
        print(
            f"profile of the 5,000-unit snapshot between two engines, no sockets "
            f"({profiled.seconds:.1f} s under the profiler, frames {profiled.frames}):\n"
            + profiled.profile
        )
    if args.write:
        print(f"updated {write_section(table, notes, header)}")
    return 0 if targets_met(results) else 1


async def run_issue16(reactor: Any, args: argparse.Namespace, tmp: Path, fleet: Fleet) -> int:
    """Issue 16's rows: request -> snapshot, snapshot scaling, convergence scaling."""
    rnd = random.Random(args.seed)
    runs = args.runs or (2 if args.quick else 5)
    conv_sizes = args.convergence or ((4, 8) if args.quick else CONV_SIZES)
    snap_sizes = args.snapshots or ((500,) if args.quick else SNAP_SIZES)
    t0 = time.monotonic()
    load_before = os.getloadavg()

    def say(text: str) -> None:
        if not args.json:
            print(f"  [{time.monotonic() - t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    request = None
    snaps: dict[int, dict[str, list[float]]] = {}
    conv: dict[int, ConvPhase] = {}
    if not args.convergence and not args.snapshots:
        say(f"knowledge_request -> snapshot of {REQUEST_UNITS} units, {runs} runs ...")
        request = await bench_request(
            reactor, tmp, fleet, runs, 20 if args.quick else 100, 5 if args.quick else 20, say
        )
    if not args.only_request and not args.convergence:
        say(f"snapshots of {', '.join(f'{u:,}' for u in snap_sizes)} units, {runs} runs each ...")
        snaps = await bench_snapshot_scaling(reactor, tmp, fleet, snap_sizes, runs, say)
    if not args.only_request and not args.snapshots:
        say(f"convergence at {', '.join(map(str, conv_sizes))} services, {runs} runs each ...")
        conv = await bench_convergence_scaling(reactor, tmp, fleet, conv_sizes, runs, rnd, say)
    data = issue16_json(Issue16(request, snaps, conv))
    data["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python scripts/bench_gossip.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "machine": machine_line(),
        "load_average_start": [round(x, 2) for x in load_before],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        meta = data["meta"]
        print(
            f"\n`{meta['command']}` at {meta['date']}; {meta['machine']}; load average "
            f"{meta['load_average_start']} at the start, {meta['load_average_end']} at the "
            f"end; {meta['seconds']:.0f} s. Cells: median (min\u2013max) over {runs} runs.\n"
        )
        print("\n".join(issue16_table(data)))
    met = [
        v["met"]
        for group in (data["snapshot"], data["convergence"])
        for v in group.values()
        if v["met"] is not None
    ]
    if "request_snapshot_500" in data:
        met.append(data["request_snapshot_500"]["met"])
    return 0 if all(met) else 1


def _sizes(text: str) -> tuple[int, ...]:
    """``--convergence 4,8,16``: growing mesh sizes of at least 2."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not sizes or min(sizes) < 2 or list(sizes) != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"sizes must grow and be at least 2: {text!r}")
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 runs, 4 and 8 services, a 500-unit snapshot (about a minute)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--runs", type=int, default=None, help="runs per row (default 5)")
    ap.add_argument("--seed", type=int, default=6, help="random seed (graphs, sources, keys)")
    ap.add_argument(
        "--convergence",
        type=_sizes,
        default=None,
        metavar="N,N,...",
        help="only the convergence rows, at these mesh sizes (e.g. 4,8,16)",
    )
    ap.add_argument(
        "--snapshots",
        type=_sizes,
        default=None,
        metavar="N,N,...",
        help="only the snapshot rows, at these store sizes (e.g. 5000,50000)",
    )
    ap.add_argument(
        "--only-request",
        action="store_true",
        help="only the knowledge_request -> snapshot row (relay serve and the floor)",
    )
    ap.add_argument(
        "--legacy",
        action="store_true",
        help="the 2026-11-26 measurements instead: 16-service mesh, 5,000-unit snapshot, "
        "engine hop and the round-model simulation",
    )
    ap.add_argument(
        "--write",
        action="store_true",
        help="--legacy: put its table right under docs/performance.md's '## Gossip' heading",
    )
    ap.add_argument("--profile", action="store_true", help="--legacy: print cProfile output")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-gossip-"))
    fleet = Fleet()

    def cleanup() -> None:
        fleet.stop_all()
        while CLI_POOL:
            CLI_POOL.pop().close()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    status = [2]

    async def body(reactor: Any) -> None:
        reactor.addSystemEventTrigger("before", "shutdown", fleet.stop_all)
        try:
            runner_home = make_home(tmp, "cli-runner")
            CLI_POOL.append(CliPool(CLI_WORKERS, runner_home))
            run = run_all if args.legacy else run_issue16
            status[0] = await run(reactor, args, tmp, fleet)
        except Exception as e:
            print(f"Error: benchmark failed: {e}", file=sys.stderr)
            for c in fleet.children:
                if not c.alive():
                    print(f"--- {c.name} exited early:\n{c.tail()}", file=sys.stderr)
            status[0] = 2
        finally:
            fleet.stop_all()

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
    finally:
        cleanup()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
