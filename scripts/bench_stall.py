#!/usr/bin/env python3
"""
Reactor stall benchmark (issue 13): how long does a running ``claudectl relay
serve`` stop answering while it does heavy state work?

Set-up, all through the real CLI in temporary homes: a service S
(``relay serve`` with ``CLAUDECTL_LAG_PROBE=1``: it measures its own event
loop with a 1 ms timer and reports the lag over the control socket), and two
clients paired with it by ``relay pair`` / ``relay accept``: a *loader* (a
peer of this project that sends knowledge) and a *prober*: a one-way client
as claudectl 0.64's ``connect`` (S sends it no knowledge) that makes a
handshake, closes, asks ``relay status`` over the control socket, and again
every 20 ms -- the latency a peer and the CLI see.

Each run, on a fresh S:
  quiet    nothing happens (the baseline)
  distill  ``claudectl hive distill`` (always forced) over N decisions (100,000), + 1 s
  merge    the loader sends N units (5,000) in knowledge_sync frames; until S acked all
  import   ``claudectl hive import`` of N units (10,000) on S's home, + 1 s for S to notice

For each phase: S's event-loop lag (max and p99 of the probe, reset at the
start of the phase), and the handshake and control-socket (``relay
status``) latency seen from outside, p50 and max.  Every figure is the
median over the runs, with the range.  Target: max lag <= 10 ms, and the
loaded handshake p50 within 2x of the quiet one.

Exit status: 0 targets met, 1 a target missed, 2 the benchmark failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import bench_relay as br  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from claudectl.control import commands as C  # noqa: E402
from claudectl.control.client import call_control  # noqa: E402
from claudectl.hive.distill import decisions_path  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.binding import PLAINTEXT  # noqa: E402
from claudectl.relay.crypto import proof  # noqa: E402
from claudectl.relay.keystore import KeyStore  # noqa: E402

LAG_TARGET_MS = 10.0
#: A loaded handshake p50 may be this many times the quiet one.
LATENCY_RATIO_TARGET = 2.0
PROBE_GAP_SECS = 0.02
#: Units per knowledge_sync frame (about 450 bytes each: ~250 KB frames).
PAGE_UNITS = 500
S_CONFIG = """\
[relay]
lan_discovery = false

[hive]
max_units = 0
max_units_per_peer_per_day = 10000000
"""
#: Distillation comes before the peer units arrive: trust drift compares every
#: new decision with every peer unit (docs/performance.md, "Reactor stalls").
PHASES = ("quiet", "distill", "merge", "import")


@dataclasses.dataclass(frozen=True)
class Sizes:
    runs: int
    merge_units: int
    import_units: int
    decisions: int
    quiet_secs: float
    #: After a CLI command returns, S still reads what it wrote (change notice).
    settle_secs: float


FULL = Sizes(
    runs=5,
    merge_units=5_000,
    import_units=10_000,
    decisions=100_000,
    quiet_secs=2.0,
    settle_secs=1.0,
)
QUICK = Sizes(
    runs=1, merge_units=200, import_units=300, decisions=2_000, quiet_secs=0.2, settle_secs=0.1
)


def decision_lines(n: int, start: int) -> bytes:
    """``n`` brain decisions in claudectl 0.64's shape, over a few hundred commands."""
    out = []
    for i in range(n):
        t = start + i
        out.append(
            json.dumps(
                {
                    "ts": str(t),
                    "pid": 4242,
                    "project": "bench",
                    "tool": "Bash",
                    "command": f"make target{i % 300}",
                    "brain_action": "approve",
                    "brain_confidence": 0.8,
                    "brain_reasoning": "r",
                    "user_action": "accept" if i % 7 else "reject",
                    "decision_type": "session",
                    "suggested_at": t,
                    "resolved_at": t + 1,
                    "brain_decision_ms": 120,
                    "override_reason": None,
                    "rule_name": None,
                    "cache_hit": False,
                    "decision_id": f"dec_{t}_99_{i}",
                    "decision_source": "llm",
                    "few_shot_ids": [],
                }
            )
        )
    return ("\n".join(out) + "\n").encode()


