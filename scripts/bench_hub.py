#!/usr/bin/env python3
"""
Loopback benchmark of the NAT hub (issue 17; figures in docs/performance.md).

Real processes, set up through the real CLI in a throw-away directory
(``tempfile.mkdtemp()``, never ``~``):

* the hub: ``python -m claudectl relay hub --listen tcp:0:interface=127.0.0.1
  --token T`` (default limits);
* S: ``python -m claudectl relay serve`` with ``[relay] hubs = [the hub]`` and
  ``hub_token``, its hive seeded with ``hive import``; it registers at the hub.

The measuring client runs in this process (a ``RelayNode`` on the real
reactor, TLS, paired with S through ``relay pair`` / ``relay accept``; the
helpers are those of ``scripts/bench_relay.py``).  Rows, each the median and
range (min-max) over ``--runs`` runs (default 5):

1. request -> reply (``knowledge_request`` answered by S's gossip layer with a
   ``knowledge_snapshot``), p50 over a direct link and over a link spliced
   through the hub: two clients (S keeps one link per identity), both links
   open, requests alternating between them one by one so that both see the
   same load; the row is the difference of the p50s (target: <= 0.5 ms);
2. hub memory: the hub's ``VmRSS`` with R registrations and L spliced idle
   channels held open by raw sockets from this process (target, at
   R = 1,000 and L = 500: <= 100 MiB);
3. bulk forwarding: B bytes written on one spliced channel, timed until the
   other end has read them all (target: >= 50 MB/s).  Both ends are in this
   Python process, which is part of what is measured.

Run from the repository root::

    python scripts/bench_hub.py            # full run
    python scripts/bench_hub.py --quick    # small counts (the smoke test)
    python scripts/bench_hub.py --json --runs 7

Exit status: 0 when every target is met, 1 when one is missed, 2 when the
benchmark itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_relay", _HERE / "bench_relay.py")
assert _spec is not None and _spec.loader is not None
br = importlib.util.module_from_spec(_spec)
sys.modules["bench_relay"] = br
_spec.loader.exec_module(br)

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402

from claudectl.hub import wire  # noqa: E402
from claudectl.hub.peer import client_endpoint  # noqa: E402
from claudectl.relay.binding import TLS13  # noqa: E402

TOKEN = "bench-hub-token"
MB = 1_000_000


@dataclass(frozen=True)
class Sizes:
    runs: int
    requests: int
    warmup: int
    units: int
    registrations: int
    idle_channels: int
    bulk_bytes: int


FULL = Sizes(
    runs=5,
    requests=200,
    warmup=20,
    units=20,
    registrations=1000,
    idle_channels=500,
    bulk_bytes=64 * 1024 * 1024,
)
QUICK = Sizes(
    runs=1,
    requests=20,
    warmup=3,
    units=5,
    registrations=40,
    idle_channels=16,
    bulk_bytes=4 * 1024 * 1024,
)

TARGETS = {
    "hub_adds_p50_ms": ("<=", 0.5),
    "hub_rss_mib": ("<=", 100.0),
    "bulk_mb_per_s": (">=", 50.0),
}


class RawHubClient(Protocol):
    """A bare hub client: control lines until ``spliced``, then counts raw bytes."""

    def __init__(self) -> None:
        self.buf = b""
        self.seen: list[dict[str, Any]] = []
        self.spliced = False
        self.raw_bytes = 0
        self.waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        self.on_incoming: Callable[[str], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.spliced:
            self.raw_bytes += len(data)
        else:
            self.buf += data
            while not self.spliced and b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                self.seen.append(msg)
                if msg.get("op") == wire.INCOMING and self.on_incoming is not None:
                    self.on_incoming(msg["channel"])
                if msg.get("op") == wire.SPLICED:
                    self.spliced = True
                    self.raw_bytes += len(self.buf)
                    self.buf = b""
        self._check()

    def _check(self) -> None:
        for item in list(self.waiters):
            cond, d = item
            if cond():
                self.waiters.remove(item)
                d.callback(None)

    def when(self, cond: Callable[[], bool]) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiters.append((cond, d))
        self._check()
        return d

    def has(self, op: str) -> bool:
        return any(m.get("op") == op for m in self.seen)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.write(wire.encode(msg))


@dataclass
class Hub:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_hub(reactor: Any, home: Path) -> Hub:
    log = home / "hub.log"
    argv = [
        sys.executable,
        "-m",
        "claudectl",
        "--home",
        str(home),
        "relay",
        "hub",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--token",
        TOKEN,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            env=br.child_env(home),
            cwd=str(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    br.CHILDREN.procs.append(proc)
    br.CHILDREN.started.append(proc.pid)

    def port() -> int | None:
        if proc.poll() is not None:
            raise br.BenchError("the hub exited:\n" + log.read_text(errors="replace")[-1500:])
        for line in log.read_text(errors="replace").splitlines():
            if "claudectl hub listening on" in line:
                return int(line.rsplit(":", 1)[1])
        return None

    return Hub(proc, await br.until(reactor, port, 60, "the hub to listen", step=0.05), log)


async def open_raw(reactor: Any, hub: Hub) -> RawHubClient:
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", hub.port)
    proto: RawHubClient = await br.within(connectProtocol(ep, RawHubClient()), 30, reactor)
    await br.within(proto.when(lambda: proto.has("hub") or bool(proto.seen)), 30, reactor)
    return proto


async def splice_raw(
    reactor: Any, hub: Hub, reg: RawHubClient, identity: str
) -> list[RawHubClient]:
    """A channel to ``identity`` (registered by ``reg``): the dialer and the accepting end."""
    accepted: defer.Deferred[RawHubClient] = defer.Deferred()

    def incoming(channel: str) -> None:
        async def go() -> None:
            acc = await open_raw(reactor, hub)
            acc.send({"op": wire.ACCEPT, "channel": channel})
            accepted.callback(acc)

        defer.Deferred.fromCoroutine(go()).addErrback(accepted.errback)

    reg.on_incoming = incoming
    dialer = await open_raw(reactor, hub)
    dialer.send({"op": wire.OPEN, "to": identity})
    acc = await br.within(accepted, 30, reactor)
    await br.within(dialer.when(lambda: dialer.spliced), 30, reactor)
    await br.within(acc.when(lambda: acc.spliced), 30, reactor)
    return [dialer, acc]


async def measure_memory(reactor: Any, hub: Hub, sizes: Sizes) -> dict[str, float]:
    base = br.proc_rss_kib(hub.proc.pid)
    regs: list[RawHubClient] = []
    ids = [f"bench-{i:06d}" for i in range(sizes.registrations)]
    for start in range(0, len(ids), 100):
        batch = []
        for ident in ids[start : start + 100]:
            p = await open_raw(reactor, hub)
            p.send({"op": wire.REGISTER, "identity": ident, "token": TOKEN})
            batch.append(p)
        for p in batch:
            await br.within(p.when(lambda p=p: p.has(wire.REGISTERED)), 30, reactor)
        regs += batch
    channels: list[RawHubClient] = []
    for i in range(sizes.idle_channels):
        channels += await splice_raw(reactor, hub, regs[i], ids[i])
    await br.sleep(reactor, 1.0)
    rss = br.proc_rss_kib(hub.proc.pid)
    for p in regs + channels:
        assert p.transport is not None
        p.transport.loseConnection()
    await br.sleep(reactor, 0.5)
    return {"hub_rss_mib": rss / 1024, "hub_base_rss_mib": base / 1024}


async def measure_bulk(reactor: Any, hub: Hub, sizes: Sizes, n: int) -> float:
    reg = await open_raw(reactor, hub)
    ident = f"bulk-{n:06d}"
    reg.send({"op": wire.REGISTER, "identity": ident, "token": TOKEN})
    await br.within(reg.when(lambda: reg.has(wire.REGISTERED)), 30, reactor)
    dialer, acc = await splice_raw(reactor, hub, reg, ident)
    chunk = os.urandom(65536)
    t0 = time.perf_counter()
    assert dialer.transport is not None
    dialer.transport.write(chunk * (sizes.bulk_bytes // len(chunk)))
    await br.within(acc.when(lambda: acc.raw_bytes >= sizes.bulk_bytes), 300, reactor)
    elapsed = time.perf_counter() - t0
    for p in (reg, dialer, acc):
        assert p.transport is not None
        p.transport.loseConnection()
    return sizes.bulk_bytes / MB / elapsed


async def bench(
    reactor: Any, tmp: Path, sizes: Sizes, say: Callable[[str], None]
) -> dict[str, Any]:
    hub_home = tmp / "hub"
    hub_home.mkdir()
    hub = await start_hub(reactor, hub_home)
    say(f"hub on {hub.address} (pid {hub.proc.pid})")
    shome = br.new_home(
        tmp, "server", f'[relay]\nhubs = ["{hub.address}"]\nhub_token = "{TOKEN}"\n'
    )
    sid = br.cli(shome.root, "relay", "identity")["identity"]
    units = tmp / "units.json"
    units.write_text(json.dumps({"units": br.unit_records(sid, sizes.units, int(time.time()))}))
    br.cli(shome.root, "hive", "import", str(units))
    service = await br.start_service(reactor, shome)
    samples: dict[str, list[float]] = {
        "direct_p50_ms": [],
        "hub_p50_ms": [],
        "hub_adds_p50_ms": [],
        "hub_rss_mib": [],
        "bulk_mb_per_s": [],
    }
    try:
        await br.until(
            reactor,
            lambda: "registered at hub" in service.log.read_text(errors="replace"),
            30,
            "S to register at the hub",
            step=0.05,
        )
        # Two clients (one link per peer identity), both links open at once;
        # requests alternate between them so both see the same machine load.
        clients, waiters, protos = {}, {}, {}
        for how, address in (("direct", service.address), ("hub", hub.address)):
            c = await br.pair_client(reactor, service, br.new_home(tmp, f"client-{how}"), TLS13)
            c.node.dial_via = client_endpoint  # as the service's dialers: hubs understood
            clients[how], waiters[how] = c, br.SnapshotWaiter(c)
            protos[how] = await c.open(reactor, address)
            want = None if how == "direct" else hub.address
            if getattr(protos[how], "hub_via", None) != want:
                raise br.BenchError(f"the {how} link is not {how}")
        for i in range(sizes.runs):
            times: dict[str, list[float]] = {"direct": [], "hub": []}
            for k in range(sizes.warmup + sizes.requests):
                for how in ("direct", "hub") if (i + k) % 2 == 0 else ("hub", "direct"):
                    s = await br.measure_requests(
                        reactor, service, clients[how], waiters[how], 1, 0, sizes.units
                    )
                    if k >= sizes.warmup:
                        times[how].append(s.values["p50_ms"])
            p50 = {how: statistics.median(v) for how, v in times.items()}
            samples["direct_p50_ms"].append(p50["direct"])
            samples["hub_p50_ms"].append(p50["hub"])
            samples["hub_adds_p50_ms"].append(p50["hub"] - p50["direct"])
            say(
                f"request run {i + 1}/{sizes.runs}: direct {p50['direct']:.3f} ms, "
                f"hub {p50['hub']:.3f} ms"
            )
        for how in protos:
            await clients[how].close(reactor, protos[how])
    finally:
        await br.stop_service(reactor, service)
    for i in range(sizes.runs):
        samples["bulk_mb_per_s"].append(await measure_bulk(reactor, hub, sizes, i))
        say(f"bulk run {i + 1}/{sizes.runs}: {samples['bulk_mb_per_s'][-1]:.1f} MB/s")
    base = 0.0
    for i in range(sizes.runs):
        # A fresh hub per run: its RSS starts from the same point.
        br.CHILDREN.stop(hub.proc)
        hub = await start_hub(reactor, hub_home)
        mem = await measure_memory(reactor, hub, sizes)
        samples["hub_rss_mib"].append(mem["hub_rss_mib"])
        base = mem["hub_base_rss_mib"]
        say(f"memory run {i + 1}/{sizes.runs}: {mem['hub_rss_mib']:.1f} MiB")
    br.CHILDREN.stop(hub.proc)
    rows = {}
    for name, values in samples.items():
        row: dict[str, Any] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": len(values),
        }
        if name in TARGETS:
            op, limit = TARGETS[name]
            row["target"] = f"{op} {limit}"
            row["passed"] = row["median"] <= limit if op == "<=" else row["median"] >= limit
        rows[name] = row
    return {"rows": rows, "hub_base_rss_mib": base, "sizes": sizes.__dict__}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small counts, one run (the smoke test)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--runs", type=int, default=None, help="runs per row (default 5)")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("Error: bench_hub.py reads /proc: Linux only", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        import dataclasses

        sizes = dataclasses.replace(sizes, runs=max(1, args.runs))
    tmp = Path(tempfile.mkdtemp(prefix="claudectl-bench-hub-"))
    status: list[int] = []
    load = os.getloadavg()

    def say(text: str) -> None:
        if not args.json:
            print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    async def go(reactor: Any) -> None:
        result = await bench(reactor, tmp, sizes, say)
        result["load_average"] = [load, os.getloadavg()]
        result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result["mode"] = "quick" if args.quick else "full"
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"Hub benchmark ({result['mode']}, {result['date']}, load {load[0]:.1f})")
            for name, row in result["rows"].items():
                verdict = "" if "passed" not in row else (" ok" if row["passed"] else " MISSED")
                print(
                    f"  {name:<18} {row['median']:10.3f}  ({row['min']:.3f}-{row['max']:.3f})"
                    f"  {row.get('target', '')}{verdict}"
                )
        passed = all(r.get("passed", True) for r in result["rows"].values())
        status.append(0 if passed else 1)

    def failed(reason: Any) -> None:
        print(f"Error: benchmark failed: {reason.getErrorMessage()}", file=sys.stderr)
        status.append(2)

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)).addErrback(failed))
    except SystemExit:
        pass
    finally:
        br.CHILDREN.stop_all()
        for d in br.SOCKET_DIRS:
            if tmp not in d.parents:
                shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp, ignore_errors=True)
    return status[0] if status else 2


if __name__ == "__main__":
    sys.exit(main())
