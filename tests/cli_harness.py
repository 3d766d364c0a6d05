"""
Run ``claudectl`` command lines in the test process (see README, "Testing the
CLI in-process").

:func:`run_command` goes through the program's own dispatcher
(:func:`claudectl.cli.dispatch`): the same argument parsing, the same
``Error:`` lines and JSON errors, the same exit codes, but with stdout and
stderr captured and the reactor that trial is already running, so a trial
``TestCase`` returns (or awaits) its Deferred.  It always passes ``--home``
(a temp home from :func:`tests.common.temp_home`), never the real home.

:func:`run_now` is for commands that finish without waiting on the reactor
(blocking ones, or one that fails before any I/O): it returns at once and
fails the test if the command is still waiting.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from claudectl.cli import dispatch
from claudectl.home import Home


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    # The names of subprocess.CompletedProcess, so a test can swap run_cli
    # (a real process) and run_now/run_command (in-process).
    @property
    def returncode(self) -> int:
        return self.code

    @property
    def stdout(self) -> str:
        return self.out

    @property
    def stderr(self) -> str:
        return self.err


def _argv(home: Home, args: tuple[str, ...]) -> list[str]:
    if "--home" in args:
        raise ValueError("run_command passes --home itself")
    return ["--home", str(home.root), *args]


def run_command(
    home: Home, *args: str, reactor: Any = None, cwd: Path | None = None
) -> Deferred[CliResult]:
    """``claudectl --home HOME ARGS`` in-process, as if started in ``cwd``
    (default: the home): a Deferred of its result."""
    if reactor is None:
        from twisted.internet import reactor as default

        reactor = default
    out, err = io.StringIO(), io.StringIO()
    d = dispatch(reactor, _argv(home, args), stdout=out, stderr=err, cwd=cwd or home.root)
    return d.addCallback(lambda code: CliResult(code, out.getvalue(), err.getvalue()))


def run_now(home: Home, *args: str, reactor: Any = None) -> CliResult:
    """
    :func:`run_command` for a command that does not wait on the reactor (by
    default a ``MemoryReactorClock``, so nothing real can happen); raises
    AssertionError if it is still waiting.
    """
    if reactor is None:
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
    results: list[Any] = []
    run_command(home, *args, reactor=reactor).addBoth(results.append)
    if not results:
        raise AssertionError(f"claudectl {' '.join(args)} is still waiting on the reactor")
    if not isinstance(results[0], CliResult):
        results[0].raiseException()
    result: CliResult = results[0]
    return result
