# -*- test-case-name: tests.test_admission -*-
"""
Who may start a handshake (docs/protocol.md, Admission; docs/security.md).

* At most :data:`MAX_INFLIGHT_HANDSHAKES` (16) handshakes at once, and
  :data:`MAX_INFLIGHT_PER_IP` (4) from one address (loopback exempt).
* Slowloris (issue 11, item 3): a pre-authentication socket that has sent no
  frame yet (*idle*), or that made no progress for :data:`STALLED_SECS`
  (a TLS handshake that never finishes, say), is *sheddable*.  When the
  global or the per-address cap is reached, the newcomer is not refused:
  the oldest sheddable socket of the most-represented address is closed
  instead (idle ones before stalled ones).  Only when nothing is sheddable
  is the newcomer closed at once.  The protocol adds a short deadline for
  the first frame (:data:`FIRST_FRAME_TIMEOUT_SECS`) and for the TLS
  handshake (:data:`TLS_HANDSHAKE_TIMEOUT_SECS`).
* Per source IP: 5 failed handshakes within 60 s give that IP a 60 s
  cooldown counted from the 5th failure.  The window slides (defect W11:
  claudectl anchors it at the first failure, never resets and never
  expires entries).  A success does **not** clear the record (issue 11,
  item 4: four wrong proofs and one right one, repeated, must still
  block); idle records expire.
* ``max_peers`` connected peers; checked at accept and again after
  authentication (a new link for an already connected peer replaces it and
  does not count twice).
* Accept pacing (issue 16): a newcomer that finds the handshake slots full
  of sockets that are busy, or idle for less than :data:`IDLE_GRACE_SECS`
  (a storm of real peers, each still about to answer its challenge), is
  neither refused nor allowed to shed one of them: it waits in
  :class:`AcceptPacer`'s waiting room (its reads paused, no challenge sent)
  and is admitted when a slot frees, addresses taking turns.  Once a slot
  holder has been idle for the grace period (or stalled), the slowloris rule
  above applies again: the whole room is admitted, each newcomer shedding
  one.  A waiting socket is closed after :data:`MAX_WAIT_SECS`; at most
  :data:`MAX_WAITING` sockets wait (:data:`MAX_WAITING_PER_IP` per address,
  loopback exempt), and while the room is full the listening socket is not
  read (the kernel's backlog holds the next ones).

Plain object with an injected ``now()``.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger

from claudectl.logbudget import LogBudget

log = Logger()

MAX_INFLIGHT_HANDSHAKES = 16
#: Handshakes in flight from one source address (so that one host cannot
#: take every slot with idle sockets).  Loopback is exempt: local processes.
MAX_INFLIGHT_PER_IP = 4
#: Handshakes admitted while max_peers links are up (replacements only).
SPARE_HANDSHAKES_WHEN_FULL = 2
#: A listener socket must send its first complete frame within this many
#: seconds of the TCP accept (a config-free constant; the whole handshake
#: keeps ``handshake_timeout_secs``).
FIRST_FRAME_TIMEOUT_SECS = 5.0
#: ... and finish the TLS handshake within this many seconds of ``starttls``.
TLS_HANDSHAKE_TIMEOUT_SECS = 5.0
#: A pre-authentication socket that made no progress (no frame, no finished
#: TLS handshake) for this long may be shed when the slots are full.
STALLED_SECS = 2.0
#: An idle pre-authentication socket younger than this is not shed for a
#: waiting newcomer (a real peer answers its challenge within a round trip).
IDLE_GRACE_SECS = 0.3
#: Sockets waiting for a handshake slot, in all and from one address.
MAX_WAITING = 256
MAX_WAITING_PER_IP = 16
#: A socket waits at most this long for a slot, then it is closed.
MAX_WAIT_SECS = 10.0
#: How often the waiting room looks for aged idle slot holders and old waiters.
WAIT_TICK_SECS = 0.05
#: The kernel's queue of connections not accepted yet (Twisted's default
#: is 50: a burst of 100 peers would see SYNs dropped and retried after 1 s).
LISTEN_BACKLOG = 1024
MAX_FAILURES = 5
FAILURE_WINDOW_SECS = 60.0
COOLDOWN_SECS = 60.0


def with_listen_backlog(listen: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    A ``tcp:``/``ssl:`` server endpoint string with ``backlog=`` set to
    ``backlog`` unless it sets one itself; other strings unchanged.
    """
    kind = listen.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "ssl") or ":backlog=" in listen.lower():
        return listen
    return f"{listen}:backlog={backlog}"


#: Dropped connections logged per address and minute (the rest are counted).
DROPS_LOGGED_PER_MINUTE = 10