# --- measuring ---------------------------------------------------------------------------


async def read_lag(reactor: Any, service: br.Service, reset: bool) -> dict[str, Any]:
    reply = await br.within(
        defer.Deferred.fromCoroutine(
            call_control(reactor, service.home, C.ReactorLag, reset=reset)
        ),
        br.STEP_TIMEOUT_SECS,
        reactor,
    )
    data: dict[str, Any] = json.loads(reply["lag_json"])
    return data


class OnewayHandshake(LineReceiver):
    """
    One handshake as a claudectl 0.64 ``connect`` client makes it (one-way:
    no cnonce), written from docs/protocol.md: challenge -> handshake ->
    handshake_ack.  S treats such a client as one that only prints knowledge
    frames, so probing sends it nothing but the handshake.
    """

    delimiter = b"\n"
    MAX_LENGTH = codec.MAX_LINE_BYTES

    def __init__(self, identity: str, psk: bytes) -> None:
        self.envelopes = codec.EnvelopeFactory(identity)
        self.psk = psk
        self.done: defer.Deferred[str] = defer.Deferred()

    def lineReceived(self, line: bytes) -> None:
        env = codec.decode(line)
        payload = env.payload if isinstance(env.payload, dict) else {}
        if env.msg_type == codec.CHALLENGE:
            body = {"proof": proof(self.psk, payload["nonce"]), "version": "0.64.0"}
            self.sendLine(codec.encode(self.envelopes.make(codec.HANDSHAKE, body)).rstrip(b"\n"))
        elif env.msg_type == codec.HANDSHAKE_ACK and not self.done.called:
            self.done.callback(str(payload.get("status")))

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(br.BenchError("S closed the probe's connection"))


class Prober:
    """Handshakes and control calls, one after another, while a phase runs."""

    def __init__(self, reactor: Any, service: br.Service, identity: str, psk: bytes) -> None:
        self.reactor = reactor
        self.service = service
        self.identity = identity
        self.psk = psk
        self.handshakes: list[float] = []
        self.controls: list[float] = []
        self._running = False
        self._done: defer.Deferred[None] | None = None

    async def handshake(self) -> float:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.service.port)
        t0 = time.perf_counter()
        proto = OnewayHandshake(self.identity, self.psk)
        await br.within(connectProtocol(endpoint, proto), br.STEP_TIMEOUT_SECS, self.reactor)
        status = await br.within(proto.done, br.STEP_TIMEOUT_SECS, self.reactor)
        took = (time.perf_counter() - t0) * 1000
        if status != "ok":
            raise br.BenchError(f"S refused the probe's handshake: {status}")
        assert proto.transport is not None
        proto.transport.loseConnection()
        return took

    def start(self) -> None:
        self._running = True
        self.handshakes, self.controls = [], []
        self._done = defer.Deferred.fromCoroutine(self._loop())

    async def stop(self) -> None:
        self._running = False
        if self._done is not None:
            await self._done

    async def _loop(self) -> None:
        while self._running:
            self.handshakes.append(await self.handshake())
            t0 = time.perf_counter()
            await self.service.status(self.reactor)
            self.controls.append((time.perf_counter() - t0) * 1000)
            await br.sleep(self.reactor, PROBE_GAP_SECS)


async def pair_prober(reactor: Any, service: br.Service, home: Any) -> Prober:
    """``relay pair`` on S, ``relay accept`` for the prober; its first handshake claims the code."""
    code = br.cli(service.home.root, "relay", "pair")["pair_code"]
    br.cli(home.root, "relay", "accept", code, service.identity)
    keys = KeyStore(home)
    identity = keys.ensure_identity()  # made by relay accept
    psk = keys.key(service.identity)
    if psk is None:
        raise br.BenchError("relay accept stored no key")
    prober = Prober(reactor, service, identity, psk)
    await prober.handshake()
    return prober


@dataclasses.dataclass
class PhaseResult:
    lag_max_ms: float
    lag_p99_ms: float
    handshake_p50_ms: float
    handshake_max_ms: float
    control_p50_ms: float
    control_max_ms: float
    secs: float


