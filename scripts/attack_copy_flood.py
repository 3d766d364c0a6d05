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

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from attack_request_flood import attack_args, attacked_service, positive, rss_mib  # noqa: E402
from bench_gossip import unit_json  # noqa: E402
from bench_relay import MiniClient  # noqa: E402

from claudectl.relay import codec  # noqa: E402

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
    args = attack_args(
        __doc__,
        5000,
        {
            "--frames": (positive, 20000, "sync frames the attacker sends"),
            "--copies": (positive, 999, "copy frames after each new one"),
            "--units-per-frame": (positive, 1, "units in each frame"),
        },
    )
    with attacked_service(args.units, "copies", ATTACKER, settle=1.5) as a:
        lines_before = len(a.srv.lines)
        before = rss_mib(a.srv.proc.pid)
        data = flood(a.client, args.frames, args.copies, args.units_per_frame, a.now)
        a.link.sock.sendall(data)  # ... and never read
        peak = a.peak_rss(args.watch_secs)
        status = subprocess.run(
            [*a.cli, "relay", "status", "--json"], env=a.env, capture_output=True, text=True
        )
        service = json.loads(status.stdout).get("service") or {}
        alive = a.srv.proc.poll() is None
        lines = len(a.srv.lines) - lines_before
    growth = peak - before
    print(
        f"{args.units} units stored; {args.frames} frames ({len(data) / 2**20:.1f} MiB) "
        f"never read: service RSS {before} MiB -> peak {peak} MiB (+{growth} MiB); "
        f"log lines: {lines}; service alive: {alive}"
    )
    print("hive counters:", json.dumps(service.get("hive", {}), sort_keys=True))
    return 0 if alive and growth <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
