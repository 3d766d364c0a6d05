# -*- test-case-name: tests.test_hub_peer -*-
"""
The peer side of the hub: register, accept channels, dial through a hub.

* :class:`HubAwareEndpoint` wraps the direct endpoint every relay dialer
  uses.  It reads the first line the far side sends: a relay listener's
  challenge goes straight to the relay protocol (a direct link, nothing
  changes); a hub's greeting means the address is a hub, so it asks for a
  channel to the peer and hands the socket over once the hub has spliced it.
  When the direct connection fails, it tries the configured hubs in turn.
* :func:`registration_service` keeps one outbound registration link per hub
  (``[relay] hubs``) with the same backoff as peer links; each ``incoming``
  channel gets a fresh outbound connection on which this node runs the
  relay handshake in the *listener* role.

Either way the relay protocol sees an ordinary TCP transport: TLS and the
channel-bound proofs run end to end, the hub forwards bytes it cannot read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from claudectl.hub import wire
from claudectl.relay.address import client_endpoint_string, parse_address
from claudectl.relay.links import connect_quietly

if TYPE_CHECKING:
    from claudectl.relay.node import RelayNode

log = Logger()

#: The registration link pings this often (the hub closes a silent one after 120 s).
PING_INTERVAL_SECS = 30.0
#: Channel connections a registration keeps open at once before their splice
#: (what the hub itself allows waiting per registration).
MAX_PENDING_ACCEPTS = 16


class HubRefused(ConnectError):
    """The hub said no (``reason`` is the hub's code, e.g. ``not_registered``)."""

    def __init__(self, hub: str, reason: str, message: str) -> None:
        super().__init__(string=f"hub {hub}: {message} ({reason})")
        self.reason = reason


def hub_endpoint(reactor: Any, address: str) -> Any:
    host, port = parse_address(address, wire.DEFAULT_HUB_PORT)
    return clientFromString(reactor, client_endpoint_string(host, port))


def hand_over(
    transport: Any, proto: Any, rest: bytes, via: str | None, peer_ip: str | None = None
) -> None:
    """Give a connected socket to ``proto`` (a relay protocol, maybe behind a proxy)."""
    inner = getattr(proto, "_protocol", proto)  # ClientService's proxy
    inner.hub_via = via
    inner.hub_peer_ip = peer_ip
    transport.protocol = proto
    proto.makeConnection(transport)
    if rest:
        proto.dataReceived(rest)


class _Lines(Protocol):
    """Control lines until :meth:`take_rest`; a short, bounded buffer."""

    transport: Any

    def __init__(self) -> None:
        self._buf = b""
        self._lines = True

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while self._lines:
            line, sep, rest = self._buf.partition(b"\n")
            if not sep:
                if len(self._buf) > wire.MAX_LINE_BYTES:
                    self.bad_line("control line too long")
                return
            self._buf = rest
            self.line(line)

    def take_rest(self) -> bytes:
        self._lines = False
        rest, self._buf = self._buf, b""
        return rest

    def line(self, line: bytes) -> None:
        raise NotImplementedError

    def bad_line(self, why: str) -> None:
        self._lines = False
        self.transport.abortConnection()


class _Sniffer(_Lines):
    """
    First contact on a dialed socket: a relay listener (direct link) or a hub
    (ask for a channel to the peer, then hand over the spliced socket).
    """

    def __init__(self, attempt: _Attempt) -> None:
        super().__init__()
        self.attempt = attempt
        self.state = "first"
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.attempt.clock.callLater(self.attempt.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.attempt.fail(ConnectError(string=f"{self.attempt.address}: no answer"))
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self.state == "first" and not self._buf:
            probe = data[: len(wire.GREETING_PREFIX)]
            if not wire.GREETING_PREFIX.startswith(probe):
                # A relay listener's challenge (or claudectl's): a direct link.
                self._cancel_timer()
                self.state = "done"
                self.attempt.direct(self.transport, data)
                return
        super().dataReceived(data)

    def line(self, line: bytes) -> None:
        if self.state == "first":
            if not wire.is_greeting(line):
                self._cancel_timer()
                self.state = "done"
                self.attempt.direct(self.transport, line + b"\n" + self.take_rest())
                return
            peer = self.attempt.peer()
            if peer is None:
                self.state = "done"
                self.attempt.fail(
                    ConnectError(
                        string=f"{self.attempt.address} is a claudectl hub: name the peer "
                        "to reach through it"
                    )
                )
                self.transport.loseConnection()
                return
            self.state = "open"
            msg: dict[str, Any] = {"op": wire.OPEN, "to": peer}
            if self.attempt.token:
                msg["token"] = self.attempt.token
            self.transport.write(wire.encode(msg))
            return
        if self.state != "open":
            return
        try:
            msg = wire.decode(line)
        except wire.HubProtocolError as e:
            self.bad_line(str(e))
            return
        self.state = "done"
        self._cancel_timer()
        if msg.get("op") == wire.SPLICED:
            self.attempt.spliced(self.transport, self.take_rest())
        else:
            self.attempt.fail(
                HubRefused(
                    self.attempt.address,
                    str(msg.get("reason", "?")),
                    str(msg.get("message", "refused"))[:200],
                )
            )
            self.transport.loseConnection()

    def bad_line(self, why: str) -> None:
        self.attempt.fail(ConnectError(string=f"{self.attempt.address}: {why}"))
        super().bad_line(why)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancel_timer()
        if self.state != "done":
            self.attempt.fail(
                ConnectError(string=f"{self.attempt.address}: connection closed before a link")
            )


class _Attempt:
    """One connection attempt to one address (direct, or a hub)."""

    def __init__(self, owner: HubAwareEndpoint, address: str, factory: Any) -> None:
        self.owner = owner
        self.address = address
        self.factory = factory
        self.clock = owner.reactor
        self.timeout = owner.timeout
        self.token = owner.token
        self.peer = owner.peer_of
        self.result: defer.Deferred[Any] = defer.Deferred()
        self.sniffer: _Sniffer | None = None
        self.addr: Any = None

    def start(self, endpoint: Any) -> defer.Deferred[Any]:
        attempt = self

        class _F(Factory):
            noisy = False  # a line per dial attempt otherwise

            def buildProtocol(self, addr: Any) -> _Sniffer:
                attempt.sniffer = _Sniffer(attempt)
                attempt.addr = addr
                return attempt.sniffer

        self.connecting = endpoint.connect(_F())
        self.connecting.addErrback(self.fail)
        return self.result

    def _build(self) -> Any:
        return self.factory.buildProtocol(self.addr)

    def direct(self, transport: Any, rest: bytes) -> None:
        proto = self._build()
        if proto is None:
            transport.abortConnection()
            self.fail(ConnectError(string="no protocol for this connection"))
            return
        hand_over(transport, proto, rest, None)
        if not self.result.called:
            self.result.callback(proto)

    def spliced(self, transport: Any, rest: bytes) -> None:
        proto = self._build()
        if proto is None:
            transport.abortConnection()
            self.fail(ConnectError(string="no protocol for this connection"))
            return
        log.info(
            "link to {peer_id} spliced through hub {hub}", peer_id=self.peer(), hub=self.address
        )
        hand_over(transport, proto, rest, self.address)
        if not self.result.called:
            self.result.callback(proto)

    def fail(self, why: Any) -> None:
        if not self.result.called:
            self.result.errback(why)

    def cancel(self) -> None:
        if self.sniffer is not None and self.sniffer.transport is not None:
            self.sniffer.state = "done"
            self.sniffer.transport.abortConnection()
        elif not self.connecting.called:
            self.connecting.cancel()


@implementer(IStreamClientEndpoint)
class HubAwareEndpoint:
    """
    Dial ``address``; when it is a hub, or when it cannot be reached and
    ``hubs`` are configured, reach the peer (``peer_of()``) through a hub.
    """

    def __init__(
        self,
        reactor: Any,
        direct: Any,
        address: str,
        peer_of: Callable[[], str | None],
        hubs: Sequence[str] = (),
        token: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.direct = direct
        self.address = address
        self.peer_of = peer_of
        self.hubs = [h for h in hubs if not _same(h, address)]
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<{self.address}{' or hubs' if self.hubs else ''}>"

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        current: list[_Attempt] = []
        errors: list[str] = []

        def cancel(_: Any) -> None:
            if current:
                current[-1].cancel()

        result: defer.Deferred[Any] = defer.Deferred(cancel)
        plan = [(self.address, self.direct)] + [
            (hub, None) for hub in (self.hubs if self.peer_of() is not None else [])
        ]

        def attempt(i: int) -> None:
            address, endpoint = plan[i]
            a = _Attempt(self, address, factory)
            current.append(a)
            d = a.start(endpoint if endpoint is not None else hub_endpoint(self.reactor, address))

            def failed(f: Failure) -> None:
                if result.called:
                    return
                errors.append(f.getErrorMessage())
                if i + 1 < len(plan) and not f.check(defer.CancelledError):
                    attempt(i + 1)
                elif len(errors) == 1:
                    result.errback(f)  # one attempt: its own error, unchanged
                else:
                    result.errback(ConnectError(string="; ".join(errors)))

            d.addCallbacks(lambda p: None if result.called else result.callback(p), failed)

        attempt(0)
        return result


def _same(a: str, b: str) -> bool:
    try:
        return parse_address(a, wire.DEFAULT_HUB_PORT) == parse_address(b, wire.DEFAULT_HUB_PORT)
    except ValueError:
        return a == b


# --- registration -------------------------------------------------------------------


class _Accept(_Lines):
    """
    This node's connection for one incoming channel: then the relay listener
    runs on it.  Until the hub says ``spliced`` it holds one of the
    registration's few accept slots and has the handshake timeout to get
    there: a hostile hub cannot make this node keep sockets open without end.
    """

    def __init__(
        self,
        node: RelayNode,
        hub: str,
        channel: str,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.node = node
        self.hub = hub
        self.channel = channel
        self.state = "greeting"
        self._release: Callable[[], None] | None = release
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.node.clock.callLater(
            float(self.node.handshake_timeout_secs), self._timed_out
        )

    def _timed_out(self) -> None:
        log.info("channel through hub {hub}: no splice in time", hub=self.hub)
        self._lines = False
        self.transport.abortConnection()

    def done(self) -> None:
        """The slot is free again (spliced, refused or closed); idempotent."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        release, self._release = self._release, None
        if release is not None:
            release()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done()

    def line(self, line: bytes) -> None:
        if self.state == "greeting":
            if not wire.is_greeting(line):
                self.bad_line("not a hub")
                return
            self.state = "accept"
            self.transport.write(wire.encode({"op": wire.ACCEPT, "channel": self.channel}))
            return
        try:
            msg = wire.decode(line)
        except wire.HubProtocolError as e:
            self.bad_line(str(e))
            return
        if msg.get("op") != wire.SPLICED:
            log.debug("hub {hub} refused channel: {reason}", hub=self.hub, reason=msg.get("reason"))
            self._lines = False
            self.transport.loseConnection()
            return
        from claudectl.relay.node import RelayFactory

        self.done()
        proto = RelayFactory(self.node).buildProtocol(self.transport.getPeer())
        hand_over(self.transport, proto, self.take_rest(), self.hub, msg.get("peer"))


class _Registration(_Lines):
    """The long-lived registration link to one hub."""

    def __init__(
        self, node: RelayNode, hub: str, token: str, states: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self.node = node
        self.hub = hub
        self.token = token
        #: ``relay status``: "registered" / "connecting" / the last refusal, per hub.
        self.states = states if states is not None else {}
        self.registered: defer.Deferred[None] = defer.Deferred()
        self.pinger: LoopingCall | None = None
        #: Channel connections opened for the hub and not spliced yet.
        self.accepting = 0

    def line(self, line: bytes) -> None:
        if not self.registered.called and wire.is_greeting(line):
            msg: dict[str, Any] = {"op": wire.REGISTER, "identity": self.node.identity}
            if self.token:
                msg["token"] = self.token
            self.transport.write(wire.encode(msg))
            return
        try:
            msg = wire.decode(line)
        except wire.HubProtocolError as e:
            self.bad_line(str(e))
            return
        op = msg.get("op")
        if op == wire.REGISTERED and not self.registered.called:
            log.info(
                "registered at hub {hub} as {identity}", hub=self.hub, identity=self.node.identity
            )
            self.pinger = LoopingCall(self._ping)
            self.pinger.clock = self.node.clock
            self.pinger.start(PING_INTERVAL_SECS, now=False)
            self.states[self.hub] = "registered"
            self.registered.callback(None)
        elif op == wire.INCOMING and self.registered.called:
            self._incoming(msg["channel"])
        elif op == wire.ERROR:
            reason = msg.get("reason")
            log.warn(
                "hub {hub} closed the registration: {reason}",
                hub=self.hub,
                reason=str(reason)[:64],
            )
            self.states[self.hub] = f"refused: {str(reason)[:64]}"
            if not self.registered.called:
                self.registered.errback(HubRefused(self.hub, str(reason), "registration refused"))
            self.transport.loseConnection()

    def _incoming(self, channel: str) -> None:
        if self.accepting >= MAX_PENDING_ACCEPTS:
            log.info(
                "hub {hub} asked for another channel while {count} wait: ignored",
                hub=self.hub,
                count=self.accepting,
            )
            return
        self.accepting += 1

        def release() -> None:
            self.accepting -= 1

        accept = _Accept(self.node, self.hub, channel, release)

        def failed(f: Failure) -> None:
            accept.done()
            log.info(
                "channel through hub {hub} failed: {error}",
                hub=self.hub,
                error=f.getErrorMessage(),
            )

        connect_quietly(hub_endpoint(self.node.reactor, self.hub), accept).addErrback(failed)

    def _ping(self) -> None:
        self.transport.write(wire.encode({"op": wire.PING}))

    def bad_line(self, why: str) -> None:
        log.warn("hub {hub} sent a bad line ({why}); reconnecting", hub=self.hub, why=why)
        super().bad_line(why)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.states.get(self.hub) == "registered":
            self.states[self.hub] = "connecting"
        if self.pinger is not None and self.pinger.running:
            self.pinger.stop()
        if not self.registered.called:
            self.registered.errback(ConnectError(string=f"hub {self.hub}: connection closed"))


class _RegistrationFactory(Factory):
    def __init__(
        self, node: RelayNode, hub: str, token: str, states: dict[str, str] | None
    ) -> None:
        self.node, self.hub, self.token, self.states = node, hub, token, states
        self.noisy = False

    def buildProtocol(self, addr: Any) -> _Registration:
        return _Registration(self.node, self.hub, self.token, self.states)


def registration_service(
    node: RelayNode, hub: str, token: str, states: dict[str, str] | None = None
) -> ClientService:
    """Keep one registration link to ``hub`` up, with the peer links' backoff."""
    from claudectl.relay.node import reconnect_policy

    service = ClientService(
        hub_endpoint(node.reactor, hub),
        _RegistrationFactory(node, hub, token, states),
        retryPolicy=reconnect_policy(node.config.relay.reconnect_max_secs, node.jitter),
        clock=node.clock,
        prepareConnection=lambda proto: proto.registered,  # type: ignore[attr-defined]
    )
    service.setName(f"hub:{hub}")
    return service


def via_of(node: RelayNode, peer_id: str) -> str | None:
    """The hub a connected peer's link runs through, or None (direct, or not connected)."""
    link = node.mesh.links.get(peer_id)
    if link is None:
        return None
    return getattr(link.protocol, "hub_via", None)


def usable_hubs(hubs: Sequence[str]) -> list[str]:
    """The ``[relay] hubs`` entries that parse as ``host:port`` (others are skipped)."""
    out = []
    for hub in hubs:
        try:
            parse_address(hub, wire.DEFAULT_HUB_PORT)
        except ValueError:
            continue
        out.append(hub)
    return out


def attach(node: RelayNode, registry: Any, parent: Any) -> None:
    """Registrations for ``[relay] hubs`` and the ``via`` field of ``relay peers``."""
    usable = usable_hubs(node.config.relay.hubs)
    for hub in node.config.relay.hubs:
        if hub not in usable:
            log.warn(
                '[relay] hubs: "{hub}" is not a "host:port" address; not registering there',
                hub=hub,
            )
    states = {hub: "connecting" for hub in usable}
    for hub in usable:
        service = registration_service(node, hub, node.config.relay.hub_token, states)
        service.setServiceParent(parent)
    if usable:
        registry.add_status(
            lambda: {"hubs": [{"address": h, "state": s} for h, s in states.items()]}
        )
    registry.add_peer_info(lambda peer: {"via": via_of(node, peer)})


def client_endpoint(
    node: RelayNode, address: str, peer_of: Callable[[], str | None]
) -> HubAwareEndpoint:
    """The endpoint a relay dialer uses toward ``address`` (hubs as the fallback)."""
    host, port = parse_address(address)
    direct = clientFromString(node.reactor, client_endpoint_string(host, port))
    return HubAwareEndpoint(
        node.reactor,
        direct,
        address,
        peer_of,
        usable_hubs(node.config.relay.hubs),
        node.config.relay.hub_token,
        float(node.config.relay.handshake_timeout_secs),
    )
