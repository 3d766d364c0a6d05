# -*- test-case-name: tests.test_hub -*-
"""
The hub: registrations, channels, and the splice that forwards bytes.

A connection to the hub starts with the hub's greeting line; the client's
first line says what the connection is (docs/hub.md):

* ``register`` -- a peer's long-lived registration link.  The hub tells it
  about channels opened to its identity (``incoming``).
* ``open`` -- a dialer wants a channel to a registered identity.  It waits
  (``spliced`` or an ``error`` line) while the target connects back.
* ``accept`` -- the target's fresh outbound connection for one channel.
* ``status`` -- the operator's counters, one line, then close.

Once both ends of a channel are there, each gets ``spliced`` and the hub only
forwards bytes between the two sockets: it holds no key, and the relay's TLS
with channel-bound proofs runs end to end through it.  Flow control: each
socket is the producer of its partner's writes (a full write buffer pauses
the reading side), plus a per-registration byte rate.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from claudectl.hub import wire
from claudectl.logbudget import LogBudget
from claudectl.relay.links import send_at_once

log = Logger()

#: Refusals (malformed control lines, refused registrations) logged per
#: source address and minute; the rest are only counted.
REFUSALS_LOGGED_PER_MINUTE = 10


def _more_refusals(host: str) -> None:
    log.info("more refusals from {host} this minute; counting, not logging them", host=host)


MiB = 1024 * 1024


@dataclass(frozen=True)
class HubLimits:
    """What one hub allows; every number bounds what a client can make it hold."""

    max_registrations: int = 10_000
    #: Spliced plus waiting channels to one registered identity.
    max_channels_per_registration: int = 64
    #: Channels opened to one identity and not yet accepted by it.
    max_pending_per_registration: int = 16
    #: Bytes per second forwarded on all channels of one registration, both
    #: directions together (0: no limit).
    bytes_per_sec_per_registration: int = 128 * MiB
    #: A spliced channel with no byte either way for this long is closed.
    channel_idle_secs: float = 600.0
    #: An opened channel the target does not accept in time is refused.
    accept_timeout_secs: float = 15.0
    #: A new connection must send its first line within this.
    first_line_timeout_secs: float = 10.0
    #: A registration that sends nothing (peers ping every 30 s) is closed.
    registration_idle_secs: float = 120.0
    #: Connections that have not sent their first line yet, at most; more
    #: are closed at once (a flood of silent sockets cannot hold the hub).
    max_unidentified: int = 1024


class State(Enum):
    AWAIT_FIRST = "await_first"
    REGISTERED = "registered"
    WAIT_ACCEPT = "wait_accept"
    SPLICED = "spliced"
    CLOSED = "closed"


#: What a client may send in each state; anything else closes the connection.
ALLOWED: dict[State, set[str]] = {
    State.AWAIT_FIRST: {wire.REGISTER, wire.OPEN, wire.ACCEPT, wire.STATUS},
    State.REGISTERED: {wire.PING},
    State.WAIT_ACCEPT: set(),
    State.SPLICED: set(),
    State.CLOSED: set(),
}


@dataclass
class HubStats:
    registrations_total: int = 0
    reregistrations: int = 0
    channels_total: int = 0
    bytes_forwarded: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class _RateBucket:
    """A token bucket of bytes per second with one second of burst."""

    def __init__(self, rate: int, now: Callable[[], float]) -> None:
        self.rate = float(rate)
        self.now = now
        self.level = self.rate
        self.stamp = now()

    def take(self, n: int) -> float:
        """Charge ``n`` bytes; the seconds to pause the sender (0 when within the rate)."""
        t = self.now()
        self.level = min(self.rate, self.level + (t - self.stamp) * self.rate)
        self.stamp = t
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate


@dataclass
class _Pending:
    channel: str
    dialer: HubConnection
    target: str
    timer: Any


class Hub:
    """The hub's state: who is registered, which channels wait or run."""

    def __init__(
        self,
        clock: Any,
        token: str = "",
        limits: HubLimits | None = None,
        random: Callable[[int], bytes] = os.urandom,
        capture_dir: Path | None = None,
    ) -> None:
        self.clock = clock
        self.token = token
        self.limits = limits or HubLimits()
        self.random = random
        self.capture_dir = capture_dir
        self.registrations: dict[str, HubConnection] = {}
        self.pending: dict[str, _Pending] = {}
        #: Open spliced channels per target identity.
        self.channels_of: dict[str, int] = {}
        self.spliced: set[HubConnection] = set()
        self.buckets: dict[str, _RateBucket] = {}
        self.stats = HubStats()
        #: Log lines that connections' bad input may cause (every refusal is
        #: counted in ``stats`` whether logged or not).
        self.log_budget = LogBudget(clock.seconds, REFUSALS_LOGGED_PER_MINUTE, _more_refusals)
        self._capture_seq = 0
        #: Connections still in AWAIT_FIRST.
        self.unidentified = 0

    # --- checks -------------------------------------------------------------------
    def token_ok(self, offered: str) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def status(self) -> dict[str, Any]:
        return {
            "registrations": len(self.registrations),
            "channels": len(self.spliced) // 2,
            "pending": len(self.pending),
            "registrations_total": self.stats.registrations_total,
            "reregistrations": self.stats.reregistrations,
            "channels_total": self.stats.channels_total,
            "bytes_forwarded": self.stats.bytes_forwarded,
            "refused": dict(sorted(self.stats.refused.items())),
        }

    # --- registrations --------------------------------------------------------------
    def register(self, conn: HubConnection, identity: str, token: str) -> str | None:
        """Register ``conn`` as ``identity``; a refusal reason, or None."""
        if not self.token_ok(token):
            return wire.BAD_TOKEN
        old = self.registrations.get(identity)
        if old is None and len(self.registrations) >= self.limits.max_registrations:
            return wire.TOO_MANY
        if old is not None:
            # Either the peer came back before the hub noticed its old link
            # died, or someone else claims its identity.  The hub cannot tell
            # (it holds no key): the newer one wins and the event is logged.
            # A squatter gains channels it cannot authenticate on -- it can
            # deny service, never pose as the peer.
            self.stats.reregistrations += 1
            log.warn(
                "{identity} registered again from {address} (replacing the registration "
                "from {previous}); if this repeats, someone else may hold the hub token "
                "and claim that identity",
                identity=identity,
                address=conn.address,
                previous=old.address,
            )
            old.identity = None
            old.refuse(wire.REPLACED, "another registration of this identity replaced this one")
        self.registrations[identity] = conn
        self.stats.registrations_total += 1
        return None

    def unregister(self, conn: HubConnection) -> None:
        if conn.identity is not None and self.registrations.get(conn.identity) is conn:
            del self.registrations[conn.identity]
            for pending in [p for p in self.pending.values() if p.target == conn.identity]:
                self._drop_pending(pending, wire.NOT_REGISTERED, "the peer left the hub")

    # --- channels -------------------------------------------------------------------
    def open(self, dialer: HubConnection, target: str) -> tuple[str, str] | None:
        """A dialer asks for ``target``: None when the target was told, else a refusal."""
        reg = self.registrations.get(target)
        if reg is None:
            return wire.NOT_REGISTERED, f"no peer is registered as {target} at this hub"
        waiting = sum(1 for p in self.pending.values() if p.target == target)
        if (
            waiting >= self.limits.max_pending_per_registration
            or waiting + self.channels_of.get(target, 0)
            >= self.limits.max_channels_per_registration
        ):
            return wire.TOO_MANY, f"{target} has too many channels at this hub"
        channel = self.random(wire.CHANNEL_ID_BYTES).hex()
        timer = self.clock.callLater(self.limits.accept_timeout_secs, self._expire, channel)
        self.pending[channel] = _Pending(channel, dialer, target, timer)
        dialer.channel = channel
        reg.send({"op": wire.INCOMING, "channel": channel})
        return None

    def _expire(self, channel: str) -> None:
        pending = self.pending.get(channel)
        if pending is not None:
            self._drop_pending(
                pending, wire.TIMEOUT, f"{pending.target} did not accept the channel in time"
            )

    def _drop_pending(self, pending: _Pending, reason: str, message: str) -> None:
        self.pending.pop(pending.channel, None)
        if pending.timer.active():
            pending.timer.cancel()
        self.stats.refuse(reason)
        pending.dialer.refuse(reason, message)

    def dialer_lost(self, dialer: HubConnection) -> None:
        pending = self.pending.get(dialer.channel or "")
        if pending is not None and pending.dialer is dialer:
            self.pending.pop(pending.channel)
            if pending.timer.active():
                pending.timer.cancel()

    def accept(self, conn: HubConnection, channel: str) -> str | None:
        """The target's connection for ``channel``: splice it, or a refusal reason."""
        pending = self.pending.pop(channel, None)
        if pending is None:
            return wire.NO_SUCH_CHANNEL
        if pending.timer.active():
            pending.timer.cancel()
        target = pending.target
        self.stats.channels_total += 1
        self.channels_of[target] = self.channels_of.get(target, 0) + 1
        if self.limits.bytes_per_sec_per_registration and target not in self.buckets:
            self.buckets[target] = _RateBucket(
                self.limits.bytes_per_sec_per_registration, self.clock.seconds
            )
        dialer = pending.dialer
        conn.target = dialer.target = target
        conn.channel = channel
        self._capture_seq += 1
        for side, name in ((dialer, "dialer"), (conn, "target")):
            if self.capture_dir is not None:
                side.capture = open(  # noqa: SIM115 -- closed in connectionLost
                    self.capture_dir / f"channel-{self._capture_seq}-{name}.bin", "wb", buffering=0
                )
        dialer.splice(conn)
        conn.splice(dialer)
        return None

    def channel_closed(self, conn: HubConnection) -> None:
        if conn in self.spliced:
            self.spliced.discard(conn)
            if conn.role == "target" and conn.target is not None:
                left = self.channels_of.get(conn.target, 1) - 1
                if left > 0:
                    self.channels_of[conn.target] = left
                else:
                    self.channels_of.pop(conn.target, None)
                    self.buckets.pop(conn.target, None)

    def charge(self, target: str | None, n: int) -> float:
        self.stats.bytes_forwarded += n
        bucket = self.buckets.get(target or "")
        return bucket.take(n) if bucket is not None else 0.0


