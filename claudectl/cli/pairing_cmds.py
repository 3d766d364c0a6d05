# -*- test-case-name: tests.test_pairing_cli -*-
"""
``claudectl relay invite | join | discover``.

* ``relay invite`` makes an invite (three formats of one secret pair, see
  :mod:`claudectl.pairing.invites`), saves it -- in text and JSON mode alike
  (claudectl's ``--json`` saved nothing: defect P4) -- and prints the exact
  ``claudectl relay join …`` lines.  ``--list`` and ``--revoke`` manage
  outstanding invites.
* ``relay join`` detects and decodes any of the four forms
  (:func:`claudectl.pairing.detect.decode_join`) and hands the result to
  ``claudectl.control.join.join_peer``.
* ``relay discover`` broadcasts a discovery query, listens for answers and
  LAN beacons, and prints the table; with ``--json`` stdout holds nothing but
  JSON (defect P10), each row with its ``paired`` flag.
"""

from __future__ import annotations

import re
import time
from typing import Any

import click

from claudectl.cli.base import CliContext, CliError, denial_hint, pass_ctx, relay
from claudectl.pairing.detect import JoinTarget, decode_join
from claudectl.pairing.hosts import InviteHostError, invite_host, qr_text
from claudectl.pairing.invites import (
    FAILURE_TEXT,
    Invite,
    InviteStore,
    InviteStoreError,
    describe_failure,
    public_view,
)
from claudectl.relay.keystore import KeyStore
from claudectl.text import clean_line

_TTL = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_TTL_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}
MAX_TTL_SECS = 365 * 86400


def _json_option(fn: Any) -> Any:
    return click.option(
        "--json",
        "json_",
        is_flag=True,
        help="Machine-readable JSON output (same as the global --json).",
    )(fn)


