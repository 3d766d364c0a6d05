"""
Attack a real ``claudectl relay serve``: a paired peer pipelines
``knowledge_sync`` frames -- a new unit, then copies of it, again and again --
and never reads what comes back.

The service runs in a throw-away home (``tempfile.mkdtemp()``, never ``~``),
listens on 127.0.0.1 only, and holds ``--units`` units (``hive import``; over
``max_units``, 500 by default, the store is full and every new peer unit is
evicted as it is stored).  The attacker is the minimal plaintext client of
``scripts/bench_relay.py``, paired by a key stored in both homes.  It prints
the service's resident memory before and at its peak, the log lines the flood
caused and the service's hive counters (``relay status --json``).  Copies are
duplicates, counted and not logged; a unit the full store evicted is not
stored and evicted again by each copy; batches that pile up faster than they
are merged hold the peer's link (docs/gossip.md, "Bounded work per peer")::

    python scripts/attack_copy_flood.py --units 5000 --frames 20000
    python scripts/attack_copy_flood.py --units 400 --frames 4000 --units-per-frame 20

Exit status 1 when the service died or grew by more than ``--max-growth-mib``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from attack_request_flood import positive, rss_mib  # noqa: E402
from bench_gossip import unit_json  # noqa: E402
from bench_relay import MiniClient, unit_records  # noqa: E402

from claudectl.home import Home  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.keystore import KeyStore  # noqa: E402
from tests.common import ServeProcess, subprocess_env  # noqa: E402

ATTACKER = "mallory-copies"


def flood(client: MiniClient, frames: int, copies: int, per_frame: int, now: int) -> bytes:
    """``frames`` sync frames of ``per_frame`` units each: a frame of new
    units, then ``copies`` frames of copies of them (other hop counts)."""
    out = []
    for f in range(frames):
        group = f // (copies + 1)
        units = []
        for i in range(per_frame):
            u = unit_json(f"ku_atk_{group}_{i}", "peer-zzzz0001", f"attack {group} {i}", now)
            u["propagation_count"] = 1 + f % (copies + 1) % 3
            units.append(u)
        env = client.envelopes.make(codec.KNOWLEDGE_SYNC, {"sync_epoch": now, "units": units})
        out.append(codec.encode(env))
    return b"".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=positive, default=5000, help="units in the service's store")
    ap.add_argument("--frames", type=positive, default=20000, help="sync frames the attacker sends")
    ap.add_argument("--copies", type=positive, default=999, help="copy frames after each new one")
    ap.add_argument("--units-per-frame", type=positive, default=1, help="units in each frame")
    ap.add_argument("--watch-secs", type=float, default=10.0, help="how long to watch the RSS")
    ap.add_argument("--max-growth-mib", type=int, default=64, help="fail above this growth")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="attack-copies-"))
    srv = None
    try:
        home = Home(tmp / "service")
        home.root.mkdir(parents=True)
        sid = KeyStore(home).ensure_identity()
        now = int(time.time())
        units = unit_records(sid, args.units, now, tag="copies")
        (tmp / "units.json").write_text(json.dumps({"units": units}), encoding="utf-8")
        cli = [sys.executable, "-m", "claudectl", "--home", str(home.root)]
        env = subprocess_env(home)
        subprocess.run(
            [*cli, "hive", "import", str(tmp / "units.json")],
            check=True,
            env=env,
            capture_output=True,
        )
        psk = bytes(range(32))
        KeyStore(home).save_key(ATTACKER, psk)
        srv = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        client = MiniClient(ATTACKER, psk, sid)
        link, _ = client.connect(("127.0.0.1", srv.port()))
        time.sleep(1.5)  # the link-up work is done
        lines_before = len(srv.lines)
        before = peak = rss_mib(srv.proc.pid)
        data = flood(client, args.frames, args.copies, args.units_per_frame, now)
        link.sock.sendall(data)  # ... and never read
        deadline = time.monotonic() + args.watch_secs
        while time.monotonic() < deadline:
            time.sleep(0.2)
            peak = max(peak, rss_mib(srv.proc.pid))
        status = subprocess.run(
            [*cli, "relay", "status", "--json"], env=env, capture_output=True, text=True
        )
        service = json.loads(status.stdout).get("service") or {}
        alive = srv.proc.poll() is None
        link.sock.close()
        growth = peak - before
        print(
            f"{args.units} units stored; {args.frames} frames ({len(data) / 2**20:.1f} MiB) "
            f"never read: service RSS {before} MiB -> peak {peak} MiB (+{growth} MiB); "
            f"log lines: {len(srv.lines) - lines_before}; service alive: {alive}"
        )
        print("hive counters:", json.dumps(service.get("hive", {}), sort_keys=True))
        return 0 if alive and growth <= args.max_growth_mib else 1
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