async def measure(
    reactor: Any,
    service: br.Service,
    prober: Prober,
    load: Callable[[], Any],
) -> PhaseResult:
    await read_lag(reactor, service, reset=True)
    prober.start()
    t0 = time.monotonic()
    await load()
    secs = time.monotonic() - t0
    await prober.stop()
    lag = await read_lag(reactor, service, reset=True)
    hs = prober.handshakes or [float("nan")]
    ctl = prober.controls or [float("nan")]
    return PhaseResult(
        lag_max_ms=lag["max_ms"],
        lag_p99_ms=lag["p99_ms"],
        handshake_p50_ms=statistics.median(hs),
        handshake_max_ms=max(hs),
        control_p50_ms=statistics.median(ctl),
        control_max_ms=max(ctl),
        secs=secs,
    )


async def one_run(
    reactor: Any, tmp: Path, sizes: Sizes, n: int, say: Callable[[str], None], profile: bool
) -> dict[str, PhaseResult]:
    base = tmp / f"run{n}"
    base.mkdir()
    s_home = br.new_home(base, "s", S_CONFIG)
    profile_out = tmp / f"profile-{n}.out" if profile else None
    service = await br.start_service(reactor, s_home, profile_out, env={"CLAUDECTL_LAG_PROBE": "1"})
    results: dict[str, PhaseResult] = {}
    try:
        loader = await br.pair_client(reactor, service, br.new_home(base, "loader"), PLAINTEXT)
        prober = await pair_prober(reactor, service, br.new_home(base, "prober"))
        now = int(time.time())

        async def quiet() -> None:
            await br.sleep(reactor, sizes.quiet_secs)

        say(f"run {n}: quiet")
        results["quiet"] = await measure(reactor, service, prober, quiet)

        log = decisions_path(s_home)
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        log.write_bytes(decision_lines(sizes.decisions, now - sizes.decisions))

        async def distill() -> None:
            await deferToThread(br.cli, s_home.root, "hive", "distill")
            await br.sleep(reactor, sizes.settle_secs)

        say(f"run {n}: hive distill over {sizes.decisions} decisions")
        results["distill"] = await measure(reactor, service, prober, distill)

        acked: list[int] = [0]

        def on_ack(_peer: str, env: Any) -> None:
            pairs = env.payload.get("knowledge") if isinstance(env.payload, dict) else None
            acked[0] += len(pairs) if isinstance(pairs, list) else 0

        loader.node.mesh.add_handler(codec.ACK, on_ack)
        proto = await loader.open(reactor, service.address)
        units = br.unit_records(loader.identity, sizes.merge_units, now, tag=f"stall_m{n}")

        async def merge() -> None:
            for i in range(0, len(units), PAGE_UNITS):
                page = units[i : i + PAGE_UNITS]
                loader.node.mesh.send(
                    service.identity, codec.KNOWLEDGE_SYNC, {"sync_epoch": now, "units": page}
                )
            await br.until(
                reactor,
                lambda: acked[0] >= len(units),
                br.PHASE_TIMEOUT_SECS,
                "S to acknowledge the merged units",
            )

        say(f"run {n}: merge of {len(units)} units from a peer")
        results["merge"] = await measure(reactor, service, prober, merge)
        await loader.close(reactor, proto)

        doc = base / "import.json"
        doc.write_text(
            json.dumps(
                br.unit_records("peer-imported-0001", sizes.import_units, now, tag=f"stall_i{n}")
            )
        )

        async def import_() -> None:
            await deferToThread(br.cli, s_home.root, "hive", "import", str(doc))
            await br.sleep(reactor, sizes.settle_secs)

        say(f"run {n}: hive import of {sizes.import_units} units")
        results["import"] = await measure(reactor, service, prober, import_)

    finally:
        await br.stop_service(reactor, service)
    return results


# --- reporting ---------------------------------------------------------------------------

FIELDS = [f.name for f in dataclasses.fields(PhaseResult)]


