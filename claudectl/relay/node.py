# -*- test-case-name: tests.test_node -*-
"""
A relay node: one identity, its keys, its mesh of links, and the dialers
that keep outbound links up.

The composition root (:func:`claudectl.service.compose.makeService`) builds
one :class:`RelayNode`, hands it the pairing layer's invite store and PAKE
responder, and hangs the listeners, dialers, timers and upper layers
(gossip, delegation) under a ``MultiService``.  The CLI builds one too for
one-shot work (``relay connect`` without a running service).  Nothing here
does I/O before it is asked to.  The node's protocols see it only through
:class:`~claudectl.relay.interfaces.ILinkHost`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from claudectl.config import Config
from claudectl.home import Home
from claudectl.relay.address import client_endpoint_string, parse_address
from claudectl.relay.admission import Admission
from claudectl.relay.binding import TLS13
from claudectl.relay.codec import HEARTBEAT, Envelope, EnvelopeFactory, now_ms
from claudectl.relay.crypto import RandomBytes
from claudectl.relay.handshake import (
    MUTUAL,
    Authenticated,
    ConnectorHandshake,
    HandshakeFailed,
    KeyAuth,
    KeyByIdentity,
    ListenerHandshake,
    PakeAuth,
    PakeResponderLike,
    Policy,
)
from claudectl.relay.interfaces import IInviteBook, ILinkHost
from claudectl.relay.keystore import PENDING, KeyStore, PeerMeta, is_remote_peer_id
from claudectl.relay.links import CONNECTOR, LISTENER, ILink, PeerLink, connect_quietly
from claudectl.relay.mesh import Mesh
from claudectl.relay.nonces import IssuedNonces
from claudectl.relay.protocol import RelayProtocol
from claudectl.relay.tls import TLSContexts, ensure_credentials
from claudectl.relay.workers import WorkerTable

log = Logger()

#: Reconnect delays: 5, 10, 20, 40, 60 s … capped by ``reconnect_max_secs``.
FIRST_RETRY_SECS = 5.0


def reconnect_policy(
    max_secs: float, jitter: Callable[[], float] | None = None
) -> Callable[[int], float]:
    """
    ``ClientService`` retry policy: attempt ``n`` (1-based: ClientService
    counts the failure before asking) waits ``min(5 * 2**(n-1), max)`` s plus
    up to one second of jitter so a mesh of peers does not retry in step.
    """
    import random as _random

    jit = jitter if jitter is not None else _random.random

    def policy(attempt: int) -> float:
        n = max(1, attempt)
        base = min(FIRST_RETRY_SECS * (2 ** min(n - 1, 30)), float(max_secs))
        return base + jit()

    return policy


#: ``dial_via(node, address, peer_of) -> IStreamClientEndpoint``: how a node
#: reaches an address (``peer_of()`` names the peer expected there, if known).
DialVia = Callable[["RelayNode", str, Callable[[], "str | None"]], Any]


class NotPaired(Exception):
    """There is no key for the peer (or no peer for the address)."""


class ListenerKeys:
    """Key lookups for the listener handshake (docs/protocol.md), plus invites."""

    def __init__(self, node: RelayNode) -> None:
        self.node = node

    def stored_key(self, peer_id: str) -> bytes | None:
        return self.node.keystore.key(peer_id)

    def pending_candidates(self) -> Sequence[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        pending = self.node.keystore.pending_key()
        if pending is not None:
            out.append((PENDING, pending))
        invites = self.node.invites
        if invites is not None:
            for invite_id, psk in invites.open_link_keys(self.node.clock.seconds()):
                if all(psk != known for _, known in out):
                    out.append((f"invite:{invite_id}", psk))
        return out

    def closed_candidates(self) -> Sequence[tuple[str, bytes]]:
        """``(state, psk)`` of closed invite links: to tell a joiner why."""
        invites = self.node.invites
        if invites is None:
            return []
        now = self.node.clock.seconds()
        try:
            return [(i.state_at(now), i.link_psk) for i in invites.list(now) if not i.is_open(now)]
        except Exception:
            return []

    def claim(self, peer_id: str, label: str, psk: bytes) -> bool:
        ks = self.node.keystore
        if ks.key(peer_id) is not None:
            return False
        if label == PENDING:
            if not ks.claim_pending(peer_id, psk):
                return False
        else:
            ks.save_key(peer_id, psk)
            if ks.pending_key() == psk:
                ks.clear_pending()
        invites = self.node.invites
        if invites is not None:
            for invite_id, key in invites.open_link_keys(self.node.clock.seconds()):
                if key == psk:
                    invites.mark_used(invite_id, peer_id, self.node.clock.seconds())
        return True

    def store_new_key(self, peer_id: str, psk: bytes) -> bool:
        if self.node.keystore.key(peer_id) is not None:
            return False
        self.node.keystore.save_key(peer_id, psk)
        return True

    def is_mutual(self, peer_id: str) -> bool:
        return self.node.keystore.is_mutual(peer_id)

    def is_tls(self, peer_id: str) -> bool:
        return self.node.keystore.is_tls(peer_id)


class RelayFactory(Factory):
    """Builds listener-side protocols."""

    def __init__(self, node: RelayNode) -> None:
        self.node = node

    def buildProtocol(self, addr: Any) -> RelayProtocol:
        p = RelayProtocol(self.node, LISTENER)
        p.factory = self
        return p


class _DialFactory(Factory):
    def __init__(self, node: RelayNode, dialer: Dialer) -> None:
        self.node = node
        self.dialer = dialer

    def buildProtocol(self, addr: Any) -> RelayProtocol | None:
        peer = self.dialer.peer_id
        auth: KeyAuth | KeyByIdentity
        if peer is None:
            auth = self.node.key_by_identity(self.dialer.address)
        else:
            psk = self.node.keystore.key(peer)
            if psk is None:
                return None
            auth = KeyAuth(psk, peer)
        p = RelayProtocol(self.node, CONNECTOR, auth)  # type: ignore[arg-type]
        p.dial_address = self.dialer.address  # type: ignore[attr-defined]
        p.factory = self
        return p


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """
    Dials only when it makes sense: never while the peer is already
    connected (through a link it opened to us, say) -- then it waits for that
    link to drop -- and never without a key.  A dialer whose peer is not
    known yet (an ``auto_connect`` address) just dials.
    """

    def __init__(self, node: RelayNode, dialer: Dialer, endpoint: Any) -> None:
        self.node = node
        self.dialer = dialer
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"<peer {self.dialer.peer_id or '?'} at {self.dialer.address}>"

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        peer_id = self.dialer.peer_id
        if peer_id is None:
            return self.endpoint.connect(factory)
        if self.node.keystore.key(peer_id) is None:
            return defer.fail(ConnectError(string=f"not paired with {peer_id}"))
        if not self.node.mesh.is_connected(peer_id):
            return self.endpoint.connect(factory)
        waiting: defer.Deferred[Any]
        #: The attempt started once the old link went down.
        attempt: list[defer.Deferred[Any]] = []

        def cancel(_: Any) -> None:
            self.node.cancel_wait_for_down(peer_id, resume)
            if attempt:
                # Its outcome goes to ``waiting``, which is being cancelled:
                # cancel it too (it then fires ``waiting`` itself, once).
                attempt[0].cancel()

        waiting = defer.Deferred(cancel)

        def resume() -> None:
            if not waiting.called:
                d = self.endpoint.connect(factory)
                attempt.append(d)
                d.chainDeferred(waiting)

        self.node.wait_for_down(peer_id, resume)
        return waiting


class Dialer:
    """
    Keeps an outbound link to one peer up, with backoff (ClientService).

    ``peer_id`` None: an ``auto_connect`` address whose peer is not known
    yet.  Each attempt then picks the key by the identity the listener
    announces (:class:`KeyByIdentity`); the first handshake that proves a
    peer makes the dialer that peer's (:meth:`RelayNode.adopt_dialer`).
    """

    def __init__(self, node: RelayNode, peer_id: str | None, address: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.address = address
        #: Removed from the node (another address replaced it, the user
        #: disconnected): a connection it still had in flight must not
        #: become the peer's link.
        self.retired = False
        endpoint = node.client_endpoint(address, lambda: self.peer_id)
        self.service = ClientService(
            _GuardedEndpoint(node, self, endpoint),
            _DialFactory(node, self),
            retryPolicy=reconnect_policy(node.config.relay.reconnect_max_secs, node.jitter),
            clock=node.clock,
            prepareConnection=self._prepare,
        )
        self.service.setName(f"dialer:{peer_id or address}")

    def _prepare(self, proto: Any) -> defer.Deferred[RelayProtocol]:
        d: defer.Deferred[RelayProtocol] = proto.authenticated
        if self.peer_id is None:

            def proved(result: Any) -> Any:
                peer = proved_peer(proto)
                if self.peer_id is None and peer is not None:
                    self.node.adopt_dialer(self, peer)
                return result

            d.addBoth(proved)
        return d


def proved_peer(proto: RelayProtocol) -> str | None:
    """
    The peer an outbound handshake proved, even if the link was refused
    afterwards (the peer was connected through another link already).
    """
    machine = getattr(proto, "_connector", None)
    result = getattr(machine, "result", None)
    return result.peer_id if result is not None else None


@dataclass(frozen=True)
class ConnectOutcome:
    """What :meth:`RelayNode.connect` did."""

    peer: str
    mode: str
    #: The peer was connected already and the address is the one dialed.
    already: bool
    #: The address the service dials from now on.
    address: str
    #: The address it dialed before, when a confirmed new one replaced it.
    previous: str | None = None


@implementer(ILinkHost)
class RelayNode:
    """
    Everything one running relay instance knows and does.

    ``invites`` and ``pake`` come from the pairing layer (the composition
    root builds them over this node's ``keystore``); without them the
    listener accepts stored and pending keys only -- enough for one-shot
    outbound work.
    """

    def __init__(
        self,
        home: Home,
        config: Config,
        reactor: Any,
        random: RandomBytes = os.urandom,
        jitter: Callable[[], float] | None = None,
        identity: str | None = None,
        tls: bool = True,
        keystore: KeyStore | None = None,
        invites: IInviteBook | None = None,
        pake: PakeResponderLike | None = None,
        dial_via: DialVia | None = None,
    ) -> None:
        self.home = home
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.random = random
        self.jitter = jitter
        self.keystore = keystore if keystore is not None else KeyStore(home)
        self.identity = identity or self.keystore.ensure_identity(random)
        self.envelopes = EnvelopeFactory(self.identity, clock=reactor.seconds)
        self.admission = Admission(reactor.seconds, config.relay.max_peers)
        self.mesh = Mesh(
            self.envelopes,
            config.relay.max_peers,
            reactor.seconds,
            on_authenticated=self._on_authenticated,
        )
        self.mesh.add_link_observer(None, self._on_link_down)
        self.workers = WorkerTable(reactor.seconds, config.relay.heartbeat_interval_secs)
        self.mesh.add_handler(HEARTBEAT, self._on_heartbeat)
        self.invites = invites
        self.pake = pake
        #: Builds the endpoint toward an address (the hub layer's, which
        #: splices through a NAT hub; docs/hub.md).  None: direct TCP only.
        self.dial_via = dial_via
        self.dialers: dict[str, Dialer] = {}
        #: ``auto_connect`` addresses whose peer is not known yet.
        self.address_dialers: dict[str, Dialer] = {}
        #: Every open relay connection (handshaking or authenticated).
        self.protocols: set[RelayProtocol] = set()
        self._down_waiters: dict[str, list[Callable[[], None]]] = {}
        #: Where this node listens (filled in by makeService once bound).
        self.listening_ports: list[Any] = []
        self.handshake_timeout_secs = config.relay.handshake_timeout_secs
        self.heartbeat_interval_secs = config.relay.heartbeat_interval_secs
        self.payload_readers = self.mesh.payload_readers
        self.started_at = reactor.seconds()
        #: Nonces our listeners and connectors issued lately: one handed
        #: back to us is a reflection attempt.
        self.nonces = IssuedNonces(
            reactor.seconds, ttl=2.0 * config.relay.handshake_timeout_secs + 5
        )
        #: TLS toward peers of this project (tests of the plaintext wire
        #: path turn it off); contexts and the certificate are made lazily.
        self.tls: TLSContexts | None = (
            TLSContexts(lambda: ensure_credentials(home, self.identity)) if tls else None
        )
        self.policy = Policy(
            tls=tls,
            require_encryption=config.relay.require_encryption,
            is_own_nonce=self.nonces.issued,
        )
        self._plaintext_warned: set[str] = set()

    def _on_heartbeat(self, peer: str, env: Envelope) -> None:
        self.workers.heartbeat(peer, env.payload)

    # --- ILinkHost: what a link's protocol sees of the node --------------------------
    def connection_opened(self, protocol: ILink) -> None:
        self.protocols.add(protocol)  # type: ignore[arg-type]

    def connection_closed(self, protocol: ILink) -> None:
        self.protocols.discard(protocol)  # type: ignore[arg-type]

    def connected_count(self) -> int:
        return self.mesh.connected_count()

    def heartbeat(self) -> Envelope:
        return self.envelopes.make(HEARTBEAT, {})

    def link_up(self, protocol: ILink, result: Authenticated) -> PeerLink | None:
        return self.mesh.link_up(protocol, result)

    def link_ready(self, link: PeerLink) -> None:
        self.mesh.link_ready(link)

    def link_lost(self, link: PeerLink, reason: str) -> None:
        self.mesh.link_lost(link, reason)

    def deliver(self, link: PeerLink, env: Envelope) -> None:
        self.mesh.deliver(link, env)

    # --- handshake machines -----------------------------------------------------
    def listener_handshake(self) -> ListenerHandshake:
        machine = ListenerHandshake(
            self.envelopes, ListenerKeys(self), self.random, self.pake, self.policy
        )
        self.nonces.add(machine.nonce)
        return machine

    def connector_handshake(self, auth: KeyAuth | KeyByIdentity | PakeAuth) -> ConnectorHandshake:
        machine = ConnectorHandshake(
            self.envelopes,
            auth,
            self.keystore.is_mutual,
            self.random,
            stored_key=self.keystore.key,
            is_tls=self.keystore.is_tls,
            policy=self.policy,
        )
        self.nonces.add(machine.cnonce)
        return machine

    # --- link events --------------------------------------------------------------
    def _on_authenticated(self, link: PeerLink, result: Authenticated) -> None:
        peer = result.peer_id
        ks = self.keystore
        if result.mode == MUTUAL:
            ks.mark_mutual(peer)
        if result.transport == TLS13:
            ks.mark_tls(peer)
        elif peer not in self._plaintext_warned:
            self._plaintext_warned.add(peer)
            log.warn(
                "link to {peer_id} is not encrypted (plaintext: a claudectl 0.64 peer); "
                "delegated tasks from it are refused unless [delegation] "
                "allow_plaintext_tasks = true",
                peer_id=peer,
            )
        if link.direction == "outbound":
            address = getattr(link.protocol, "dial_address", None)
            if ks.key(peer) is None:
                # First contact through an invite link, pair code or PAKE
                # (the handshake refused an identity already paired under
                # another key).
                ks.save_key(peer, result.psk)
            if address:
                link.state.address = address
                # Only a new address is written now (atomic write + fsync is
                # slow on the handshake path); last_seen is saved when the
                # link goes down.
                meta = ks.meta(peer)
                if meta is None or meta.addr != address:
                    ks.save_meta(peer, PeerMeta(address, now_ms(self.clock.seconds)))

    def _on_link_down(self, peer_id: str) -> None:
        meta = self.keystore.meta(peer_id)
        if meta is not None:
            # last_seen alone: no fsync (two per link-down were ~0.5 ms of
            # wall time on the dialer's reactor); a crash only sets it back.
            self.keystore.save_meta(
                peer_id, PeerMeta(meta.addr, now_ms(self.clock.seconds)), durable=False
            )
        for resume in self._down_waiters.pop(peer_id, []):
            resume()

    def wait_for_down(self, peer_id: str, fn: Callable[[], None]) -> None:
        self._down_waiters.setdefault(peer_id, []).append(fn)

    def cancel_wait_for_down(self, peer_id: str, fn: Callable[[], None]) -> None:
        waiters = self._down_waiters.get(peer_id, [])
        if fn in waiters:
            waiters.remove(fn)

    # --- outbound -------------------------------------------------------------------
    def open_link(
        self,
        address: str,
        auth: KeyAuth | KeyByIdentity | PakeAuth,
    ) -> defer.Deferred[RelayProtocol]:
        """Connect once, authenticate, register the link; fires with the protocol."""
        return self._dial_once(address, auth)[1]

    def _dial_once(
        self,
        address: str,
        auth: KeyAuth | KeyByIdentity | PakeAuth,
    ) -> tuple[RelayProtocol, defer.Deferred[RelayProtocol]]:
        expected = auth.expected_peer if isinstance(auth, KeyAuth) else None
        endpoint = self.client_endpoint(address, lambda: expected)
        proto = RelayProtocol(self, CONNECTOR, auth)  # type: ignore[arg-type]
        proto.dial_address = address  # type: ignore[attr-defined]
        d = connect_quietly(endpoint, proto)
        d.addCallback(lambda p: p.authenticated)
        return proto, d

    def client_endpoint(self, address: str, peer_of: Callable[[], str | None]) -> Any:
        """
        The endpoint toward ``address``: direct TCP, or what ``dial_via``
        builds (through a hub when the address is one or cannot be reached).
        """
        host, port = parse_address(address)  # a bad address fails here, as before
        if self.dial_via is not None:
            return self.dial_via(self, address, peer_of)
        return clientFromString(self.reactor, client_endpoint_string(host, port))

    def key_by_identity(self, address: str) -> KeyByIdentity:
        """
        Credentials for an address whose peer we do not know for sure: the
        key of the identity the listener announces (TLS listeners of this
        project); toward a listener that announces none (claudectl 0.64), the
        key of the peer last seen there or of the only peer without an
        address.  Never a search through every key.
        """
        ks = self.keystore

        def key_for(peer: str) -> bytes | None:
            if not is_remote_peer_id(peer) or peer == self.identity:
                return None
            return ks.key(peer)

        def fallback() -> tuple[str, bytes] | str:
            try:
                peer = self.choose_peer_for(address)
            except (NotPaired, ValueError) as e:
                return (
                    f"the listener at {address} does not announce its identity (a "
                    f"claudectl 0.64 peer?), so the key cannot be chosen by it; {e}"
                )
            psk = ks.key(peer)
            if psk is None:
                return f"no key stored for {peer}"
            return peer, psk

        def chosen(peer: str, how: str) -> None:
            if how == "announced":
                log.info(
                    "{address} announces itself as {peer_id}: using that peer's key",
                    address=address,
                    peer_id=peer,
                )
            else:
                log.info(
                    "{address} does not announce its identity (a claudectl 0.64 "
                    "listener?): using the key of {peer_id}, the paired peer last seen "
                    "there or the only one without an address",
                    address=address,
                    peer_id=peer,
                )

        return KeyByIdentity(key_for, fallback, chosen)

    def choose_peer_for(
        self, address: str, peer_id: str | None = None, allow_unaddressed: bool = True
    ) -> str:
        """
        Which stored key to use toward ``address`` (defect W12: never try every
        key): the named peer; else the peer last seen at that address; else the
        only paired peer that has no address yet (the one just accepted).
        """
        ks = self.keystore
        if peer_id is not None:
            if ks.key(peer_id) is None:
                raise NotPaired(
                    f"peer '{peer_id}' is not paired — run `claudectl relay accept "
                    f"<code> {peer_id}` or `claudectl relay join <invite>` first"
                )
            return peer_id
        found = self.peer_last_seen_at(address)
        if found is not None:
            return found
        without_meta = [peer for peer in ks.known_peers() if ks.meta(peer) is None]
        if len(without_meta) == 1 and allow_unaddressed:
            return without_meta[0]
        if not without_meta or not allow_unaddressed:
            raise NotPaired(
                f"no paired peer is known at {address} — pair first "
                "(`claudectl relay pair` / `relay accept`, or `relay join <invite>`)"
            )
        raise NotPaired(
            f"several paired peers have no address yet ({', '.join(without_meta)}); "
            "say which one is at this address with --peer"
        )

    def peer_last_seen_at(self, address: str) -> str | None:
        """The paired peer whose stored address is ``address``, if any."""
        ks = self.keystore
        norm = parse_address(address)
        for peer in ks.known_peers():
            meta = ks.meta(peer)
            if meta is None or not meta.addr:
                continue
            try:
                if parse_address(meta.addr) == norm:
                    return peer
            except ValueError:
                continue
        return None

    def dial_address(self, peer_id: str) -> str | None:
        """Where the service dials ``peer_id`` (or would at its next start)."""
        dialer = self.dialers.get(peer_id)
        if dialer is not None:
            return dialer.address
        meta = self.keystore.meta(peer_id)
        return meta.addr if meta is not None and meta.addr else None

    async def connect(self, address: str, peer_id: str | None, parent: Any) -> ConnectOutcome:
        """
        ``relay connect``: authenticate to ``address`` once, then keep a link
        to the peer there.  An address replaces the one a peer is dialed at
        only once a handshake there proved that peer: a failed attempt (a
        mistyped port, another instance) raises and changes nothing -- the
        working link and the dialed address stay.
        """
        ks = self.keystore
        if peer_id is None:
            peer_id = self.peer_last_seen_at(address)
        auth: KeyAuth | KeyByIdentity
        if peer_id is not None:
            self.choose_peer_for(address, peer_id)  # raises NotPaired
            psk = ks.key(peer_id)
            assert psk is not None
            if self.mesh.is_connected(peer_id) and _same_address(
                self.dial_address(peer_id), address
            ):
                self.ensure_dialer(peer_id, address, parent)
                return ConnectOutcome(peer_id, self.mesh.peer_mode(peer_id) or "", True, address)
            auth = KeyAuth(psk, peer_id)
        else:
            auth = self.key_by_identity(address)
        proto, d = self._dial_once(address, auth)
        try:
            await d
        except HandshakeFailed:
            proved = proved_peer(proto)
            if proved is None or not self.mesh.is_connected(proved):
                raise
            # The handshake proved the peer, but the mesh kept the link it
            # already had (the one the peer dialed): the address is confirmed.
        peer = proved_peer(proto)
        assert peer is not None
        previous = self.dial_address(peer)
        self.ensure_dialer(peer, address, parent)
        meta = ks.meta(peer)
        if meta is None or meta.addr != address:
            ks.save_meta(peer, PeerMeta(address, now_ms(self.clock.seconds)))
        mode = proto.result.mode if proto.result is not None else (self.mesh.peer_mode(peer) or "")
        if previous is not None and _same_address(previous, address):
            previous = None
        if previous is not None:
            log.info(
                "{peer_id} confirmed at {address}: dialed there from now on (was {previous})",
                peer_id=peer,
                address=address,
                previous=previous,
            )
        return ConnectOutcome(peer, mode, False, address, previous)

    def ensure_dialer(self, peer_id: str | None, address: str, parent: Any) -> Dialer:
        """
        Keep an outbound link to ``peer_id`` at ``address`` (replacing an old
        address: callers confirm it first).  ``peer_id`` None: the peer at an
        ``auto_connect`` address is not known yet; the key is chosen by the
        identity the listener announces.
        """
        if peer_id is None:
            existing = self.address_dialers.get(address)
            if existing is not None:
                return existing
            dialer = Dialer(self, None, address)
            self.address_dialers[address] = dialer
            dialer.service.setServiceParent(parent)
            return dialer
        existing = self.dialers.get(peer_id)
        if existing is not None and existing.address == address:
            return existing
        unresolved = self.address_dialers.get(address)
        if unresolved is not None:
            # An auto_connect dialer to that address: it is this peer's now.
            self.adopt_dialer(unresolved, peer_id)
            return unresolved
        if existing is not None:
            self.remove_dialer(peer_id)
        dialer = Dialer(self, peer_id, address)
        self._register_dialer(peer_id, dialer)
        dialer.service.setServiceParent(parent)
        return dialer

    def _register_dialer(self, peer_id: str, dialer: Dialer) -> None:
        self.dialers[peer_id] = dialer
        self.mesh.dialing[peer_id] = dialer.address
        # What `relay peers` shows is what the service dials.
        self.mesh.state(peer_id).address = dialer.address

    def adopt_dialer(self, dialer: Dialer, peer_id: str) -> None:
        """An address dialer's handshake proved ``peer_id``: it is that peer's dialer now."""
        if self.address_dialers.get(dialer.address) is dialer:
            del self.address_dialers[dialer.address]
        old = self.dialers.get(peer_id)
        if old is not None and old is not dialer:
            self.remove_dialer(peer_id)
        dialer.peer_id = peer_id
        self._register_dialer(peer_id, dialer)
        meta = self.keystore.meta(peer_id)
        if meta is None or meta.addr != dialer.address:
            self.keystore.save_meta(peer_id, PeerMeta(dialer.address, now_ms(self.clock.seconds)))
        log.info(
            "auto_connect {address}: the peer there is {peer_id}; keeping the link up",
            address=dialer.address,
            peer_id=peer_id,
        )

    def remove_dialer(self, peer_id: str) -> defer.Deferred[None]:
        dialer = self.dialers.pop(peer_id, None)
        self.mesh.dialing.pop(peer_id, None)
        if dialer is None:
            return defer.succeed(None)
        dialer.retired = True
        return defer.maybeDeferred(dialer.service.disownServiceParent)

    def close_all(self, reason: str = "service stopping") -> defer.Deferred[Any]:
        """Close every relay connection; fires when all are gone."""
        waits = []
        for proto in list(self.protocols):
            waits.append(proto.when_closed())
            proto.close(reason)
        return defer.gatherResults(waits, consumeErrors=True)

    def auto_connect_targets(self) -> list[tuple[str | None, str]]:
        """
        ``(peer, address)`` to dial at start: peers we dialed before, then
        ``auto_connect``.  A plain ``"host:port"`` entry where no paired peer
        was seen yet comes as ``(None, address)``: its dialer picks the key by
        the identity the listener announces.
        """
        targets: dict[str, str] = {}
        for peer in self.keystore.known_peers():
            meta = self.keystore.meta(peer)
            if meta is not None and meta.addr:
                targets[peer] = meta.addr
        unknown: list[str] = []
        for entry in self.config.relay.auto_connect:
            peer_hint, _, address = entry.rpartition("@")
            try:
                parse_address(address)
                named = (
                    self.choose_peer_for(address, peer_hint)
                    if peer_hint
                    else self.peer_last_seen_at(address)
                )
            except (NotPaired, ValueError) as e:
                log.warn("auto_connect {entry}: {error}", entry=entry, error=str(e))
                continue
            if named is not None:
                targets[named] = address
            elif address not in unknown:
                unknown.append(address)
        known = set(targets.values())
        out: list[tuple[str | None, str]] = list(sorted(targets.items()))
        out += [(None, address) for address in unknown if address not in known]
        return out


def _same_address(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return parse_address(a) == parse_address(b)
    except ValueError:
        return a == b
