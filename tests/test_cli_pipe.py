"""
A reader that goes away (``claudectl ... | head -1``): the command ends at
once, quietly, with status 141 -- it used to hang when its error report went
to the same closed pipe (``2>&1``), and to blame the home directory.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.cli import EXIT_BROKEN_PIPE, dispatch
from tests.common import subprocess_env, temp_home


def closed_reader_run(home, *args: str, merge_stderr: bool, **extra: str) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """Run the CLI with its stdout a pipe whose reader is closed before it writes."""
    env = subprocess_env(home)
    env.pop("PYTHONUNBUFFERED")  # as a user runs it: output buffered, flushed at exit
    env.update(extra)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the reader is gone before the child starts
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "claudectl", "--home", str(home.root), *args],
            stdout=write_fd,
            stderr=write_fd if merge_stderr else err_w,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(home.root),
        )
    finally:
        os.close(write_fd)
        os.close(err_w)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the command hung on a closed pipe") from None
    with os.fdopen(err_r, "rb") as f:
        err = f.read()
    return code, err


class ClosedReaderTests(SynchronousTestCase):
    def test_async_command_with_stderr_on_the_same_pipe_ends(self) -> None:
        home = temp_home(self)
        code, _ = closed_reader_run(home, "relay", "status", merge_stderr=True)
        self.assertEqual(code, EXIT_BROKEN_PIPE)

    def test_unbuffered_output_too(self) -> None:
        home = temp_home(self)
        code, err = closed_reader_run(
            home, "relay", "status", merge_stderr=False, PYTHONUNBUFFERED="1"
        )
        self.assertEqual(code, EXIT_BROKEN_PIPE)
        self.assertEqual(err, b"")

    def test_no_misleading_error_when_only_stdout_is_closed(self) -> None:
        home = temp_home(self)
        code, err = closed_reader_run(home, "relay", "status", merge_stderr=False)
        self.assertEqual(code, EXIT_BROKEN_PIPE)
        self.assertNotIn(b"writable", err)
        self.assertNotIn(b"Traceback", err)

    def test_blocking_command_ends_too(self) -> None:
        home = temp_home(self)
        code, err = closed_reader_run(home, "--help", merge_stderr=False)
        self.assertEqual(code, EXIT_BROKEN_PIPE)
        self.assertEqual(err, b"")  # not even Python's "Exception ignored" at exit


class MoreClosedReaderTests(SynchronousTestCase):
    def test_blocking_command_unbuffered(self) -> None:
        """click exits 1 on a closed pipe itself: still 141 (review 16)."""
        home = temp_home(self)
        code, err = closed_reader_run(
            home, "relay", "identity", merge_stderr=False, PYTHONUNBUFFERED="1"
        )
        self.assertEqual((code, err), (EXIT_BROKEN_PIPE, b""))

    def test_a_usage_error_onto_the_closed_pipe(self) -> None:
        """The report of a usage error went to the closed pipe and escaped (exit 120)."""
        home = temp_home(self)
        code, _ = closed_reader_run(home, "relay", "bogus", merge_stderr=True)
        self.assertEqual(code, EXIT_BROKEN_PIPE)


class InterruptibleTests(SynchronousTestCase):
    def test_a_failed_command_deferred_still_gives_an_exit_code(self) -> None:
        """finish() failing (its report's stream closed) left react() waiting forever."""
        from twisted.internet.defer import fail

        from claudectl.cli import Streams, _interruptible

        class Triggers:
            removed: list[object] = []

            def addSystemEventTrigger(self, *args: object) -> object:
                return "trigger"

            def removeSystemEventTrigger(self, trigger: object) -> None:
                self.removed.append(trigger)

        reactor = Triggers()
        streams = Streams(io.StringIO(), io.StringIO())
        result = _interruptible(reactor, fail(BrokenPipeError(32, "Broken pipe")), [], streams)
        self.assertEqual(self.successResultOf(result), 1)
        self.assertEqual(reactor.removed, ["trigger"])


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


class ReportFailsTests(TestCase):
    async def test_a_failing_error_report_still_ends_the_command(self) -> None:
        """Both streams broken, in process: the exit code still comes."""
        home = temp_home(self)
        code = await dispatch(
            reactor, ["--home", str(home.root), "relay", "status"], _Broken(), _Broken()
        )
        self.assertNotEqual(code, 0)
