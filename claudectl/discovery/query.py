# -*- test-case-name: tests.test_discovery_query -*-
"""
Discovery on demand: the query a scanner broadcasts and the rules by which a
running instance answers it (sans-IO; :mod:`.protocol` does the sockets).

claudectl only announces (every 10 s, when it announces at all), so a 3 s
scan hears about a third of the instances.  Our scanner therefore also
broadcasts a *query* to ``lan_broadcast_port + 1`` (9849), and every running
instance of this project answers at once, by unicast to the query's source
address and port, with its ordinary beacon (``CCTL{...}``).

The query is ``CCTQ`` followed by a JSON object, padded with spaces to
:data:`QUERY_BYTES`::

    CCTQ{"v":1}                                        ...(spaces to 256 bytes)

* It can never be mistaken for an instance: claudectl's scanner needs the
  ``CCTL`` magic (and listens on 9848, not 9849), and so does ours.
* The answer cannot amplify: an instance answers only when its beacon is no
  longer than the query, only to source ports 1024-65535, and at most
  :data:`ANSWERS_PER_SOURCE` times per :data:`ANSWER_WINDOW_SECS` per source
  IP (and :data:`ANSWERS_TOTAL` in all), so a spoofed flood turns into at
  most as many bytes, at a bounded rate, towards its victim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from claudectl.discovery.beacon import MAX_DATAGRAM_BYTES, BeaconError, loads_bounded

QUERY_MAGIC = b"CCTQ"
#: What we send: ``CCTQ{"v":1}`` padded with spaces to this many bytes.
QUERY_BYTES = 256
#: Ports below this never get an answer (0 and the well-known services).
MIN_SOURCE_PORT = 1024
ANSWER_WINDOW_SECS = 10.0
ANSWERS_PER_SOURCE = 8
ANSWERS_TOTAL = 256
#: Source IPs remembered at once; when full, new sources get no answer.
MAX_TRACKED_SOURCES = 1024


def query_port(broadcast_port: int) -> int | None:
    """Where queries go: the announcement port + 1 (None when there is none)."""
    if not 0 < broadcast_port < 65535:
        return None
    return broadcast_port + 1


def encode_query() -> bytes:
    """The query datagram we send, :data:`QUERY_BYTES` long."""
    body = QUERY_MAGIC + b'{"v":1}'
    return body + b" " * (QUERY_BYTES - len(body))


def parse_query(data: bytes) -> None:
    """Return if ``data`` is a query, else raise :class:`BeaconError`."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise BeaconError("oversized")
    if len(data) < len(QUERY_MAGIC) + 1 or not data.startswith(QUERY_MAGIC):
        raise BeaconError("no magic")
    if not isinstance(loads_bounded(data[len(QUERY_MAGIC) :]), dict):
        raise BeaconError("not an object")


@dataclass
class _Window:
    start: float
    count: int


class AnswerLimiter:
    """Per-source and total answer budgets over a fixed window."""

    def __init__(
        self,
        per_source: int = ANSWERS_PER_SOURCE,
        total: int = ANSWERS_TOTAL,
        window: float = ANSWER_WINDOW_SECS,
        max_sources: int = MAX_TRACKED_SOURCES,
    ) -> None:
        self.per_source = per_source
        self.window = window
        self.max_sources = max_sources
        self._total = _Window(float("-inf"), 0)
        self._total_limit = total
        self._sources: OrderedDict[str, _Window] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._sources:
            host, w = next(iter(self._sources.items()))
            if now - w.start < self.window:
                break
            del self._sources[host]

    def allow(self, host: str, now: float) -> bool:
        """Whether one more answer to ``host`` fits the budgets (and count it)."""
        if now - self._total.start >= self.window:
            self._total = _Window(now, 0)
        if self._total.count >= self._total_limit:
            return False
        self._expire(now)
        w = self._sources.get(host)
        if w is None:
            if len(self._sources) >= self.max_sources:
                return False
            w = self._sources[host] = _Window(now, 0)
        if w.count >= self.per_source:
            return False
        w.count += 1
        self._total.count += 1
        return True


class QueryAnswerer:
    """
    Decides, for one received datagram, what to send back (sans-IO).

    :meth:`answer` returns the bytes to send to the datagram's source, or
    None; ``dropped`` counts the reasons for None and ``last_drop`` names the
    latest.  ``beacon()`` is called only for a well-formed query.
    """

    def __init__(self, limiter: AnswerLimiter | None = None) -> None:
        self.limiter = limiter or AnswerLimiter()
        self.answered = 0
        self.dropped: dict[str, int] = {}
        self.last_drop = ""

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.last_drop = reason

    def answer(
        self, data: bytes, source: tuple[str, int], beacon: Callable[[], bytes | None], now: float
    ) -> bytes | None:
        try:
            parse_query(data)
        except BeaconError as e:
            self._drop(e.reason)
            return None
        reply = beacon()
        if reply is None:
            self._drop("not listening yet")
            return None
        if not MIN_SOURCE_PORT <= source[1] <= 65535:
            self._drop("source port")
            return None
        if len(reply) > len(data):
            self._drop("query too short")
            return None
        if not self.limiter.allow(source[0], now):
            self._drop("rate limited")
            return None
        self.answered += 1
        return reply
