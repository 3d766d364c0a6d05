# -*- test-case-name: tests.test_hive_answers -*-
"""
Pages of units, encoded once, and the answers to ``knowledge_request``
kept encoded (issue 16).

A :class:`Page` is one ``knowledge_sync`` or ``knowledge_snapshot`` frame's
worth of units (at most :data:`~claudectl.hive.units.SNAPSHOT_PAGE_BYTES` of
unit JSON): its payload spliced from the units' cached wire JSON and turned
into bytes once, and the ``id -> version`` map the sender's bookkeeping
needs, so marking a page in flight is a dict update, not a Python loop.

:class:`AnswerCache` keeps, per peer, the full answer to a
``{"since_epoch": 0}`` request: the units that may go to that peer and their
encoded snapshot pages.  Answering again costs a dict lookup and a write.
What an answer holds depends on

* the store (the list of units the gossip engine holds: a new list after
  every change),
* the sharing context (``[hive]`` settings, trust.json, exposure.json: a new
  :class:`~claudectl.hive.sharing.ShareContext` after every change),
* the peer (its id: units it originated, per-unit consent; its trust tier
  comes with the context),
* and the clock, which only ever takes units out: a unit expires
  (``knowledge_ttl_days``) or its consent does (``expires_at``).

So the cache is for one (store, context) pair -- anything else empties it
-- holds one entry per peer, and each entry is good until the first of its
units would expire.  Peers whose answers hold the same units share one set
of pages.  It never computes what a peer may have: the caller's ``select``
does, for that peer, on every miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from claudectl.hive.sharing import ShareContext
from claudectl.hive.units import DAY, SNAPSHOT_PAGE_BYTES, KnowledgeUnit, paginate
from claudectl.relay.codec import EncodedPayload

#: A unit and the bytes of its wire JSON (``KnowledgeUnit.wire_json``).
Encoded = tuple[KnowledgeUnit, int]

#: Encoded pages the cache keeps at most (distinct answers; peers with the
#: same answer share one copy).  Of a bigger answer only the selection is
#: kept (its pages are made again for each request).
MAX_CACHED_BYTES = 16 * 1024 * 1024
#: What keeping one unit of a selection without its pages is counted.
SELECTION_BYTES_PER_UNIT = 128
#: Peers the cache keeps an answer for at most.
MAX_CACHED_PEERS = 1024


def units_payload(head: dict[str, int], units: list[Encoded]) -> EncodedPayload:
    """
    A sync or snapshot payload, its frame text spliced from the units' cached
    JSON: byte for byte what the codec's sorted compact encoder writes (the
    ``head`` keys sort before ``"units"``).
    """
    text = ",".join(
        [f'"{k}":{v}' for k, v in sorted(head.items())]
        + ['"units":[' + ",".join([u.wire_json for u, _ in units]) + "]"]
    )
    # Only the bytes are kept (what the codec writes); ``json`` decodes them
    # again if someone asks.
    return EncodedPayload(
        {**head, "units": [u.wire_dict for u, _ in units]}, raw=("{" + text + "}").encode("utf-8")
    )


@dataclass(eq=False)
class Page:
    """One frame's units, what marking them in flight needs, and its last payload."""

    units: list[Encoded]
    #: unit id -> version: what marking the page in flight adds (one dict
    #: update; no tuple per unit).
    versions: dict[str, int] = field(init=False)
    #: Bytes of the units' wire JSON.
    nbytes: int = field(init=False)
    _head: dict[str, int] | None = field(default=None, init=False, repr=False)
    _payload: EncodedPayload | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.versions = {u.id: u.version for u, _ in self.units}
        self.nbytes = sum([n for _, n in self.units])

    def __len__(self) -> int:
        return len(self.units)

    def payload(self, head: dict[str, int]) -> EncodedPayload:
        """The frame payload with ``head`` (kept: a snapshot page's head never changes)."""
        if self._payload is None or self._head != head:
            self._payload = units_payload(head, self.units)
            self._head = dict(head)
        return self._payload

    def queued_at(self, when: float) -> Any:
        """``(id, when)`` pairs for a dict update."""
        return zip(self.versions, repeat(when))


def pages_of(units: list[Encoded]) -> list[Page]:
    """claudectl's paging (docs/gossip.md) over units whose sizes are already known."""
    return [Page(p) for p in paginate(units, SNAPSHOT_PAGE_BYTES, size=lambda item: item[1])]


