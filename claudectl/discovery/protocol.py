# -*- test-case-name: tests.test_discovery -*-
"""
LAN discovery over UDP, with Twisted.

* :class:`Announcer` sends our beacon to ``(lan_broadcast_addr,
  lan_broadcast_port)`` -- ``255.255.255.255:9848`` by default, as claudectl
  does -- from an ephemeral socket with broadcast enabled.
  :func:`announcer_service` wraps it in a service (a ``UDPServer`` plus a
  ``TimerService`` every ``lan_announce_interval`` seconds) that the relay
  service runs when ``relay.lan_discovery`` is true (claudectl never starts
  its announcer: defect P9).
* :class:`BeaconListener` feeds received datagrams to a
  :class:`~claudectl.discovery.beacon.DiscoveryTable`.  :func:`scan` binds
  ``lan_broadcast_port`` with ``SO_REUSEADDR``/``SO_REUSEPORT`` (so several
  scanners on one machine can listen at once), collects for ``timeout``
  seconds and returns the rows.
* Discovery on demand (:mod:`.query`): :func:`scan` also broadcasts a
  ``CCTQ`` query to ``lan_broadcast_port + 1`` from an ephemeral socket, and
  the :class:`QueryResponder` every announcing instance runs on that port
  answers at once with its beacon, by unicast to that socket.  A scan of any
  length therefore finds instances however rarely they announce.

Nothing a datagram holds can raise out of ``datagramReceived``: malformed
datagrams are counted and dropped, with at most one debug line per
:data:`DROP_LOG_EVERY_SECS` per socket.  An announcer whose sends fail (a host
with no route) warns once, logs at debug level while it keeps failing, and
says once when it works again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService, UDPServer
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from claudectl import COMPAT_VERSION
from claudectl.config import RelayConfig
from claudectl.discovery.beacon import DiscoveryTable, Row, encode_beacon
from claudectl.discovery.query import QueryAnswerer, encode_query, query_port

#: At most one debug line about dropped datagrams per socket this often.
DROP_LOG_EVERY_SECS = 10.0
#: The scanner repeats its query once, after this long (or half its timeout).
QUERY_REPEAT_AFTER_SECS = 1.0


class DiscoveryError(Exception):
    """Discovery cannot run; ``str()`` says why."""


def broadcast_target(config: RelayConfig) -> tuple[str, int]:
    """``(ip, port)`` to announce to; the address must be an IPv4 literal."""
    try:
        ip = ipaddress.IPv4Address(config.lan_broadcast_addr)
    except ValueError:
        raise DiscoveryError(
            f"relay.lan_broadcast_addr must be an IPv4 address such as 255.255.255.255, "
            f"not {config.lan_broadcast_addr!r}"
        ) from None
    return str(ip), config.lan_broadcast_port


class Announcer(DatagramProtocol):
    """Sends one beacon per :meth:`announce` call; one warning per failing streak."""

    _log = Logger()

    def __init__(
        self,
        target: tuple[str, int],
        identity: str,
        port: int | Callable[[], int | None],
        version: str = COMPAT_VERSION,
    ) -> None:
        self.target = target
        self.identity = identity
        self._port = port
        self.version = version
        self.sent = 0
        self.errors = 0
        #: The last send failed (a warning was logged for this streak).
        self.failing = False

    def startProtocol(self) -> None:
        self.transport.setBroadcastAllowed(True)  # type: ignore[union-attr]

    def beacon(self) -> bytes | None:
        port = self._port() if callable(self._port) else self._port
        if not port:
            return None
        return encode_beacon(self.identity, port, self.version)

    def announce(self) -> None:
        """Send the beacon now; errors are logged and counted, never raised."""
        if self.transport is None:
            return
        try:
            data = self.beacon()
            if data is None:
                return
            self.transport.write(data, self.target)
            self.sent += 1
            if self.failing:
                self.failing = False
                self._log.info(
                    "LAN announcements to {target} work again",
                    target=f"{self.target[0]}:{self.target[1]}",
                )
        except OSError as e:
            self.errors += 1
            target = f"{self.target[0]}:{self.target[1]}"
            if self.failing:
                self._log.debug(
                    "LAN announcement to {target} failed again: {error}",
                    target=target,
                    error=str(e),
                )
            else:
                self.failing = True
                self._log.warn(
                    "LAN announcement to {target} failed: {error} (retrying; "
                    "no further warning until announcements work again)",
                    target=target,
                    error=str(e),
                )
            return
        except Exception:
            self.errors += 1
            self._log.failure("LAN announcement failed")


def announcer_service(
    config: RelayConfig, identity: str, port: int | Callable[[], int | None], reactor: object = None
) -> IService:
    """
    A service announcing ``identity`` and the relay's TCP ``port`` (an int,
    or a callable returning the port once listening) every
    ``config.lan_announce_interval`` seconds, and answering discovery queries
    on ``lan_broadcast_port + 1`` at once.
    """
    target = broadcast_target(config)
    proto = Announcer(target, identity, port)
    parent = MultiService()
    parent.setName("lan-announcer")
    udp = UDPServer(0, proto) if reactor is None else UDPServer(0, proto, reactor=reactor)
    udp.setServiceParent(parent)
    timer = TimerService(config.lan_announce_interval, proto.announce)
    if reactor is not None:
        timer.clock = reactor
    timer.setServiceParent(parent)
    parent.announcer = proto  # type: ignore[attr-defined]
    qport = query_port(config.lan_broadcast_port)
    if qport is not None:
        responder = QueryResponder(proto.beacon, reactor)
        QueryResponderService(qport, responder, reactor).setServiceParent(parent)
        parent.responder = responder  # type: ignore[attr-defined]
    return parent


class _DropLog:
    """Counts dropped datagrams; one debug line per ``every`` seconds at most."""

    def __init__(
        self, log: Logger, clock: object, what: str, every: float = DROP_LOG_EVERY_SECS
    ) -> None:
        self._log = log
        self._clock = clock
        self._what = what
        self._every = every
        self._last = float("-inf")
        self.pending = 0

    def note(self, host: object, reason: str) -> None:
        self.pending += 1
        now = self._clock.seconds()  # type: ignore[attr-defined]
        if now - self._last < self._every:
            return
        self._log.debug(
            "dropped {count} {what} datagram(s); the latest from {host}: {reason}",
            count=self.pending,
            what=self._what,
            host=str(host)[:64],
            reason=reason,
        )
        self._last = now
        self.pending = 0


def _host(addr: object) -> object:
    return addr[0] if isinstance(addr, tuple) and addr else addr


class BeaconListener(DatagramProtocol):
    """Collects beacons into a table; nothing a datagram holds raises."""

    _log = Logger()

    def __init__(self, table: DiscoveryTable, clock: object) -> None:
        self.table = table
        self.clock = clock
        self.drops = _DropLog(self._log, clock, "LAN")

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        try:
            row = self.table.observe(datagram, addr, self.clock.seconds())  # type: ignore
        except Exception as e:  # a bug, not the peer's fault: still no traceback per packet
            self.drops.note(_host(addr), f"unexpected {type(e).__name__}")
            return
        if row is not None:
            self._log.debug(
                "heard {identity} at {address}", identity=row.identity, address=row.address
            )
        elif self.table.last_rejected:
            self.drops.note(_host(addr), self.table.last_rejected)
            self.table.last_rejected = ""


class QuerySender(BeaconListener):
    """The scanner's ephemeral socket: sends queries, collects the answers."""

    def __init__(self, table: DiscoveryTable, clock: object, target: tuple[str, int]) -> None:
        super().__init__(table, clock)
        self.target = target
        self.sent = 0

    def startProtocol(self) -> None:
        self.transport.setBroadcastAllowed(True)  # type: ignore[union-attr]

    def send(self) -> None:
        """Broadcast one query; a failure (no route) only means fewer answers."""
        if self.transport is None:
            return
        try:
            self.transport.write(encode_query(), self.target)
            self.sent += 1
        except OSError as e:
            self._log.debug(
                "discovery query to {target} failed: {error}",
                target=f"{self.target[0]}:{self.target[1]}",
                error=str(e),
            )


