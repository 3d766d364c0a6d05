"""
Faults with real processes (issue 11): kill -9 in the middle of writes,
senders killed with units in flight, big control answers, a squatted
control-socket directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hive.store import hive_file, read_units_file
from claudectl.home import Home
from claudectl.relay.keystore import KeyStore
from tests.common import ServeProcess, run_cli, subprocess_env, temp_home
from tests.test_gossip import NOW, put, unit_json


def temp_files(home: Home) -> list[str]:
    return sorted(str(p) for d in home.state_dirs() if d.is_dir()
                  for p in d.iterdir() if p.name.endswith(".tmp"))


class KillDuringMergeTests(SynchronousTestCase):
    """kill -9 during a large ``hive import`` merge, 20 times (item 6)."""

    ROUNDS = 20
    UNITS = 1500

    def test_kill_loop(self) -> None:
        home = temp_home(self)
        me = KeyStore(home).ensure_identity()
        base = [unit_json(f"ku_base_{i}", me, cmd=f"base {i} " + "b" * 300) for i in range(500)]
        put(home, me, *base)
        docs = []
        for r in range(self.ROUNDS):
            path = home.root / f"import-{r}.json"
            path.write_text(json.dumps([unit_json(f"ku_{r}_{i}", me, cmd=f"round {r} {i} "
                                                  + "x" * 300) for i in range(self.UNITS)]))
            docs.append(path)
        rng = random.Random(11)
        accepted = {u["id"] for u in base}
        left_behind = 0
        started = time.monotonic()
        env = subprocess_env(home)
        for r, doc in enumerate(docs):
            proc = subprocess.Popen(
                [sys.executable, "-m", "claudectl", "--home", str(home.root), "hive", "import",
                 str(doc)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            if r % 4 == 3:
                time.sleep(rng.uniform(0.2, 1.0))  # anywhere: parse, lock, merge, write
            else:
                # Wait for the merge's temporary file, then kill the writer mid-write.
                deadline = time.monotonic() + 20
                while proc.poll() is None and time.monotonic() < deadline:
                    if any(n.startswith(".knowledge.jsonl.") for n in os.listdir(home.hive)):
                        break
                    time.sleep(0.0005)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait(10)
            if rc == 0:
                accepted |= {f"ku_{r}_{i}" for i in range(self.UNITS)}
            left_behind += len(temp_files(home))
            # Every file parses, nothing accepted before the kill is lost,
            # and a round is all or nothing.
            loaded = read_units_file(hive_file(home, "knowledge.jsonl"))
            self.assertEqual(loaded.bad, [])
            ids = {u.id for u in loaded.store.units()}
            self.assertLessEqual(accepted, ids)
            round_ids = {i for i in ids if i.startswith(f"ku_{r}_")}
            self.assertIn(len(round_ids), (0, self.UNITS))
            accepted |= round_ids
        self.assertLess(time.monotonic() - started, 40)
        self.assertGreater(left_behind, 0, "no kill landed inside a write: the test proved nothing")
        self.assertFalse((home.hive / "quarantine.jsonl").exists())
        # The next start sweeps what the killed writers left.
        time.sleep(1.0)
        serve = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(serve.stop)
        serve.port()
        self.assertEqual(temp_files(home), [])
        self.assertEqual(serve.stop(), 0)


def fake_peers(home: Home, count: int) -> list[str]:
    """``count`` paired peers and their trust records (files written directly, no fsync)."""
    home.peers.mkdir(parents=True, exist_ok=True)
    ids = [f"host{i:04d}-{i:08x}" for i in range(count)]
    trust = {}
    for i, peer in enumerate(ids):
        # No .meta: a service would dial every peer with an address.
        (home.peers / f"{peer}.key").write_text(f"{i:064x}")
        trust[peer] = {"peer_id": peer, "trust_level": 0.5, "knowledge_accepted": 0,
                       "knowledge_conflicted": 0, "first_seen": 1, "last_sync": 1,
                       "quarantined_until": 0, "frozen": False, "freeze_reason": None,
                       "daily_received": {}, "last_anomaly_at": None}
    home.hive.mkdir(parents=True, exist_ok=True)
    (home.hive / "trust.json").write_text(json.dumps(trust))
    return ids


class BigControlAnswerTests(SynchronousTestCase):
    """`relay peers --json` with 1,000 known peers against a real service (item 9)."""

    def test_thousand_peers(self) -> None:
        home = temp_home(self)
        KeyStore(home).ensure_identity()
        ids = fake_peers(home, 1000)
        serve = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(serve.stop)
        serve.port()
        started = time.monotonic()
        r = run_cli(home, "relay", "peers", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = json.loads(r.stdout)
        self.assertEqual([row["identity"] for row in rows], ids)
        self.assertGreater(len(r.stdout), 2 * 65_535)  # several AMP values' worth
        self.assertTrue(all(row["trust"] == 0.5 for row in rows))
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(serve.stop(), 0)
