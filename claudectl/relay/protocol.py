# -*- test-case-name: tests.test_protocol -*-
"""
The thin Twisted protocol of a relay link: NDJSON lines in, envelopes to the
handshake machine and then to the mesh; envelopes out as lines.

Everything that decides lives elsewhere: :mod:`~claudectl.relay.handshake`
(authentication), :mod:`~claudectl.relay.session` (bad input, dedup,
liveness), :mod:`~claudectl.relay.admission` (limits) and
:mod:`~claudectl.relay.mesh` (who is connected, dispatch).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ITLSTransport
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from claudectl.lines import LineSplitter
from claudectl.relay import codec
from claudectl.relay.admission import (
    FIRST_FRAME_TIMEOUT_SECS,
    TLS_HANDSHAKE_TIMEOUT_SECS,
    PreAuth,
)
from claudectl.relay.codec import Envelope, ProtocolError
from claudectl.relay.handshake import (
    ONEWAY,
    Authenticated,
    ConnectorHandshake,
    HandshakeFailed,
    KeyAuth,
    ListenerHandshake,
    PakeAuth,
    Step,
)
from claudectl.relay.interfaces import ILinkHost
from claudectl.relay.links import (
    CONNECTOR,
    LISTENER,
    ILink,
    PeerLink,
    send_at_once,
    send_queued,
    unsent_bytes,
)
from claudectl.relay.session import Disconnect, FrameFilter, Liveness
from claudectl.relay.tls import (
    can_preface,
    drop_preface,
    exporter_of,
    flush_tls,
    is_tls13,
    start_tls,
)

__all__ = ["CONNECTOR", "LISTENER", "RelayProtocol"]

#: Toward a claudectl 0.64 connector, nothing may follow ``handshake_ack``
#: for about a second: its reader drops bytes that arrive with the ack
#: (docs/protocol.md, Compatibility notes).
ONEWAY_QUIET_SECS = 1.0
#: What may wait unsent toward a peer before its link is closed: a peer
#: that does not read must not make this node hold what its frames ask for
#: (a refusal per ``delegate_task``, an ack per ``task_handoff``...).  Gossip
#: stops writing at 4 MiB of backlog on its own; nothing honest comes near.
MAX_UNSENT_BYTES = 16 * 1024 * 1024
#: ... looked at after every this many bytes written (not per small frame).
UNSENT_CHECK_BYTES = 64 * 1024
#: claudectl's own heartbeat interval (it declares a link dead after 3 of them).
CLAUDECTL_HEARTBEAT_SECS = 30


def _describe(reason: Failure) -> str:
    """A short, secret-free description of why a connection ended."""
    value = reason.value
    text = str(value).strip() or type(value).__name__
    return text[:200]


def peer_ip(transport: Any) -> str:
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    return getattr(peer, "host", None) or "unix"


@implementer(IHandshakeListener, ILink)
class RelayProtocol(LineReceiver):
    delimiter = b"\n"
    #: 1 MiB excluding the ``\n`` (a trailing ``\r`` counts).
    MAX_LENGTH = codec.MAX_LINE_BYTES

    _log = Logger()
    #: A TCP transport (``ITCPTransport``; ``ITLSTransport`` once TLS starts).
    transport: Any

    def __init__(self, node: ILinkHost, role: str, auth: KeyAuth | PakeAuth | None = None) -> None:
        #: The node, seen through the narrow :class:`ILinkHost` only.
        self.node = node
        self.role = role
        self.auth = auth
        self.peer_id: str | None = None
        self.result: Authenticated | None = None
        #: Fires with this protocol once authenticated; errbacks with
        #: :class:`HandshakeFailed` (or ConnectionLost) otherwise.
        self.authenticated: defer.Deferred[RelayProtocol] = defer.Deferred()
        if role == LISTENER:
            # Nobody waits on an accepted connection's handshake: failures
            # are logged and counted, not "unhandled errors".
            self.authenticated.addErrback(lambda _f: None)
        self._listener: ListenerHandshake | None = None
        self._connector: ConnectorHandshake | None = None
        #: Our admission slot while unauthenticated (listener only).
        self._preauth: PreAuth | None = None
        #: One timer for both handshake deadlines (:meth:`_deadline_passed`):
        #: the whole handshake's, and the short one of the current
        #: pre-authentication step (the first frame, the TLS handshake;
        #: listener only).  Then, once authenticated, the link's one timer
        #: for heartbeats and liveness (:meth:`_tick`).
        self._timeout: IDelayedCall | None = None
        self._handshake_due = 0.0
        #: (when, what) of the current step's deadline, if one runs.
        self._step_due: tuple[float, str] | None = None
        self._quiet_call: IDelayedCall | None = None
        self._liveness: Liveness | None = None
        self._heartbeat_every = 0.0
        self._next_heartbeat = 0.0
        self._filter: FrameFilter | None = None
        #: The shared bounded line splitter (:mod:`claudectl.lines`).
        self._lines = LineSplitter(self.MAX_LENGTH)
        self._closing_reason: str | None = None
        self._quiet_until = 0.0
        self._queued: list[bytes] = []
        #: Bytes of ``_queued`` (counted as unsent toward the peer).
        self.queued_bytes = 0
        self.link: PeerLink | None = None
        self.ip = "?"
        self._closed: list[defer.Deferred[None]] = []
        self.is_closed = False
        self._got_handshake_frame = False
        #: Set while switching to TLS: the rest of the plaintext read is not ours.
        self._tls_switching = False
        self._tls_started = False
        #: Early TLS: the challenge has not come yet (start_tls reads it ahead of TLS).
        self._preface_pending = False
        self._failure_counted = False
        #: In the accept pacer's waiting room (listener only).
        self._waiting = False
        #: Reading held by the layers above (:meth:`hold_reading`).
        self._held = False
        #: Closed for not reading what we send (:meth:`_not_reading`).
        self._unread_closed = False
        self._written_since_check = 0

    def when_closed(self) -> defer.Deferred[None]:
        """Fires once the connection is gone."""
        if self.is_closed:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed.append(d)
        return d

    # --- connection lifecycle -------------------------------------------------
    def connectionMade(self) -> None:
        # A link spliced through a hub: admission counts the dialer's address
        # as the hub saw it (not the hub's, which carries everyone's links),
        # kept apart from direct addresses: a hub could name any address, so
        # what it says never counts as loopback (exempt from the per-address
        # caps) nor puts a direct peer's address into its cooldown.
        via = getattr(self, "hub_via", None)
        self.ip = (
            f"hub:{via}/{getattr(self, 'hub_peer_ip', None) or '?'}"
            if via
            else peer_ip(self.transport)
        )
        # From the start, handshake included: with early TLS the listener's
        # TLS flight follows its challenge before that is acknowledged, and
        # Nagle's algorithm would hold it a round trip on a real network.
        send_at_once(self.transport)
        self.node.connection_opened(self)
        if self.role == LISTENER:
            verdict = self.node.admission.pacing(self.node.clock).arrive(
                self, self.node.connected_count()
            )
            if isinstance(verdict, str):
                self._refuse(verdict)
            elif verdict:
                # The handshake slots are busy: wait (reads paused, no
                # challenge yet) until admit_now() is called.
                self._waiting = True
                self.transport.pauseProducing()
            else:
                self.admit_now()
            return
        assert self.auth is not None
        self._connector = self.node.connector_handshake(self.auth)
        self._arm_handshake_timeout()
        if self.node.tls is not None and can_preface(self.transport):
            early = self._connector.early_tls()
            if early is not None:
                self._apply_step(early)

    def _arm_handshake_timeout(self) -> None:
        self._handshake_due = self.node.clock.seconds() + self.node.handshake_timeout_secs
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        """The handshake's timer fires at the nearer of its two deadlines."""
        due = self._handshake_due
        if self._step_due is not None and self._step_due[0] < due:
            due = self._step_due[0]
        clock = self.node.clock
        call = self._timeout
        if call is None or not call.active():
            self._timeout = clock.callLater(max(0.0, due - clock.seconds()), self._deadline_passed)
        elif call.getTime() > due:
            call.reset(max(0.0, due - clock.seconds()))

    def _deadline_passed(self) -> None:
        self._timeout = None
        if self.result is not None or self.is_closed:
            return
        now = self.node.clock.seconds()
        step = self._step_due
        if step is not None and now >= step[0]:
            self._fail_handshake(step[1])
        elif now >= self._handshake_due:
            self._fail_handshake("handshake timed out")
        else:
            self._arm_deadline()  # the step's deadline was lifted: the whole one's is later

    def _log_drop(self, reason: str) -> None:
        if self.node.admission.drop_log.allow(self.ip):
            self._log.debug("dropped connection from {ip}: {reason}", ip=self.ip, reason=reason)

    def _refuse(self, reason: str) -> None:
        # Debug only: a flood of refused connections must not fill the disk
        # with log lines (the counters and the cooldown warning say what
        # happened).
        self._log_drop(reason)
        self.transport.abortConnection()

    # --- the waiting room (admission.AcceptPacer's Waiter) ---------------------------
    def admit_now(self) -> None:
        """Take a handshake slot (listener): the challenge goes out."""
        if self.is_closed:
            return
        if self._waiting:
            self._waiting = False
            self.transport.resumeProducing()
        ticket = self.node.admission.admit(self.ip, self.node.connected_count(), self._shed)
        if isinstance(ticket, str):
            self._refuse(ticket)
            return
        self._preauth = ticket
        self._listener = self.node.listener_handshake()
        self._send_all(self._listener.start())
        self._handshake_due = self.node.clock.seconds() + self.node.handshake_timeout_secs
        self._step_deadline(FIRST_FRAME_TIMEOUT_SECS, "no handshake frame")

    def drop_waiting(self, reason: str) -> None:
        self._waiting = False
        self._closing_reason = reason
        self._log_drop(reason)
        self.transport.abortConnection()

    def listening_port(self) -> Any:
        return getattr(self.transport, "server", None)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        self.is_closed = True
        self.node.connection_closed(self)
        if self._waiting:
            self._waiting = False
            self.node.admission.pacing(self.node.clock).leave(self)
        for call in (self._timeout, self._quiet_call):
            if call is not None and call.active():
                call.cancel()
        if self.result is None and self._closing_reason is None and self._tls_started:
            # The TLS handshake failed (or the peer hung up during it).
            self._closing_reason = f"TLS handshake failed ({_describe(reason)})"
            self._log.info(
                "handshake with {peer} at {ip} failed: {reason}",
                peer=self._claimed_peer(),
                ip=self.ip,
                reason=self._closing_reason,
            )
            self._count_failure()
        if self._preauth is not None:
            self.node.admission.release(self._preauth)
            self._preauth = None
            if self._got_handshake_frame and self._closing_reason is None:
                # Hanging up in the middle of a handshake (after the PAKE
                # messages, say) counts as a failed attempt.
                self._count_failure()
        if self.result is None:
            if not self.authenticated.called:
                self.authenticated.errback(
                    HandshakeFailed(
                        self._closing_reason or "connection closed during the handshake"
                    )
                )
        elif self.link is not None:
            if self._filter is not None:
                self._filter.flush_suppressed()
            why = self._closing_reason
            if why is None and self._tls_started and not reason.check(ConnectionDone):
                why = f"TLS error ({_describe(reason)})"
            self.node.link_lost(self.link, why or "connection closed")
        waiting, self._closed = self._closed, []
        for d in waiting:
            d.callback(None)

    def close(self, reason: str) -> None:
        """Close the link, remembering why (for logs and ``relay peers``)."""
        if self._closing_reason is None:
            self._closing_reason = reason
        if self.transport is not None:
            self.transport.loseConnection()

    # --- output -----------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._queued or self.node.clock.seconds() < self._quiet_until:
            self._queued.append(data)
            self.queued_bytes += len(data)
            if self.queued_bytes > MAX_UNSENT_BYTES:
                self._not_reading(self.queued_bytes)
            return
        self.transport.write(data)
        if self.link is not None:
            self.link.counters.frames_out += 1
            self.link.counters.bytes_out += len(data)
            self._written_since_check += len(data)
            if self._written_since_check >= UNSENT_CHECK_BYTES:
                self._written_since_check = 0
                unsent = unsent_bytes(self.transport)
                if unsent > MAX_UNSENT_BYTES:
                    self._not_reading(unsent)

    def _not_reading(self, unsent: int) -> None:
        """The peer lets what we write pile up: close its link (aborted: it
        would never drain), once, with one log line and a rejection counted."""
        if not self._unread_closed:
            self._unread_closed = True
            self.node.admission.count("unread_output")
            self._log.warn(
                "{peer_id} does not read what this node sends ({mib:.1f} MiB waiting); "
                "closing its link",
                peer_id=self.peer_id,
                mib=unsent / 1048576,
            )
            if self._closing_reason is None:
                self._closing_reason = f"the peer does not read ({unsent:,} bytes unsent)"
        self.transport.abortConnection()

    def _flush_queue(self) -> None:
        queued, self._queued = self._queued, []
        self.queued_bytes = 0
        for data in queued:
            self._write(data)

    def _send_all(self, envs: list[Envelope]) -> None:
        for env in envs:
            self.transport.write(codec.encode(env))

    def send(self, env: Envelope) -> None:
        self._write(codec.encode(env))

    def hold_reading(self, held: bool) -> None:
        """
        Back-pressure from the layers above: stop reading from the peer
        while its frames' work piles up (TCP's flow control then slows its
        sender), go on once it caught up.  Frames of the read under way are
        still delivered.  The liveness deadline does not run meanwhile.
        """
        if held == self._held or self.transport is None or self.is_closed:
            return
        if held and self._closing_reason is not None:
            return  # closing: the liveness deadline must stay able to abort it
        self._held = held
        if held:
            self.transport.pauseProducing()
        else:
            if self._liveness is not None:
                self._liveness.touch()  # the silence was ours
            self.transport.resumeProducing()

    def flush(self) -> None:
        """
        Put what this link wrote so far on the wire now, not when the
        reactor next polls: encrypted at once on a TLS link, handed to the
        kernel at once on a plain TCP one (Twisted sends a transport's
        writes when the loop comes round to it, after the rest of this
        turn's reads).
        """
        transport = self.transport
        if transport is None:
            return
        flush_tls(transport)
        send_queued(transport)

    # --- input ------------------------------------------------------------------
    def lineReceived(self, line: bytes) -> None:
        if self.result is None:
            self._handshake_line(line)
        else:
            self._session_line(line)

    def dataReceived(self, data: bytes) -> None:
        """
        Split everything that arrived at once with the shared bounded
        splitter (:mod:`claudectl.lines`: one pass over the read).  Lines
        after a handshake frame are kept for the session: pipelined bytes are
        never lost (defect W17).
        """
        if self._preface_pending:
            # Early TLS, and the challenge reaches us directly (the hub
            # dialer's sniffer reads it before handing the socket over), not
            # through start_tls's preface: the rest of this read is TLS's.
            self._preface_pending = False
            self._tls_switching = True
            drop_preface(self.transport)
        lines = self._lines.feed(data)
        if self.result is not None:
            self._session_lines(lines)
            return
        for i, line in enumerate(lines):
            if self._closing_reason is not None:
                self._lines.take()
                return
            if line is None:  # OVERLONG
                self.lineLengthExceeded(b"")
            elif self.result is None:
                self._handshake_line(line)
            else:
                self._session_lines(lines[i:])
                return
            if self._tls_switching:
                # Everything after the starttls frame belongs to TLS (the
                # connector sends its ClientHello right behind the frame).
                self._tls_switching = False
                rest = b"".join(ln + b"\n" for ln in lines[i + 1 :] if ln is not None)
                rest += self._lines.take()
                if rest and self.transport is not None and self.connected:
                    self.transport.protocol.dataReceived(rest)
                return

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.result is None:
            self._fail_handshake("line too long")
            return
        self._bad("line too long")

    def _bad(self, reason: str) -> None:
        assert self._filter is not None
        try:
            self._filter.bad(reason)
        except Disconnect as e:
            self._disconnect_bad(e)

    def _disconnect_bad(self, e: Disconnect) -> None:
        self.node.admission.count(e.kind)
        self._log.warn("disconnecting {peer_id}: {reason}", peer_id=self.peer_id, reason=str(e))
        self.close(str(e))

    def _bad_frames_suppressed(self, count: int) -> None:
        """The summary line of a peer's rate-limited bad-frame log lines."""
        self.node.admission.count("log_lines_suppressed", count)
        self._log.info(
            "{count} more bad frames from {peer_id} were not logged",
            count=count,
            peer_id=self.peer_id,
        )

    def _handshake_line(self, line: bytes) -> None:
        if not line.strip():
            if self.role == LISTENER:
                self._fail_handshake("empty line before the handshake")
            return
        try:
            env = codec.decode(line)
        except ProtocolError as e:
            self._fail_handshake(f"bad handshake frame: {e}")
            return
        machine = self._listener or self._connector
        assert machine is not None
        self._got_handshake_frame = True
        if self._preauth is not None:
            self.node.admission.progress(self._preauth)
            self._cancel_step_deadline()
        step = machine.receive(env)
        self._apply_step(step)

    def _apply_step(self, step: Step) -> None:
        self._send_all(step.send)
        if step.failed is not None:
            self._fail_handshake(step.failed, step.reflected)
        elif step.done is not None:
            self._handshake_succeeded(step.done)
        elif step.start_tls:
            self._start_tls()

    def _claimed_peer(self) -> str:
        """Who the other side says (or we expect) it is, for log lines."""
        if self._listener is not None:
            return self._listener.claimed_id or "?"
        if self._connector is not None and self._connector.listener_id:
            return self._connector.listener_id
        if isinstance(self.auth, KeyAuth) and self.auth.expected_peer:
            return self.auth.expected_peer
        return "?"

    def _step_deadline(self, secs: float, what: str) -> None:
        """The peer must do ``what`` within ``secs`` (capped by the handshake's own deadline)."""
        secs = min(secs, self.node.handshake_timeout_secs)
        self._step_due = (self.node.clock.seconds() + secs, f"{what} within {secs:g} s")
        self._arm_deadline()

    def _cancel_step_deadline(self) -> None:
        # The timer stays: it fires at the old step deadline, finds none and
        # waits for the handshake's own (one timer per handshake, not two).
        self._step_due = None

    def _stop_deadline(self) -> None:
        self._step_due = None
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _shed(self) -> None:
        """Admission closes this idle or stalled socket to make room for a newcomer."""
        if self._closing_reason is None:
            self._closing_reason = "shed: idle before authentication while the slots were full"
        self._preauth = None  # admission already released it
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail_handshake(self, reason: str, reflected: bool = False) -> None:
        self._stop_deadline()
        if reflected:
            self._log.warn(
                "reflection attempt refused: {peer} at {ip}: {reason}",
                peer=self._claimed_peer(),
                ip=self.ip,
                reason=reason,
            )
        else:
            self._log.info(
                "handshake with {peer} at {ip} failed: {reason}",
                peer=self._claimed_peer(),
                ip=self.ip,
                reason=reason,
            )
        self._count_failure()
        self.close(reason)

    def _count_failure(self) -> None:
        """One failed handshake for this address (listener side, at most once)."""
        if self.role == LISTENER and not self._failure_counted:
            self._failure_counted = True
            self.node.admission.failure(self.ip)

    # --- TLS ------------------------------------------------------------------------
    def _start_tls(self) -> None:
        tls = self.node.tls
        if tls is None or not ITLSTransport.providedBy(self.transport):
            self._fail_handshake("TLS is not available on this connection")
            return
        early = self._connector is not None and self._connector.early
        # Early TLS (the connector's, before the challenge): the challenge is
        # read ahead of TLS by start_tls; otherwise the rest of this read is
        # TLS's (see dataReceived).
        self._tls_switching = not early
        self._tls_started = True
        if self._preauth is not None:
            self._step_deadline(TLS_HANDSHAKE_TIMEOUT_SECS, "no TLS handshake")
        try:
            if self.role == LISTENER:
                # Also on a socket it dialed (a hub channel): still the TLS server.
                start_tls(self.transport, tls.server(), client=False)
            else:
                client = bool(getattr(self.transport, "_tlsClientDefault", True))
                preface = self._early_challenge if early else None
                self._preface_pending = early
                start_tls(self.transport, tls.client(), client=client, preface=preface)
        except Exception as e:
            self._fail_handshake(f"cannot start TLS: {type(e).__name__}: {e}")

    def _early_challenge(self, line: bytes | None) -> None:
        """The listener's challenge, read ahead of its TLS flight (early TLS)."""
        self._preface_pending = False
        if line is None:
            self.lineLengthExceeded(b"")
        elif self.result is None and self._closing_reason is None:
            self._handshake_line(line)

    def handshakeCompleted(self) -> None:
        """The TLS handshake finished (``IHandshakeListener``)."""
        if self.result is not None or self._closing_reason is not None:
            return
        if self._preauth is not None:
            self._cancel_step_deadline()
            self.node.admission.progress(self._preauth, frame=False)
        try:
            conn = self.transport.getHandle()
            if not is_tls13(conn):
                raise ValueError("not TLS 1.3")
            exporter = exporter_of(conn)
        except Exception as e:
            self._fail_handshake(f"TLS channel binding unavailable: {e}")
            return
        if self._listener is not None:
            self._listener.tls_established(exporter)
        elif self._connector is not None:
            self._apply_step(self._connector.tls_established(exporter))
            # The proof goes out with our TLS Finished, in one TCP write.
            flush_tls(self.transport)

    def _handshake_succeeded(self, result: Authenticated) -> None:
        self._stop_deadline()
        if self._preauth is not None:
            self.node.admission.release(self._preauth)
            self._preauth = None
        if self.role == LISTENER:
            self.node.admission.success(self.ip)
        self.result = result
        self.peer_id = result.peer_id
        dialer = getattr(self.factory, "dialer", None)
        if dialer is not None and dialer.retired:
            # The dialer that made this connection was removed meanwhile
            # (its peer moved to another address): not the peer's link.
            self.result = None
            self.close("its dialer was removed")
            return
        link = self.node.link_up(self, result)
        if link is None:
            self.result = None
            self.close("refused by the mesh")
            return
        self.link = link
        self._filter = FrameFilter(
            link.state.dedup,
            link.counters,
            on_bad=lambda r: self._log.info(
                "bad frame from {peer_id}: {reason}", peer_id=self.peer_id, reason=r
            ),
            now=self.node.clock.seconds,
            on_suppressed=self._bad_frames_suppressed,
            readers=getattr(self.node, "payload_readers", None),
        )
        clock = self.node.clock
        interval = self.node.heartbeat_interval_secs
        self._liveness = Liveness(clock.seconds, interval)
        if result.mode == ONEWAY:
            # A claudectl 0.64 peer drops a link after 90 s without a
            # heartbeat, whatever our own interval is.
            interval = min(interval, CLAUDECTL_HEARTBEAT_SECS)
        if self.role == LISTENER and result.mode == ONEWAY:
            self._quiet_until = clock.seconds() + ONEWAY_QUIET_SECS
            self._quiet_call = clock.callLater(ONEWAY_QUIET_SECS, self._flush_queue)
        # One timer per link for heartbeats and liveness (not a LoopingCall
        # and a liveness timer): it fires at the nearer of the next heartbeat
        # and the liveness deadline.
        self._heartbeat_every = interval
        self._next_heartbeat = clock.seconds() + interval
        self._timeout = clock.callLater(min(interval, self._liveness.deadline + 0.001), self._tick)
        self.authenticated.callback(self)
        if self.role == LISTENER and self._quiet_call is None:
            # Put the ack on the wire before the layers' link-up work (a
            # knowledge request, a push of units...) runs: otherwise the
            # reactor sends it only once all of that is done.
            self.flush()
        self.node.link_ready(link)

    # --- session ----------------------------------------------------------------
    def _session_lines(self, lines: list[bytes | None]) -> None:
        """The lines of one read on an authenticated link, in bulk."""
        assert self._filter is not None and self.link is not None
        counters = self._filter.counters
        frames_before = counters.frames_in
        envs, stop = self._filter.feed_many(lines)
        if counters.frames_in != frames_before and self._liveness is not None:
            # Any valid frame proves the peer is alive, duplicates included;
            # a bad line does not.
            self._liveness.touch()
        deliver, link = self.node.deliver, self.link
        for env in envs:
            if self._closing_reason is not None:
                break
            deliver(link, env)
        if stop is not None:
            self._disconnect_bad(stop)
        if self._closing_reason is not None:
            self._lines.take()

    def _session_line(self, line: bytes) -> None:
        self._session_lines([line])

    def _tick(self) -> None:
        """Heartbeat if one is due; close the link if the peer went quiet."""
        self._timeout = None
        assert self._liveness is not None
        clock = self.node.clock
        now = clock.seconds()
        if now >= self._next_heartbeat:
            self.send(self.node.heartbeat())
            # As LoopingCall: the next one on the grid, intervals missed skipped.
            every = self._heartbeat_every
            self._next_heartbeat += every * (1 + int((now - self._next_heartbeat) // every))
        if self._held and self._closing_reason is None:
            # We are not reading: the silence is ours.  (Not once closing: a
            # replaced link that is never released must still be aborted.)
            self._liveness.touch()
        remaining = self._liveness.remaining()
        if remaining >= 0:
            if not self.is_closed:
                # Also while closing: a peer that stops reading never lets a
                # close finish; the liveness deadline then aborts the socket.
                wait = min(self._next_heartbeat - now, remaining + 0.001)
                self._timeout = clock.callLater(max(0.0, wait), self._tick)
            return
        self._log.warn(
            "no traffic from {peer_id} for {secs:.0f} s: link is dead",
            peer_id=self.peer_id,
            secs=self._liveness.deadline,
        )
        self.close("heartbeat timeout")
        if self.transport is not None:
            # A dead peer may never answer our FIN.
            self.node.clock.callLater(5, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and self.connected:
            self.transport.abortConnection()
