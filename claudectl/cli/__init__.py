"""
The ``claudectl`` command line.  :func:`main` is the console script.

Command modules register themselves on the groups of :mod:`claudectl.cli.base`
when imported; :data:`COMMAND_MODULES` lists them.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import select
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from claudectl.cli import base
from claudectl.cli.base import CliContext, CliError, Streams, cli
from claudectl.control.paths import UnsafeSocketDir
from claudectl.relay.keystore import DamagedIdentity
from claudectl.text import clean_text, json_safe

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

COMMAND_MODULES = (
    "claudectl.cli.relay_cmds",
    "claudectl.cli.pairing_cmds",
    "claudectl.cli.hive_cmds",
    "claudectl.cli.delegate_cmds",
    "claudectl.cli.tui_cmds",
    "claudectl.cli.hooks_cmds",
    "claudectl.cli.hub_cmds",
)


def load_commands() -> click.Group:
    """The ``claudectl`` group with every command module's commands registered."""
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    return cli


def _json_mode(streams: Streams, argv: list[str]) -> bool:
    ctx = streams.context
    if ctx is not None and ctx.json:
        return True
    # An error while parsing arguments comes before the flag was applied.
    args = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in args


def _fail(streams: Streams, argv: list[str], message: str, code: int, kind: str = "error") -> int:
    """One ``Error: ...`` line on stderr (a JSON object on stdout under ``--json``)."""
    if _json_mode(streams, argv):
        streams.stdout.write(
            json_safe(
                json.dumps({"error": message, "kind": kind, "exit_code": code}, ensure_ascii=False)
            )
            + "\n"
        )
        streams.stdout.flush()
    else:
        streams.stderr.write(f"Error: {clean_text(message)}\n")
        streams.stderr.flush()
    return code


#: The exit status of a command whose reader went away (``| head``): as if
#: killed by SIGPIPE, which Python ignores.
EXIT_BROKEN_PIPE = 141


def _flushed(code: int, streams: Streams) -> int:
    """``code``, once what is buffered for stdout is out (else the reader is gone)."""
    try:
        streams.stdout.flush()
    except BrokenPipeError:
        return _reader_gone(streams)
    return code


def _closed_by_reader(stream: IO[str]) -> bool:
    """Whether ``stream`` is a pipe or socket whose reading end is closed."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False  # not a file (a test's StringIO), or no poll() here


def _reader_gone(streams: Streams) -> int:
    """
    Whoever read our output closed it (``claudectl ... | head -1``): stop
    quietly.  What is still buffered for the closed stream is dropped (the
    interpreter would try to flush it again at exit and complain).
    """
    fds = []
    for stream in (streams.stdout, streams.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fds.append(stream.fileno())  # not a file (a test's StringIO): left alone
    if fds:
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd)
        os.close(null)
    return EXIT_BROKEN_PIPE


def _os_error_text(e: OSError, ctx: CliContext | None) -> str:
    what = e.strerror or str(e)
    if e.filename is not None:
        what = f"{what}: {e.filename}"
    where = f" (home: {ctx.home.root})" if ctx is not None else ""
    return (
        f"{what}{where}; check that the home directory (--home / CLAUDECTL_HOME) is a "
        f"writable directory"
    )


def _exit_code(e: BaseException, args: list[str], streams: Streams) -> int:
    """Report what a command raised (never a traceback) and return its exit code."""
    try:
        return _report(e, args, streams)
    except BrokenPipeError:
        return _reader_gone(streams)  # the report's own stream is closed


def _report(e: BaseException, args: list[str], streams: Streams) -> int:
    if isinstance(e, CliError):
        return _fail(streams, args, e.message, e.code)
    if isinstance(e, DamagedIdentity):
        return _fail(streams, args, str(e), 1)
    if isinstance(e, UnsafeSocketDir):
        # From any command that talks to the service's control socket.
        return _fail(streams, args, str(e), 1)
    if isinstance(e, click.exceptions.Abort):
        streams.stderr.write("Aborted.\n")
        return 130
    if isinstance(e, click.ClickException):
        if _json_mode(streams, args):
            message = e.format_message()
            if isinstance(e, click.exceptions.NoArgsIsHelpError):
                # A group without its command: not the whole help as the error.
                where = e.ctx.command_path if e.ctx is not None else "claudectl"
                message = f"Missing command (see `{where} --help`)."
            return _fail(streams, args, message, e.exit_code, "usage")
        e.show(file=streams.stderr)
        return e.exit_code
    if isinstance(e, click.exceptions.Exit):
        return e.exit_code
    if isinstance(e, SystemExit):
        if e.code == 1 and _closed_by_reader(streams.stdout):
            return _reader_gone(streams)  # click's own exit on a closed pipe
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, BrokenPipeError) and _closed_by_reader(streams.stdout):
        return _reader_gone(streams)
    if isinstance(e, OSError):
        return _fail(streams, args, _os_error_text(e, streams.context), 1)
    if isinstance(e, RecursionError):
        return _fail(streams, args, "input nested too deeply", 1)
    if not isinstance(e, Exception):
        raise e  # GeneratorExit and the like: not ours to report
    # A bug: still one line, the traceback under -v.
    ctx = streams.context
    if ctx is not None and ctx.verbose:
        traceback.print_exception(e, file=streams.stderr)
    text = f"internal error: {type(e).__name__}: {e} (run with -v for details)"
    return _fail(streams, args, text, 1)


def _code_of(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse(args: list[str], streams: Streams) -> tuple[int, Any]:
    """
    Parse ``args`` and run the command's synchronous part, without a reactor.

    Returns ``(exit code, None)`` for a blocking command (it has run), or
    ``(0, awaitable)`` for an asynchronous one, still to be driven by
    :func:`finish` on a reactor.
    """
    group = load_commands()
    try:
        # click writes help and usage errors to sys.stdout/sys.stderr itself.
        with redirect_stdout(streams.stdout), redirect_stderr(streams.stderr):
            # Without standalone mode click *returns* the code of ctx.exit(n).
            rv = group.main(args=args, prog_name="claudectl", standalone_mode=False, obj=streams)
    except BaseException as e:
        return _exit_code(e, args, streams), None
    if inspect.isawaitable(rv):
        return 0, rv
    return _code_of(rv), None


async def finish(reactor: Any, pending: Any, args: list[str], streams: Streams) -> int:
    """Drive an asynchronous command's awaitable on ``reactor``; its exit code."""
    ctx = streams.context
    if ctx is not None:
        ctx.reactor = reactor
    try:
        return _code_of(await pending)
    except BaseException as e:
        return _exit_code(e, args, streams)


