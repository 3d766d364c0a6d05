"""
The one dispatcher of the CLI (:func:`claudectl.cli.dispatch`): parsing,
errors to one line (JSON under ``--json``), exit codes, asynchronous commands
on the caller's reactor, and what an interrupted command reports.
"""

from __future__ import annotations

import io
from typing import Any

import click
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl import cli as cli_module
from claudectl.cli.base import CliContext, CliError, Streams, pass_ctx
from tests.cli_harness import run_command, run_now
from tests.common import temp_home


def add_command(testcase: Any, fn: Any, name: str) -> None:
    """Register a throw-away top-level command for one test."""
    group = cli_module.load_commands()
    group.add_command(click.command(name=name)(pass_ctx(fn)))
    testcase.addCleanup(group.commands.pop, name)


class ParseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)

    def test_help_and_version_exit_zero_on_stdout(self) -> None:
        r = run_now(self.home, "--help")
        self.assertEqual((r.code, r.err), (0, ""))
        self.assertTrue(r.out.startswith("Usage: claudectl [OPTIONS] COMMAND"), r.out)
        r = run_now(self.home, "--version")
        self.assertEqual(r.code, 0)
        self.assertTrue(r.out.startswith("claudectl, version "), r.out)

    def test_usage_errors(self) -> None:
        r = run_now(self.home, "relay", "no-such")
        self.assertEqual((r.code, r.out), (2, ""))
        self.assertIn("Error: No such command 'no-such'.", r.err)
        r = run_now(self.home, "--json", "relay", "no-such")
        self.assertEqual((r.code, r.err), (2, ""))
        self.assertEqual(
            r.json(), {"error": "No such command 'no-such'.", "kind": "usage", "exit_code": 2}
        )

    def test_errors_of_a_command(self) -> None:
        def fails(ctx: CliContext) -> None:
            raise CliError("nothing to do\x1b[2J", code=3)

        add_command(self, fails, "fails")
        r = run_now(self.home, "fails")
        # No escape sequence reaches the terminal.
        self.assertEqual((r.code, r.out, r.err), (3, "", "Error: nothing to do\n"))
        r = run_now(self.home, "--json", "fails")
        self.assertEqual(
            r.json(), {"error": "nothing to do\x1b[2J", "kind": "error", "exit_code": 3}
        )

    def test_a_bug_is_one_line_and_its_traceback_only_under_verbose(self) -> None:
        def buggy(ctx: CliContext) -> None:
            raise ZeroDivisionError("oops")

        add_command(self, buggy, "buggy")
        r = run_now(self.home, "buggy")
        self.assertEqual(r.code, 1)
        self.assertEqual(
            r.err, "Error: internal error: ZeroDivisionError: oops (run with -v for details)\n"
        )
        r = run_now(self.home, "-v", "buggy")
        self.assertIn("Traceback (most recent call last)", r.err)
        self.assertTrue(r.err.endswith("(run with -v for details)\n"), r.err)

    def test_os_error_names_the_home(self) -> None:
        def denied(ctx: CliContext) -> None:
            raise PermissionError(13, "Permission denied", "/x/y")

        add_command(self, denied, "denied")
        r = run_now(self.home, "denied")
        self.assertEqual(r.code, 1)
        self.assertEqual(
            r.err,
            f"Error: Permission denied: /x/y (home: {self.home.root}); check that the home "
            "directory (--home / CLAUDECTL_HOME) is a writable directory\n",
        )

    def test_exit_codes_from_click_and_system_exit(self) -> None:
        def exits(ctx: CliContext) -> int:
            click.get_current_context().exit(4)
            return 0

        def aborts(ctx: CliContext) -> None:
            raise click.exceptions.Abort()

        def sys_exit(ctx: CliContext) -> None:
            raise SystemExit(5)

        def returns(ctx: CliContext) -> int:
            return 6

        for fn, name in (
            (exits, "exits"),
            (aborts, "aborts"),
            (sys_exit, "sys-exit"),
            (returns, "returns"),
        ):
            add_command(self, fn, name)
        self.assertEqual(run_now(self.home, "exits").code, 4)
        r = run_now(self.home, "aborts")
        self.assertEqual((r.code, r.err), (130, "Aborted.\n"))
        self.assertEqual(run_now(self.home, "sys-exit").code, 5)
        self.assertEqual(run_now(self.home, "returns").code, 6)

    def test_home_that_is_a_file(self) -> None:
        path = self.home.root / "file"
        path.write_text("")
        r = cli_module.dispatch(
            MemoryReactorClock(),
            ["--home", str(path), "relay", "identity"],
            io.StringIO(),
            io.StringIO(),
        )
        self.assertEqual(self.successResultOf(r), 1)

    def test_run_outside_the_dispatcher_is_a_bug(self) -> None:
        with self.assertRaises(RuntimeError):
            CliContext(home=self.home).run(lambda reactor: None)

    def test_main_exits_with_the_code(self) -> None:
        with self.assertRaises(SystemExit) as cm:
            cli_module.main(["--home", str(self.home.root), "relay", "no-such"])
        self.assertEqual(cm.exception.code, 2)


