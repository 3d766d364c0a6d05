"""
The hook command's own process-level paths, in-process: ``main`` (argv,
stdin, exit 0), the deadline, ``python -S claudectl/hooks/run.py`` and
``python -m claudectl.hooks``.  (The real processes run with ``-S`` in
tests.test_hooks_entry, where no coverage hook can start.)
"""

from __future__ import annotations

import io
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hooks import entry, runtime
from claudectl.hooks.files import HookHome
from tests.common import temp_home


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


class MainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.log = self.home.root / ".claudectl" / "hooks" / "hooks.log"

        # main allows the slow paths a real SIGALRM: never left on in trial's process.
        self.addCleanup(runtime.allow, False)

    def main(self, argv: list[str], stdin: bytes) -> tuple[int, str]:
        out = io.StringIO()
        self.patch(sys, "stdin", _Stdin(stdin))
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as cm:
            entry.main(argv)
        return cm.exception.code, out.getvalue()  # type: ignore[return-value]

    def test_bad_input_exits_zero_quietly_and_logs(self) -> None:
        code, out = self.main(["SessionStart", f"--home={self.home.root}"], b"[1, 2]")
        self.assertEqual((code, out), (0, ""))
        self.assertIn(
            "SessionStart: ValueError: hook input is not a JSON object", self.log.read_text()
        )
        # main let the slow paths arm a deadline and detach.
        self.assertEqual((runtime._deadline_allowed, runtime.may_detach()), ([True], True))

    def test_deadline_is_logged(self) -> None:
        def slow(*args: Any) -> None:
            runtime._on_alarm(signal.SIGALRM, None)

        self.patch(entry, "handle", slow)
        code, out = self.main(["SessionStart", "--home", str(self.home.root)], b"{}")
        self.assertEqual((code, out), (0, ""))
        self.assertIn(f"SessionStart: gave up after {entry.DEADLINE_SECS}s", self.log.read_text())

    def test_arm_deadline_only_when_allowed(self) -> None:
        calls: list[Any] = []
        self.patch(signal, "signal", lambda *a: calls.append(("signal", *a)))
        self.patch(signal, "alarm", lambda secs: calls.append(("alarm", secs)))
        runtime.arm_deadline()
        self.assertEqual(calls, [])
        runtime.allow(True)
        runtime.arm_deadline()
        self.assertEqual(
            calls,
            [("signal", signal.SIGALRM, runtime._on_alarm), ("alarm", runtime.DEADLINE_SECS)],
        )

    def test_an_unusable_home_is_no_error(self) -> None:
        def broken(*args: Any) -> HookHome:
            raise OSError("no home")

        self.patch(HookHome, "resolve", broken)
        out = io.StringIO()
        self.assertEqual(entry.run(["Stop"], io.BytesIO(b"{}"), out, {}), 0)
        self.assertEqual(out.getvalue(), "")

    def test_a_failure_to_log_is_ignored(self) -> None:
        class NoData:
            @property
            def data(self) -> str:
                raise OSError("read-only")

        runtime.log_error(NoData(), "Stop", "something")  # does not raise
        self.assertFalse(self.log.exists())


class ScriptTests(SynchronousTestCase):
    """Both ways Claude Code may start the hook call ``entry.main``."""

    def setUp(self) -> None:
        self.calls: list[Any] = []
        self.patch(entry, "main", lambda argv=None: self.calls.append(argv))
        path = list(sys.path)
        self.addCleanup(sys.path.__setitem__, slice(None), path)

    def test_run_py_puts_the_package_first_on_sys_path(self) -> None:
        script = Path(entry.__file__).with_name("run.py")
        runpy.run_path(str(script), run_name="__main__")
        self.assertEqual(self.calls, [None])
        self.assertEqual(Path(sys.path[0]), script.parent.parent.parent)
        # Imported as a module it does nothing.
        runpy.run_path(str(script), run_name="claudectl.hooks.run")
        self.assertEqual(self.calls, [None])

    def test_dash_m(self) -> None:
        sys.modules.pop("claudectl.hooks.__main__", None)
        runpy.run_module("claudectl.hooks", run_name="__main__", alter_sys=False)
        self.assertEqual(self.calls, [None])