@implementer(IPushProducer)
class _Valve:
    """Registered on one socket's transport as the producer: pauses the partner's reads."""

    def __init__(self, reader: HubConnection) -> None:
        self.reader = reader

    def pauseProducing(self) -> None:
        self.reader.pause("buffer")

    def resumeProducing(self) -> None:
        self.reader.resume("buffer")

    def stopProducing(self) -> None:
        self.reader.transport.loseConnection()


class HubConnection(LineReceiver, TimeoutMixin):
    """One TCP connection to the hub: control lines first, then (spliced) raw bytes."""

    delimiter = b"\n"
    MAX_LENGTH = wire.MAX_LINE_BYTES
    transport: Any

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.state = State.AWAIT_FIRST
        self.address = "?"
        self.identity: str | None = None
        #: The identity this channel connection leads to (both ends of a splice).
        self.target: str | None = None
        self.channel: str | None = None
        self.role = ""
        self.partner: HubConnection | None = None
        self.capture: IO[bytes] | None = None
        self._paused: set[str] = set()
        self._unidentified = False
        self._last_pong = float("-inf")
        self.callLater = hub.clock.callLater  # type: ignore[method-assign]  # TimeoutMixin's clock

    # --- lifecycle ------------------------------------------------------------------
    def connectionMade(self) -> None:
        send_at_once(self.transport)  # it carries relay frames once spliced
        peer = self.transport.getPeer()
        self.address = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        if self.hub.unidentified >= self.hub.limits.max_unidentified:
            self.state = State.CLOSED
            self.hub.stats.refuse("too_many_connections")
            self.transport.abortConnection()
            return
        self.hub.unidentified += 1
        self._unidentified = True
        self.transport.write(wire.greeting())
        self.setTimeout(self.hub.limits.first_line_timeout_secs)

    def _identified(self) -> None:
        """The first line arrived (or the connection ended before it)."""
        if self._unidentified:
            self._unidentified = False
            self.hub.unidentified -= 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._identified()
        previous, self.state = self.state, State.CLOSED
        self.setTimeout(None)
        if previous == State.REGISTERED:
            self.hub.unregister(self)
        elif previous == State.WAIT_ACCEPT:
            self.hub.dialer_lost(self)
        elif previous == State.SPLICED:
            self.hub.channel_closed(self)
            partner, self.partner = self.partner, None
            if partner is not None and partner.state != State.CLOSED:
                partner.transport.loseConnection()
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    def timeoutConnection(self) -> None:
        what = {
            State.AWAIT_FIRST: "no first line",
            State.REGISTERED: "registration idle",
            State.SPLICED: "channel idle",
        }.get(self.state, "timeout")
        log.debug("closing {address}: {what}", address=self.address, what=what)
        if self.state == State.SPLICED:
            self.transport.abortConnection()
        else:
            self.refuse(wire.TIMEOUT, what)

    # --- control lines --------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        if self.state != State.CLOSED:
            self.transport.write(wire.encode(message))

    def refuse(self, reason: str, message: str) -> None:
        """One error line, then close."""
        if self.state == State.CLOSED:
            return
        self.transport.write(wire.error(reason, message))
        self.transport.loseConnection()

    def _may_log(self) -> bool:
        """Whether this connection's address may log one more refusal this minute."""
        return self.hub.log_budget.allow(self.address.rpartition(":")[0])

    def _malformed(self, why: str) -> None:
        kind = "registration " + (self.identity or "") if self.identity else "connection"
        if self._may_log():
            log.info(
                "closing {kind} from {address}: malformed control line ({why})",
                kind=kind.strip(),
                address=self.address,
                why=why,
            )
        self.hub.stats.refuse(wire.MALFORMED)
        self.refuse(wire.MALFORMED, why)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._malformed(f"line longer than {wire.MAX_LINE_BYTES} bytes")

    def lineReceived(self, line: bytes) -> None:
        if self.state == State.CLOSED:
            return
        try:
            msg = wire.decode(line)
        except wire.HubProtocolError as e:
            self._malformed(str(e))
            return
        op = msg.get("op")
        if op not in ALLOWED[self.state]:
            self._malformed(f"{op!r} not allowed now")
            return
        self._identified()
        if op == wire.PING:
            self.resetTimeout()
            # One answer a second at most: a client that pings in a loop and
            # never reads cannot make the hub buffer answers without bound.
            now = self.hub.clock.seconds()
            if now - self._last_pong >= 1.0:
                self._last_pong = now
                self.send({"op": wire.PONG})
        elif op == wire.REGISTER:
            self._on_register(msg)
        elif op == wire.OPEN:
            self._on_open(msg)
        elif op == wire.ACCEPT:
            self._on_accept(msg)
        elif op == wire.STATUS:
            if not self.hub.token_ok(msg.get("token", "")):
                self.refuse(wire.BAD_TOKEN, "wrong hub token")
                return
            self.send({"op": wire.STATUS, **self.hub.status()})
            self.transport.loseConnection()

    def _on_register(self, msg: dict[str, Any]) -> None:
        identity = msg["identity"]
        refusal = self.hub.register(self, identity, msg.get("token", ""))
        if refusal is not None:
            self.hub.stats.refuse(refusal)
            if self._may_log():
                log.info(
                    "registration of {identity} from {address} refused: {reason}",
                    identity=identity,
                    address=self.address,
                    reason=refusal,
                )
            self.refuse(refusal, "registration refused")
            return
        self.identity = identity
        self.state = State.REGISTERED
        self.setTimeout(self.hub.limits.registration_idle_secs)
        self.send({"op": wire.REGISTERED})
        log.info("{identity} registered from {address}", identity=identity, address=self.address)

    def _on_open(self, msg: dict[str, Any]) -> None:
        self.state = State.WAIT_ACCEPT
        self.role = "dialer"
        self.setTimeout(None)  # the hub's accept timer bounds the wait
        refusal = self.hub.open(self, msg["to"])
        if refusal is not None:
            reason, message = refusal
            self.hub.stats.refuse(reason)
            log.debug("channel to {to} refused: {reason}", to=msg["to"], reason=reason)
            self.refuse(reason, message)

    def _on_accept(self, msg: dict[str, Any]) -> None:
        self.role = "target"
        refusal = self.hub.accept(self, msg["channel"])
        if refusal is not None:
            self.hub.stats.refuse(refusal)
            self.refuse(refusal, "no such channel (it expired or was never opened)")

    # --- splicing -------------------------------------------------------------------
    def splice(self, partner: HubConnection) -> None:
        self.partner = partner
        self.state = State.SPLICED
        self.hub.spliced.add(self)
        message: dict[str, Any] = {"op": wire.SPLICED, "channel": self.channel}
        if self.role == "target":
            # The target's relay admission counts the dialer's address, not the hub's.
            message["peer"] = partner.address.rsplit(":", 1)[0]
        self.send(message)
        self.setTimeout(self.hub.limits.channel_idle_secs)
        # Our writes come from the partner: a full buffer here pauses its reads.
        self.transport.registerProducer(_Valve(partner), True)
        self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        partner = self.partner
        if partner is None or self.state != State.SPLICED:
            return
        if self.capture is not None:
            self.capture.write(data)
        partner.transport.write(data)
        self.resetTimeout()
        partner.resetTimeout()
        delay = self.hub.charge(self.target, len(data))
        if delay > 0:
            self.pause("rate")
            self.hub.clock.callLater(delay, self.resume, "rate")

    def pause(self, why: str) -> None:
        if not self._paused and self.state != State.CLOSED:
            self.transport.pauseProducing()
        self._paused.add(why)

    def resume(self, why: str) -> None:
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and self.state != State.CLOSED:
            self.transport.resumeProducing()


class HubFactory(Factory):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.noisy = False

    def buildProtocol(self, addr: Any) -> HubConnection:
        proto = HubConnection(self.hub)
        proto.factory = self
        return proto
