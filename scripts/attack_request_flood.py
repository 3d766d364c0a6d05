"""
Attack a real ``claudectl relay serve``: a paired peer floods
``knowledge_request`` frames and never reads what comes back.

The service runs in a throw-away home (``tempfile.mkdtemp()``, never ``~``),
listens on 127.0.0.1 only, and holds UNITS units (``hive import``); the
attacker is the minimal plaintext client of ``scripts/bench_relay.py``
(written from docs/protocol.md), paired by a key stored in both homes.  It
prints the service's resident memory before and at its peak, and how many
answers the service queued.  A service that answers every request grows by
one answer per request; this project's holds one request per peer while an
answer is going out (docs/gossip.md, "One answer at a time per peer")::

    python scripts/attack_request_flood.py --units 2000 --requests 300

Exit status 1 when the service grew by more than ``--max-growth-mib``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_relay import MiniClient, unit_records  # noqa: E402

from claudectl.home import Home  # noqa: E402
from claudectl.relay import codec  # noqa: E402
from claudectl.relay.keystore import KeyStore  # noqa: E402
from tests.common import ServeProcess, subprocess_env  # noqa: E402

ATTACKER = "mallory-flood"


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


@dataclass
class Attacked:
    """A real ``relay serve`` in a throw-away home and a paired attacker linked to it."""

    home: Home
    srv: ServeProcess
    client: MiniClient
    link: Any
    #: ``python -m claudectl --home <home>``, and the environment to run it in.
    cli: list[str]
    env: dict[str, str]
    now: int

    def peak_rss(self, secs: float, step: float = 0.2) -> int:
        """The service's highest resident memory (MiB) seen over ``secs``."""
        peak = rss_mib(self.srv.proc.pid)
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            time.sleep(step)
            peak = max(peak, rss_mib(self.srv.proc.pid))
        return peak


@contextlib.contextmanager
def attacked_service(units: int, tag: str, attacker: str, settle: float) -> Iterator[Attacked]:
    """
    A service holding ``units`` units (``hive import``), listening on 127.0.0.1
    only, in a ``tempfile.mkdtemp()`` home (never ``~``); ``attacker`` paired
    with it by a key stored in both homes and linked (the minimal plaintext
    client), ``settle`` seconds after its link-up.  Stopped and removed after.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"attack-{tag}-"))
    srv = None
    try:
        home = Home(tmp / "service")
        home.root.mkdir(parents=True)
        sid = KeyStore(home).ensure_identity()
        now = int(time.time())
        records = unit_records(sid, units, now, tag=tag)
        (tmp / "units.json").write_text(json.dumps({"units": records}), encoding="utf-8")
        cli = [sys.executable, "-m", "claudectl", "--home", str(home.root)]
        env = subprocess_env(home)
        subprocess.run(
            [*cli, "hive", "import", str(tmp / "units.json")],
            check=True,
            env=env,
            capture_output=True,
        )
        psk = bytes(range(32))
        KeyStore(home).save_key(attacker, psk)
        srv = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        client = MiniClient(attacker, psk, sid)
        link, _ = client.connect(("127.0.0.1", srv.port()))
        time.sleep(settle)  # the link-up work is done
        try:
            yield Attacked(home, srv, client, link, cli, env, now)
        finally:
            link.sock.close()
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def attack_args(doc: str, units: int, extra: dict[str, tuple[Any, int, str]]) -> Any:
    """
    The attack scripts' command line: ``--units`` (``units`` by default),
    the script's own options (``extra``: name -> (type, default, help)),
    ``--watch-secs`` and ``--max-growth-mib``.
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--units", type=positive, default=units, help="units in the service's store")
    for name, (kind, default, text) in extra.items():
        ap.add_argument(name, type=kind, default=default, help=text)
    ap.add_argument("--watch-secs", type=float, default=10.0, help="how long to watch the RSS")
    ap.add_argument("--max-growth-mib", type=int, default=64, help="fail above this growth")
    return ap.parse_args()


def main() -> int:
    args = attack_args(
        __doc__, 2000, {"--requests": (positive, 300, "requests the attacker sends")}
    )
    with attacked_service(args.units, "flood", ATTACKER, settle=1.0) as a:
        before = rss_mib(a.srv.proc.pid)
        frames = b"".join(
            codec.encode(a.client.envelopes.make(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}))
            for _ in range(args.requests)
        )
        a.link.sock.sendall(frames)  # ... and never read
        peak = a.peak_rss(args.watch_secs, step=0.25)
        answered = sum(1 for text in a.srv.lines if "answered a knowledge request" in text)
        alive = a.srv.proc.poll() is None
    growth = peak - before
    print(
        f"{args.units} units, {args.requests} requests never read: service RSS {before} MiB "
        f"-> peak {peak} MiB (+{growth} MiB); answers queued: {answered}; "
        f"service alive: {alive}"
    )
    return 0 if alive and growth <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
