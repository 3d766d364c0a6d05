"""
What one link is: the two roles of a connection, the :class:`ILink` the
mesh drives, and the records the mesh keeps per peer (:class:`PeerState`,
across links) and per authenticated link (:class:`PeerLink`).  Below the
mesh, the protocol and the seams in :mod:`claudectl.relay.interfaces`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from zope.interface import Attribute, Interface

from claudectl.relay.codec import Envelope
from claudectl.relay.session import Dedup, LinkCounters

#: The two roles of a link's protocol: it accepted the connection, or dialed it.
LISTENER = "listener"
CONNECTOR = "connector"


class ILink(Interface):
    """One connection as the mesh drives it."""

    role = Attribute(":data:`LISTENER` or :data:`CONNECTOR`.")
    is_closed = Attribute("True once the connection is gone.")
    transport = Attribute("The connection's transport (``getPeer()``), or None.")
    queued_bytes = Attribute("Bytes the link holds back itself, not yet written (int).")

    def send(env: Envelope) -> None:
        """Write one envelope to the peer."""

    def close(reason: str) -> None:
        """Close the connection, recording ``reason``."""

    def flush() -> None:
        """Put what was written so far on the wire now (not on the reactor's next poll)."""

    def hold_reading(held: bool) -> None:
        """Stop (``True``) or go on (``False``) reading from the peer: TCP's
        flow control then slows its sender.  Silence while held is ours, not
        the peer's: it does not count against the link's liveness."""


def send_at_once(transport: Any) -> None:
    """
    TCP_NODELAY on a connection: each write is sent at once, never held back
    by Nagle's algorithm until the peer acknowledges the last one -- which a
    peer with nothing to say delays by 40 ms or more (delayed ACK).  Frames
    are small and latency-bound (a unit crossing a mesh is one frame per
    hop).  A transport that is no TCP connection is left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if callable(set_no_delay):
        with contextlib.suppress(OSError):
            set_no_delay(True)


def send_queued(transport: Any) -> None:
    """
    Hand what a link's TCP connection has queued to the kernel now (one
    ``send``) instead of when the reactor next polls (after
    :func:`claudectl.relay.tls.flush_tls` on a TLS link: the connection's
    TLS layer writes into it) -- only while
    the connection is open and not closing: a closing connection's last
    write is the reactor's to finish (it then reports the connection lost).
    A transport that is no TCP connection (a test's) is left alone.
    """
    write = getattr(transport, "doWrite", None)
    if (
        callable(write)
        and getattr(transport, "connected", False)
        and not getattr(transport, "disconnecting", True)
        and not getattr(transport, "disconnected", True)
    ):
        write()


class _OneShot(Factory):
    """:func:`connect_quietly`'s factory: the one protocol, no start/stop lines."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def connect_quietly(endpoint: Any, protocol: Protocol) -> Deferred[Any]:
    """
    ``connectProtocol(endpoint, protocol)`` without Twisted's "Starting
    factory" / "Stopping factory" log lines: connections a stranger can
    cause (a hub channel each) must not cost a log line each.
    """
    return endpoint.connect(_OneShot(protocol))  # type: ignore[no-any-return]


def unsent_bytes(transport: Any) -> int:
    """
    What a connection's transports hold that the kernel has not taken yet:
    the write buffers of the transport and of what it wraps (a TLS layer
    over TCP), as :class:`twisted.internet.abstract.FileDescriptor` keeps
    them.  0 for a transport without such a buffer (a test's, say).
    """
    total = 0
    for _ in range(4):  # the link's transport, and what it is layered on
        if transport is None:
            break
        buf = getattr(transport, "dataBuffer", None)
        if isinstance(buf, (bytes, bytearray, memoryview)):
            total += len(buf) - int(getattr(transport, "offset", 0) or 0)
            total += int(getattr(transport, "_tempDataLen", 0) or 0)
        transport = getattr(transport, "transport", None)
    return total


@dataclass
class PeerState:
    """What we know of a peer across its links (for this service's life)."""

    peer_id: str
    dedup: Dedup = field(default_factory=Dedup)
    counters: LinkCounters = field(default_factory=LinkCounters)
    mode: str | None = None
    #: ``"tls1.3"`` or ``"plaintext"`` (of the current or last link).
    transport: str | None = None
    #: What ``relay peers`` shows: the address the service dials (or last
    #: dialed), else where an inbound link came from.
    address: str | None = None
    last_seen: float = 0.0  # epoch seconds of the last inbound frame
    connected_since: float = 0.0
    last_error: str | None = None
    links_replaced: int = 0


@dataclass
class PeerLink:
    protocol: ILink
    state: PeerState
    direction: str  # "inbound" / "outbound"

    @property
    def peer_id(self) -> str:
        return self.state.peer_id

    @property
    def counters(self) -> LinkCounters:
        return self.state.counters