def _stop_verbose_logging(streams: Streams) -> None:
    ctx = streams.context
    if ctx is not None and ctx.log_observer is not None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(ctx.log_observer)
        ctx.log_observer = None


def dispatch(
    reactor: Any,
    argv: list[str],
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    cwd: Path | None = None,
) -> Deferred[int]:
    """
    Run one ``claudectl`` command line on a running ``reactor``: a Deferred
    of its exit code.  Errors are reported on ``stderr`` (JSON on ``stdout``
    under ``--json``) and never raised.  This is what tests call in-process
    (see ``tests/cli_harness.py``); it neither stops the reactor nor installs
    signal handlers.
    """
    from twisted.internet.defer import ensureDeferred, succeed

    args = list(argv)
    streams = Streams(stdout or sys.stdout, stderr or sys.stderr, cwd)
    code, pending = parse(args, streams)
    if pending is None:
        _stop_verbose_logging(streams)
        return succeed(code)
    d = ensureDeferred(finish(reactor, pending, args, streams))

    def done(code: int) -> int:
        _stop_verbose_logging(streams)
        return code

    return d.addCallback(done)


def _interruptible(reactor: Any, command: Deferred[int], args: list[str], streams: Streams) -> Any:
    """
    ``command``'s exit code, or, if the reactor shuts down first (Ctrl+C,
    SIGTERM), what the command's ``on_interrupt`` says (its late result is
    then dropped).
    """
    from twisted.internet.defer import Deferred

    result: Deferred[int] = Deferred()

    def on_shutdown() -> None:
        if result.called:
            return
        ctx = streams.context
        error = ctx.on_interrupt() if ctx is not None else base.interrupted()
        result.callback(0 if error is None else _exit_code(error, args, streams))

    trigger = reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)

    def done(code: int) -> None:
        if not result.called:
            reactor.removeSystemEventTrigger(trigger)
            result.callback(code)

    def failed(_: Any) -> None:
        # finish() reports what the command raised; this is that report
        # failing in turn (its stream closed): end all the same.
        done(1)

    command.addCallbacks(done, failed)
    return result


async def _react_main(reactor: Any, pending: Any, args: list[str], streams: Streams) -> None:
    from twisted.internet.defer import Deferred, ensureDeferred

    # react() calls us before reactor.run(): start the command (its child
    # processes, say) only once the reactor runs and handles SIGINT/SIGTERM.
    running: Deferred[None] = Deferred()
    reactor.callWhenRunning(running.callback, None)
    await running
    command = ensureDeferred(finish(reactor, pending, args, streams))
    code = _flushed(await _interruptible(reactor, command, args, streams), streams)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """
    The ``claudectl`` program: parse ``argv``; a blocking command runs at
    once, an asynchronous one under :func:`twisted.internet.task.react`
    (which owns the reactor and its Ctrl+C/SIGTERM handling).  Exits with
    the command's status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    streams = Streams(sys.stdout, sys.stderr)
    code, pending = parse(args, streams)
    if pending is None:
        sys.exit(_flushed(code, streams))
    from twisted.internet.task import react

    react(_react_main, [pending, args, streams])
