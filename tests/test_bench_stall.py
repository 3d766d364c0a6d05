"""
``scripts/bench_stall.py --quick`` still runs against a real ``relay serve``.

Not a timed test: the quick sizes measure nothing meaningful.  It checks
that every phase was measured (the service's own lag probe answered, the
probe's handshakes succeeded), that the JSON report has its shape, and that
no temporary directory is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.common import bench_tmp, kill_strays, subprocess_env, temp_home

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_stall.py"


class QuickRunTests(TestCase):
    def test_quick_run_measures_every_phase(self) -> None:
        home = temp_home(self)
        tmp = bench_tmp(self, "cb-")
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", "--json"],
            env=subprocess_env(home, TMPDIR=str(tmp)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        # 0: targets met, 1: missed (a loaded machine); 2 would be a failure.
        self.assertIn(done.returncode, (0, 1), done.stderr)
        report = json.loads(done.stdout)
        self.assertEqual(report["mode"], "quick")
        self.assertEqual(report["passed"], done.returncode == 0)
        self.assertEqual(list(report["phases"]), ["quiet", "distill", "merge", "import"])
        for phase, row in report["phases"].items():
            for key in ("lag_max_ms", "lag_p99_ms", "handshake_p50_ms", "control_p50_ms"):
                value = row[key]["median"]
                self.assertGreaterEqual(value, 0.0, (phase, key))
                self.assertLess(value, 60_000.0, (phase, key))
            self.assertGreaterEqual(row["lag_max_ms"]["median"], row["lag_p99_ms"]["median"])
        self.assertEqual(os.listdir(tmp), [])


class StrayTests(TestCase):
    def test_processes_left_by_a_killed_run_are_stopped(self) -> None:
        # What bench_tmp's cleanup does after a script the test's timeout
        # killed: its services (own sessions) still run from the directory.
        marker = f"stray-marker-{os.getpid()}-{id(self)}"
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", marker],
            start_new_session=True,
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())
        # (Until the child has exec'd, its command line is still this process's.)
        cmdline = Path(f"/proc/{child.pid}/cmdline")
        for _ in range(500):
            if marker.encode() in cmdline.read_bytes():
                break
            time.sleep(0.01)
        self.assertEqual(kill_strays(marker), 1)
        self.assertEqual(child.wait(10), -9)
        self.assertEqual(kill_strays(marker), 0)
