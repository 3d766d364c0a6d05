# -*- test-case-name: tests.test_session -*-
"""
What happens to frames on an authenticated link, sans I/O.

* Bad input never stalls a link (defect W2): a line that is not valid JSON,
  not an envelope, of an unknown type, or over 1 MiB is counted and skipped.
  A peer that sends :data:`MAX_BAD_STRIKES` bad lines in a row (with no good
  frame in between) is disconnected with a logged reason.
* Empty and whitespace-only lines are ignored (defect W3).
* The last :data:`DEDUP_CAPACITY` message ids are remembered **per peer**
  (defect W8); a repeated id is dropped.
* Liveness: any valid inbound frame counts (defect W4); see
  :class:`Liveness`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from claudectl.relay import codec
from claudectl.relay.codec import Envelope, ProtocolError

DEDUP_CAPACITY = 1000
#: Message ids longer than this are bad frames (claudectl's are ~20 bytes);
#: the dedup window keeps ids, so their size must be bounded.
MAX_ID_CHARS = 256
MAX_BAD_STRIKES = 20
#: A link is dead after this many heartbeat intervals without inbound traffic.
MISSED_INTERVALS = 3


class Dedup:
    """A FIFO set of the last ``capacity`` ids."""

    def __init__(self, capacity: int = DEDUP_CAPACITY) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, msg_id: str) -> bool:
        """True if ``msg_id`` was seen recently; otherwise remember it."""
        if msg_id in self._ids:
            return True
        self._ids[msg_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._ids


class Disconnect(Exception):
    """The peer misbehaved often enough that the link should close."""


@dataclass
class LinkCounters:
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    bad_frames: int = 0
    duplicates: int = 0
    ignored: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class FrameFilter:
    """Turns inbound lines of one authenticated link into envelopes to act on."""

    def __init__(self, dedup: Dedup, counters: LinkCounters,
                 on_bad: Callable[[str], None] = lambda reason: None,
                 max_strikes: int = MAX_BAD_STRIKES) -> None:
        self.dedup = dedup
        self.counters = counters
        self._on_bad = on_bad
        self._max_strikes = max_strikes
        self._strikes = 0

    def bad(self, reason: str) -> None:
        """Count one bad line; raise :class:`Disconnect` past the limit."""
        self.counters.bad_frames += 1
        key = reason.split(":", 1)[0]
        self.counters.reasons[key] = self.counters.reasons.get(key, 0) + 1
        self._strikes += 1
        self._on_bad(reason)
        if self._strikes >= self._max_strikes:
            raise Disconnect(f"{self._strikes} bad frames in a row (last: {reason})")

    def feed(self, line: bytes) -> Envelope | None:
        self.counters.bytes_in += len(line) + 1
        if not line.strip():
            return None
        try:
            env = codec.decode(line)
        except ProtocolError as e:
            self.bad(str(e))
            return None
        if len(env.id) > MAX_ID_CHARS:
            self.bad(f"message id longer than {MAX_ID_CHARS} characters")
            return None
        self._strikes = 0
        self.counters.frames_in += 1
        if env.msg_type in codec.HANDSHAKE_TYPES:
            self.counters.ignored += 1
            return None
        if self.dedup.seen(env.id):
            self.counters.duplicates += 1
            return None
        return env


class Liveness:
    """
    Tracks the last inbound traffic of a link.  ``dead()`` is true once more
    than ``MISSED_INTERVALS`` heartbeat intervals passed without any.
    """

    def __init__(self, now: Callable[[], float], interval: float) -> None:
        self._now = now
        self.interval = interval
        self.last_rx = now()

    @property
    def deadline(self) -> float:
        return self.interval * MISSED_INTERVALS

    def touch(self) -> None:
        self.last_rx = self._now()

    def remaining(self) -> float:
        return self.last_rx + self.deadline - self._now()

    def dead(self) -> bool:
        return self.remaining() < 0
