#!/usr/bin/env python3
"""
Fail when a module's line coverage is under the floor.

    python -m coverage json -o coverage.json
    python scripts/coverage_floor.py [coverage.json] [--floor 85] [--prefix claudectl/]

Reads the report of ``coverage json`` and prints every module under
``--prefix`` whose line coverage is below ``--floor`` percent (lowest
first, with its covered/total statements), then one summary line.  Exit
status 1 when any module is below the floor, 0 otherwise (2 for an
unreadable report).  Modules without statements (an empty ``__init__.py``)
count as covered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_FLOOR = 85.0


def module_path(path: str, prefix: str) -> str | None:
    """``path`` from ``prefix`` on (an installed copy's site-packages path
    included, as tox measures the wheel), or None outside it."""
    path = path.replace("\\", "/")
    if path.startswith(prefix):
        return path
    at = path.rfind("/" + prefix)
    return path[at + 1 :] if at >= 0 else None


def below_floor(
    report: dict[str, Any], floor: float, prefix: str = "claudectl/"
) -> list[tuple[str, float, int, int]]:
    """``(module path, percent, covered, statements)`` of every module under the floor."""
    low = []
    for name, data in report.get("files", {}).items():
        path = module_path(name, prefix)
        if path is None:
            continue
        summary = data["summary"]
        statements = int(summary["num_statements"])
        covered = int(summary["covered_lines"])
        if statements == 0:
            continue
        percent = 100.0 * covered / statements
        if percent < floor:
            low.append((path, percent, covered, statements))
    return sorted(low, key=lambda row: (row[1], row[0]))


def main(argv: list[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("report", nargs="?", default="coverage.json")
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR)
    parser.add_argument("--prefix", default="claudectl/")
    args = parser.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        out.write(f"coverage floor: cannot read {args.report}: {e}\n")
        return 2
    modules = [p for p in report.get("files", {}) if module_path(p, args.prefix) is not None]
    low = below_floor(report, args.floor, args.prefix)
    for path, percent, covered, statements in low:
        out.write(f"  {path:<50} {percent:5.1f} %  ({covered}/{statements} lines)\n")
    if low:
        out.write(
            f"coverage floor: {len(low)} of {len(modules)} module(s) under {args.floor:g} %\n"
        )
        return 1
    out.write(f"coverage floor: all {len(modules)} module(s) at or above {args.floor:g} %\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
