# -*- test-case-name: tests.test_relay_cli -*-
"""
``claudectl relay serve | pair | accept | connect | peers | disconnect |
forget | identity``.

Commands that need live state ask the running service over the control
socket; without one they say so, or do a one-shot connection and say that
they did.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from claudectl.cli.base import CliContext, CliError, denial_hint, json_flag, pass_ctx, relay
from claudectl.control import commands as C
from claudectl.control.client import ServiceNotRunning, call_control, call_paged
from claudectl.control.client import remote_error_text as _amp_error
from claudectl.relay.address import AddressError, format_address, parse_address
from claudectl.relay.crypto import CodeError, new_pair_code, psk_from_code
from claudectl.relay.keystore import PENDING, KeyStore, is_remote_peer_id
from claudectl.relay.peers_view import peer_rows
from claudectl.text import ago


async def call_service(ctx: CliContext, command: type, **kwargs: Any) -> dict[str, Any] | None:
    """Run an AMP command; None when no service is running."""

    async def go(reactor: Any) -> dict[str, Any]:
        return await call_control(reactor, ctx.home, command, **kwargs)

    try:
        return await ctx.run(go)  # type: ignore[no-any-return]
    except ServiceNotRunning:
        return None
    except (C.NotPairedError, C.LinkFailed, C.NoSuchPeer, C.BadRequest) as e:
        raise CliError(_amp_error(e)) from None


# --- serve -------------------------------------------------------------------------


@relay.command()
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    default=None,
    help="TCP port (default: [relay] listen_port, 9847).",
)
@click.option(
    "--listen",
    metavar="ENDPOINT",
    default=None,
    help="Twisted endpoint to listen on, e.g. tcp:9847:interface=0.0.0.0.",
)
@click.option("--no-discovery", is_flag=True, help="Do not announce on the LAN.")
@click.option(
    "--logfile", metavar="FILE", default="-", show_default=True, help="Where to log ('-' = stdout)."
)
@pass_ctx
def serve(
    ctx: CliContext, port: int | None, listen: str | None, no_discovery: bool, logfile: str
) -> None:
    """Run the relay service in the foreground (Ctrl+C stops it).

    This is `twistd -n claudectl-relay` with this home; for a daemon use
    twistd directly (see docs/running.md).
    """
    _refuse_second_service(ctx)
    args = ["--nodaemon", f"--logfile={logfile}"]
    ctx.home.ensure_private_dir(ctx.home.run_dir)
    args.append(f"--pidfile={ctx.home.run_dir / 'relay.pid'}")
    args += ["claudectl-relay", "--home", str(ctx.home.root)]
    for f in ctx.config_files:
        args += ["--config", f]
    if port is not None:
        args += ["--port", str(port)]
    if listen is not None:
        args += ["--listen", listen]
    if no_discovery:
        args.append("--no-discovery")
    if ctx.log_observer is not None:  # twistd logs to --logfile, -v or not
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(ctx.log_observer)
        ctx.log_observer = None
    run_twistd(args, _run_app)


def _is_relay_service(cmdline: bytes) -> bool:
    """
    Whether a process's ``/proc/<pid>/cmdline`` is a relay service: ``claudectl
    … relay serve`` (the program or ``-m claudectl``) or ``twistd …
    claudectl-relay``.  Arguments are compared whole: a path that merely
    contains "claudectl" (a temp directory, say) does not count.
    """
    args = [a.decode("utf-8", "replace") for a in cmdline.split(b"\0") if a]
    names = {os.path.basename(a) for a in args}
    if "claudectl-relay" in args and any(n.startswith("twist") for n in names):
        return True
    runs_claudectl = "claudectl" in names or any(
        a == "-m" and b == "claudectl" for a, b in zip(args, args[1:], strict=False)
    )
    return runs_claudectl and "relay" in args and "serve" in args


def _refuse_second_service(ctx: CliContext) -> None:
    """One service per home: say which one runs and how to stop it (not twistd's
    advice about --pidfile, an option `relay serve` does not have)."""
    import os

    from claudectl.relay.runinfo import read_runinfo

    info = read_runinfo(ctx.home) or {}
    pid = info.get("pid")
    if not isinstance(pid, int):
        try:  # starting, not listening yet: only the pid file tells
            pid = int((ctx.home.run_dir / "relay.pid").read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return
    if os.path.isdir("/proc/self"):  # else (no /proc) trust the pid
        # A pid left by a killed service may belong to another program by now.
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return  # gone meanwhile
        if not _is_relay_service(cmdline):
            return
    ports = [p for p in info.get("ports", []) if isinstance(p, int)]
    where = f", listening on port {', '.join(map(str, ports))}" if ports else ""
    ident = f" ({info['identity']})" if isinstance(info.get("identity"), str) else ""
    raise CliError(
        f"the relay service{ident} is already running for home {ctx.home.root} "
        f"(pid {pid}{where}); stop it with Ctrl+C in its terminal or "
        f"`kill {pid}`, or use another --home"
    )


def _run_app(config: Any) -> None:
    """
    ``twistd.runApp`` without its last step: after a clean shutdown on
    SIGTERM/SIGINT, twistd re-raises the signal to die by it; the foreground
    command exits with status 0 instead.
    """
    from twisted.internet.error import CannotListenError
    from twisted.python import usage
    from twisted.scripts import twistd

    from claudectl.control.paths import UnsafeSocketDir

    logfile = config.get("logfile")
    if not config.get("logger"):
        if logfile in ("-", ""):
            # The log goes to the terminal: events carry peers' text.
            config["logger"] = _clean_stdout_observer
        elif logfile:
            # A log file: the same info-and-up filter (one debug line per
            # refused or silent connection would let a flood grow the file).
            config["logger"] = lambda: _clean_file_observer(str(logfile))
    runner = twistd._SomeApplicationRunner(config)
    try:
        runner.run()
    except CannotListenError as e:
        raise CliError(
            f"cannot listen on {e.interface or '0.0.0.0'}:{e.port}: {e.socketError}"
        ) from None
    except UnsafeSocketDir as e:
        # twistd has sent stderr into its log by now: say it where the user looks.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        raise CliError(str(e)) from None
    except usage.UsageError as e:
        # From makeService: a mistake in what was asked (a log file that
        # cannot be made, a damaged identity), before anything started.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        raise CliError(str(e)) from None


class _InfoLines:
    """
    What ``FilteringLogObserver(FileLogObserver(CleanWriter(out),
    classic_log_text), [LogLevelFilterPredicate(info)])`` does, in one call:
    events of level info and up, as Twisted's classic text, cleaned, one
    flushed write each; debug events are not formatted at all.  Half the
    cost of the three observers' chain (a service logs two lines per link:
    issues 10 and 16).
    """

    def __init__(self, out: Any) -> None:
        from twisted.logger import ILogObserver, LogLevel
        from zope.interface import alsoProvides

        from claudectl.text import CleanWriter, classic_log_text

        # Declared, or twistd wraps it as a legacy observer (costly per event).
        alsoProvides(self, ILogObserver)

        self._out = CleanWriter.wrap(out)
        self._format = classic_log_text
        self._levels = frozenset((LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical))

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") not in self._levels:
            return
        text = self._format(event)
        if text:
            self._out.write(text)
            self._out.flush()


def _clean_stdout_observer() -> Any:
    """
    twistd's stdout log observer, with every line through clean_text, info
    and up: debug events (a refused connection, a link coming up) are not
    formatted at all (issue 16: formatting them was a large part of a
    handshake's CPU, and a flood must not fill the log).
    """
    import sys

    return _InfoLines(sys.stdout)


def _clean_file_observer(path: str) -> Any:
    """:func:`_clean_stdout_observer` for ``--logfile FILE`` (rotated as twistd's)."""
    from twisted.python.logfile import LogFile

    return _InfoLines(LogFile.fromFullPath(path))


class _Plugin:
    """What twistd needs of a plugin: a tapname and makeService."""

    tapname = "claudectl-relay"

    def makeService(self, options: Any) -> Any:
        from claudectl.service import compose

        return compose.makeService(options)


def run_twistd(args: list[str], run_app: Any) -> None:
    """Parse twistd arguments with our plugin preloaded and run (tahoe's pattern)."""
    from twisted.python import usage
    from twisted.scripts import twistd

    from claudectl.service import compose

    class _ServerOptions(twistd.ServerOptions):
        subCommands = [("claudectl-relay", None, compose.Options, "the claudectl relay")]

    config = _ServerOptions()
    try:
        config.parseOptions(args)
    except usage.UsageError as e:
        raise CliError(str(e)) from None
    config.loadedPlugins = {"claudectl-relay": _Plugin()}
    run_app(config)


# --- pairing by raw code -----------------------------------------------------------


@relay.command()
@json_flag
@pass_ctx
def pair(ctx: CliContext) -> None:
    """Generate a pair code; the peer runs `claudectl relay accept <code> <your id>`."""
    from claudectl.pairing.invites import InviteStore, InviteStoreError

    ks = KeyStore(ctx.home)
    ident = ks.shareable_identity()
    code, psk = new_pair_code()
    ttl_secs = ctx.config.relay.invite_ttl_hours * 3600
    # Every code stays valid until it is used or expires (kept as an invite
    # record); `_pending.key` holds the newest, as claudectl writes it.
    earlier: list[Any] = []
    kept = True
    try:
        _, earlier = InviteStore(ctx.home, ks).remember_pair_code(ident, psk, ttl_secs, time.time())
    except InviteStoreError as e:
        kept = False
        ctx.err(
            f"Warning: {e}; only this new code is valid now: an earlier unused pair code "
            f"no longer works"
        )
    ks.save_pending_key(psk)
    if kept and earlier:  # on stderr: stdout is claudectl's exact text / JSON
        ctx.err(
            f"Note: {len(earlier)} earlier unused pair code(s) stay valid until used or "
            f"{ctx.config.relay.invite_ttl_hours} h after they were made "
            f"(`claudectl relay invite --list`, `--revoke ID`)."
        )
    if ctx.json:
        ctx.emit_json({"identity": ident, "pair_code": code})
        return
    ctx.out(f"Your identity: {ident}")
    ctx.out()
    ctx.out(f"PAIR CODE: {code}")
    ctx.out()
    ctx.out("Share this code with the peer you want to connect.")
    ctx.out(f"They should run: claudectl relay accept {code} {ident}")


def explain_code_error(code: str, message: str) -> str:
    """claudectl's message ("... got N") plus what was ignored to get N."""
    ignored = sorted({c for c in code if c not in "0123456789abcdefABCDEF" and c not in "-: "})
    if not ignored:
        return message
    shown = ", ".join(repr(c) for c in ignored[:6]) + (" …" if len(ignored) > 6 else "")
    return (
        f"{message} ({shown} {'is not a hex digit' if len(ignored) == 1 else 'are not hex digits'} "
        f"and {'was' if len(ignored) == 1 else 'were'} ignored). A pair code from "
        f"`relay pair` has 16 hex digits, like a3f2-9b1c-d4e5-f678; a relay code, word "
        f"phrase or invite link goes to `claudectl relay join`"
    )


@relay.command()
@click.argument("code")
@click.argument("peer")
@click.option("--force", is_flag=True, help="Replace an existing key for PEER.")
@json_flag
@pass_ctx
def accept(ctx: CliContext, code: str, peer: str, force: bool) -> None:
    """Store the key of a pair code that PEER generated with `relay pair`."""
    if peer == PENDING:
        raise CliError(f"{PENDING!r} is reserved (it names a key waiting for its peer)")
    if not is_remote_peer_id(peer):
        raise CliError(f"invalid peer id {peer!r}: use 1-128 letters, digits, '-' or '_'")
    try:
        psk = psk_from_code(code)
    except CodeError as e:
        raise CliError(explain_code_error(code, str(e))) from None
    ks = KeyStore(ctx.home)
    ident = ks.shareable_identity()
    if peer == ident:
        raise CliError("that is this instance's own identity")
    existing = ks.key(peer)
    if existing is not None and existing != psk and not force:
        raise CliError(
            f"peer '{peer}' is already paired with another key; "
            f"run `claudectl relay forget {peer}` first or pass --force"
        )
    ks.save_key(peer, psk)
    if ctx.json:
        ctx.emit_json({"identity": ident, "peer": peer, "stored": True})
        return
    ctx.out(f"Paired with peer: {peer}")
    ctx.out("PSK stored. You can now connect with:")
    ctx.out("  claudectl relay connect <host>:<port>")


# --- links -----------------------------------------------------------------------------


@relay.command()
@click.argument("address", metavar="HOST:PORT")
@click.option(
    "--peer",
    metavar="ID",
    default=None,
    help="Which paired peer is at that address (needed when it is ambiguous).",
)
@json_flag
@pass_ctx
async def connect(ctx: CliContext, address: str, peer: str | None) -> None:
    """Connect to a paired peer and keep the link up (through the running service)."""
    try:
        host, port = parse_address(address)
    except AddressError as e:
        raise CliError(str(e)) from None
    address = format_address(host, port)
    result = await ctx.run(_connect, ctx, address, peer)
    if result["kept_by_service"]:
        previous = result.get("previous") or None
        if ctx.json:
            ctx.emit_json(
                {
                    "peer": result["peer"],
                    "address": address,
                    "mode": result["mode"],
                    "state": "connected",
                    "kept_by_service": True,
                    "already": result["already"],
                    "previous_address": previous,
                }
            )
        elif result["already"]:
            ctx.out(
                f"Already connected to {result['peer']} at {address}; the service keeps "
                "the link up."
            )
        else:
            ctx.out(
                f"Connected to {result['peer']} ({address}), {result['mode']} "
                "authentication. The relay service keeps the link up."
            )
            if previous:
                ctx.out(
                    f"{result['peer']} answered at {address}: the service dials it there "
                    f"from now on (instead of {previous})."
                )
        return
    if ctx.json:
        ctx.emit_json(
            {
                "peer": result["peer"],
                "address": address,
                "mode": result["mode"],
                "state": "verified",
                "kept_by_service": False,
            }
        )
        return
    ctx.out(f"Authenticated with {result['peer']} ({address}), {result['mode']} authentication.")
    ctx.out("No relay service is running for this home, so the link was closed again.")
    ctx.out(
        f"Start it with `claudectl relay serve`: it reconnects to {result['peer']} automatically."
    )


async def _connect(reactor: Any, ctx: CliContext, address: str, peer: str | None) -> dict[str, Any]:
    try:
        r = await call_control(reactor, ctx.home, C.Connect, address=address, peer=peer)
    except ServiceNotRunning:
        peer_id, mode = await _one_shot_connect(reactor, ctx, address, peer)
        return {"peer": peer_id, "mode": mode, "already": False, "kept_by_service": False}
    except (C.NotPairedError, C.LinkFailed, C.NoSuchPeer, C.BadRequest) as e:
        raise CliError(_amp_error(e)) from None
    return {**r, "kept_by_service": True}


async def _one_shot_connect(
    reactor: Any, ctx: CliContext, address: str, peer: str | None
) -> tuple[str, str]:
    from claudectl.hub.peer import client_endpoint
    from claudectl.relay.handshake import HandshakeFailed, KeyAuth, KeyByIdentity
    from claudectl.relay.node import NotPaired, RelayNode

    node = RelayNode(ctx.home, ctx.config, reactor, dial_via=client_endpoint)
    auth: KeyAuth | KeyByIdentity
    try:
        peer_id = peer or node.peer_last_seen_at(address)
        if peer_id is None:
            # The key of the identity the listener announces (one key).
            auth = node.key_by_identity(address)
        else:
            node.choose_peer_for(address, peer_id)
            psk = node.keystore.key(peer_id)
            assert psk is not None
            auth = KeyAuth(psk, peer_id)
    except NotPaired as e:
        raise CliError(str(e)) from None
    try:
        proto = await node.open_link(address, auth)
    except HandshakeFailed as e:
        raise CliError(denial_hint(f"connection failed: auth failed: {e}")) from None
    except Exception as e:
        raise CliError(f"connection failed: connect to {address}: {e}") from None
    assert proto.result is not None
    proto.close("one-shot connection done")
    return proto.result.peer_id, proto.result.mode


@relay.command()
@json_flag
@pass_ctx
async def peers(ctx: CliContext) -> None:
    """List known peers: state, address, last seen, trust, traffic."""

    async def fetch(reactor: Any) -> Any:
        return await call_paged(reactor, ctx.home, C.Peers, "peers_json")

    try:
        rows = await ctx.run(fetch)
    except ServiceNotRunning:
        rows = None
    except (C.NotPairedError, C.LinkFailed, C.NoSuchPeer, C.BadRequest, ValueError) as e:
        raise CliError(_amp_error(e)) from None
    live = rows is not None
    keystore = KeyStore(ctx.home)
    if rows is None:
        rows = peer_rows(keystore, None, _trust_reader(ctx), [_sync_reader(ctx)])
    for peer in keystore.damaged_keys():
        ctx.err(
            f"Warning: {keystore.home.peers / (peer + '.key')} holds no key, so {peer} is "
            f"not paired now: restore the file, or `claudectl relay forget {peer}` and pair again."
        )
    if ctx.json:
        ctx.emit_json(rows)
        return
    if not rows:
        ctx.out(
            "No peers yet. Pair with `claudectl relay invite` / `relay join`, or "
            "`relay pair` / `relay accept`."
        )
        return
    ctx.out(
        f"{'IDENTITY':<24}{'STATE':<14}{'LINK':<11}{'ADDRESS':<24}{'LAST SEEN':<14}"
        f"{'TRUST':<7}{'UNITS ↑/↓':>12}{'BYTES ↑':>10}{'BYTES ↓':>10}"
    )
    ctx.out("─" * 126)
    for r in rows:
        trust = "" if r.get("trust") is None else f"{r['trust']:.2f}"
        dot = "●" if r["state"] == "connected" else "○"
        units = f"{r.get('units_up', 0)}/{r.get('units_down', 0)}"
        link = {"tls1.3": "TLS 1.3", "plaintext": "plaintext"}.get(r.get("transport") or "", "-")
        address = f"via {r['via']}" if r.get("via") else (r["address"] or "-")
        ctx.out(
            f"{dot} {r['identity']:<22}{r['state']:<14}{link:<11}{address:<24}"
            f"{ago(r['last_seen'], time.time()):<14}{trust:<7}{units:>12}{_kb(r['bytes_up']):>10}"
            f"{_kb(r['bytes_down']):>10}"
        )
    if not live:
        ctx.out()
        ctx.out("(the relay service is not running: states are from the files)")


def _trust_reader(ctx: CliContext) -> Any:
    """Peers' trust levels from trust.json, read once (a damaged file is a warning)."""
    from claudectl.hive.trust import load_trust

    book = load_trust(
        ctx.home, ctx.config.hive.default_trust, on_damage=lambda t: ctx.err(f"Warning: {t}.")
    )
    return book.level


def _sync_reader(ctx: CliContext) -> Any:
    """Per-peer gossip counters from sync_state.json (when no service runs)."""
    from claudectl.hive.gossip import SyncState

    state = SyncState(ctx.home)

    def read(peer: str) -> dict[str, Any]:
        ps = state.peers.get(peer)
        return {} if ps is None else {"units_up": ps.units_up, "units_down": ps.units_down}

    return read


def _kb(n: int) -> str:
    """A byte count with one unit system: ``329 B``, ``2.0 KiB``, ``1.5 MiB``."""
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def _is_paired(ctx: CliContext, peer: str) -> bool:
    return is_remote_peer_id(peer) and KeyStore(ctx.home).key(peer) is not None


@relay.command()
@click.argument("peer")
@json_flag
@pass_ctx
async def disconnect(ctx: CliContext, peer: str) -> None:
    """Drop the link to PEER; this side stops redialing it until the next start.

    A peer that dials us reconnects on its own schedule: `relay forget PEER`
    ends the pairing for good.
    """
    result = await call_service(ctx, C.Disconnect, peer=peer)
    if result is None:
        raise CliError("the relay service is not running, so there is no link to drop")
    dropped = bool(result.get("dropped_link", result["was_connected"]))
    stopped = bool(result.get("stopped_dialer", False))
    if not (dropped or stopped or result["was_connected"]) and not _is_paired(ctx, peer):
        raise CliError(f"unknown peer '{peer}' (see `claudectl relay peers`)")
    if ctx.json:
        ctx.emit_json(
            {
                "peer": peer,
                "was_connected": result["was_connected"],
                "dropped_link": dropped,
                "stopped_dialer": stopped,
            }
        )
    elif dropped and stopped:
        ctx.out(f"Disconnected from {peer}; the service stopped redialing it (until it restarts).")
    elif dropped:
        ctx.out(
            f"Disconnected from {peer}. The service was not dialing it: {peer} dialed "
            "this side and may reconnect on its own (`relay forget` ends the pairing)."
        )
    elif stopped:
        ctx.out(f"{peer} was not connected; the service stopped redialing it (until it restarts).")
    else:
        ctx.out(f"{peer} was not connected, and the service was not dialing it: nothing to do.")


@relay.command()
@click.argument("peer")
@json_flag
@pass_ctx
async def forget(ctx: CliContext, peer: str) -> None:
    """Remove PEER's key and address (pair again to reconnect)."""
    if not is_remote_peer_id(peer):
        raise CliError(f"invalid peer id {peer!r}")
    ks = KeyStore(ctx.home)
    if not ks.forget(peer):
        raise CliError(f"unknown peer '{peer}'")
    await call_service(ctx, C.Forgotten, peer=peer)
    if ctx.json:
        ctx.emit_json({"peer": peer, "forgotten": True})
    else:
        ctx.out(f"Forgot peer {peer}.")


@relay.command()
@json_flag
@pass_ctx
def identity(ctx: CliContext) -> None:
    """Show this instance's relay identity."""
    ident = KeyStore(ctx.home).ensure_identity()
    if ctx.json:
        ctx.out(json.dumps({"identity": ident}))
    else:
        ctx.out(ident)
