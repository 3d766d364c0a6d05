# -*- test-case-name: tests.test_admission -*-
"""
Who may start a handshake (wire.md 5; mission "Security").

* At most :data:`MAX_INFLIGHT_HANDSHAKES` (16) handshakes at once.
* Per source IP: 5 failed handshakes within 60 s give that IP a 60 s
  cooldown counted from the 5th failure.  The window slides (defect W11:
  claudectl anchors it at the first failure, never resets and never
  expires entries); a success clears the IP's record; idle records expire.
* ``max_peers`` connected peers; checked at accept and again after
  authentication (a new link for an already connected peer replaces it and
  does not count twice).

Plain object with an injected ``now()``.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.logger import Logger

log = Logger()

MAX_INFLIGHT_HANDSHAKES = 16
#: Handshakes in flight from one source address (so that one host cannot
#: take every slot with idle sockets).  Loopback is exempt: local processes.
MAX_INFLIGHT_PER_IP = 4
#: Handshakes admitted while max_peers links are up (replacements only).
SPARE_HANDSHAKES_WHEN_FULL = 2
MAX_FAILURES = 5
FAILURE_WINDOW_SECS = 60.0
COOLDOWN_SECS = 60.0


@dataclass
class _IpRecord:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "unix"


class Admission:
    def __init__(self, now: Callable[[], float], max_peers: int,
                 max_inflight: int = MAX_INFLIGHT_HANDSHAKES) -> None:
        self._now = now
        self.max_peers = max_peers
        self.max_inflight = max_inflight
        self.inflight = 0
        self._inflight_by_ip: dict[str, int] = {}
        self._ips: dict[str, _IpRecord] = {}
        #: Counters by reason, for logs and ``relay status``.
        self.rejections: dict[str, int] = {}

    def _count(self, reason: str) -> str:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        return reason

    def _expire(self, now: float) -> None:
        if len(self._ips) < 1024:
            stale = [ip for ip, r in self._ips.items()
                     if r.blocked_until <= now and (not r.failures
                                                    or now - r.failures[-1] > FAILURE_WINDOW_SECS)]
        else:  # under attack: still bounded
            stale = [ip for ip, r in self._ips.items() if r.blocked_until <= now]
        for ip in stale:
            del self._ips[ip]

    def check_accept(self, ip: str, connected_peers: int) -> str | None:
        """None to proceed, else the reason to drop the connection silently."""
        now = self._now()
        rec = self._ips.get(ip)
        if rec is not None and rec.blocked_until > now:
            return self._count("rate_limited")
        if self.inflight >= self.max_inflight:
            return self._count("too_many_handshakes")
        if (self._inflight_by_ip.get(ip, 0) >= MAX_INFLIGHT_PER_IP
                and not _is_loopback(ip)):
            return self._count("too_many_handshakes_from_ip")
        # When full, a couple of handshakes may still run: a connected peer
        # that restarted must be able to replace its own (stale) link.  After
        # authentication the mesh refuses anyone else.
        if connected_peers >= self.max_peers and (
                self.max_peers == 0 or self.inflight >= SPARE_HANDSHAKES_WHEN_FULL):
            return self._count("max_peers")
        return None

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
            log.warn("{ip}: {count} failed handshakes in {window:.0f} s; refused for {secs:.0f} s",
                     ip=ip, count=MAX_FAILURES, window=FAILURE_WINDOW_SECS, secs=COOLDOWN_SECS)
            return True
        return False

    def success(self, ip: str) -> None:
        self._ips.pop(ip, None)

    def blocked(self, ip: str) -> bool:
        rec = self._ips.get(ip)
        return rec is not None and rec.blocked_until > self._now()
