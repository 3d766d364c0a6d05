# -*- test-case-name: tests.test_node -*-
"""
A relay node: one identity, its keys, its mesh of links, and the dialers
that keep outbound links up.

``makeService`` builds one :class:`RelayNode` and hangs the listeners,
dialers, timers and upper layers (gossip, delegation) under a
``MultiService``.  The CLI builds one too for one-shot work (``relay
connect`` without a running service).  Nothing here does I/O before it is
asked to.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol
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
from claudectl.relay.codec import HEARTBEAT, EnvelopeFactory, now_ms
from claudectl.relay.crypto import RandomBytes
from claudectl.relay.handshake import (
    MUTUAL,
    Authenticated,
    ConnectorHandshake,
    KeyAuth,
    ListenerHandshake,
    PakeAuth,
    Policy,
)
from claudectl.relay.keystore import PENDING, KeyStore, PeerMeta
from claudectl.relay.mesh import Mesh, PeerLink
from claudectl.relay.nonces import IssuedNonces
from claudectl.relay.protocol import CONNECTOR, LISTENER, RelayProtocol
from claudectl.relay.tls import TLSContexts, ensure_credentials
from claudectl.relay.workers import WorkerTable

log = Logger()

#: Reconnect delays: 5, 10, 20, 40, 60 s … capped by ``reconnect_max_secs``.
FIRST_RETRY_SECS = 5.0


def reconnect_policy(max_secs: float,
                     jitter: Callable[[], float] | None = None) -> Callable[[int], float]:
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


class NotPaired(Exception):
    """There is no key for the peer (or no peer for the address)."""


class ListenerKeys:
    """Key lookups for the listener handshake (wire.md 3.3 plus invites)."""

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
    def __init__(self, node: RelayNode, peer_id: str, address: str) -> None:
        self.node = node
        self.peer_id = peer_id
        self.address = address

    def buildProtocol(self, addr: Any) -> RelayProtocol | None:
        psk = self.node.keystore.key(self.peer_id)
        if psk is None:
            return None
        p = RelayProtocol(self.node, CONNECTOR, KeyAuth(psk, self.peer_id))
        p.dial_address = self.address  # type: ignore[attr-defined]
        p.factory = self
        return p


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """
    Dials only when it makes sense: never while the peer is already
    connected (through a link it opened to us, say) -- then it waits for that
    link to drop -- and never without a key.
    """

    def __init__(self, node: RelayNode, peer_id: str, endpoint: Any) -> None:
        self.node = node
        self.peer_id = peer_id
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"<peer {self.peer_id}>"

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.node.keystore.key(self.peer_id) is None:
            return defer.fail(ConnectError(string=f"not paired with {self.peer_id}"))
        if not self.node.mesh.is_connected(self.peer_id):
            return self.endpoint.connect(factory)
        waiting: defer.Deferred[Any]

        def cancel(_: Any) -> None:
            self.node.cancel_wait_for_down(self.peer_id, resume)

        waiting = defer.Deferred(cancel)

        def resume() -> None:
            if not waiting.called:
                self.endpoint.connect(factory).chainDeferred(waiting)

        self.node.wait_for_down(self.peer_id, resume)
        return waiting


class Dialer:
    """Keeps an outbound link to one peer up, with backoff (ClientService)."""

    def __init__(self, node: RelayNode, peer_id: str, address: str) -> None:
        self.peer_id = peer_id
        self.address = address
        host, port = parse_address(address)
        endpoint = clientFromString(node.reactor, client_endpoint_string(host, port))
        self.service = ClientService(
            _GuardedEndpoint(node, peer_id, endpoint),
            _DialFactory(node, peer_id, address),
            retryPolicy=reconnect_policy(node.config.relay.reconnect_max_secs, node.jitter),
            clock=node.clock,
            prepareConnection=lambda proto: proto.authenticated,
        )
        self.service.setName(f"dialer:{peer_id}")


class RelayNode:
    """Everything one running relay instance knows and does."""

    def __init__(self, home: Home, config: Config, reactor: Any,
                 random: RandomBytes = os.urandom,
                 jitter: Callable[[], float] | None = None,
                 identity: str | None = None,
                 tls: bool = True) -> None:
        self.home = home
        self.config = config
        self.reactor = reactor
        self.clock = reactor
        self.random = random
        self.jitter = jitter
        self.keystore = KeyStore(home)
        self.identity = identity or self.keystore.ensure_identity(random)
        self.envelopes = EnvelopeFactory(self.identity, clock=reactor.seconds)
        self.admission = Admission(reactor.seconds, config.relay.max_peers)
        self.mesh = Mesh(self.envelopes, config.relay.max_peers, reactor.seconds,
                         on_authenticated=self._on_authenticated)
        self.mesh.add_link_observer(None, self._on_link_down)
        self.workers = WorkerTable(reactor.seconds, config.relay.heartbeat_interval_secs)
        self.mesh.add_handler(HEARTBEAT, lambda peer, env: self.workers.heartbeat(peer, env.payload))
        self.invites = _load_invites(home, config)
        self.pake = _load_pake(self.invites, reactor)
        self.dialers: dict[str, Dialer] = {}
        #: Every open relay connection (handshaking or authenticated).
        self.protocols: set[RelayProtocol] = set()
        #: AMP ``CommandLocator``s of the layers (delegation, …) for the control socket.
        self.control_locators: list[Any] = []
        #: ``make(amp_protocol) -> CommandLocator``: locators that need their connection.
        self.connection_locators: list[Callable[[Any], Any]] = []
        self._down_waiters: dict[str, list[Callable[[], None]]] = {}
        #: ``trust_of(peer_id) -> float``; the hive layer replaces it.
        self.trust_of: Callable[[str], float] = lambda _peer: config.hive.default_trust
        #: Where this node listens (filled in by makeService once bound).
        self.listening_ports: list[Any] = []
        #: Extra fields for ``relay status`` / ``relay peers`` from the layers.
        self.status_providers: list[Callable[[], dict[str, Any]]] = []
        self.peer_info_providers: list[Callable[[str], dict[str, Any]]] = []
        #: Called with the bound TCP port once the listener is up.
        self.on_listening: list[Callable[[int], None]] = []
        self.started_at = reactor.seconds()
        #: Nonces our listeners and connectors issued lately: one handed
        #: back to us is a reflection attempt.
        self.nonces = IssuedNonces(reactor.seconds,
                                   ttl=2.0 * config.relay.handshake_timeout_secs + 5)
        #: TLS toward peers of this project (tests of the plaintext wire
        #: path turn it off); contexts and the certificate are made lazily.
        self.tls: TLSContexts | None = (
            TLSContexts(lambda: ensure_credentials(home, self.identity)) if tls else None)
        self.policy = Policy(tls=tls, require_encryption=config.relay.require_encryption,
                             is_own_nonce=self.nonces.issued)
        self._plaintext_warned: set[str] = set()

    # --- handshake machines -----------------------------------------------------
    def listener_handshake(self) -> ListenerHandshake:
        machine = ListenerHandshake(self.envelopes, ListenerKeys(self), self.random, self.pake,
                                    self.policy)
        self.nonces.add(machine.nonce)
        return machine

    def connector_handshake(self, auth: KeyAuth | PakeAuth) -> ConnectorHandshake:
        machine = ConnectorHandshake(self.envelopes, auth, self.keystore.is_mutual, self.random,
                                     stored_key=self.keystore.key, is_tls=self.keystore.is_tls,
                                     policy=self.policy)
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
            log.warn("link to {peer_id} is not encrypted (plaintext: a claudectl 0.64 peer); "
                     "delegated tasks from it are refused unless [delegation] "
                     "allow_plaintext_tasks = true", peer_id=peer)
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
            self.keystore.save_meta(peer_id, PeerMeta(meta.addr, now_ms(self.clock.seconds)))
        for resume in self._down_waiters.pop(peer_id, []):
            resume()

    def wait_for_down(self, peer_id: str, fn: Callable[[], None]) -> None:
        self._down_waiters.setdefault(peer_id, []).append(fn)

    def cancel_wait_for_down(self, peer_id: str, fn: Callable[[], None]) -> None:
        waiters = self._down_waiters.get(peer_id, [])
        if fn in waiters:
            waiters.remove(fn)

    # --- outbound -------------------------------------------------------------------
    def open_link(self, address: str, auth: KeyAuth | PakeAuth) -> defer.Deferred[RelayProtocol]:
        """Connect once, authenticate, register the link; fires with the protocol."""
        host, port = parse_address(address)
        endpoint = clientFromString(self.reactor, client_endpoint_string(host, port))
        proto = RelayProtocol(self, CONNECTOR, auth)
        proto.dial_address = address  # type: ignore[attr-defined]
        d = connectProtocol(endpoint, proto)
        d.addCallback(lambda p: p.authenticated)
        return d

    def choose_peer_for(self, address: str, peer_id: str | None = None,
                        allow_unaddressed: bool = True) -> str:
        """
        Which stored key to use toward ``address`` (defect W12: never try every
        key): the named peer; else the peer last seen at that address; else the
        only paired peer that has no address yet (the one just accepted).
        """
        ks = self.keystore
        if peer_id is not None:
            if ks.key(peer_id) is None:
                raise NotPaired(f"peer '{peer_id}' is not paired — run `claudectl relay accept "
                                f"<code> {peer_id}` or `claudectl relay join <invite>` first")
            return peer_id
        host, port = parse_address(address)
        norm = (host, port)
        without_meta = []
        for peer in ks.known_peers():
            meta = ks.meta(peer)
            if meta is None:
                without_meta.append(peer)
                continue
            try:
                if parse_address(meta.addr) == norm:
                    return peer
            except ValueError:
                continue
        if len(without_meta) == 1 and allow_unaddressed:
            return without_meta[0]
        if not without_meta or not allow_unaddressed:
            raise NotPaired(f"no paired peer is known at {address} — pair first "
                            "(`claudectl relay pair` / `relay accept`, or `relay join <invite>`)")
        raise NotPaired(f"several paired peers have no address yet ({', '.join(without_meta)}); "
                        "say which one is at this address with --peer")

    def ensure_dialer(self, peer_id: str, address: str, parent: Any) -> Dialer:
        """Keep an outbound link to ``peer_id`` at ``address`` (replacing an old address)."""
        existing = self.dialers.get(peer_id)
        if existing is not None:
            if existing.address == address:
                return existing
            self.remove_dialer(peer_id)
        dialer = Dialer(self, peer_id, address)
        self.dialers[peer_id] = dialer
        self.mesh.dialing.add(peer_id)
        dialer.service.setServiceParent(parent)
        return dialer

    def remove_dialer(self, peer_id: str) -> defer.Deferred[None]:
        dialer = self.dialers.pop(peer_id, None)
        self.mesh.dialing.discard(peer_id)
        if dialer is None:
            return defer.succeed(None)
        return defer.maybeDeferred(dialer.service.disownServiceParent)

    def close_all(self, reason: str = "service stopping") -> defer.Deferred[Any]:
        """Close every relay connection; fires when all are gone."""
        waits = []
        for proto in list(self.protocols):
            waits.append(proto.when_closed())
            proto.close(reason)
        return defer.gatherResults(waits, consumeErrors=True)

    def auto_connect_targets(self) -> list[tuple[str, str]]:
        """``(peer, address)`` to dial at start: peers we dialed before + ``auto_connect``."""
        targets: dict[str, str] = {}
        for peer in self.keystore.known_peers():
            meta = self.keystore.meta(peer)
            if meta is not None and meta.addr:
                targets[peer] = meta.addr
        for entry in self.config.relay.auto_connect:
            peer_hint, _, address = entry.rpartition("@")
            try:
                peer = self.choose_peer_for(address, peer_hint or None,
                                            allow_unaddressed=False)
            except (NotPaired, ValueError) as e:
                hint = ("" if peer_hint else
                        f"; name the peer as \"<peer id>@{address}\" in [relay] auto_connect")
                log.warn("auto_connect {entry}: {error}{hint}", entry=entry, error=str(e),
                         hint=hint)
                continue
            targets[peer] = address
        return sorted(targets.items())


def _load_invites(home: Home, config: Config) -> Any:
    try:
        from claudectl.pairing.invites import InviteStore
    except ImportError:
        return None
    try:
        return InviteStore(home)
    except TypeError:
        return InviteStore(home, config.relay)  # type: ignore[call-arg]


def _load_pake(invites: Any, reactor: Any) -> Any:
    if invites is None:
        return None
    try:
        from claudectl.pairing.pake import PakeResponder
    except ImportError:
        return None
    return PakeResponder(invites, reactor)
