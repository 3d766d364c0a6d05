# -*- test-case-name: tests.test_cli -*-
"""
The ``claudectl`` command group and what every command shares.

Each command receives a :class:`CliContext` (``@pass_ctx``) carrying the
resolved :class:`~claudectl.home.Home`, the global ``--json`` flag and the
output streams.  Commands raise :class:`CliError` for anything the user
should read; :func:`claudectl.cli.main` turns it into ``Error: <message>`` on
stderr and exit status 1.

A command that needs the reactor is an ``async def``: its click callback
returns a coroutine, which :func:`claudectl.cli.dispatch` drives on the
reactor it is given (``react`` in the ``claudectl`` program, trial's reactor
in a test), and :meth:`CliContext.run` calls ``fn(reactor, *args)`` there.
Such a command never starts or stops the reactor nor installs signal
handlers: :func:`claudectl.cli.main` owns those.  Blocking-only commands stay
plain functions, run before any reactor starts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from claudectl.config import Config, ConfigError, load_config
from claudectl.home import Home
from claudectl.text import CleanWriter, clean_text, json_safe


class CliError(Exception):
    """A failure to report to the user: ``Error: <message>``, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def denial_hint(error: str) -> str:
    """
    ``error``, with what a bare ``denied`` means: the peer has no key that
    matches (it says no more, so as not to tell a stranger which peers it
    knows).
    """
    if not error.rstrip().endswith("handshake denied: denied"):
        return error
    return (
        f"{error}. The peer has no key that matches this machine's: the pair code or "
        f"invite link may be mistyped or already used, or the peer forgot this machine; "
        f"pair again (`claudectl relay pair` there, `claudectl relay accept` here, or a "
        f"new invite)"
    )


def interrupted() -> CliError | None:
    """What a command says when Ctrl+C or SIGTERM stops the reactor under it."""
    return CliError("interrupted", code=130)


@dataclass
class Streams:
    """Where a run's output goes, and the directory it counts as its working
    directory (passed as click's ``obj`` by the dispatcher)."""

    stdout: IO[str]
    stderr: IO[str]
    cwd: Path | None = None
    #: The context the command got (set by the ``claudectl`` group).
    context: CliContext | None = None


@dataclass
class CliContext:
    home: Home
    json: bool = False
    verbose: bool = False
    config_files: tuple[str, ...] = ()
    cwd: Path = field(default_factory=Path.cwd)
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    _config: Config | None = None
    #: The ``-v`` observer (removed when twistd takes over logging).
    log_observer: Any = None
    #: The reactor an asynchronous command runs on (set by the dispatcher).
    reactor: Any = None
    #: Called when the reactor shuts down (Ctrl+C, SIGTERM) before the
    #: command finished: the error to report, or None for a quiet exit 0.
    on_interrupt: Callable[[], CliError | None] = interrupted

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.home, self.cwd, self.config_files)
            except ConfigError as e:
                raise CliError(str(e)) from None
            for warning in self._config.warnings:
                self.err(f"Warning: {warning}")
        return self._config

    # Everything a command prints goes through clean_text: no escape
    # sequence or control character from a peer ever reaches the terminal.
    # (Single-line fields are cleaned with clean_line where they are built.)
    def out(self, text: str = "") -> None:
        self.stdout.write(clean_text(text) + "\n")
        self.stdout.flush()

    def err(self, text: str = "") -> None:
        self.stderr.write(clean_text(text) + "\n")
        self.stderr.flush()

    def out_json_text(self, encoded: str) -> None:
        """Print already-encoded JSON, unsafe characters as escapes (same data)."""
        self.out(json_safe(encoded))

    def emit_json(self, value: Any) -> None:
        self.out_json_text(json.dumps(value, indent=2, ensure_ascii=False))

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """
        Call ``fn(reactor, *args)`` (returning a Deferred, a coroutine or a
        value) on the command's reactor; a Deferred of its result, to await.
        """
        from twisted.internet.defer import ensureDeferred

        if self.reactor is None:
            raise RuntimeError("CliContext.run outside claudectl.cli.dispatch")
        return ensureDeferred(_maybe_coro(fn(self.reactor, *args)))


async def _maybe_coro(value: Any) -> Any:
    from twisted.internet.defer import Deferred

    if isinstance(value, Deferred):
        return await value
    if hasattr(value, "__await__"):
        return await value
    return value


pass_ctx = click.make_pass_decorator(CliContext)


def json_flag(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A local ``--json`` after the command, meaning the same as the global one."""

    def callback(click_ctx: click.Context, _param: Any, value: bool) -> None:
        if value:
            click_ctx.ensure_object(CliContext).json = True

    return click.option(
        "--json",
        "json_local",
        is_flag=True,
        expose_value=False,
        callback=callback,
        help="Machine-readable JSON output.",
    )(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    "home",
    metavar="DIR",
    envvar="CLAUDECTL_HOME",
    help="Use DIR as the home directory: data in DIR/.claudectl, config in "
    "DIR/.config/claudectl/config.toml (default: $CLAUDECTL_HOME, else ~).",
)
@click.option("--json", "json_", is_flag=True, help="Machine-readable JSON output.")
@click.option(
    "--config",
    "config_files",
    metavar="FILE",
    multiple=True,
    help="Extra TOML config file, read after the user and project configs.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log what happens to stderr.")
@click.version_option(package_name="claudectl-relay", prog_name="claudectl")
@click.pass_context
def cli(
    click_ctx: click.Context,
    home: str | None,
    json_: bool,
    config_files: tuple[str, ...],
    verbose: bool,
) -> None:
    """claudectl relay & hive mind: pair machines, share what brains learn,
    delegate tasks to Claude Code on a peer."""
    ctx = CliContext(
        home=Home.resolve(home), json=json_, verbose=verbose, config_files=config_files
    )
    if isinstance(click_ctx.obj, Streams):  # from claudectl.cli.dispatch
        ctx.stdout, ctx.stderr = click_ctx.obj.stdout, click_ctx.obj.stderr
        if click_ctx.obj.cwd is not None:
            ctx.cwd = click_ctx.obj.cwd
        click_ctx.obj.context = ctx
    if verbose:
        # An observer, not globalLogBeginner.beginLoggingTo: `relay serve`
        # hands logging to twistd, which begins it (twice would log every
        # line twice and warn "primary log target selected twice").
        from twisted.logger import globalLogPublisher, textFileLogObserver

        ctx.log_observer = textFileLogObserver(CleanWriter.wrap(ctx.stderr))
        globalLogPublisher.addObserver(ctx.log_observer)
    click_ctx.obj = ctx
    if ctx.home.root.exists() and not ctx.home.root.is_dir():
        raise CliError(f"home {ctx.home.root} is not a directory (check --home / CLAUDECTL_HOME)")


@cli.group()
def relay() -> None:
    """Pair with peers, run the relay service, delegate tasks."""


@cli.group()
def hive() -> None:
    """Inspect and manage shared knowledge (the hive mind)."""
