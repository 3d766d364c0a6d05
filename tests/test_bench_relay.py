"""
``scripts/bench_relay.py`` still runs against the relay core.

The benchmark is not a timed test: this runs its ``--smoke`` size (a few
handshakes, frames and idle links) in a temporary directory and checks that
every measurement happened and is plausible, not that targets were met.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.common import subprocess_env, temp_home

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_relay.py"


class SmokeRunTests(TestCase):
    def run_smoke(self) -> tuple[subprocess.CompletedProcess[str], Path]:
        home = temp_home(self)
        tmp = home.root / "tmp"
        tmp.mkdir()
        env = subprocess_env(home, TMPDIR=str(tmp))
        done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json"],
                              env=env, capture_output=True, text=True, timeout=120)
        return done, tmp

    def test_smoke_run_measures_everything(self) -> None:
        done, tmp = self.run_smoke()
        # 0: targets met, 1: a target missed (a loaded machine); 2 would be a crash.
        self.assertIn(done.returncode, (0, 1), done.stderr)
        report = json.loads(done.stdout)
        self.assertEqual(report["mode"], "smoke")
        data = {r["metric"].split(",")[0]: r["data"] for r in report["results"]}
        self.assertEqual(sorted(data), ["handshake", "memory per idle authenticated link (n=4)",
                                        "one-way throughput", "receive path only",
                                        "request -> reply"])
        handshake = data["handshake"]
        self.assertEqual(handshake["modes"], ["mutual"])
        self.assertGreater(handshake["p50_ms"], 0)
        self.assertLessEqual(handshake["p50_ms"], handshake["p99_ms"])
        self.assertGreater(data["request -> reply"]["p50_ms"], 0)
        for name in ("one-way throughput", "receive path only"):
            self.assertEqual(data[name]["n"], 500)
            self.assertGreater(data[name]["receiver_msgs_per_s"], 0)
        memory = data["memory per idle authenticated link (n=4)"]
        self.assertEqual(memory["connected"], 4)
        self.assertGreater(memory["rss_before_kib"], 0)
        # The temporary homes are removed afterwards.
        self.assertEqual(list(tmp.iterdir()), [])