def parse_ttl(text: str) -> int:
    """``90s``, ``30m``, ``24h``, ``7d`` or a plain number of hours -> seconds."""
    m = _TTL.match(text)
    if m is None or int(m.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration such as 30m, 24h or 7d")
    secs = int(m.group(1)) * _TTL_UNIT[m.group(2).lower()]
    if secs > MAX_TTL_SECS:
        raise click.BadParameter("an invite can live at most 365 days")
    return secs


def _duration(secs: float) -> str:
    secs = max(0, int(secs))
    if secs >= 2 * 86400 and secs % 86400 == 0:
        return f"{secs // 86400}d"
    if secs >= 3600:
        return f"{secs // 3600}h" + (f"{secs % 3600 // 60}m" if secs % 3600 >= 60 else "")
    if secs >= 60:
        return f"{secs // 60}m"
    return f"{secs}s"


# --- relay invite ---------------------------------------------------------------------


@relay.command()
@click.option("--qr", is_flag=True, help="Also draw the invite link as a QR code.")
@click.option("--words", is_flag=True, help="Also print the word phrase.")
@click.option(
    "--ttl",
    metavar="DURATION",
    default=None,
    help="How long the invite stays valid: 30m, 24h, 7d (default: relay.invite_ttl_hours, 24h).",
)
@click.option(
    "--host",
    metavar="ADDR",
    default=None,
    help="The IP address peers should connect to (default: listen_addr when "
    "specific, else this machine's primary IPv4).",
)
@click.option(
    "--port",
    "port",
    type=click.IntRange(1, 65535),
    default=None,
    help="The port peers should connect to (default: the running service's port, "
    "else relay.listen_port).",
)
@click.option(
    "--hub",
    metavar="IP:PORT",
    default=None,
    help="Name the NAT hub this machine is reachable through (one of [relay] hubs; "
    "docs/hub.md) instead of its own address.  The invite then has a link only.",
)
@click.option("--list", "list_", is_flag=True, help="List remembered invites and their state.")
@click.option("--revoke", metavar="ID", default=None, help="Revoke an open invite.")
@_json_option
@pass_ctx
def invite(
    ctx: CliContext,
    qr: bool,
    words: bool,
    ttl: str | None,
    host: str | None,
    port: int | None,
    list_: bool,
    revoke: str | None,
    json_: bool,
    hub: str | None = None,
) -> None:
    """Create a single-use invite: a relay code, a word phrase and an invite link.

    The peer runs `claudectl relay join <any of them>` while this machine's
    relay service is running.  Relay codes and word phrases are one-time
    passwords for a PAKE: a wrong attempt burns the invite, and the key both
    sides end with is a fresh 32-byte key.
    """
    as_json = ctx.json or json_
    store = InviteStore(ctx.home)
    now = time.time()
    if list_ and revoke:
        raise CliError("use either --list or --revoke, not both")
    try:
        if list_:
            return _list_invites(ctx, store, now, as_json)
        if revoke:
            inv = store.revoke(revoke, now)
            if as_json:
                ctx.emit_json(public_view(inv, now))
            else:
                ctx.out(f"Invite {inv.id} revoked.")
            return
        ttl_secs = parse_ttl(ttl) if ttl is not None else ctx.config.relay.invite_ttl_hours * 3600
        relay_cfg = ctx.config.relay
        warning: str | None = None
        if hub is not None:
            address, port = _hub_address(hub, relay_cfg.hubs)
        else:
            if port is None:
                port = _service_port(ctx) or relay_cfg.listen_port
            if not port:
                raise CliError(
                    "relay.listen_port is 0 (a random port): set a fixed port so an "
                    "invite can name it, or pass --port"
                )
            try:
                address, warning = invite_host(relay_cfg.listen_addr, host)
            except InviteHostError as e:
                raise CliError(str(e)) from None
        identity = KeyStore(ctx.home).shareable_identity()
        inv = store.create(identity, address, port, ttl_secs, now, via_hub=hub is not None)
    except InviteStoreError as e:
        raise CliError(str(e)) from None
    if warning:
        ctx.err(f"Warning: {warning}")
    if as_json:
        ctx.emit_json(_invite_json(inv))
    else:
        _print_invite(ctx, inv, words, now)
    if qr and not as_json:
        ctx.out("QR Code (scan to join):")
        ctx.out()
        ctx.out(qr_text(inv.link))
        ctx.out()


def _hub_address(hub: str, configured: tuple[str, ...]) -> tuple[str, int]:
    """``--hub``: an IP address and port (an invite link cannot carry a host name)."""
    import ipaddress

    from claudectl.hub.wire import DEFAULT_HUB_PORT
    from claudectl.relay.address import parse_address

    try:
        host, port = parse_address(hub, DEFAULT_HUB_PORT)
        ipaddress.ip_address(host)
    except ValueError:
        raise CliError(
            f"--hub {hub!r}: give the hub's IP address and port (an invite link cannot "
            f"carry a host name), e.g. 203.0.113.7:{DEFAULT_HUB_PORT}"
        ) from None
    if not configured:
        raise CliError(
            "--hub: this machine registers at no hub, so nobody could reach it there; "
            'add it to [relay] hubs (and hub_token) first, e.g. hubs = ["' + hub + '"]'
        )
    return host, port


def _service_port(ctx: CliContext) -> int | None:
    """The TCP port the running relay service listens on, if one runs."""
    from claudectl.relay.runinfo import running_port

    return running_port(ctx.home)


def _invite_json(inv: Invite) -> dict[str, Any]:
    return {
        "identity": inv.identity,
        "invite_link": inv.link,
        "relay_code": inv.relay_code,
        "word_phrase": inv.word_phrase,
        "addr": inv.address,
        "invite_id": inv.id,
        "expires_at": inv.expires_at,
        "code_unavailable": inv.not_carried_reason,
    }


def _print_invite(ctx: CliContext, inv: Invite, words: bool, now: float) -> None:
    code, phrase = inv.relay_code, inv.word_phrase
    ctx.out(f"Your identity: {inv.identity}")
    ctx.out()
    if code is None:
        ctx.out(f"  RELAY CODE:  (none: {inv.not_carried_reason})")
    else:
        ctx.out(f"  RELAY CODE:  {code}")
    ctx.out()
    if words and phrase is not None:
        ctx.out(f"  WORD PHRASE: {phrase}")
        ctx.out()
    ctx.out(f"  INVITE LINK: {inv.link}")
    ctx.out()
    ctx.out("Share any of the above with your peer. They run:")
    ctx.out()
    if code is not None:
        ctx.out(f"  claudectl relay join {code}")
    if words and phrase is not None:
        ctx.out(f"  claudectl relay join {phrase}")
    ctx.out(f"  claudectl relay join {inv.link}")
    ctx.out()
    ctx.out(
        f"Invite {inv.id}: single use, expires in {_duration(inv.expires_at - inv.created_at)}. "
        f"Keep `claudectl relay serve` running here until the peer has joined."
    )
    ctx.out()


def _list_invites(ctx: CliContext, store: InviteStore, now: float, as_json: bool) -> None:
    invites = store.list(now)
    if as_json:
        ctx.emit_json([public_view(i, now) for i in invites])
        return
    if not invites:
        ctx.out("No invites. Create one with: claudectl relay invite")
        return
    ctx.out(f"  {'ID':<10}{'STATE':<9}{'ADDRESS':<24}{'EXPIRES':<12}USED BY")
    ctx.out("  " + "─" * 62)
    for inv in invites:
        state = inv.state_at(now)
        expires = _duration(inv.expires_at - now) if state == "open" else "-"
        ctx.out(f"  {inv.id:<10}{state:<9}{inv.address:<24}{expires:<12}{inv.used_by or '-'}")


# --- relay join ------------------------------------------------------------------------


def _describe_target(target: JoinTarget) -> dict[str, Any]:
    return {
        "format": target.kind,
        "addr": target.address,
        "expected_identity": target.expected_identity,
    }


@relay.command()
@click.argument("invite_text", nargs=-1, required=True, metavar="INVITE...")
@click.option(
    "--check", is_flag=True, help="Only decode the invite and show what it holds; do not connect."
)
@_json_option
@pass_ctx
async def join(ctx: CliContext, invite_text: tuple[str, ...], check: bool, json_: bool) -> None:
    """Pair with the peer that gave you an invite, in any of its forms:

    \b
      claudectl relay join YCU-ACM-UAU-PZJ-WHA                  (relay code)
      claudectl relay join nut may act dub jag mad ray let cap  (word phrase)
      claudectl relay join cctl://laptop-a3f29b1c@192.168.1.50:9847/k/a3f29b1cd4e5f678
      claudectl relay join a3f2-9b1c-d4e5-f678 192.168.1.50:9847  (pair code + address)

    Case, dashes and spaces do not matter.  The inviter's relay service must
    be running.
    """
    as_json = ctx.json or json_
    try:
        target = decode_join(" ".join(invite_text))
    except ValueError as e:
        raise CliError(str(e)) from None
    if check:
        if as_json:
            ctx.emit_json(_describe_target(target))
        else:
            ctx.out(f"Format:   {target.kind.replace('_', ' ')}")
            ctx.out(f"Address:  {target.address}")
            if target.expected_identity:
                ctx.out(f"Identity: {target.expected_identity}")
        return
    from claudectl.control.join import join_peer

    if not as_json:
        ctx.out(f"Connecting to {target.address}...")
    try:
        result = await ctx.run(join_peer, ctx.home, ctx.config, target)
    except CliError:
        raise
    except Exception as e:  # the relay core's errors explain themselves
        raise CliError(join_failure_message(target, str(e))) from None
    peer_id, addr = result[0], result[1]
    kept = getattr(result, "kept_by_service", None)
    if as_json:
        data: dict[str, Any] = {"peer_id": peer_id, "addr": str(addr), "format": target.kind}
        if kept is not None:
            data["kept_by_service"] = kept
            data["mode"] = getattr(result, "mode", None)
        ctx.emit_json(data)
        return
    ctx.out(f"Paired with {peer_id} ({addr})")
    if kept is True:
        ctx.out("The link stays up through the running relay service.")
    elif kept is False:
        ctx.out(
            f"No relay service runs here; start one (claudectl relay serve) to stay "
            f"connected to {peer_id}."
        )


def join_failure_message(target: JoinTarget, error: str) -> str:
    """``connection failed: …``, plus what a refused short code can mean."""
    message = f"connection failed: {error}"
    for reason in FAILURE_TEXT:
        if re.search(rf"\b{reason}\b", error):
            return f"{message}: {describe_failure(reason)}"
    if target.pake_password is not None and "denied" in error:
        return (
            f"{message}. The code may be mistyped, or the invite used, expired, revoked "
            f"or burned (each invite allows one attempt); ask for a new invite"
        )
    return denial_hint(message)


# --- relay discover --------------------------------------------------------------------


def _version_label(version: str) -> str:
    return f"v{version}" if version[:1].isdigit() else version


@relay.command()
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60.0),
    default=3.0,
    show_default=True,
    help="Seconds to wait for answers and announcements.",
)
@_json_option
@pass_ctx
async def discover(ctx: CliContext, timeout: float, json_: bool) -> None:
    """List claudectl instances on the LAN.

    Broadcasts a discovery query that running instances of this project
    answer at once, and listens for the periodic announcements of any
    instance (claudectl's included).
    """
    from claudectl.discovery.protocol import DiscoveryError, scan

    as_json = ctx.json or json_
    relay_cfg = ctx.config.relay
    keystore = KeyStore(ctx.home)
    own = keystore.identity()
    seconds = f"{timeout:g} second" + ("" if timeout == 1 else "s")
    if not as_json:
        ctx.out(f"Scanning LAN for claudectl instances ({seconds})...")
        ctx.out()
    try:
        rows = await ctx.run(scan, relay_cfg, timeout, own)
    except DiscoveryError as e:
        raise CliError(str(e)) from None
    if as_json:
        ctx.emit_json(
            [{**r.to_json(), "paired": keystore.key(r.identity) is not None} for r in rows]
        )
        return
    if not rows:
        ctx.out("No instances found.")
        return
    ctx.out(f"Found {len(rows)} instance(s):")
    ctx.out()
    ctx.out(f"  {'IDENTITY':<20}{'ADDRESS':<24}VERSION")
    ctx.out("  " + "─" * 56)
    for r in rows:
        paired = " (paired)" if keystore.key(r.identity) is not None else ""
        # Identity and version come from unauthenticated datagrams.
        ctx.out(
            f"  {clean_line(r.identity):<20}{clean_line(r.address):<24}"
            f"{clean_line(_version_label(r.version))}{paired}"
        )
