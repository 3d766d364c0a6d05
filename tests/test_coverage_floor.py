"""scripts/coverage_floor.py: the per-module coverage floor of CI and tox."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "coverage_floor.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("coverage_floor", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


floor = _load()


def report(**modules: tuple[int, int]) -> dict[str, Any]:
    """A `coverage json` report: path -> (covered lines, statements)."""
    return {
        "files": {
            path.replace("__", "/") + ".py": {
                "summary": {"covered_lines": covered, "num_statements": statements}
            }
            for path, (covered, statements) in modules.items()
        }
    }


class FloorTests(SynchronousTestCase):
    def run_script(self, data: dict[str, Any], *args: str) -> tuple[int, str]:
        path = Path(self.mktemp())
        path.write_text(json.dumps(data))
        out = io.StringIO()
        return floor.main([str(path), *args], out), out.getvalue()

    def test_modules_under_the_floor_fail_lowest_first(self) -> None:
        data = report(
            claudectl__a=(90, 100),
            claudectl__b=(84, 100),
            claudectl__c=(10, 100),
            claudectl__empty=(0, 0),
            _tox__site_packages__claudectl__d=(85, 100),
            tests__x=(0, 100),
        )
        code, out = self.run_script(data)
        self.assertEqual(code, 1)
        lines = out.splitlines()
        self.assertEqual(
            [line.split()[0] for line in lines[:2]], ["claudectl/c.py", "claudectl/b.py"]
        )
        self.assertIn("84.0 %  (84/100 lines)", lines[1])
        self.assertEqual(lines[2], "coverage floor: 2 of 5 module(s) under 85 %")
        self.assertNotIn("tests/x.py", out)

    def test_installed_copies_count_by_their_package_path(self) -> None:
        data = report(_tox__lib__site_packages__claudectl__cli__base=(1, 100))
        code, out = self.run_script(data)
        self.assertEqual(code, 1)
        self.assertTrue(out.startswith("  claudectl/cli/base.py "), out)

    def test_all_above_the_floor_pass(self) -> None:
        code, out = self.run_script(report(claudectl__a=(85, 100)))
        self.assertEqual((code, out), (0, "coverage floor: all 1 module(s) at or above 85 %\n"))
        code, _ = self.run_script(report(claudectl__a=(85, 100)), "--floor", "90")
        self.assertEqual(code, 1)

    def test_unreadable_report(self) -> None:
        out = io.StringIO()
        self.assertEqual(floor.main([self.mktemp()], out), 2)
        self.assertIn("cannot read", out.getvalue())
