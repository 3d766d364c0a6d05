"""
``scripts/bench_tui.py`` still runs: two rounds, checked for plausibility
(every measurement present and positive), not for the latency goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.common import subprocess_env, temp_home

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_tui.py"


class SmokeRunTests(SynchronousTestCase):
    def test_two_rounds(self) -> None:
        import shutil
        import tempfile

        home = temp_home(self)
        # Short: the services' control sockets may fall back to TMPDIR
        # (AF_UNIX paths are limited to about 104 bytes).
        tmp = Path(tempfile.mkdtemp(prefix="tb"))
        self.addCleanup(shutil.rmtree, tmp, True)
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--rounds", "2", "--json"],
            env=subprocess_env(home, TMPDIR=str(tmp)),
            capture_output=True,
            text=True,
            timeout=180,
        )
        self.assertIn(done.returncode, (0, 1), done.stderr)
        result = json.loads(done.stdout)
        for key in (
            "up_from_connect_request",
            "up_from_connect_answer",
            "down_from_disconnect_request",
        ):
            self.assertEqual(result[key]["n"], 2)
            self.assertGreaterEqual(result[key]["min_ms"], 0)
        self.assertGreaterEqual(
            result["up_from_connect_request"]["min_ms"], result["up_from_connect_answer"]["min_ms"]
        )
        self.assertEqual(list(tmp.iterdir()), [])  # its temporary homes are gone
