# -*- test-case-name: tests.test_tui_app -*-
"""``claudectl tui``: the full-screen dashboard (see docs/tui.md)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from claudectl.cli.base import CliContext, CliError, cli, pass_ctx

LOG_NAME = "tui.log"


def _begin_logging(ctx: CliContext) -> str:
    """Everything logged while the screen is up goes to a file, never to the screen."""
    import logging

    from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

    run_dir = ctx.home.ensure_private_dir(ctx.home.run_dir)
    path = run_dir / LOG_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    stream = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(stream)], redirectStandardIO=False, discardBuffer=True
    )
    tlog = Logger(namespace="urwid")

    class _ToTwisted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            tlog.error("{message}", message=self.format(record))

    urwid_log = logging.getLogger("urwid")
    urwid_log.handlers[:] = [_ToTwisted()]
    urwid_log.propagate = False
    return str(path)


@cli.command()
@pass_ctx
async def tui(ctx: CliContext) -> None:
    """Full-screen dashboard: peers (p), remote tasks (t), hive (h), live.

    Attaches to the running relay service and shows its changes as they
    happen.  With no service running it starts one in this process when
    [relay] enabled = true, otherwise it shows what the files say.  Colour
    follows NO_COLOR; the log goes to ~/.claudectl/relay/run/tui.log.
    """
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError(
            "claudectl tui needs a terminal (use `claudectl relay peers`, "
            "`relay status` or `hive status` in scripts)"
        )
    try:
        import urwid  # noqa: F401
    except ImportError:
        raise CliError("claudectl tui needs urwid: pip install urwid") from None
    config = ctx.config
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started from a shell or script that ignores SIGINT: an interactive
        # dashboard still quits on Ctrl+C (the reactor installs its handler
        # only over the default one).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _begin_logging(ctx)
    from claudectl.tui.app import colour_wanted
    from claudectl.tui.runner import run_dashboard

    def go(reactor: Any) -> Any:
        return run_dashboard(reactor, ctx.home, config, ctx.config_files, colour_wanted())

    ctx.on_interrupt = lambda: None  # Ctrl+C quits the dashboard: exit 0
    await ctx.run(go)
