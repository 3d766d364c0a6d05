"""
``scripts/bench_hub.py --quick`` still runs: a real hub and a real ``relay
serve`` registered at it, a request answered over a direct and a spliced
link, bulk bytes and idle channels through the hub.  It checks that every row
was measured and is plausible and that nothing is left behind, not that the
targets were met (the machine is shared).  About 10 s: real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.common import bench_tmp, subprocess_env, temp_home

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_hub.py"


class QuickRunTests(TestCase):
    def test_quick_run_measures_every_row(self) -> None:
        home = temp_home(self)
        tmp = bench_tmp(self, "cbh-")
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--quick", "--json"],
            env=subprocess_env(home, TMPDIR=str(tmp)),
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.assertIn(done.returncode, (0, 1), done.stderr)
        result = json.loads(done.stdout)
        rows = result["rows"]
        for name in (
            "direct_p50_ms",
            "hub_p50_ms",
            "hub_adds_p50_ms",
            "hub_rss_mib",
            "bulk_mb_per_s",
        ):
            self.assertEqual(rows[name]["runs"], 1, name)
        self.assertGreater(rows["hub_p50_ms"]["median"], 0)
        self.assertGreater(rows["bulk_mb_per_s"]["median"], 1)
        self.assertGreater(rows["hub_rss_mib"]["median"], result["hub_base_rss_mib"])
        self.assertEqual(list(tmp.glob("claudectl-bench-hub-*")), [])