@dataclass(eq=False)
class Answer:
    """The answer to one peer's ``since_epoch: 0`` request."""

    #: The units that may go to the peer, in store order.
    units: list[Encoded]
    #: The last ``now`` (seconds) at which every unit may still go: after
    #: it one has expired (None: no unit ever does).
    valid_until: int | None
    #: False: the pages are made for each use, not kept (a big answer).
    keep_pages: bool = True
    _pages: list[Page] | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, units: list[Encoded], ttl_days: int) -> Answer:
        return cls(units, _valid_until(units, ttl_days))

    @property
    def nbytes(self) -> int:
        """Bytes of the units' wire JSON (about what the encoded pages hold)."""
        return sum([n for _, n in self.units])

    @property
    def cost(self) -> int:
        """What keeping this answer is counted: its pages' bytes, or its
        selection's (:data:`SELECTION_BYTES_PER_UNIT` a unit) when its pages
        are not kept."""
        return self.nbytes if self.keep_pages else SELECTION_BYTES_PER_UNIT * len(self.units)

    @property
    def pages(self) -> list[Page]:
        """
        The snapshot pages (one empty page when there is nothing).  Each is
        encoded when it is first sent and keeps its payload (its head never
        changes): a big answer's pages are encoded one per reactor turn, as
        the gossip engine sends them, not all at once.  Kept for later
        requests unless ``keep_pages`` is off (then made for each use).
        """
        if self._pages is not None:
            return self._pages
        pages = pages_of(self.units) or [Page([])]
        if self.keep_pages:
            self._pages = pages
        return pages

    def good_at(self, now: int) -> bool:
        return self.valid_until is None or now <= self.valid_until


def _valid_until(units: list[Encoded], ttl_days: int) -> int | None:
    """
    When the first unit of ``units`` stops being shareable by the clock alone
    (:meth:`ShareContext.shareable_units` leaves a unit out once
    ``now - ttl > last_validated_at``, and its consent once
    ``now > expires_at``).
    """
    limits = []
    if ttl_days and units:
        limits.append(min([u.last_validated_at for u, _ in units]) + ttl_days * DAY)
    expiries = [
        u.sharing_consent.expires_at
        for u, _ in units
        if u.sharing_consent is not None and u.sharing_consent.expires_at is not None
    ]
    if expiries:
        limits.append(min(expiries))
    return min(limits) if limits else None


class AnswerCache:
    """Per-peer encoded answers to ``since_epoch: 0`` for one store and sharing context."""

    def __init__(
        self, max_bytes: int = MAX_CACHED_BYTES, max_peers: int = MAX_CACHED_PEERS
    ) -> None:
        self.max_bytes = max_bytes
        self.max_peers = max_peers
        self._store: list[KnowledgeUnit] | None = None
        self._ctx: ShareContext | None = None
        self._by_peer: dict[str, Answer] = {}
        #: The units of an answer (their object ids) -> that answer, shared by peers.
        self._by_units: dict[tuple[int, ...], Answer] = {}
        self._bytes = 0
        #: Answers built (misses) and served from the cache (hits).
        self.built = 0
        self.hits = 0

    def clear(self) -> None:
        self._by_peer.clear()
        self._by_units.clear()
        self._bytes = 0

    def forget(self, peer_id: str) -> None:
        """Drop one peer's entry (its shared pages stay while others use them)."""
        self._by_peer.pop(peer_id, None)

    def answer(
        self,
        peer_id: str,
        store: list[KnowledgeUnit],
        ctx: ShareContext,
        now: int,
        select: Callable[[], list[Encoded]],
    ) -> Answer:
        """
        ``peer_id``'s answer: from the cache when it was made for this very
        ``store`` list and ``ctx`` object and no unit of it has expired by
        ``now``; else ``select()`` (the units that may go to ``peer_id`` now)
        is encoded into pages and kept.
        """
        if store is not self._store or ctx is not self._ctx:
            self.clear()
            self._store, self._ctx = store, ctx
        hit = self._by_peer.get(peer_id)
        if hit is not None and hit.good_at(now):
            self.hits += 1
            return hit
        units = select()
        key = tuple([id(u) for u, _ in units])
        shared = self._by_units.get(key)
        if shared is not None:
            # The same units as another peer's answer: the same pages.  (Good
            # at ``now``: every unit ``select`` kept is shareable now.)
            self._keep(peer_id, shared)
            return shared
        self.built += 1
        answer = Answer.of(units, ctx.config.knowledge_ttl_days)
        if answer.cost > self.max_bytes:
            # Too big to keep encoded: keep what to send (the selection over
            # the whole store is most of an answer's cost), page it each time.
            answer.keep_pages = False
        size = answer.cost
        if size > self.max_bytes:
            return answer  # answered uncached
        if self._bytes + size > self.max_bytes:
            self.clear()
        self._by_units[key] = answer
        self._bytes += size
        self._keep(peer_id, answer)
        return answer

    def _keep(self, peer_id: str, answer: Answer) -> None:
        if peer_id not in self._by_peer and len(self._by_peer) >= self.max_peers:
            self.clear()
            self._by_units[tuple([id(u) for u, _ in answer.units])] = answer
            self._bytes = answer.cost
        self._by_peer[peer_id] = answer


__all__ = ["Answer", "AnswerCache", "Encoded", "Page", "pages_of", "units_payload"]