def _more_drops(ip: str) -> None:
    log.debug("more connections from {ip} dropped this minute; counting, not logging them", ip=ip)


@dataclass
class _IpRecord:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class PreAuth:
    """
    One admitted pre-authentication socket, as admission sees it.  The
    protocol reports progress (a complete handshake frame, a finished TLS
    handshake) and releases it when the socket authenticates or closes.
    """

    __slots__ = ("ip", "opened_at", "progressed_at", "frames", "_shed", "released")

    def __init__(self, ip: str, now: float, shed: Callable[[], None]) -> None:
        self.ip = ip
        self.opened_at = now
        self.progressed_at = now
        #: Complete handshake frames received so far (0: the socket is idle).
        self.frames = 0
        self._shed = shed
        self.released = False

    def sheddable(self, now: float) -> int | None:
        """0 if idle, 1 if stalled, None if it is making progress."""
        if self.frames == 0:
            return 0
        if now - self.progressed_at >= STALLED_SECS:
            return 1
        return None


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "unix"


class Admission:
    def __init__(
        self, now: Callable[[], float], max_peers: int, max_inflight: int = MAX_INFLIGHT_HANDSHAKES
    ) -> None:
        self._now = now
        self.max_peers = max_peers
        self.max_inflight = max_inflight
        self.inflight = 0
        self._inflight_by_ip: dict[str, int] = {}
        #: Admitted pre-authentication sockets, oldest first.
        self._preauth: dict[PreAuth, None] = {}
        self._ips: dict[str, _IpRecord] = {}
        #: Counters by reason, for logs and ``relay status``.
        self.rejections: dict[str, int] = {}
        #: Which dropped connections get their (debug) log line: a flood is
        #: counted in ``rejections``, not written line by line to a log file
        #: that keeps debug lines (a plain ``twistd --logfile``).
        self.drop_log = LogBudget(now, DROPS_LOGGED_PER_MINUTE, _more_drops, max_keys=64)
        self._pacer: AcceptPacer | None = None

    def pacing(self, clock: Any) -> AcceptPacer:
        """The accept pacer of this admission (made on first use with ``clock``)."""
        if self._pacer is None:
            self._pacer = AcceptPacer(self, clock)
        return self._pacer

    def immediate_refusal(self, ip: str, connected_peers: int) -> str | None:
        """
        The reasons to drop a newcomer that do not depend on the handshake
        slots (a cooling-down address, max_peers), counted; else None.
        """
        rec = self._ips.get(ip)
        if rec is not None and rec.blocked_until > self._now():
            return self._count("rate_limited")
        if connected_peers >= self.max_peers and (
            self.max_peers == 0 or self.inflight >= SPARE_HANDSHAKES_WHEN_FULL
        ):
            return self._count("max_peers")
        return None

    def has_aged_sheddable(self, grace: float = IDLE_GRACE_SECS) -> bool:
        """A slot holder is stalled, or idle for at least ``grace`` seconds."""
        now = self._now()
        for t in self._preauth:
            tier = t.sheddable(now)
            if tier == 1 or (tier == 0 and now - t.opened_at >= grace):
                return True
        return False

    def _count(self, reason: str, n: int = 1) -> str:
        self.rejections[reason] = self.rejections.get(reason, 0) + n
        return reason

    def count(self, reason: str, n: int = 1) -> None:
        """Count a refusal decided elsewhere (bad-frame ratio, suppressed log lines…)."""
        self._count(reason, n)

    def _expire(self, now: float) -> None:
        if len(self._ips) < 1024:
            stale = [
                ip
                for ip, r in self._ips.items()
                if r.blocked_until <= now
                and (not r.failures or now - r.failures[-1] > FAILURE_WINDOW_SECS)
            ]
        else:  # under attack: still bounded
            stale = [ip for ip, r in self._ips.items() if r.blocked_until <= now]
        for ip in stale:
            del self._ips[ip]

    def check_accept(self, ip: str, connected_peers: int) -> str | None:
        """
        None if a newcomer from ``ip`` would be admitted without shedding
        anyone, else the reason it would be dropped (and counted).
        """
        return self._refusal(ip, connected_peers, shed=False)

    def admit(self, ip: str, connected_peers: int, shed: Callable[[], None]) -> PreAuth | str:
        """
        Admit a new listener socket: a :class:`PreAuth` to report progress on
        and :meth:`release`, or the reason to drop the newcomer silently.
        When the slots are full, an idle or stalled socket is shed (its
        ``shed`` callable is called, and it is released) to make room.
        """
        reason = self._refusal(ip, connected_peers, shed=True)
        if reason is not None:
            return reason
        ticket = PreAuth(ip, self._now(), shed)
        self._preauth[ticket] = None
        self.handshake_started(ip)
        return ticket

    def _refusal(self, ip: str, connected_peers: int, shed: bool) -> str | None:
        now = self._now()
        rec = self._ips.get(ip)
        if rec is not None and rec.blocked_until > now:
            return self._count("rate_limited")
        # When full, a couple of handshakes may still run: a connected peer
        # that restarted must be able to replace its own (stale) link.  After
        # authentication the mesh refuses anyone else.
        if connected_peers >= self.max_peers and (
            self.max_peers == 0 or self.inflight >= SPARE_HANDSHAKES_WHEN_FULL
        ):
            return self._count("max_peers")
        if (
            self._inflight_by_ip.get(ip, 0) >= MAX_INFLIGHT_PER_IP
            and not _is_loopback(ip)
            and not (shed and self._shed_one(now, only_ip=ip))
        ):
            return self._count("too_many_handshakes_from_ip")
        if self.inflight >= self.max_inflight and not (shed and self._shed_one(now)):
            return self._count("too_many_handshakes")
        return None

    def _shed_one(self, now: float, only_ip: str | None = None) -> bool:
        """Close the best sheddable socket; False if there is none."""
        best: tuple[int, int, float] | None = None
        victim: PreAuth | None = None
        for t in self._preauth:
            if only_ip is not None and t.ip != only_ip:
                continue
            tier = t.sheddable(now)
            if tier is None:
                continue
            # Idle before stalled; the most-represented address first; oldest first.
            key = (tier, -self._inflight_by_ip.get(t.ip, 0), t.progressed_at)
            if best is None or key < best:
                best, victim = key, t
        if victim is None:
            return False
        self.release(victim)
        self._count("idle_shed" if best is not None and best[0] == 0 else "stalled_shed")
        log.debug("shed a pre-authentication socket from {ip} to make room", ip=victim.ip)
        try:
            victim._shed()
        except Exception:
            log.failure("shedding a socket failed")
        return True

    def progress(self, ticket: PreAuth, frame: bool = True) -> None:
        """The socket sent a complete handshake frame (or finished TLS)."""
        ticket.progressed_at = self._now()
        if frame:
            ticket.frames += 1

    def release(self, ticket: PreAuth) -> None:
        """The socket authenticated or closed (idempotent)."""
        if ticket.released:
            return
        ticket.released = True
        self._preauth.pop(ticket, None)
        self.handshake_ended(ticket.ip)

    def preauth_counts(self) -> dict[str, int]:
        """Pre-authentication sockets by address (for tests and status)."""
        return dict(self._inflight_by_ip)

    def handshake_started(self, ip: str | None = None) -> None:
        self.inflight += 1
        if ip is not None:
            self._inflight_by_ip[ip] = self._inflight_by_ip.get(ip, 0) + 1

    def handshake_ended(self, ip: str | None = None) -> None:
        self.inflight = max(0, self.inflight - 1)
        if ip is not None:
            left = self._inflight_by_ip.get(ip, 0) - 1
            if left > 0:
                self._inflight_by_ip[ip] = left
            else:
                self._inflight_by_ip.pop(ip, None)
        if self._pacer is not None:
            self._pacer.slot_freed()

    def failure(self, ip: str) -> bool:
        """Record a failed handshake; True if the IP is now cooling down."""
        now = self._now()
        self._expire(now)
        rec = self._ips.setdefault(ip, _IpRecord())
        rec.failures.append(now)
        while rec.failures and now - rec.failures[0] > FAILURE_WINDOW_SECS:
            rec.failures.popleft()
        if len(rec.failures) >= MAX_FAILURES:
            rec.blocked_until = now + COOLDOWN_SECS
            rec.failures.clear()
            log.warn(
                "{ip}: {count} failed handshakes in {window:.0f} s; refused for {secs:.0f} s",
                ip=ip,
                count=MAX_FAILURES,
                window=FAILURE_WINDOW_SECS,
                secs=COOLDOWN_SECS,
            )
            return True
        return False

    def success(self, ip: str) -> None:
        """
        A handshake from ``ip`` succeeded.  Its failures still count: the
        window only slides (issue 11, item 4).
        """

    def blocked(self, ip: str) -> bool:
        rec = self._ips.get(ip)
        return rec is not None and rec.blocked_until > self._now()


