# -*- test-case-name: tests.test_session -*-
"""
What happens to frames on an authenticated link, sans I/O.

* Bad input never stalls a link (defect W2): a line that is not valid JSON,
  not an envelope, of an unknown type, or over 1 MiB is counted and skipped.
  A peer that sends :data:`MAX_BAD_STRIKES` bad lines in a row (with no good
  frame in between) is disconnected with a logged reason, and so is a link
  whose bad-frame ratio stays high: more than :data:`BAD_RATIO_LIMIT` of
  the last :data:`BAD_RATIO_WINDOW` lines bad (issue 11, item 2: one valid
  frame every 19 bad lines used to keep a link open forever).
* Log lines a peer causes are rate-limited per peer (:class:`LogGate`): the
  first :data:`LOG_BURST` in each :data:`LOG_INTERVAL_SECS`, then one summary
  with the number suppressed.
* Empty and whitespace-only lines are ignored (defect W3).
* The last :data:`DEDUP_CAPACITY` message ids are remembered **per peer**
  (defect W8); a repeated id is dropped.
* Liveness: any valid inbound frame counts (defect W4); see
  :class:`Liveness`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from claudectl.relay import codec
from claudectl.relay.codec import Envelope, ProtocolError

DEDUP_CAPACITY = 1000
#: Message ids longer than this are bad frames (claudectl's are ~20 bytes);
#: the dedup window keeps ids, so their size must be bounded.
MAX_ID_CHARS = 256
MAX_BAD_STRIKES = 20
#: The bad-frame ratio rule: a link is closed once more than half
#: (:data:`BAD_RATIO_LIMIT`) of its last :data:`BAD_RATIO_WINDOW` non-empty
#: lines were bad.
BAD_RATIO_WINDOW = 64
BAD_RATIO_LIMIT = 0.5
#: Per peer: this many log lines per interval, then one summary line.
LOG_BURST = 5
LOG_INTERVAL_SECS = 60.0
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

    def __init__(self, message: str, kind: str = "bad_frames_in_a_row") -> None:
        super().__init__(message)
        #: The counter it is reported under (``relay status`` rejections).
        self.kind = kind


class LogGate:
    """
    A per-peer budget for log lines: :data:`LOG_BURST` lines per
    :data:`LOG_INTERVAL_SECS` window.  :meth:`allow` says whether to log the
    next line, and how many earlier lines were suppressed (to be mentioned
    once, in the next line logged).
    """

    def __init__(self, burst: int = LOG_BURST, interval: float = LOG_INTERVAL_SECS) -> None:
        self.burst = burst
        self.interval = interval
        self._window_start: float | None = None
        self._logged = 0
        self._suppressed = 0
        #: Lines suppressed over the gate's whole life.
        self.suppressed_total = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """``(log it?, lines suppressed since the last line logged)``."""
        if self._window_start is None or now - self._window_start >= self.interval:
            self._window_start = now
            self._logged = 0
        if self._logged < self.burst:
            self._logged += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed
        self._suppressed += 1
        self.suppressed_total += 1
        return False, 0

    def pending(self) -> int:
        """Suppressed lines not yet reported (say so when the link closes)."""
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


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
    #: The peer's log budget (kept across its links, like the counters).
    log_gate: LogGate = field(default_factory=LogGate, repr=False, compare=False)


def _heartbeat_envelope(m: Any) -> Envelope:
    """The envelope of an ``EMPTY_HEARTBEAT_MATCH`` match (what ``decode`` gives)."""
    return Envelope(m[1].decode("ascii"), codec.HEARTBEAT, m[2].decode("ascii"), int(m[3]), {})


class FrameFilter:
    """Turns inbound lines of one authenticated link into envelopes to act on."""

    def __init__(
        self,
        dedup: Dedup,
        counters: LinkCounters,
        on_bad: Callable[[str], None] = lambda reason: None,
        max_strikes: int = MAX_BAD_STRIKES,
        now: Callable[[], float] = lambda: 0.0,
        on_suppressed: Callable[[int], None] = lambda count: None,
        ratio_window: int = BAD_RATIO_WINDOW,
        readers: Mapping[str, codec.PayloadReader] | None = None,
    ) -> None:
        """
        ``on_bad(reason)`` is called for the bad lines the peer's log budget
        allows.  ``on_suppressed(n)`` is the summary: ``n`` lines were not
        logged since the last one that was; it is called just before the next
        allowed ``on_bad`` and by :meth:`flush_suppressed` (when the link
        closes).
        """
        self.dedup = dedup
        self.counters = counters
        #: Payload readers by message type (codec.decode's ``readers``).
        self._readers = readers
        self._on_bad = on_bad
        self._on_suppressed = on_suppressed
        self._max_strikes = max_strikes
        self._now = now
        self._strikes = 0
        #: True for each recent bad line, False for each good one.
        self._recent: deque[bool] = deque(maxlen=ratio_window)
        self._recent_bad = 0

    def _remember(self, bad: bool) -> None:
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._recent_bad -= 1
        self._recent.append(bad)
        if bad:
            self._recent_bad += 1

    def ratio_exceeded(self) -> bool:
        window = self._recent.maxlen or 0
        return len(self._recent) >= window and self._recent_bad > window * BAD_RATIO_LIMIT

    def bad(self, reason: str) -> None:
        """Count one bad line; raise :class:`Disconnect` past the limits."""
        self.counters.bad_frames += 1
        key = reason.split(":", 1)[0]
        self.counters.reasons[key] = self.counters.reasons.get(key, 0) + 1
        self._strikes += 1
        self._remember(True)
        log_it, earlier = self.counters.log_gate.allow(self._now())
        if earlier:
            self._on_suppressed(earlier)
        if log_it:
            self._on_bad(reason)
        if self._strikes >= self._max_strikes:
            raise Disconnect(f"{self._strikes} bad frames in a row (last: {reason})")
        if self.ratio_exceeded():
            window = self._recent.maxlen
            raise Disconnect(
                f"{self._recent_bad} of the last {window} frames were bad (last: {reason})",
                kind="bad_frame_ratio",
            )

    def flush_suppressed(self) -> None:
        """Report lines suppressed since the last one logged (link closing)."""
        n = self.counters.log_gate.pending()
        if n:
            self._on_suppressed(n)

    def _good(self, n: int, nbytes: int) -> None:
        """``n`` valid frames in a row, ``nbytes`` in all (the rules' view of them)."""
        self.counters.bytes_in += nbytes
        self._strikes = 0
        window = self._recent.maxlen or 0
        if n >= window:
            self._recent.clear()
            self._recent.extend([False] * window)
            self._recent_bad = 0
        else:
            for _ in range(n):
                self._remember(False)
        self.counters.frames_in += n

    def feed_many(self, lines: list[bytes | None]) -> tuple[list[Envelope], Disconnect | None]:
        """
        The lines of one read, in bulk: the envelopes to act on, in order,
        and the :class:`Disconnect` that ended the read early, if any
        (``None`` lines are over-long ones).

        Empty heartbeats in the exact shape ``codec.encode`` writes skip the
        JSON parser, and a run of them in one read is delivered once (the
        last new one): each is still counted and remembered for dedup, and
        a heartbeat carries nothing but "alive" (issue 16).  Anything else
        goes through :meth:`feed`.
        """
        out: list[Envelope] = []
        counters = self.counters
        match = codec.EMPTY_HEARTBEAT_MATCH
        dedup = self.dedup
        ids, capacity = dedup._ids, dedup.capacity
        good = nbytes = 0
        last_hb: Any = None
        try:
            for line in lines:
                m = match(line) if line is not None else None
                if m is not None and (len(m[3]) < 20 or int(m[3]) <= codec.MAX_TIMESTAMP):
                    # The ids are at most 256 characters (MAX_ID_CHARS) here.
                    nbytes += len(m.string) + 1
                    good += 1
                    msg_id = m[1].decode("ascii")
                    if msg_id in ids:
                        counters.duplicates += 1
                    else:
                        ids[msg_id] = None
                        if len(ids) > capacity:
                            ids.popitem(last=False)
                        last_hb = m
                    continue
                if good:
                    self._good(good, nbytes)
                    good = nbytes = 0
                if last_hb is not None:
                    out.append(_heartbeat_envelope(last_hb))
                    last_hb = None
                if line is None:
                    self.bad("line too long")
                    continue
                env = self.feed(line)
                if env is not None:
                    out.append(env)
        except Disconnect as e:
            return out, e
        finally:
            if good:
                self._good(good, nbytes)
        if last_hb is not None:
            out.append(_heartbeat_envelope(last_hb))
        return out, None

    def feed(self, line: bytes) -> Envelope | None:
        self.counters.bytes_in += len(line) + 1
        if not line.strip():
            return None
        try:
            env = codec.decode(line, self._readers)
        except ProtocolError as e:
            self.bad(str(e))
            return None
        if len(env.id) > MAX_ID_CHARS:
            self.bad(f"message id longer than {MAX_ID_CHARS} characters")
            return None
        self._strikes = 0
        self._remember(False)
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