class QueryResponder(DatagramProtocol):
    """Answers discovery queries with our beacon (rules in :mod:`.query`)."""

    _log = Logger()

    def __init__(
        self,
        beacon: Callable[[], bytes | None],
        clock: object = None,
        answerer: QueryAnswerer | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._beacon = beacon
        self.clock = clock
        self.answerer = answerer or QueryAnswerer()
        self.drops = _DropLog(self._log, clock, "discovery query")

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self.answerer.answer(datagram, addr, self._beacon, self.clock.seconds())  # type: ignore[attr-defined]
            if reply is None:
                self.drops.note(_host(addr), self.answerer.last_drop)
                return
            self.transport.write(reply, addr)  # type: ignore[union-attr]
        except OSError as e:
            self.drops.note(_host(addr), f"answer failed: {e}")
        except Exception as e:
            self.drops.note(_host(addr), f"unexpected {type(e).__name__}")


class QueryResponderService(Service):
    """
    Listens for queries on ``port`` (shared: ``SO_REUSEADDR``/``SO_REUSEPORT``,
    so every instance on a host hears a broadcast query).  A busy port is one
    warning, not a failure: the instance still announces.
    """

    _log = Logger()

    def __init__(
        self, port: int, proto: QueryResponder, reactor: object = None, interface: str = ""
    ) -> None:
        self.port = port
        self.proto = proto
        self._reactor = reactor
        self.interface = interface
        self._listening: Any = None

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        try:
            self._listening = reactor.listenMulticast(  # type: ignore[attr-defined]
                self.port, self.proto, interface=self.interface, listenMultiple=True
            )
        except CannotListenError as e:
            self._log.warn(
                "cannot answer LAN discovery queries on UDP port {port}: {error}; announcing only",
                port=self.port,
                error=str(e.socketError),
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self._listening = self._listening, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def scan(
    reactor: object,
    config: RelayConfig,
    timeout: float,
    own_identity: str | None,
    interface: str = "",
    query: bool = True,
) -> Deferred[list[Row]]:
    """
    Listen on ``lan_broadcast_port`` for ``timeout`` seconds and, unless
    ``query`` is false, broadcast a discovery query to
    ``lan_broadcast_port + 1`` (at once, and again after
    :data:`QUERY_REPEAT_AFTER_SECS` or half the timeout); the rows heard.
    """
    table = DiscoveryTable(own_identity)
    listener = BeaconListener(table, reactor)
    qport = query_port(config.lan_broadcast_port) if query else None
    target = None
    if qport is not None:
        try:
            target = (broadcast_target(config)[0], qport)
        except DiscoveryError as e:
            return fail(e)
    try:
        udp = reactor.listenMulticast(  # type: ignore[attr-defined]
            config.lan_broadcast_port, listener, interface=interface, listenMultiple=True
        )
    except CannotListenError as e:
        return fail(
            DiscoveryError(
                f"cannot listen on UDP port {config.lan_broadcast_port}: {e.socketError}"
            )
        )
    ports = [udp]
    repeat = None
    if target is not None:
        sender = QuerySender(table, reactor, target)
        try:
            ports.append(reactor.listenUDP(0, sender, interface=interface))  # type: ignore
        except CannotListenError as e:
            BeaconListener._log.debug(
                "cannot send discovery queries: {error}", error=str(e.socketError)
            )
        else:
            sender.send()
            repeat = reactor.callLater(  # type: ignore[attr-defined]
                min(QUERY_REPEAT_AFTER_SECS, timeout / 2), sender.send
            )

    def done(_: object) -> Deferred[list[Row]]:
        if repeat is not None and repeat.active():
            repeat.cancel()
        d = gatherResults([maybeDeferred(p.stopListening) for p in ports])
        return d.addCallback(lambda _: table.rows(reactor.seconds()))  # type: ignore

    d: Deferred[None] = deferLater(reactor, timeout, lambda: None)  # type: ignore[arg-type]
    return d.addCallback(done)
