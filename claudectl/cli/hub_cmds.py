# -*- test-case-name: tests.test_hub_cli -*-
"""``claudectl relay hub``: run a NAT hub in the foreground, or ask one for its status."""

from __future__ import annotations

import json
from typing import Any

import click

from claudectl.cli.base import CliContext, CliError, json_flag, pass_ctx, relay
from claudectl.hub import wire
from claudectl.text import clean_line


class _HubPlugin:
    tapname = "claudectl-hub"

    def makeService(self, options: Any) -> Any:
        from claudectl.hub import tap

        return tap.makeService(options)


def run_hub_twistd(args: list[str], run_app: Any) -> None:
    from twisted.python import usage
    from twisted.scripts import twistd

    from claudectl.hub import tap

    class _ServerOptions(twistd.ServerOptions):
        subCommands = [("claudectl-hub", None, tap.Options, "the claudectl hub")]

    config = _ServerOptions()
    try:
        config.parseOptions(args)
    except usage.UsageError as e:
        raise CliError(str(e)) from None
    config.loadedPlugins = {"claudectl-hub": _HubPlugin()}
    run_app(config)


async def fetch_status(reactor: Any, address: str, token: str, timeout: float = 10.0) -> Any:
    """One ``status`` exchange with the hub at ``address``."""
    from twisted.internet import defer
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.protocol import Protocol

    from claudectl.hub.peer import hub_endpoint

    class _Status(Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.done: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if wire.is_greeting(line):
                    msg: dict[str, Any] = {"op": wire.STATUS}
                    if token:
                        msg["token"] = token
                    self.transport.write(wire.encode(msg))  # type: ignore[union-attr]
                    continue
                try:
                    answer = wire.decode(line)
                except wire.HubProtocolError as e:
                    self.fail(f"the hub answered with a bad line ({e})")
                    return
                if not self.done.called:
                    self.done.callback(answer)
            if len(self.buf) > 65536:
                self.fail("the hub's answer is too long")

        def fail(self, why: str) -> None:
            if not self.done.called:
                self.done.errback(CliError(why))
            self.transport.abortConnection()  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            if not self.done.called:
                self.done.errback(CliError(f"hub {address} closed the connection"))

    try:
        proto = await connectProtocol(hub_endpoint(reactor, address), _Status())
    except Exception as e:
        raise CliError(f"cannot reach the hub at {address}: {e}") from None
    call = reactor.callLater(timeout, proto.fail, f"hub {address} did not answer")
    try:
        answer = await proto.done
    finally:
        if call.active():
            call.cancel()
    if answer.get("op") == wire.ERROR:
        raise CliError(
            f"hub {address} refused: {clean_line(answer.get('message'))} "
            f"({clean_line(answer.get('reason'))})"
        )
    answer.pop("op", None)
    return answer


def _count(value: object) -> str:
    """A hub's counter as shown: a number, or ``?`` for anything else it sent."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "?"


async def show_status(ctx: CliContext, address: str, token: str) -> None:
    """``relay hub --status``: one exchange with the hub, then the counters."""
    data = await ctx.run(fetch_status, address, token)
    if ctx.json:
        ctx.emit_json(data)
        return
    ctx.out(f"Hub {address}")
    ctx.out(f"  registrations: {_count(data.get('registrations'))}")
    ctx.out(
        f"  channels:      {_count(data.get('channels'))} open, "
        f"{_count(data.get('pending'))} waiting"
    )
    ctx.out(f"  bytes:         {_count(data.get('bytes_forwarded'))} forwarded")
    refused = data.get("refused") or {}
    if refused:
        ctx.out(f"  refused:       {json.dumps(refused, sort_keys=True)}")


def _status_address(listen: str, hub: str | None) -> str:
    if hub:
        return hub
    for part in listen.split(":")[1:]:
        if part.isdigit():
            return f"127.0.0.1:{part}"
    return f"127.0.0.1:{wire.DEFAULT_HUB_PORT}"


@relay.command()
@click.option(
    "--listen",
    default=f"tcp:{wire.DEFAULT_HUB_PORT}",
    show_default=True,
    help="Endpoint to listen on.",
)
@click.option("--token", default=None, help="Access token peers present to register.")
@click.option("--token-file", default=None, metavar="FILE", help="File holding the token.")
@click.option("--status", "status", is_flag=True, help="Ask a running hub for its counters.")
@click.option("--hub", default=None, metavar="HOST:PORT", help="The hub --status asks.")
@click.option("--max-registrations", default=None, type=int, help="Registrations at most.")
@click.option("--max-channels", default=None, type=int, help="Channels per registration.")
@click.option("--rate", default=None, type=int, help="Bytes/s per registration (0: none).")
@click.option("--capture-dir", default=None, hidden=True)
@click.option("--logfile", metavar="FILE", default="-", show_default=True)
@json_flag
@pass_ctx
def hub(
    ctx: CliContext,
    listen: str,
    token: str | None,
    token_file: str | None,
    status: bool,
    hub: str | None,
    max_registrations: int | None,
    max_channels: int | None,
    rate: int | None,
    capture_dir: str | None,
    logfile: str,
) -> Any:
    """Run a NAT hub in the foreground (see docs/hub.md), or --status of one."""
    if status:
        if token_file is not None:
            from twisted.python import usage

            from claudectl.hub.tap import read_token_file

            try:
                token = read_token_file(token_file)
            except usage.UsageError as e:
                raise CliError(str(e)) from None
        # Asynchronous: the dispatcher drives the coroutine on its reactor.
        return show_status(ctx, _status_address(listen, hub), token or "")
    from claudectl.cli.relay_cmds import _run_app

    args = ["--nodaemon", f"--logfile={logfile}", "--pidfile=", "claudectl-hub", "--listen", listen]
    for name, value in (
        ("--token", token),
        ("--token-file", token_file),
        ("--max-registrations", max_registrations),
        ("--max-channels", max_channels),
        ("--rate", rate),
        ("--capture-dir", capture_dir),
    ):
        if value is not None:
            args += [name, str(value)]
    if ctx.log_observer is not None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(ctx.log_observer)
        ctx.log_observer = None
    run_hub_twistd(args, _run_app)
