"""
``scripts/bench_hooks.py`` still runs: a few calls per case, checked for
plausibility (every case measured, positive, ordered), not for the goal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.common import subprocess_env, temp_home

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_hooks.py"


class SmokeRunTests(SynchronousTestCase):
    def test_few_calls(self) -> None:
        home = temp_home(self)
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--calls", "3", "--units", "20", "--json"],
            env=subprocess_env(home),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertIn(done.returncode, (0, 1), done.stderr)
        result = json.loads(done.stdout)
        self.assertEqual(result["calls"], 3)
        self.assertEqual(
            sorted(result["cases"]),
            sorted(
                [
                    "SessionStart (cold: built from the store)",
                    "SessionStart (new units: cached, refreshed)",
                    "SessionStart (warm: cached context)",
                    "PermissionRequest (gate off)",
                    "PostToolUse (answers a request)",
                    "PostToolUse (nothing waiting)",
                    "PermissionRequest (gate auto, allows)",
                    "python -S -c pass (interpreter start)",
                ]
            ),
        )
        for name, s in result["cases"].items():
            self.assertEqual(s["calls"], 3, name)
            self.assertTrue(0 < s["min"] <= s["p50"] <= s["p90"] <= s["max"], (name, s))
        self.assertEqual(result["goal_met"], done.returncode == 0)
