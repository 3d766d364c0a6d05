# -*- test-case-name: tests.test_join -*-
"""
``relay join``: reach the peer an invite names.

With a running service the service does the work (and keeps the link up);
without one, a one-shot node authenticates, stores the key and address, and
closes the link again -- the next ``relay serve`` dials the peer.
"""

from __future__ import annotations

from typing import Any

from claudectl.config import Config
from claudectl.control import commands as C
from claudectl.control.client import ServiceNotRunning, call_control, remote_error_text
from claudectl.home import Home
from claudectl.pairing.pake import PakeInitiator
from claudectl.relay.handshake import HandshakeFailed, KeyAuth, PakeAuth
from claudectl.relay.node import RelayNode


class JoinFailed(Exception):
    """The inviter could not be reached or did not accept us."""


class JoinResult(tuple):  # type: ignore[type-arg]
    """``(peer_id, address)`` plus ``mode`` and ``kept_by_service``."""

    peer_id: str
    address: str
    mode: str
    kept_by_service: bool

    def __new__(cls, peer_id: str, address: str, mode: str, kept: bool) -> JoinResult:
        self = super().__new__(cls, (peer_id, address))
        self.peer_id, self.address, self.mode, self.kept_by_service = peer_id, address, mode, kept
        return self


async def join_peer(reactor: Any, home: Home, config: Config, target: Any) -> JoinResult:
    """
    Authenticate to the inviter described by ``target`` (a
    :class:`claudectl.pairing.detect.JoinTarget`), store its key under its
    real identity with its address, and keep the link (through the service).
    """
    address = target.address
    if target.psk is not None:
        kind, secret = "key", target.psk
    elif target.pake_password is not None:
        kind, secret = "pake", target.pake_password
    else:
        raise JoinFailed("the code carries no secret")
    try:
        r = await call_control(
            reactor,
            home,
            C.Join,
            address=address,
            kind=kind,
            secret_hex=secret.hex(),
            expected_peer=target.expected_identity or None,
        )
    except ServiceNotRunning:
        pass
    except (C.LinkFailed, C.BadRequest, C.NotPairedError) as e:
        raise JoinFailed(remote_error_text(e)) from None
    else:
        return JoinResult(r["peer"], address, r["mode"], True)

    from claudectl.hub.peer import client_endpoint

    node = RelayNode(home, config, reactor, dial_via=client_endpoint)
    auth: KeyAuth | PakeAuth
    if kind == "key":
        auth = KeyAuth(secret, target.expected_identity or None)
    else:
        auth = PakeAuth(PakeInitiator(secret))
    try:
        proto = await node.open_link(address, auth)
    except HandshakeFailed as e:
        raise JoinFailed(str(e)) from None
    except Exception as e:
        raise JoinFailed(f"connect to {address}: {e}") from None
    assert proto.result is not None
    proto.close("join done")
    await proto.when_closed()
    return JoinResult(proto.result.peer_id, address, proto.result.mode, False)
