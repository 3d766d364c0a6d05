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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from twisted.application.internet import TimerService, UDPServer
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from claudectl import COMPAT_VERSION
from claudectl.config import RelayConfig
from claudectl.discovery.beacon import DiscoveryTable, Row, encode_beacon


class DiscoveryError(Exception):
    """Discovery cannot run; ``str()`` says why."""


def broadcast_target(config: RelayConfig) -> tuple[str, int]:
    """``(ip, port)`` to announce to; the address must be an IPv4 literal."""
    try:
        ip = ipaddress.IPv4Address(config.lan_broadcast_addr)
    except ValueError:
        raise DiscoveryError(
            f"relay.lan_broadcast_addr must be an IPv4 address such as 255.255.255.255, "
            f"not {config.lan_broadcast_addr!r}") from None
    return str(ip), config.lan_broadcast_port


class Announcer(DatagramProtocol):
    """Sends one beacon per :meth:`announce` call."""

    _log = Logger()

    def __init__(self, target: tuple[str, int], identity: str,
                 port: int | Callable[[], int | None], version: str = COMPAT_VERSION) -> None:
        self.target = target
        self.identity = identity
        self._port = port
        self.version = version
        self.sent = 0
        self.errors = 0

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
        except OSError as e:
            self.errors += 1
            self._log.warn("LAN announcement to {target} failed: {error}",
                           target=f"{self.target[0]}:{self.target[1]}", error=str(e))
        except Exception:
            self.errors += 1
            self._log.failure("LAN announcement failed")


def announcer_service(config: RelayConfig, identity: str,
                      port: int | Callable[[], int | None], reactor: object = None) -> IService:
    """
    A service announcing ``identity`` and the relay's TCP ``port`` (an int,
    or a callable returning the port once listening) every
    ``config.lan_announce_interval`` seconds.
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
    return parent


class BeaconListener(DatagramProtocol):
    """Collects beacons into a table."""

    _log = Logger()

    def __init__(self, table: DiscoveryTable, clock: object) -> None:
        self.table = table
        self.clock = clock

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        row = self.table.observe(datagram, addr, self.clock.seconds())  # type: ignore[attr-defined]
        if row is not None:
            self._log.debug("heard {identity} at {address}", identity=row.identity,
                            address=row.address)
        elif self.table.rejected_total:
            self._log.debug("ignored a datagram from {host} ({rejected} rejected so far)",
                            host=addr[0], rejected=self.table.rejected_total)


def scan(reactor: object, config: RelayConfig, timeout: float,
         own_identity: str | None, interface: str = "") -> Deferred[list[Row]]:
    """Listen on ``lan_broadcast_port`` for ``timeout`` seconds; the rows heard."""
    table = DiscoveryTable(own_identity)
    listener = BeaconListener(table, reactor)
    try:
        udp = reactor.listenMulticast(  # type: ignore[attr-defined]
            config.lan_broadcast_port, listener, interface=interface, listenMultiple=True)
    except CannotListenError as e:
        return fail(DiscoveryError(
            f"cannot listen on UDP port {config.lan_broadcast_port}: {e.socketError}"))

    def done(_: object) -> Deferred[list[Row]]:
        d = maybeDeferred(udp.stopListening)
        return d.addCallback(lambda _: table.rows(reactor.seconds()))  # type: ignore

    d: Deferred[None] = deferLater(reactor, timeout, lambda: None)  # type: ignore[arg-type]
    return d.addCallback(done)
