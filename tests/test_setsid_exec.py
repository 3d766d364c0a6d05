"""
The setsid trampoline (claudectl.process.setsid_exec) in-process, with
os.setsid/os.execvp replaced: what it runs, and the one line it writes when
it cannot.  (Real runs replace the process, so no coverage hook sees them:
tests.test_delegation_process spawns it for real.)
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.process import setsid_exec


class _Execed(Exception):
    pass


class TrampolineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.calls: list[Any] = []
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)
        self.patch(os, "setsid", lambda: self.calls.append("setsid"))

    def execvp(self, program: str, args: list[str]) -> None:
        self.calls.append((program, args))
        raise _Execed()

    def test_new_session_then_exec(self) -> None:
        self.patch(os, "execvp", self.execvp)
        with self.assertRaises(_Execed):
            setsid_exec.main(["setsid_exec.py", "--", "claude", "-p", "hi"])
        self.assertEqual(self.calls, ["setsid", ("claude", ["claude", "-p", "hi"])])
        self.assertEqual(self.err.getvalue(), "")

    def test_already_a_session_leader(self) -> None:
        def eperm() -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "setsid", eperm)
        self.patch(os, "execvp", self.execvp)
        with self.assertRaises(_Execed):
            setsid_exec.main(["setsid_exec.py", "claude"])  # no "--" is fine too
        self.assertEqual(self.calls, [("claude", ["claude"])])

    def test_cannot_exec(self) -> None:
        def missing(program: str, args: list[str]) -> None:
            raise FileNotFoundError(2, "No such file or directory")

        self.patch(os, "execvp", missing)
        self.assertEqual(setsid_exec.main(["setsid_exec.py", "--", "nope"]), 127)
        self.assertEqual(
            self.err.getvalue(), "claudectl-spawn-error: nope: No such file or directory\n"
        )

    def test_no_program(self) -> None:
        self.assertEqual(setsid_exec.main(["setsid_exec.py", "--"]), 127)
        self.assertEqual(self.err.getvalue(), "claudectl-spawn-error: no program given\n")
        self.assertEqual(self.calls, [])
