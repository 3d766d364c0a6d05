# -*- test-case-name: tests.test_mesh -*-
"""
The registry of authenticated links and the dispatcher of their frames.

One link per peer id.  A newer authenticated link from the same peer
replaces the old one cleanly (defect W10): the old socket is closed, the
peer's state (dedup window, counters) is kept.  ``max_peers`` is checked
again here, after authentication (defect W11).

:class:`Mesh` provides :class:`~claudectl.relay.interfaces.IMesh` to the
layers above (hive gossip, delegation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from claudectl.relay.codec import Envelope, EnvelopeFactory, PayloadReader
from claudectl.relay.handshake import MUTUAL, Authenticated
from claudectl.relay.interfaces import IMesh, LinkObserver, MessageHandler
from claudectl.relay.links import CONNECTOR, ILink, PeerLink, PeerState, unsent_bytes

log = Logger()

CONNECTED = "connected"
CONNECTING = "connecting"
DISCONNECTED = "disconnected"


@implementer(IMesh)
class Mesh:
    def __init__(
        self,
        envelopes: EnvelopeFactory,
        max_peers: int,
        now: Callable[[], float],
        on_authenticated: Callable[[PeerLink, Authenticated], None] | None = None,
    ) -> None:
        self._env = envelopes
        self.max_peers = max_peers
        self._now = now
        self._on_authenticated = on_authenticated
        self.states: dict[str, PeerState] = {}
        self.links: dict[str, PeerLink] = {}
        self._handlers: dict[str, list[MessageHandler]] = {}
        #: Readers of payloads by message type (codec.decode's ``readers``).
        self.payload_readers: dict[str, PayloadReader] = {}
        self._up: list[LinkObserver] = []
        self._down: list[LinkObserver] = []
        #: Peers a dialer keeps a link to, and the address it dials (set by the node).
        self.dialing: dict[str, str] = {}

    @property
    def identity(self) -> str:
        return self._env.identity

    # --- IMesh --------------------------------------------------------------------
    def send(self, peer_id: str, msg_type: str, payload: Any) -> bool:
        link = self.links.get(peer_id)
        if link is None:
            return False
        link.protocol.send(self._env.make(msg_type, payload))
        return True

    def flush(self, peer_id: str) -> None:
        """Put the frames written to ``peer_id`` so far on the wire now
        (see :meth:`claudectl.relay.protocol.RelayProtocol.flush`)."""
        link = self.links.get(peer_id)
        if link is not None:
            link.protocol.flush()

    def hold_reading(self, peer_id: str, held: bool) -> None:
        link = self.links.get(peer_id)
        if link is not None:
            link.protocol.hold_reading(held)

    def send_envelope(self, peer_id: str, env: Envelope) -> bool:
        link = self.links.get(peer_id)
        if link is None:
            return False
        link.protocol.send(env)
        return True

    def connected_peers(self) -> list[str]:
        return sorted(self.links)

    def add_handler(self, msg_type: str, handler: MessageHandler) -> None:
        self._handlers.setdefault(msg_type, []).append(handler)

    def add_payload_reader(self, msg_type: str, reader: PayloadReader) -> None:
        self.payload_readers[msg_type] = reader

    def add_link_observer(self, on_up: LinkObserver | None, on_down: LinkObserver | None) -> None:
        if on_up is not None:
            self._up.append(on_up)
        if on_down is not None:
            self._down.append(on_down)

    def peer_mode(self, peer_id: str) -> str | None:
        link = self.links.get(peer_id)
        return link.state.mode if link is not None else None

    def peer_transport(self, peer_id: str) -> str | None:
        link = self.links.get(peer_id)
        return link.state.transport if link is not None else None

    def peer_direction(self, peer_id: str) -> str | None:
        link = self.links.get(peer_id)
        return link.direction if link is not None else None

    def unsent_bytes(self, peer_id: str) -> int:
        link = self.links.get(peer_id)
        if link is None:
            return 0
        # What the transports hold, and what the link holds back itself (a
        # claudectl connector's first second after the ack).
        return unsent_bytes(link.protocol.transport) + link.protocol.queued_bytes

    # --- for the protocol -----------------------------------------------------------
    def connected_count(self) -> int:
        return len(self.links)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self.links

    def state(self, peer_id: str) -> PeerState:
        st = self.states.get(peer_id)
        if st is None:
            st = self.states[peer_id] = PeerState(peer_id)
        return st

    def link_up(self, protocol: ILink, result: Authenticated) -> PeerLink | None:
        """Register a freshly authenticated link; None if it must be refused."""
        peer = result.peer_id
        if peer == self.identity:
            log.warn("refusing a link to ourselves ({peer_id})", peer_id=peer)
            return None
        existing = self.links.get(peer)
        if existing is None and len(self.links) >= self.max_peers:
            log.warn(
                "refusing {peer_id}: max_peers ({max}) reached", peer_id=peer, max=self.max_peers
            )
            return None
        st = self.state(peer)
        direction = "outbound" if protocol.role == CONNECTOR else "inbound"
        if (
            existing is not None
            and existing.direction != direction
            and not existing.protocol.is_closed
        ):
            # Both sides dialed each other: keep the link dialed by the smaller
            # identity, on both sides alike, instead of each side keeping its
            # newest link (and both dropping the one the other kept).
            def dialer(d: str) -> str:
                return self.identity if d == "outbound" else peer

            if dialer(existing.direction) < dialer(direction):
                log.info(
                    "{peer_id}: keeping the link dialed by {dialer}",
                    peer_id=peer,
                    dialer=dialer(existing.direction),
                )
                return None
        if existing is not None:
            st.links_replaced += 1
            del self.links[peer]
            log.info("{peer_id}: a newer link replaces the old one", peer_id=peer)
            existing.protocol.close("replaced by a newer link")
        link = PeerLink(protocol, st, direction)
        now = self._now()
        st.mode = result.mode
        st.transport = result.transport
        st.last_seen = now
        st.connected_since = now
        st.last_error = None
        if direction == "inbound" and peer not in self.dialing and protocol.transport:
            # Where it connected from -- unless we dial it: then `relay
            # peers` shows the address the service dials.
            where = protocol.transport.getPeer()
            host = getattr(where, "host", None)
            if host is not None:
                port = getattr(where, "port", None)
                st.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.links[peer] = link
        log.info(
            "{peer_id} authenticated ({direction}, {mode}, {transport})",
            peer_id=peer,
            direction=direction,
            mode=result.mode,
            transport=result.transport,
        )
        if self._on_authenticated is not None:
            self._on_authenticated(link, result)
        return link

    def link_ready(self, link: PeerLink) -> None:
        for cb in list(self._up):
            try:
                cb(link.peer_id)
            except Exception:
                log.failure("link-up observer failed for {peer_id}", peer_id=link.peer_id)

    def link_lost(self, link: PeerLink, reason: str) -> None:
        st = link.state
        st.last_error = reason
        if self.links.get(link.peer_id) is not link:
            return  # replaced: the peer is still connected
        del self.links[link.peer_id]
        log.info(
            "{peer_id} disconnected after {secs:.1f} s ({direction}, {mode}, {transport}): {reason}",
            peer_id=link.peer_id,
            secs=max(0.0, self._now() - (st.connected_since or self._now())),
            direction=link.direction,
            mode=st.mode,
            transport=st.transport,
            reason=reason,
        )
        for cb in list(self._down):
            try:
                cb(link.peer_id)
            except Exception:
                log.failure("link-down observer failed for {peer_id}", peer_id=link.peer_id)

    def deliver(self, link: PeerLink, env: Envelope) -> None:
        link.state.last_seen = self._now()
        handlers = self._handlers.get(env.msg_type)
        if not handlers:
            link.counters.ignored += 1
            log.debug(
                "{msg_type} from {peer_id} (no handler)",
                msg_type=env.msg_type,
                peer_id=link.peer_id,
            )
            return
        for h in handlers:
            try:
                h(link.peer_id, env)
            except Exception:
                log.failure(
                    "handler for {msg_type} from {peer_id} failed",
                    msg_type=env.msg_type,
                    peer_id=link.peer_id,
                )

    def disconnect(self, peer_id: str, reason: str = "disconnected by the user") -> bool:
        link = self.links.get(peer_id)
        if link is None:
            return False
        link.protocol.close(reason)
        return True

    def peer_status(self, peer_id: str) -> str:
        if peer_id in self.links:
            return CONNECTED
        if peer_id in self.dialing:
            return CONNECTING
        return DISCONNECTED

    def is_mutual(self, peer_id: str) -> bool:
        st = self.states.get(peer_id)
        return st is not None and st.mode == MUTUAL