def summary(runs: list[dict[str, PhaseResult]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for phase in PHASES:
        out[phase] = {}
        for name in FIELDS:
            values = [getattr(r[phase], name) for r in runs]
            out[phase][name] = {
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
            }
    return out


def verdicts(summ: dict[str, dict[str, dict[str, float]]]) -> dict[str, bool]:
    quiet_hs = summ["quiet"]["handshake_p50_ms"]["median"]
    out = {}
    for phase in PHASES[1:]:
        out[f"{phase}_lag"] = summ[phase]["lag_max_ms"]["median"] <= LAG_TARGET_MS
        out[f"{phase}_handshake"] = (
            summ[phase]["handshake_p50_ms"]["median"] <= LATENCY_RATIO_TARGET * quiet_hs
        )
    return out


def cell(v: dict[str, float]) -> str:
    return f"{v['median']:.2f} ({v['min']:.2f}–{v['max']:.2f})"


def print_table(summ: dict[str, Any], meta: dict[str, Any], ok: dict[str, bool]) -> None:
    print(f"claudectl reactor stall benchmark — {meta['date']}, {meta['mode']} mode")
    m = meta["machine"]
    print(f"machine: {m['cpu']}, {m['nproc']} cores, Python {m['python']}, Twisted {m['twisted']}")
    print(f"command: {meta['command']}; runs: {meta['runs']}; sizes: {meta['sizes']}")
    print("figures in ms: median over the runs (min–max)")
    head = ["phase", "lag max", "lag p99", "handshake p50", "handshake max", "status p50", "s"]
    print(" | ".join(head))
    for phase in PHASES:
        row = summ[phase]
        print(
            " | ".join(
                [
                    phase,
                    cell(row["lag_max_ms"]),
                    cell(row["lag_p99_ms"]),
                    cell(row["handshake_p50_ms"]),
                    cell(row["handshake_max_ms"]),
                    cell(row["control_p50_ms"]),
                    f"{row['secs']['median']:.1f}",
                ]
            )
        )
    missed = [k for k, v in ok.items() if not v]
    print("targets: max lag <= 10 ms; loaded handshake p50 <= 2x quiet")
    print("all targets met" if not missed else "missed: " + ", ".join(missed))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one run (a smoke test)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--runs", type=int, default=None, metavar="N", help="runs (default 5)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="run S under cProfile and print where its reactor thread spent its time",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary homes and logs")
    args = p.parse_args(argv)
    if args.runs is not None and not 1 <= args.runs <= 50:
        p.error("--runs must be between 1 and 50")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not sys.platform.startswith("linux"):
        print("Error: bench_stall.py runs on Linux only", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.runs is not None:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    tmp = Path(tempfile.mkdtemp(prefix="cb-stall-"))
    status: list[int] = []
    command = "python scripts/bench_stall.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )

    def say(text: str) -> None:
        if not args.json:
            print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    async def go(reactor: Any) -> None:
        br.start_logging(tmp / "client.log")
        runs = [
            await one_run(reactor, tmp, sizes, n, say, args.profile)
            for n in range(1, sizes.runs + 1)
        ]
        summ = summary(runs)
        ok = verdicts(summ)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "mode": "quick" if args.quick else "full",
            "machine": br.machine(),
            "load_average": os.getloadavg(),
            "command": command,
            "runs": sizes.runs,
            "sizes": {
                "merge_units": sizes.merge_units,
                "import_units": sizes.import_units,
                "decisions": sizes.decisions,
            },
        }
        if args.json:
            print(json.dumps({**meta, "phases": summ, "targets": ok, "passed": all(ok.values())}))
        else:
            print_table(summ, meta, ok)
        for n in range(1, sizes.runs + 1):
            path = tmp / f"profile-{n}.out"
            if path.exists():  # the reactor thread only (cProfile sees one thread)
                print(br.dump_profile(path, f"S, run {n}"), file=sys.stderr)
        status.append(0 if all(ok.values()) else 1)

    def failed(reason: Any) -> None:
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
        br.CHILDREN.stop_all()
        for d in br.SOCKET_DIRS:
            if tmp not in d.parents:
                shutil.rmtree(d, ignore_errors=True)
        if args.keep:
            print(f"(kept {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status[0] if status else 2


if __name__ == "__main__":
    sys.exit(main())
