"""
The seams of the relay core.

* :class:`IMesh`: what the layers above (hive gossip, delegation, the
  control socket's event hub) see of the links.  A layer registers a handler
  per message type, hears when authenticated links come and go, and sends
  payloads to a peer id; it never touches sockets.  Tests give it a small
  recording fake; the service gives it the real
  :class:`claudectl.relay.mesh.Mesh`.
* :class:`ILinkHost`: what one connection's protocol
  (:class:`claudectl.relay.protocol.RelayProtocol`) sees of the node that
  accepted or dialed it -- admission, the handshake machines, the mesh's
  link events and two timeouts -- and nothing else.
  :class:`claudectl.relay.node.RelayNode` provides it.
* :class:`~claudectl.relay.links.ILink` (in :mod:`claudectl.relay.links`):
  what the mesh sees of a connection (send, close, role).
* :class:`IInviteBook`: what the listener's key lookups need of the pairing
  layer's invite store.  The relay core never imports the pairing layer; the
  composition root (:mod:`claudectl.service.compose`) hands a store in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

from claudectl.relay.codec import Envelope, PayloadReader
from claudectl.relay.links import ILink, PeerLink

if TYPE_CHECKING:
    from claudectl.relay.handshake import (
        Authenticated,
        ConnectorHandshake,
        KeyAuth,
        KeyByIdentity,
        ListenerHandshake,
        PakeAuth,
    )

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

    def flush(peer_id: str) -> None:
        """Put the frames sent to ``peer_id`` so far on the wire now, not
        when the reactor next polls (no-op without a link)."""

    def add_handler(msg_type: str, handler: MessageHandler) -> None:
        """Call ``handler`` for every accepted inbound frame of ``msg_type``."""

    def add_link_observer(on_up: LinkObserver | None, on_down: LinkObserver | None) -> None:
        """Be told when a peer's authenticated link comes up or goes down."""

    def add_payload_reader(msg_type: str, reader: PayloadReader) -> None:
        """Read the payloads of ``msg_type`` frames in the plain shape with
        ``reader`` (see :func:`claudectl.relay.codec.decode`): a handler of
        that type then receives what the reader makes of them."""

    def peer_mode(peer_id: str) -> str | None:
        """``"mutual"`` (a peer of this project), ``"oneway"`` (claudectl 0.64) or None."""

    def peer_transport(peer_id: str) -> str | None:
        """``"tls1.3"``, ``"plaintext"`` (the link is not encrypted) or None (no link)."""

    def peer_direction(peer_id: str) -> str | None:
        """``"outbound"`` (we dialed), ``"inbound"`` (it dialed us) or None (no link)."""

    def unsent_bytes(peer_id: str) -> int:
        """Bytes written to the peer's link that the kernel has not taken
        yet (a peer that stops reading makes this grow); 0 without a link."""

    def hold_reading(peer_id: str, held: bool) -> None:
        """Stop or go on reading the peer's link (back-pressure: a layer
        whose work from that peer piles up holds it until it caught up).
        Applies to the link up now; a new link starts unheld (the hive's
        gossip holds it again if its old link's work is still waiting)."""


class ILinkHost(Interface):
    """What a link's protocol needs of the node it belongs to."""

    clock = Attribute("The IReactorTime the protocol's timers run on.")
    admission = Attribute(
        "The :class:`claudectl.relay.admission.Admission` of unauthenticated connections."
    )
    tls = Attribute(
        "The :class:`claudectl.relay.tls.TLSContexts` (None: TLS is off for this node)."
    )
    handshake_timeout_secs = Attribute("Seconds a handshake may take in all ([relay]).")
    heartbeat_interval_secs = Attribute("Seconds between heartbeats on a link ([relay]).")
    payload_readers = Attribute(
        "Payload readers by message type (codec.PayloadReader) for the links' frames."
    )

    def connection_opened(protocol: ILink) -> None:
        """A connection (not yet authenticated) is open."""

    def connection_closed(protocol: ILink) -> None:
        """The connection is gone."""

    def connected_count() -> int:
        """How many authenticated links are up (admission sheds load on it)."""

    def listener_handshake() -> ListenerHandshake:
        """A fresh listener-side handshake machine."""

    def connector_handshake(auth: KeyAuth | KeyByIdentity | PakeAuth) -> ConnectorHandshake:
        """A fresh connector-side handshake machine for ``auth``."""

    def heartbeat() -> Envelope:
        """A heartbeat envelope from this node."""

    def link_up(protocol: ILink, result: Authenticated) -> PeerLink | None:
        """Register an authenticated link; None if it must be refused."""

    def link_ready(link: PeerLink) -> None:
        """The link may carry frames now (after the quiet time toward 0.64)."""

    def link_lost(link: PeerLink, reason: str) -> None:
        """The authenticated link is gone."""

    def deliver(link: PeerLink, env: Envelope) -> None:
        """One accepted inbound frame of an authenticated link."""


class IInvite(Interface):
    link_psk = Attribute("The invite link's pre-shared key (bytes).")

    def state_at(now: float) -> str:
        """``open``, ``used``, ``expired``, ``revoked`` or ``burned`` at ``now``."""

    def is_open(now: float) -> bool:
        """Whether a joiner may still use it at ``now``."""


class IInviteBook(Interface):
    """The outstanding invites the listener accepts joiners through."""

    def open_link_keys(now: float) -> Iterable[tuple[str, bytes]]:
        """``(invite_id, link_psk)`` of the invites open at ``now``."""

    def list(now: float) -> Sequence[IInvite]:
        """Every stored invite."""

    def mark_used(invite_id: str, peer_id: str, now: float) -> Any:
        """A joiner authenticated with the invite's key: it is used."""
