"""
The seams between the relay core and the layers above it (hive gossip,
remote delegation).

A layer receives an :class:`IMesh` and never touches sockets: it registers a
handler per message type, hears when authenticated links come and go, and
sends payloads to a peer id.  Tests give it :class:`claudectl.testing.FakeMesh`
style objects; the service gives it the real :class:`claudectl.relay.mesh.Mesh`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Attribute, Interface

from claudectl.relay.codec import Envelope

#: ``handler(peer_id, envelope)``; ``peer_id`` is the *authenticated* link id.
MessageHandler = Callable[[str, Envelope], None]
LinkObserver = Callable[[str], None]


class IMesh(Interface):
    identity = Attribute("This instance's peer id (str).")

    def send(peer_id: str, msg_type: str, payload: Any) -> bool:
        """
        Send one frame to a connected peer.  Returns False (and sends
        nothing) when no authenticated link to ``peer_id`` is up.
        """

    def connected_peers() -> list[str]:
        """Ids of the peers with an authenticated link, sorted."""

    def add_handler(msg_type: str, handler: MessageHandler) -> None:
        """Call ``handler`` for every accepted inbound frame of ``msg_type``."""

    def add_link_observer(on_up: LinkObserver | None, on_down: LinkObserver | None) -> None:
        """Be told when a peer's authenticated link comes up or goes down."""

    def peer_mode(peer_id: str) -> str | None:
        """``"mutual"`` (a peer of this project), ``"oneway"`` (claudectl 0.64) or None."""

    def peer_transport(peer_id: str) -> str | None:
        """``"tls1.3"``, ``"plaintext"`` (the link is not encrypted) or None (no link)."""

    def peer_direction(peer_id: str) -> str | None:
        """``"outbound"`` (we dialed), ``"inbound"`` (it dialed us) or None (no link)."""


class ISubsystem(Interface):
    """Something ``makeService`` attaches to a node (gossip, delegation)."""

    def attach(node: Any, parent: Any) -> None:
        """Register handlers on ``node.mesh`` and child services under ``parent``."""