class Waiter(Protocol):
    """A socket in the waiting room (the listener side of a relay link)."""

    ip: str

    def admit_now(self) -> None:
        """Leave the room: take the admission path (which may still refuse)."""

    def drop_waiting(self, reason: str) -> None:
        """Close the socket without a word (it waited too long)."""

    def listening_port(self) -> Any:
        """The listening port it came through (None if unknown)."""


class AcceptPacer:
    """
    The waiting room in front of the handshake slots (see the module
    docstring).  Plain object: the admission, and a clock with
    ``seconds()`` and ``callLater()``.
    """

    def __init__(self, admission: Admission, clock: Any) -> None:
        self.admission = admission
        self.clock = clock
        #: Waiting sockets per address (arrival order); the addresses in turn order.
        self._queues: dict[str, deque[tuple[Waiter, float]]] = {}
        self._turns: deque[str] = deque()
        self.waiting = 0
        self._paused: list[Any] = []
        self._promote_call: Any = None
        self._tick_call: Any = None

    def arrive(self, w: Waiter, connected_peers: int) -> str | bool:
        """
        A new listener socket: a reason to drop it at once (counted), True if
        it waits in the room, False if it may take the admission path now.
        """
        adm = self.admission
        reason = adm.immediate_refusal(w.ip, connected_peers)
        if reason is not None:
            return reason
        if self.waiting == 0 and (adm.inflight < adm.max_inflight or adm.has_aged_sheddable()):
            return False
        queue = self._queues.get(w.ip)
        if self.waiting >= MAX_WAITING or (
            queue is not None and len(queue) >= MAX_WAITING_PER_IP and not _is_loopback(w.ip)
        ):
            # No room: the old rule (shed an idle one, or be refused).
            return False
        if queue is None:
            queue = self._queues[w.ip] = deque()
            self._turns.append(w.ip)
        queue.append((w, self.clock.seconds()))
        self.waiting += 1
        if self.waiting >= MAX_WAITING:
            self._pause(w.listening_port())
        self._arm_tick()
        return True

    def leave(self, w: Waiter) -> None:
        """A waiting socket closed."""
        queue = self._queues.get(w.ip)
        if queue is None:
            return
        for item in queue:
            if item[0] is w:
                queue.remove(item)
                self.waiting -= 1
                break
        if not queue:
            self._drop_address(w.ip)
        self._maybe_resume()

    def slot_freed(self) -> None:
        """A handshake slot freed: admit the next waiter (after this call stack)."""
        if self.waiting and self._promote_call is None:
            self._promote_call = self.clock.callLater(0, self._promote)

    def _drop_address(self, ip: str) -> None:
        self._queues.pop(ip, None)
        try:
            self._turns.remove(ip)
        except ValueError:
            pass

    def _next(self) -> Waiter:
        ip = self._turns.popleft()
        queue = self._queues[ip]
        w, _ = queue.popleft()
        self.waiting -= 1
        if queue:
            self._turns.append(ip)
        else:
            del self._queues[ip]
        return w

    def _promote(self) -> None:
        self._promote_call = None
        adm = self.admission
        # A slot holder idle past the grace period (or stalled): slowloris
        # pressure, so everyone waiting goes in, each shedding one if need be.
        drain = adm.has_aged_sheddable()
        while self.waiting and (adm.inflight < adm.max_inflight or drain):
            self._next().admit_now()
        self._maybe_resume()

    def _arm_tick(self) -> None:
        if self._tick_call is None and self.waiting:
            self._tick_call = self.clock.callLater(WAIT_TICK_SECS, self._tick)

    def _tick(self) -> None:
        self._tick_call = None
        if not self.waiting:
            return
        cutoff = self.clock.seconds() - MAX_WAIT_SECS
        for ip in list(self._turns):
            queue = self._queues[ip]
            while queue and queue[0][1] <= cutoff:
                w, _ = queue.popleft()
                self.waiting -= 1
                self.admission.count("waited_too_long")
                w.drop_waiting(f"no handshake slot within {MAX_WAIT_SECS:g} s")
            if not queue:
                self._drop_address(ip)
        self._promote()
        self._arm_tick()

    def _pause(self, port: Any) -> None:
        if port is not None and port not in self._paused and hasattr(port, "stopReading"):
            port.stopReading()
            self._paused.append(port)
            log.info(
                "{count} connections wait for a handshake slot: not accepting more for now",
                count=self.waiting,
            )

    def _maybe_resume(self) -> None:
        if not self.waiting:
            # Nobody waits: no timer left behind.
            for call in (self._tick_call, self._promote_call):
                if call is not None and call.active():
                    call.cancel()
            self._tick_call = self._promote_call = None
        if self._paused and self.waiting < MAX_WAITING // 2:
            paused, self._paused = self._paused, []
            for port in paused:
                if getattr(port, "connected", True):
                    port.startReading()