class AsyncCommandTests(TestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)

    async def test_runs_on_the_given_reactor(self) -> None:
        seen: list[Any] = []

        async def later(ctx: CliContext) -> None:
            seen.append(ctx.reactor)
            value = await ctx.run(lambda r, x: succeed((r, x)), 7)
            ctx.out(f"got {value[1]}")

        add_command(self, later, "later")
        r = await run_command(self.home, "later")
        self.assertEqual((r.code, r.out, r.err), (0, "got 7\n", ""))
        self.assertIs(seen[0], reactor)

    def test_waiting_command_is_reported_by_run_now(self) -> None:
        async def waits(ctx: CliContext) -> None:
            await Deferred()

        add_command(self, waits, "waits")
        with self.assertRaises(AssertionError) as cm:
            run_now(self.home, "waits")
        self.assertIn("still waiting on the reactor", str(cm.exception))

    async def test_react_main_exits_with_the_code(self) -> None:
        async def fails(ctx: CliContext) -> None:
            raise CliError("late failure", code=9)

        add_command(self, fails, "late-fails")
        out, err = io.StringIO(), io.StringIO()
        streams = Streams(out, err)
        args = ["--home", str(self.home.root), "late-fails"]
        code, pending = cli_module.parse(args, streams)
        self.assertEqual(code, 0)
        with self.assertRaises(SystemExit) as cm:
            await cli_module._react_main(reactor, pending, args, streams)
        self.assertEqual((cm.exception.code, err.getvalue()), (9, "Error: late failure\n"))


class TriggerReactor(MemoryReactorClock):
    """A MemoryReactorClock whose system event triggers can be removed."""

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Any, *a: Any, **kw: Any
    ) -> Any:
        entry = (callable, a, kw)
        self.triggers.setdefault(phase, {}).setdefault(eventType, []).append(entry)
        return (phase, eventType, entry)

    def removeSystemEventTrigger(self, triggerID: Any) -> None:
        phase, eventType, entry = triggerID
        self.triggers[phase][eventType].remove(entry)


class InterruptTests(SynchronousTestCase):
    """Ctrl+C / SIGTERM: the reactor shuts down before the command ends."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.reactor = TriggerReactor()
        self.out, self.err = io.StringIO(), io.StringIO()

    def interrupt(self, on_interrupt: Any = None) -> tuple[Deferred[int], Deferred[int]]:
        ctx = CliContext(home=self.home)
        if on_interrupt is not None:
            ctx.on_interrupt = on_interrupt
        command: Deferred[int] = Deferred()
        streams = Streams(self.out, self.err, context=ctx)
        result = cli_module._interruptible(self.reactor, command, [], streams)
        return command, result

    def shutdown(self) -> None:
        for before in list(self.reactor.triggers.get("before", {}).get("shutdown", [])):
            fn, args, kwargs = before
            fn(*args, **kwargs)

    def test_interrupted_by_default_exits_130(self) -> None:
        command, result = self.interrupt()
        self.assertNoResult(result)
        self.shutdown()
        self.assertEqual(self.successResultOf(result), 130)
        self.assertEqual(self.err.getvalue(), "Error: interrupted\n")
        command.callback(0)  # a late result is dropped

    def test_a_command_can_say_more_or_quit_quietly(self) -> None:
        command, result = self.interrupt(
            lambda: CliError("interrupted; task t1 keeps running", 130)
        )
        self.shutdown()
        self.assertEqual(self.successResultOf(result), 130)
        self.assertEqual(self.err.getvalue(), "Error: interrupted; task t1 keeps running\n")
        command, result = self.interrupt(lambda: None)
        self.shutdown()
        self.assertEqual(self.successResultOf(result), 0)

    def test_finished_command_leaves_no_trigger(self) -> None:
        command, result = self.interrupt()
        command.callback(3)
        self.assertEqual(self.successResultOf(result), 3)
        self.assertEqual(self.reactor.triggers.get("before", {}).get("shutdown", []), [])
