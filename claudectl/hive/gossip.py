# -*- test-case-name: tests.test_gossip -*-
"""
Hive gossip: knowledge spreads across the mesh, local always wins
(docs/gossip.md).

One mechanism does all the sending -- a *push round* to a peer: every unit
of the store that may go to that peer and whose ``(id, version)`` that peer
has not had from us yet goes out in ``knowledge_sync`` frames (pages of at
most 512,000 bytes of unit JSON).  Push rounds run when a link comes up,
when ``knowledge.jsonl`` changes (distillation, import, forget -- by any
process), and after a batch from a peer was merged (which is how accepted
units travel on).  What each peer is known to have (id -> version) and
the request cursors live in ``sync_state.json``, so a restart neither
resends everything nor misses an update.  A unit counts as delivered only
when the peer has it: a peer of this project acknowledges what it merged
(``ack`` frames), a claudectl 0.64 ``relay serve`` we dialed has it once the
link outlived its liveness deadline, and a claudectl ``connect``/``join``
client (it only prints knowledge frames) is sent nothing.  What is still in
flight when a link drops or the service restarts is offered again.

Receiving: each unit of a batch is validated on its own (a bad unit is
rejected, logged and counted; the rest are merged -- defect H5), gets
``propagation_count + 1``, passes the per-peer daily rate cap, and is merged
with the store's rules (local always wins, conflicts logged); the cap
counts new units only.  A unit received from a peer counts as sent to that
peer, so it is never echoed back.  Snapshot pages are buffered in bytes,
with a per-peer budget per request.  Only units that may leave the machine
are ever sent, in syncs and in snapshots (defect H4), and only while
``propagation_count < max_propagation`` and not older than
``knowledge_ttl_days``.

After authentication each side asks the other with ``knowledge_request``
``{"since_epoch": cursor}`` -- claudectl 0.64 never asks nor pushes by
itself (H1), but it answers requests and accepts syncs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from claudectl.atomic import atomic_write, locked
from claudectl.changes import ChangeWatcher
from claudectl.config import Config, HiveConfig
from claudectl.filesig import Signature, signature
from claudectl.hive.answers import AnswerCache, Encoded, Page, pages_of
from claudectl.hive.delivery import DeliveryBook, DeliveryFile, fingerprint
from claudectl.hive.merge import (
    ACCEPTED,
    CLUSTER_UNIONED,
    DUPLICATE,
    UPDATED,
    BatchResult,
    merge_batch,
    merge_unit,
    write_merge_logs,
)
from claudectl.hive.sharing import EXPOSURE, ShareContext, ShareContexts, precompute_verdicts
from claudectl.hive.store import (
    KNOWLEDGE,
    MODE,
    held_by_key,
    hive_active,
    hive_file,
    last_contact,
    read_units_file,
    remember_lines,
    store_transaction,
)
from claudectl.hive.trust import (
    TrustBook,
    any_collision,
    load_trust,
    log_collisions,
    trust_transaction,
)
from claudectl.hive.units import (
    SNAPSHOT_PAGE_BYTES,
    ApproachCluster,
    KnowledgeUnit,
    UnitError,
    dumps_pretty,
    paginate,
)
from claudectl.hive.wireunits import Prechecked, read_units_payload
from claudectl.home import Home
from claudectl.logbudget import LogBudget
from claudectl.relay import codec
from claudectl.relay.codec import Envelope
from claudectl.relay.interfaces import IMesh
from claudectl.relay.keystore import KeyStore, is_remote_peer_id
from claudectl.statestore import StateWriter, bulk_work, logged

log = Logger()

SYNC_STATE = "sync_state.json"
TRUST = "trust.json"
#: sync_state.json is written at most this often (and when the service
#: stops), not once per request: a lost update only costs resends.
STATE_SAVE_SECS = 5.0
#: Without change notices (no watcher): how often knowledge.jsonl is stat()ed.
POLL_SECS = 3.0
#: After a link to a peer of this project comes up we answer its
#: knowledge_request first; a push round follows after this delay in case the
#: peer never asks.
LINKUP_PUSH_DELAY_SECS = 3.0
#: Snapshot pages are merged together; a page set still incomplete after
#: this long is merged as it is.
SNAPSHOT_FLUSH_SECS = 10.0
#: Receive counts and tallies of a merge that wrote no trust.json (all but
#: a crossed cap or a collision) reach it within this.
RECORD_FLUSH_SECS = 5.0
#: A unit whose JSON would not fit in one frame (1 MiB line limit, minus
#: room for the envelope) is never sent (defect H6).
MAX_UNIT_BYTES = codec.MAX_LINE_BYTES - 16_384
#: A batch of at least this many units is worked through with the cyclic
#: garbage collector paused (see :func:`_collector_paused`).
BULK_UNITS = 100
#: Batches waiting for the merge before them are merged together, in one
#: store transaction, up to this many units.
COALESCE_UNITS = 100_000
#: The stored units of a big merge are encoded for sending once no batch
#: waited for this long (see :meth:`Gossip._warm_when_quiet`).
WARM_QUIET_SECS = 0.25
#: How often the service checks the brain's decision log (distil every 10).
DISTILL_POLL_SECS = 5.0
#: Forward before the durable write: a batch of at most this many units is
#: validated and decided on the reactor as it arrives, and the units it
#: brings that are new are passed on at once, while the writer thread makes
#: them durable (see :meth:`Gossip._forward_early`, docs/gossip.md).
FORWARD_MAX_UNITS = 16
#: Units decided early and not yet written, at most (the overlay's bound).
FORWARD_MAX_PENDING = 10_000
#: The store's index by semantic key (for early decisions) is built on the
#: reactor up to this many units (about 1 ms); a bigger store's on the
#: writer thread (issue 13's stall budget), early forwarding waiting for it.
FORWARD_INDEX_INLINE = 5_000

# --- bounds against hostile peers (docs/security.md, "Bounds against hostile peers") ---
#: Snapshot pages buffered for one peer are merged once they are charged this
#: much, so the buffer of a peer never holds much more than this.
SNAPSHOT_FLUSH_BYTES = 4 * 1024 * 1024
#: What the snapshot pages answering one of our requests may be charged in
#: all; a peer crossing it loses its buffered pages and the link.
SNAPSHOT_BUDGET_BYTES = 64 * 1024 * 1024
#: Charged per entry of a page on top of its JSON (an empty list ``[]`` is 2
#: bytes on the wire but a Python object of ~56), and per page.
SNAPSHOT_ENTRY_CHARGE = 64
SNAPSHOT_PAGE_CHARGE = 16 * 1024
#: (id, version) pairs per ``ack`` frame.
ACK_MAX_PAIRS = 4096
#: A peer's received batches waiting to be merged may be charged this much
#: (their frames' bytes and NODE_CHARGE per value in them) before its link
#: is no longer read (see :meth:`Gossip._charge`); reading goes on at half
#: of it.
HOLD_BYTES = 32 * 1024 * 1024
#: What a value of a received frame (``Envelope.wire_nodes``) is charged
#: beyond its bytes: about what a small one costs in memory once parsed.
NODE_CHARGE = 64

#: Units evicted as they were stored remembered (see ``Gossip._gone``), and
#: for how long: the weights that ranked them decay, the store changes.
GONE_MAX = 4096
GONE_SECS = 3600

#: What ranks a unit for eviction by ``max_units`` (see
#: :func:`~claudectl.hive.store.compact`): another unit under the same id and
#: version that weighs more is not the unit that was evicted.
EvictionKey = tuple[str, int, float, int, int, int]


def eviction_key(unit: KnowledgeUnit) -> EvictionKey:
    return (
        unit.id,
        unit.version,
        unit.confidence,
        unit.evidence_count,
        unit.last_validated_at,
        unit.interval(),
    )


#: Seconds in a (UTC) day: the daily cap's unit.
DAY = 86400
#: A peer may have this many bytes written to it and not taken by the kernel
#: (it is not reading) before the rest of an answer waits and its further
#: knowledge_requests are held (one per peer, the latest; see
#: :meth:`Gossip.on_request`).
BACKLOG_BYTES = 4 * 1024 * 1024
#: How often a held answer or request looks again at a peer's backlog.
BACKLOG_RETRY_SECS = 0.25
#: Acks to a peer wait this long and go in one frame (see :meth:`Gossip._ack`).
ACK_DELAY_SECS = 0.5
#: Warnings a peer's bad input causes (invalid units, the daily cap): at most
#: this many lines per peer per minute, then one "suppressed" line.
PEER_WARNINGS_PER_MINUTE = 10


def _more_bad_knowledge(peer_id: str) -> None:
    log.info("{peer_id}: more bad knowledge this minute; not logging it", peer_id=peer_id)


#: How a link delivers what we send (see ``Gossip.delivery``).
ACKS = "acks"  # a peer of this project: delivered when it acknowledges
SERVES = "serves"  # a claudectl 0.64 ``relay serve`` we dialed: merges syncs
PRINTS = "prints"  # a claudectl 0.64 ``connect``/``join`` client: only prints them


@dataclass
class PeerSync:
    peer_id: str
    last_sync_epoch: int = 0
    #: unit id -> version this peer has had from us (or sent us).
    sent: dict[str, int] = field(default_factory=dict)
    #: ``since_epoch`` of our next knowledge_request to this peer.
    cursor: int = 0
    units_up: int = 0
    units_down: int = 0
    bytes_up: int = 0
    rejected: int = 0
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        # claudectl's three keys first (it reads only those), ours after.
        return {
            "peer_id": self.peer_id,
            "last_sync_epoch": self.last_sync_epoch,
            "units_sent": sorted(self.sent),
            "sent_versions": dict(sorted(self.sent.items())),
            "cursor": self.cursor,
            "stats": {
                "units_up": self.units_up,
                "units_down": self.units_down,
                "bytes_up": self.bytes_up,
                "rejected": self.rejected,
                "dropped": self.dropped,
            },
        }

    @classmethod
    def from_json(cls, peer_id: str, value: Any) -> PeerSync:
        if not isinstance(value, dict):
            return cls(peer_id)
        sent: dict[str, int] = {}
        versions = value.get("sent_versions")
        if isinstance(versions, dict):
            sent = {k: v for k, v in versions.items() if isinstance(k, str) and isinstance(v, int)}
        else:
            # A claudectl file: ids only, no versions (0 = resend newer versions).
            ids = value.get("units_sent")
            if isinstance(ids, list):
                sent = {i: 0 for i in ids if isinstance(i, str)}
        stats = value.get("stats") if isinstance(value.get("stats"), dict) else {}

        def n(d: Any, k: str) -> int:
            v = d.get(k, 0) if isinstance(d, dict) else 0
            return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

        return cls(
            peer_id,
            n(value, "last_sync_epoch"),
            sent,
            n(value, "cursor"),
            n(stats, "units_up"),
            n(stats, "units_down"),
            n(stats, "bytes_up"),
            n(stats, "rejected"),
            n(stats, "dropped"),
        )


class SyncState:
    """``$HIVE/sync_state.json``: per peer what was sent and where to resume."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.path = hive_file(home, SYNC_STATE)
        self.peers: dict[str, PeerSync] = {}
        self.load()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (ValueError, UnicodeDecodeError, OSError) as e:
            log.warn("ignoring unreadable {path}: {error}", path=str(self.path), error=str(e))
            return
        if isinstance(data, dict):
            self.peers = {
                k: PeerSync.from_json(k, v) for k, v in data.items() if isinstance(k, str)
            }

    def peer(self, peer_id: str) -> PeerSync:
        ps = self.peers.get(peer_id)
        if ps is None:
            ps = self.peers[peer_id] = PeerSync(peer_id)
        return ps

    def snapshot(self) -> list[PeerSync]:
        """A copy to hand to the writer thread (the reactor goes on changing its own)."""
        return [dataclasses.replace(v, sent=dict(v.sent)) for v in self.peers.values()]

    @staticmethod
    def encode(peers: list[PeerSync]) -> bytes:
        data = {p.peer_id: p.to_json() for p in sorted(peers, key=lambda p: p.peer_id)}
        # json.dumps(data, indent=2, ensure_ascii=False), without the pure-Python
        # encoder's cost per id (a second for 50,000 units sent and received).
        return dumps_pretty(data).encode("utf-8")

    def write(self, peers: list[PeerSync]) -> None:
        """Encode and write a snapshot (on the writer thread)."""
        data = self.encode(peers)
        with locked(self.path):
            # A lost update only costs resends that the receiver's merge drops.
            atomic_write(self.path, data, mode=0o600, durable=False)

    def save(self) -> None:
        self.write(self.snapshot())


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _unit_bytes(unit_json: Any) -> int:
    return len(_COMPACT(unit_json).encode("utf-8"))


def _units_bytes(raw_units: list[Any]) -> int:
    """About the bytes of received units' JSON (a unit read from its text:
    its line's)."""
    plain = [r for r in raw_units if type(r) is not Prechecked]
    lines = sum(len(r.line) for r in raw_units if type(r) is Prechecked)
    return lines + (_unit_bytes(plain) if plain else 0)


def _paginate(encoded: list[Encoded]) -> list[list[Encoded]]:
    """claudectl's paging over units whose sizes are already known (``Encoded``:
    a unit and the bytes of its wire JSON, cached on the unit)."""
    return paginate(encoded, SNAPSHOT_PAGE_BYTES, size=lambda item: item[1])


@contextlib.contextmanager
def _collector_paused(units: int) -> Iterator[None]:
    """
    Pause the cyclic garbage collector while a big batch is validated and
    merged.  The batch allocates several objects per unit, so the collector
    would run again and again over every object the service holds (the
    stored units included): a 50,000-unit snapshot spent about a third of its
    time there.  Units hold no reference cycles; whatever cyclic garbage the
    batch leaves is collected once the collector runs again.
    """
    if units < BULK_UNITS or not gc.isenabled():
        yield
        return
    with bulk_work():  # also keeps the merged units out of later collections
        yield


def _warm_wire(units: list[KnowledgeUnit]) -> None:
    """
    Encode the units' wire JSON now (on the writer thread) that the next
    push round or snapshot would otherwise encode on the reactor: 10,000
    freshly imported units took the loop about 100 ms in one turn.  Cached
    per unit object, so units already encoded cost a lookup.
    """
    for u in units:
        if "wire_size" not in u.__dict__:
            try:
                u.wire_size  # noqa: B018  # fills the cached properties
            except ValueError:
                pass  # not encodable: _sendable leaves it out


def _in_bulk(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as :func:`bulk_work` (on the writer thread)."""
    with bulk_work():
        return fn(*args, **kwargs)


#: Peer names seen well-formed lately (a snapshot's units mostly share a few).
_GOOD_NAMES: set[str] = set()


def _good_name(name: str) -> bool:
    if name in _GOOD_NAMES:
        return True
    if not is_remote_peer_id(name):
        return False
    if len(_GOOD_NAMES) >= 4096:
        _GOOD_NAMES.clear()
    _GOOD_NAMES.add(name)
    return True


def check_peer_fields(unit: KnowledgeUnit) -> None:
    """
    Refuse (UnitError) a received unit whose origin (``source_peer``) or a
    cluster variant's ``contributing_peers`` is not a well-formed peer id:
    such a name could never be a peer we trust, and it is shown to people.
    """
    if not _good_name(unit.source_peer):
        raise UnitError(f"source_peer {unit.source_peer[:80]!r} is not a valid peer id")
    if isinstance(unit.content, ApproachCluster):
        for v in unit.content.variants:
            for p in v.contributing_peers:
                if not _good_name(p):
                    raise UnitError(f"contributing_peers entry {p[:80]!r} is not a valid peer id")


def record_deliveries(
    file: DeliveryFile,
    existing: dict[str, KnowledgeUnit],
    merged: list[tuple[str, BatchResult]],
    stored: list[KnowledgeUnit],
) -> None:
    """
    Remember each batch's peer as the deliverer of every unit that batch
    stored (``merged``: (peer, result) in the order merged into ``existing``;
    ``delivery.json``, written once; call it holding the store's lock).  A
    unioned cluster keeps the deliverers of the cluster it was merged into
    as well.
    """
    book = file.load()
    current = dict(existing)
    for peer_id, result in merged:
        _record_batch(book, current, peer_id, result)
    book.keep_only(stored)
    if book.changed:
        file.save(book)


def _record_batch(
    book: DeliveryBook, current: dict[str, KnowledgeUnit], peer_id: str, result: BatchResult
) -> None:
    for inc, outcome in result.outcomes:
        unit = outcome.store
        if unit is None:
            held = current.get(inc.semantic_key)
            if (
                outcome.result == DUPLICATE
                and inc.source_peer == peer_id
                and held is not None
                and fingerprint(held) == fingerprint(inc)
            ):
                # The origin itself sent what we hold: the best path there is.
                book.record(held, (peer_id,))
            continue
        via: tuple[str, ...] = (peer_id,)
        prior = current.get(unit.semantic_key)
        if outcome.result == CLUSTER_UNIONED and prior is not None:
            via = (*_delivered_by(book, prior), peer_id)
        book.record(unit, via)
        current[unit.semantic_key] = unit


def _delivered_by(book: DeliveryBook, unit: KnowledgeUnit) -> tuple[str, ...]:
    # No entry: the unit counts as delivered by its origin.
    return book.deliverers(unit) or (unit.source_peer,)


def validate_batch(raw_units: list[Any]) -> tuple[list[KnowledgeUnit], int, str]:
    """
    A peer's units, each checked on its own: (good ones, how many bad, the
    first error).  A unit read from its canonical text (:class:`Prechecked`)
    is checked already but for its origin.
    """
    good: list[KnowledgeUnit] = []
    bad = 0
    first_error = ""
    for n, raw in enumerate(raw_units):
        try:
            if type(raw) is Prechecked:
                unit = raw.unit
                check_peer_fields(unit)
                good.append(unit)
                continue
            # One more hop: the count it is stored and passed on with.
            unit = KnowledgeUnit.from_json(raw, hops=1)
            check_peer_fields(unit)
        except Exception as e:  # UnitError, or anything a hostile value provokes
            bad += 1
            if not first_error:
                first_error = f"#{n}: {str(e)[:200]}"
            continue
        good.append(unit)
    return good, bad, first_error


def _lines_stored(
    batches: list[tuple[str, list[Any]]], merged: list[tuple[str, Any, BatchResult, Any]]
) -> list[Prechecked]:
    """The lines that came with units the merges store (for the store's
    write; units not stored leave nothing behind in its caches)."""
    came = {id(p.unit): p for _, raw in batches for p in raw if type(p) is Prechecked}
    if not came:
        return []
    out = []
    for _, _, result, _ in merged:
        for _, outcome in result.outcomes:
            p = came.get(id(outcome.store))
            if p is not None and p.unit is outcome.store:
                out.append(p)
    return out


def _mark_sent(sent: dict[str, int], units: list[KnowledgeUnit]) -> None:
    """The peer has these units (id, version): never echo them back to it."""
    get = sent.get
    for u in units:
        version = u.version
        if get(u.id, -1) < version:
            sent[u.id] = version


def _id_version(raw: Any) -> tuple[Any, Any] | None:
    """A received unit's (id, version) before it is checked; None: not an object."""
    if type(raw) is Prechecked:
        return raw.unit.id, raw.unit.version
    if isinstance(raw, dict):
        key = raw.get("id"), raw.get("version")
        if type(key[0]) is str and type(key[1]) is int:  # (a list would not hash)
            return key
    return None


def _all_known(
    stored: Mapping[str, KnowledgeUnit] | None,
    units: list[KnowledgeUnit],
    peer_id: str,
    recorded: Container[str] = (),
    gone: frozenset[EvictionKey] = frozenset(),
) -> bool:
    """True when every unit is already stored (``stored``: the store by
    semantic key) at that version by no shorter path (and none comes straight
    from its origin while ``delivery.json`` has an entry for its id --
    ``recorded`` -- that this better path would remove), or was evicted by
    ``max_units`` as it was stored (``gone``: it would be again, whoever
    sends it).  A batch of new units is told at its first unit."""
    if stored is None:
        return False
    for u in units:
        if gone and eviction_key(u) in gone:
            continue
        if u.source_peer == peer_id and u.id in recorded:
            return False  # from its origin: its delivery record may improve
        h = stored.get(u.semantic_key)
        if (
            h is None
            or h.id != u.id
            or h.version < u.version
            or (h.version == u.version and h.propagation_count > u.propagation_count)
        ):
            return False
    return True


def _held_at(
    get: Callable[[str], KnowledgeUnit | None], units: list[KnowledgeUnit]
) -> dict[str, KnowledgeUnit]:
    """What a store (``get`` by semantic key) holds at the keys of ``units``."""
    held = {}
    for u in units:
        h = get(u.semantic_key)
        if h is not None:
            held[u.semantic_key] = h
    return held


def _stored_by_key(
    path: Any, cache: tuple[Any, list[KnowledgeUnit]] | None, sig: Any
) -> Mapping[str, KnowledgeUnit] | None:
    """The store by semantic key without reading it: what this process left
    in the file, else the reactor's copy if it is current; else None."""
    held = held_by_key(path)
    if held is not None:
        return held
    if cache is None or cache[0] is None or cache[0] != sig:
        return None
    return {u.semantic_key: u for u in cache[1]}


#: Receive counts by (peer id, UTC day number): a count is booked on the day
#: its units came, whenever it is written.
DayCounts = dict[tuple[str, int], int]


@dataclass
class _Job:
    """What a merge job takes from the reactor besides its batches, and the
    trust.json it wrote (if any), read by the reactor once it is back."""

    #: The receive counts so far (written with trust.json when the job
    #: writes it; else they go back to the reactor's tally).
    counts: DayCounts
    #: Each peer's last contact, for the store's bounds: the reactor's copy
    #: of trust.json, and now for the peers heard from since it was written.
    contact: dict[str, int]
    #: Units the store's bounds evicted as they were stored (``Gossip._gone``).
    gone: frozenset[EvictionKey] = frozenset()
    #: trust.json as the job wrote it, or None.
    book: TrustBook | None = None


@dataclass
class _Commit:
    """What the writer thread did with one batch."""

    #: Receive counts not written (they go back to the reactor's tally).
    counts: DayCounts
    good: list[KnowledgeUnit]
    bad: int
    first_error: str
    #: (merge result, the store's units, its file signature, trust.json as
    #: written or None when it was not) if the store was written.
    committed: tuple[BatchResult, list[KnowledgeUnit], Any, TrustBook | None] | None = None
    #: Per peer [units accepted or updated, units conflicted] not written to
    #: trust.json yet (they go back to the reactor's tally).
    tallies: dict[str, list[int]] = field(default_factory=dict)
    #: Those units by semantic key, as the store module holds them (read only).
    by_key: Mapping[str, KnowledgeUnit] | None = None
    #: Decided on the reactor: copies of units that batches still queued are
    #: writing (done once those writes are, see :meth:`Gossip._release_copies`).
    after_write: bool = False
    #: The units this batch stored that ``max_units`` evicted in the same
    #: commit (see :attr:`Gossip._gone`).
    gone: list[EvictionKey] = field(default_factory=list)


@dataclass(slots=True)
class _Received:
    """A batch received from a peer, until it is merged (or known to need no merge)."""

    peer_id: str
    raw_units: list[Any]
    ack_id: str
    #: The counts :meth:`Gossip.receive` returns (filled in once merged).
    stats: dict[str, int]
    #: What it is charged against its peer's :data:`HOLD_BYTES`.
    nbytes: int = 0
    #: Its place in the merge queue (:meth:`Gossip._enqueue`).
    seq: int = 0


class Gossip:
    """The gossip engine of one node (reactor-free apart from the injected clock)."""

    def __init__(
        self,
        home: Home,
        config: Config,
        mesh: Any,
        identity: str,
        now: Callable[[], float],
        call_later: Callable[..., Any] | None = None,
        writer: StateWriter | None = None,
    ) -> None:
        self.home = home
        #: File work goes through the writer (inline when there is no service).
        self.writer = writer or StateWriter()
        #: True once change notices keep the caches below current
        #: (:meth:`watch`); else the store file is stat()ed when read.
        self._watched = False
        self.config = config
        self.mesh = mesh
        self.identity = identity
        self._now = now
        #: ``call_later(delay, fn, *args)``; None runs everything at once
        #: (reactor-free tests).
        self._call_later = call_later
        self.state = SyncState(home)
        self.delivery_file = DeliveryFile(home)
        #: knowledge.jsonl's path as text (stat()ed per received batch).
        self._store_path = str(hive_file(home, KNOWLEDGE))
        self._file_sig: tuple[int, int, int] | None = self._signature()
        self._units_cache: tuple[tuple[int, int, int] | None, list[KnowledgeUnit]] | None = None
        #: knowledge.jsonl's signature after the last merge wrote it (writer thread).
        self._commit_sig: tuple[int, int, int] | None = None
        #: trust.json as last read or written by us (the reactor's copy).
        self._trust: TrustBook = load_trust(home, config.hive.default_trust)
        #: Batches waiting for the merge before them (one merge at a time).
        self._merges: deque[_Received] = deque()
        self._merging = False
        #: Stored units wait to be encoded for sending (see :meth:`_merge_batches`).
        self._warm_pending = False
        self._warm_timer: Any = None
        #: Forward before the durable write (:meth:`_forward_early`): while
        #: batches wait for the writer, semantic key -> what the store will
        #: hold there once they are written (the units they change), on top
        #: of the unit cache.  Valid only while ``_overlay_ok``: every batch
        #: in the queue was decided here and the file is the cache's.  Both
        #: start afresh whenever the queue is empty.
        self._overlay: dict[str, KnowledgeUnit] = {}
        self._overlay_ok = True
        #: A link came up while units that went out early were being written:
        #: it missed them (a push round once the queue is done).
        self._push_when_idle = False
        #: Batches of copies of units queued batches are writing (decided
        #: early), with the place in the queue of the last batch queued
        #: before them: acknowledged once that batch is written, merged the
        #: usual way if a write failed since the queue was last empty
        #: (``_merge_failed``).
        self._after_write: list[tuple[_Commit, _Received, int]] = []
        self._merge_failed = False
        #: The place in the queue of the last batch queued (see _Received.seq).
        self._merge_seq = 0
        #: Peer units ``max_units`` evicted as they were stored (the store is
        #: full of units that weigh more) -> when, the latest GONE_MAX of the
        #: last GONE_SECS: their copies (whoever sends them: they rank the
        #: same) are duplicates, not new units each stored and evicted
        #: again.  Forgotten once the store has room.
        self._gone: dict[EvictionKey, int] = {}
        #: ... as the frozenset writer jobs read (replaced, never changed),
        #: and their (id, version) pairs (a first look at a raw batch).
        self._gone_view: frozenset[EvictionKey] = frozenset()
        self._gone_pairs: frozenset[tuple[str, int]] = frozenset()
        #: knowledge_requests held while an answer is going out, per peer:
        #: the latest one's since_epoch (see :meth:`on_request`).
        self._held_requests: dict[str, int] = {}
        #: The timer that looks at a peer's held request again.
        self._held_timers: dict[str, Any] = {}
        #: Acks waiting to go, per peer: [last frame id, [[id, version], ...]].
        self._acks_due: dict[str, list[Any]] = {}
        #: Units merged in this reactor turn, to be pushed in the next one.
        self._to_push: list[KnowledgeUnit] = []
        #: (id, version, hops) of the units passed on early whose batch is queued.
        self._forwarded: set[tuple[str, int, int]] = set()
        #: Per peer, the units of its batches still queued (the rate cap's reserve).
        self._queued_raw: dict[str, int] = {}
        #: Per peer, the bytes of its batches not merged yet; its link is
        #: not read while they are over HOLD_BYTES (see :meth:`_charge`).
        self._unmerged_bytes: dict[str, int] = {}
        self._holding: set[str] = set()
        #: The unit cache by semantic key (built when first needed).
        self._key_index: tuple[list[KnowledgeUnit], Mapping[str, KnowledgeUnit]] | None = None
        self._indexing: list[KnowledgeUnit] | None = None
        #: knowledge.jsonl changed while a merge of ours was writing it: look
        #: again once that merge is done (it may have been our own write).
        #: Also set by notices while a read of it is under way (``_reading``).
        self._store_recheck = False
        self._reading = False
        self._distilling = False
        self._push_scheduled = False
        self._save_scheduled = False
        self._record_scheduled = False
        #: Units received per peer and not yet counted in trust.json.
        self._unrecorded: DayCounts = {}
        #: Counts handed to a writer job that has not come back yet: still
        #: counted against the cap (the job may write them or return them).
        self._recording: DayCounts = {}
        #: A flush found every count in a writer job: flush when it is back.
        self._flush_missed = False
        #: Flushes of the counts that failed in a row (see :meth:`_flush_failed`).
        self._flush_failures = 0
        #: The writer thread's own key store (its caches of ``.meta``).
        self._keys = KeyStore(home)
        #: Per peer [accepted or updated, conflicted] not in trust.json yet.
        self._untallied: dict[str, list[int]] = {}
        self._state_dirty = False
        self._pages: dict[str, list[Any]] = {}
        #: Charge of the buffered pages, and of all pages since our last request.
        self._page_bytes: dict[str, int] = {}
        self._snapshot_bytes: dict[str, int] = {}
        self._page_timers: dict[str, Any] = {}
        self._page_ack: dict[str, str] = {}
        #: Per peer, unit id -> version sent on the current link and not yet
        #: known to have arrived (memory only: after a restart or a new link
        #: these are offered again).
        self._inflight: dict[str, dict[str, int]] = {}
        #: ... and for a claudectl ``relay serve`` (:data:`SERVES`), which
        #: never acknowledges, unit id -> when it was queued.
        self._queued_at: dict[str, dict[str, float]] = {}
        self._confirm_scheduled: set[str] = set()
        #: Per peer, unit frames waiting to go out, one per reactor turn (see
        #: :meth:`_send_page`); present while a drain is scheduled.
        self._outbox: dict[str, deque[tuple[str, dict[str, int], Page]]] = {}
        #: trust.json and exposure.json as a ShareContext, read again on change.
        self._contexts = ShareContexts(home, identity)
        #: Encoded answers to ``since_epoch: 0`` per peer (issue 16).
        self._answers = AnswerCache()
        #: ``$HIVE/mode``, its signature and the config when last read (:meth:`active`).
        self._mode_path = str(hive_file(home, MODE))
        self._mode_sig: tuple[Signature, HiveConfig] | None = None
        self._active = False
        self._stopped = False
        #: Log lines a peer's bad input may cause (each is counted anyway).
        self._warnings = LogBudget(self._now, PEER_WARNINGS_PER_MINUTE, _more_bad_knowledge)
        self._timers: set[Any] = set()
        #: peer -> its link-up push round, pending (cancelled when the link drops).
        self._linkup_push: dict[str, Any] = {}
        self._oversize: set[tuple[str, int]] = set()
        #: Counters for ``relay status``.
        self.counters = {
            "bad_units": 0,
            "merged_batches": 0,
            "dropped_rate_cap": 0,
            "duplicate_units": 0,
            "reads_held": 0,
        }

    # --- wiring -------------------------------------------------------------------------
    def register(self) -> None:
        self.mesh.add_handler(codec.KNOWLEDGE_SYNC, self.on_batch)
        self.mesh.add_handler(codec.KNOWLEDGE_SNAPSHOT, self.on_batch)
        # Units in canonical form skip the JSON parser (wireunits).
        self.mesh.add_payload_reader(codec.KNOWLEDGE_SYNC, read_units_payload)
        self.mesh.add_payload_reader(codec.KNOWLEDGE_SNAPSHOT, read_units_payload)
        self.mesh.add_handler(codec.KNOWLEDGE_REQUEST, self.on_request)
        self.mesh.add_handler(codec.ACK, self.on_ack)
        self.mesh.add_link_observer(self.on_link_up, self.on_link_down)

    def now(self) -> int:
        return int(self._now())

    def active(self) -> bool:
        """:func:`hive_active`, read again only when ``$HIVE/mode`` changed (a
        ``stat()``; every request asks) or the config object is another."""
        sig = (signature(self._mode_path), self.config.hive)
        if self._mode_sig is None or sig[0] != self._mode_sig[0] or sig[1] is not self._mode_sig[1]:
            self._active = hive_active(self.home, self.config.hive)
            self._mode_sig = sig
        return self._active

    # --- sending ------------------------------------------------------------------------
    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any:
        if self._call_later is None:
            fn(*args)
            return None
        if self._stopped:
            return None  # links closing after stop() schedule nothing
        box: list[Any] = []

        def run() -> None:
            self._timers.discard(box[0])
            fn(*args)

        call = self._call_later(delay, run)
        box.append(call)
        self._timers.add(call)
        return call

    def stop(self) -> None:
        """Cancel everything scheduled (the service is stopping)."""
        self._stopped = True
        for call in list(self._timers):
            if call.active():
                call.cancel()
        self._timers.clear()
        self._page_timers.clear()
        self._confirm_scheduled.clear()
        self._record_scheduled = False
        self._save_scheduled = False
        for peer_id in list(self._acks_due):
            self._flush_acks(peer_id)
        self.flush_counts()
        if self._state_dirty:
            self._save_state()

    def _load_units(self) -> list[KnowledgeUnit]:
        """The store's units, parsed again only when the file changed."""
        if self._watched and self._units_cache is not None:
            return self._units_cache[1]  # change notices keep it current
        sig = self._signature()
        if self._units_cache is not None and sig is not None and self._units_cache[0] == sig:
            return self._units_cache[1]
        units = read_units_file(hive_file(self.home, KNOWLEDGE)).store.units()
        self._units_cache = (sig, units)
        self._remember_gone([], len(units))  # changed elsewhere: room again?
        return units

    def _save_state(self) -> None:
        """Hand sync_state.json's bytes to the writer thread."""
        self._state_dirty = False
        d = self.writer.run(self.state.write, self.state.snapshot())
        d.addErrback(logged("saving " + SYNC_STATE))

    def _save_soon(self) -> None:
        """Save sync_state.json within STATE_SAVE_SECS, once for all changes meanwhile."""
        self._state_dirty = True
        if self._stopped:
            self._save_state()
            return
        if self._save_scheduled:
            return
        self._save_scheduled = True

        def run() -> None:
            self._save_scheduled = False
            if self._state_dirty:
                self._save_state()

        self._later(STATE_SAVE_SECS, run)

    def on_link_up(self, peer_id: str) -> None:
        # A new link: whatever was in flight on an old one may be lost.  Reset
        # now, not in the next turn: a request the peer pipelined behind its
        # handshake may be answered before then, and its pages must stay.
        # (A link that replaces an older one gets no link-down first.)
        self._end_link(peer_id)
        if peer_id in self._holding:
            # Its last link's batches are still being merged: this one waits too.
            self.mesh.hold_reading(peer_id, True)
        if self._forwarded:
            self._push_when_idle = True  # it missed what went out early
        # The rest not inside the authentication callback: a big store must not stall it.
        self._later(0, self._link_up, peer_id)

    def _link_up(self, peer_id: str) -> None:
        if not self.active() or peer_id not in self.mesh.connected_peers():
            return
        delivery = self.delivery(peer_id)
        if delivery == PRINTS:
            # A claudectl connect/join client prints knowledge frames and
            # never merges or answers them: nothing to send it.
            return
        ps = self.state.peer(peer_id)
        self.mesh.send(peer_id, codec.KNOWLEDGE_REQUEST, {"since_epoch": ps.cursor})
        if delivery == SERVES or self._call_later is None:
            # claudectl 0.64 never asks: push what it has not had from us.
            self.push(peer_id)
        else:
            # Our peers ask at once; answering that request covers them, and
            # this push round sends whatever the answer left out.
            self._cancel_linkup_push(peer_id)
            call = self._later(LINKUP_PUSH_DELAY_SECS, self._push_if_connected, peer_id)
            if call is not None:
                self._linkup_push[peer_id] = call

    def on_link_down(self, peer_id: str) -> None:
        self._end_link(peer_id)

    def _end_link(self, peer_id: str) -> None:
        """A link to ``peer_id`` ended (or a newer one replaced it): merge
        what arrived of an unfinished snapshot, forget the link's state."""
        self._cancel_linkup_push(peer_id)  # a storm of short links leaves no timers
        # Queued but not known to have arrived: offered again on the next link.
        self._inflight.pop(peer_id, None)
        self._queued_at.pop(peer_id, None)
        self._answers.forget(peer_id)
        self._outbox.pop(peer_id, None)
        self._snapshot_bytes.pop(peer_id, None)
        # The peer offers what we did not ack again on the next link, and asks again.
        self._acks_due.pop(peer_id, None)
        self._held_requests.pop(peer_id, None)
        self._cancel(self._held_timers.pop(peer_id, None))
        if peer_id in self._pages:
            self._flush_pages(peer_id)

    # --- delivery -----------------------------------------------------------------------
    def _direction(self, peer_id: str) -> str | None:
        """``"outbound"`` (we dialed), ``"inbound"`` or None (unknown)."""
        return self.mesh.peer_direction(peer_id)

    def delivery(self, peer_id: str) -> str:
        """
        When a unit sent on this link counts as delivered: a peer of this
        project acknowledges what it merged (:data:`ACKS`); a claudectl 0.64
        peer never acks, but its ``relay serve`` (the side we dialed) merges
        what it reads (:data:`SERVES`), while its ``connect``/``join`` client
        (the side that dialed us) only prints it (:data:`PRINTS`).
        """
        if self.mesh.peer_mode(peer_id) != "oneway":
            return ACKS
        return PRINTS if self._direction(peer_id) == "inbound" else SERVES

    def _send_page(self, peer_id: str, msg_type: str, head: dict[str, int], page: Page) -> bool:
        """
        Send one frame of units -- or, if one went to ``peer_id`` in this
        reactor turn, queue it for a later turn (in order): a push round or
        a snapshot of thousands of units is many ~256 KiB frames, each
        joined and signed on the reactor, and must not stall it in one turn
        (issue 13).  False when the link is gone.
        """
        box = self._outbox.get(peer_id)
        if box is not None:
            box.append((msg_type, head, page))
            return True
        if not self.mesh.send(peer_id, msg_type, page.payload(head)):
            return False
        if self._call_later is not None and not self._stopped:
            box = self._outbox[peer_id] = deque()
            self._later(0, self._drain_box, peer_id, box)
        return True

    def _drain_box(self, peer_id: str, box: Any) -> None:
        """A wait for the backlog is over: drain, unless the link (and its box) changed."""
        if self._outbox.get(peer_id) is box:
            self._drain_outbox(peer_id)

    def _drain_outbox(self, peer_id: str) -> None:
        box = self._outbox.get(peer_id)
        if not box:
            self._outbox.pop(peer_id, None)
            self._answer_held(peer_id)
            return
        if self._backlog(peer_id) > BACKLOG_BYTES:
            # The peer is not reading: the next page waits in the outbox.
            self._later(BACKLOG_RETRY_SECS, self._drain_box, peer_id, box)
            return
        msg_type, head, page = box.popleft()
        if not self.mesh.send(peer_id, msg_type, page.payload(head)):
            self._outbox.pop(peer_id, None)  # the link is gone: offered again on the next
            return
        # On the wire now (as news is, :meth:`_push_to`): one frame per turn anyway.
        self.mesh.flush(peer_id)
        self._later(0, self._drain_box, peer_id, box)

    def _queued(self, peer_id: str, page: Page) -> None:
        """``page`` went out to ``peer_id``: in flight until it is known to have arrived."""
        ps = self.state.peer(peer_id)
        # One dict update from the page's id -> version map: no Python loop
        # per unit on the reactor (a snapshot answer is the whole store).
        self._inflight.setdefault(peer_id, {}).update(page.versions)
        ps.bytes_up += page.nbytes
        ps.units_up += len(page)
        if page and self.delivery(peer_id) == SERVES:
            self._queued_at.setdefault(peer_id, {}).update(page.queued_at(self._now()))
            self._confirm_later(peer_id)

    def _delivered(self, peer_id: str, pairs: list[tuple[str, int]]) -> int:
        """Move acknowledged (id, version) pairs from in flight to sent."""
        flying = self._inflight.get(peer_id)
        if not flying:
            return 0
        ps = self.state.peer(peer_id)
        at = self._queued_at.get(peer_id, {})
        n = 0
        for uid, version in pairs:
            if flying.get(uid) == version:
                del flying[uid]
                at.pop(uid, None)
                ps.sent[uid] = version
                n += 1
        if n:
            self._save_soon()
        return n

    def _confirm_secs(self) -> float:
        # Longer than the link's liveness deadline: a claudectl serve that
        # stopped reading (paused, hung) loses its link before this.
        return 3 * self.config.relay.heartbeat_interval_secs + 5.0

    def _confirm_later(self, peer_id: str) -> None:
        if peer_id in self._confirm_scheduled:
            return
        self._confirm_scheduled.add(peer_id)
        self._later(0 if self._call_later is None else self._confirm_secs(), self._confirm, peer_id)

    def _confirm(self, peer_id: str) -> None:
        """A claudectl serve link stayed up: what it had long enough is delivered."""
        self._confirm_scheduled.discard(peer_id)
        flying = self._inflight.get(peer_id)
        if not flying or peer_id not in self.mesh.connected_peers():
            return
        limit = self._now() - (0 if self._call_later is None else self._confirm_secs())
        at = self._queued_at.get(peer_id, {})
        done = [(uid, v) for uid, v in flying.items() if at.get(uid, limit + 1) <= limit]
        self._delivered(peer_id, done)
        if flying:
            self._confirm_later(peer_id)

    def on_ack(self, peer_id: str, env: Envelope) -> None:
        """
        ``ack {"ack_id": <frame id>, "knowledge": [[id, version], ...]}`` from
        a peer of this project: these units arrived and were merged.  (The
        delegation layer reads acks too; it ignores those without a task.)
        """
        payload = env.payload if isinstance(env.payload, dict) else {}
        pairs = payload.get("knowledge")
        if not isinstance(pairs, list):
            return
        good = [
            (p[0], p[1])
            for p in pairs[:ACK_MAX_PAIRS]
            if isinstance(p, list)
            and len(p) == 2
            and isinstance(p[0], str)
            and isinstance(p[1], int)
            and not isinstance(p[1], bool)
        ]
        self._delivered(peer_id, good)

    def _ack(self, peer_id: str, ack_id: str, units: list[KnowledgeUnit]) -> None:
        """
        Tell a peer of this project which of its units we now have -- all
        but those we sent it ourselves (in flight to it at that version): our
        copies crossed on the link, and the peer counts a unit it receives
        from us as one we have, as we count its copy (so a mesh that floods a
        unit does not also pay an ack for every crossing).  Should our frame
        be lost with the link, the peer offers the unit again on the next one.
        """
        if not units or self.delivery(peer_id) != ACKS:
            return
        flying = self._inflight.get(peer_id, {})
        pairs = [[u.id, u.version] for u in units if flying.get(u.id) != u.version]
        if not pairs:
            return
        if self._call_later is None or self._stopped:
            self._send_acks(peer_id, ack_id, pairs)
            return
        # Acks wait up to ACK_DELAY_SECS and go together, one frame per
        # link: while a unit spreads through the mesh, its acks do not
        # compete with the frames that carry it.
        due = self._acks_due.get(peer_id)
        if due is None:
            due = self._acks_due[peer_id] = ["", []]
            self._later(ACK_DELAY_SECS, self._flush_acks, peer_id)
        due[0] = ack_id
        due[1].extend(pairs)
        if len(due[1]) >= ACK_MAX_PAIRS:
            self._flush_acks(peer_id)

    def _flush_acks(self, peer_id: str) -> None:
        due = self._acks_due.pop(peer_id, None)
        if due is not None and due[1]:
            self._send_acks(peer_id, due[0], due[1])

    def _send_acks(self, peer_id: str, ack_id: str, pairs: list[list[Any]]) -> None:
        for i in range(0, len(pairs), ACK_MAX_PAIRS):
            self.mesh.send(
                peer_id, codec.ACK, {"ack_id": ack_id, "knowledge": pairs[i : i + ACK_MAX_PAIRS]}
            )

    def _push_if_connected(self, peer_id: str) -> None:
        self._linkup_push.pop(peer_id, None)
        if peer_id in self.mesh.connected_peers():
            self.push(peer_id)

    def _cancel_linkup_push(self, peer_id: str) -> None:
        self._cancel(self._linkup_push.pop(peer_id, None))

    def _cancel(self, call: Any) -> None:
        """Cancel a call of :meth:`_later` (if still due) and forget it."""
        if call is not None:
            if call.active():
                call.cancel()
            self._timers.discard(call)

    def schedule_push_all(self) -> None:
        """One push round soon, however many batches arrive in this turn."""
        if self._call_later is None:
            self.push_all()
            return
        if not self._push_scheduled:
            self._push_scheduled = True

            def run() -> None:
                self._push_scheduled = False
                try:
                    self.push_all()
                except Exception:
                    log.failure("gossip push round failed")

            self._later(0, run)

    def push_all(self) -> int:
        """A push round to every connected peer; returns the units sent."""
        if not self.active():
            return 0
        peers = self.mesh.connected_peers()
        if not peers:
            return 0
        units = self._load_units()
        ctx = self._contexts.get(self.config.hive)
        sent = self._push_to(peers, units, ctx, news=True)
        if self._state_dirty:
            self._save_soon()
        return sent

    def push(self, peer_id: str) -> int:
        units = self._load_units()
        ctx = self._contexts.get(self.config.hive)
        sent = self._push_to([peer_id], units, ctx)
        if self._state_dirty:
            self._save_soon()
        return sent

    def _sendable(self, units: list[KnowledgeUnit]) -> list[Encoded]:
        """Encode once; leave out (logged once, counted) units too big for any frame."""
        out = []
        for unit in units:
            try:
                size = unit.wire_size
            except ValueError:  # not encodable (a NaN made locally): never sendable
                size = MAX_UNIT_BYTES + 1
            if size <= MAX_UNIT_BYTES:
                out.append((unit, size))
            elif (unit.id, unit.version) not in self._oversize:
                self._oversize.add((unit.id, unit.version))
                self.counters["oversize_units"] = self.counters.get("oversize_units", 0) + 1
                log.warn(
                    "knowledge unit {unit_id} is too big to send ({size} bytes)",
                    unit_id=unit.id,
                    size=size,
                )
        return out

    def _push(self, peer_id: str, units: list[KnowledgeUnit], ctx: ShareContext) -> int:
        now = self.now()
        ps = self.state.peer(peer_id)
        if self.delivery(peer_id) == PRINTS:
            return 0
        flying = self._inflight.get(peer_id, {})
        todo = self._sendable(
            ctx.shareable_units(
                [
                    u
                    for u in units
                    if ps.sent.get(u.id) != u.version and flying.get(u.id) != u.version
                ],
                peer_id,
                now,
            )
        )
        if not todo:
            return 0
        sent = 0
        for page in pages_of(todo):
            if not self._send_page(peer_id, codec.KNOWLEDGE_SYNC, {"sync_epoch": now}, page):
                break
            self._queued(peer_id, page)
            sent += len(page)
        if sent:
            ps.last_sync_epoch = now
            self._state_dirty = True
        return sent

    def _push_to(
        self, peers: list[str], units: list[KnowledgeUnit], ctx: ShareContext, news: bool = False
    ) -> int:
        """
        :meth:`_push` to each of ``peers``, logged in one line: one unit
        passed on to a node's every link is one line in its log, not one per
        link (each line costs the reactor a formatted write).  ``news``: the
        units are spreading through the mesh now -- their frames go on the
        wire at once, not after the rest of this reactor turn (the other
        links' reads, a writer job's result...), so each hop costs the
        mesh less time.
        """
        # A peer with frames waiting in its outbox gets these after them,
        # each flushed as it is sent (:meth:`_drain_outbox`).
        waiting = {p for p in peers if p in self._outbox}
        counts = [(p, self._push(p, units, ctx)) for p in peers]
        sent = [(p, n) for p, n in counts if n]
        if news:
            for p, _ in sent:
                if p not in waiting:
                    self.mesh.flush(p)
        total = sum(n for _, n in sent)
        if len(sent) == 1:
            log.info("sent {count} knowledge unit(s) to {peer_id}", count=total, peer_id=sent[0][0])
        elif sent:
            log.info(
                "sent {count} knowledge unit(s) to {peers} peers ({detail})",
                count=total,
                peers=len(sent),
                detail=", ".join(f"{p}: {n}" for p, n in sent),
            )
        return total

    def _backlog(self, peer_id: str) -> int:
        """Bytes written to ``peer_id`` that the kernel has not taken yet."""
        unsent = getattr(self.mesh, "unsent_bytes", None)
        return int(unsent(peer_id)) if callable(unsent) else 0

    def on_request(self, peer_id: str, env: Envelope) -> None:
        """
        Answer a ``knowledge_request`` with a snapshot -- unless an answer
        to this peer is still going out (pages in the outbox) or it has not
        read what we wrote (:data:`BACKLOG_BYTES`): then the request is held,
        the latest one per peer, and answered once that is done.  A peer
        that floods requests and never reads costs one held request, not an
        answer each.
        """
        if not self.active():
            return
        payload = env.payload if isinstance(env.payload, dict) else {}
        since = payload.get("since_epoch", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            since = 0
        if peer_id in self._outbox or self._backlog(peer_id) > BACKLOG_BYTES:
            if peer_id in self._held_requests:
                self.counters["requests_held"] = self.counters.get("requests_held", 0) + 1
            self._held_requests[peer_id] = since
            if peer_id not in self._outbox:
                self._look_again_later(peer_id)
            return
        self._answer(peer_id, since)

    def _look_again_later(self, peer_id: str) -> None:
        """One timer per peer looks at a held request again (never one per request)."""
        timer = self._held_timers.get(peer_id)
        if timer is None or not timer.active():
            self._held_timers[peer_id] = self._later(BACKLOG_RETRY_SECS, self._answer_held, peer_id)

    def _answer_held(self, peer_id: str) -> None:
        self._cancel(self._held_timers.pop(peer_id, None))  # (from the outbox's end)
        if peer_id not in self._held_requests or peer_id in self._outbox:
            return  # none held, or the outbox's end looks again
        if peer_id not in self.mesh.connected_peers():
            self._held_requests.pop(peer_id, None)
            return
        if self._backlog(peer_id) > BACKLOG_BYTES:
            self._look_again_later(peer_id)
            return
        since = self._held_requests.pop(peer_id)
        if self.active():
            self._answer(peer_id, since)

    def _answer(self, peer_id: str, since: int) -> None:
        now = self.now()
        ctx = self._contexts.get(self.config.hive)
        ps = self.state.peer(peer_id)
        stored = self._load_units()
        # What may go to this peer now (in store order), kept encoded per
        # peer for this store and sharing context (claudectl/hive/answers.py).
        answer = self._answers.answer(
            peer_id,
            stored,
            ctx,
            now,
            lambda: self._sendable(ctx.shareable_units(stored, peer_id, now)),
        )
        if since == 0:
            # "I have nothing": everything, in the pages encoded once (a big
            # answer's pages: made again for each request).
            pages = answer.pages
            count = len(answer.units)
        else:
            # What this peer is known to have (acknowledged, same version) is
            # left out -- never what we merely queued for it once.
            units = [
                (u, n)
                for u, n in answer.units
                if u.last_validated_at >= since and ps.sent.get(u.id) != u.version
            ]
            pages = pages_of(units) or [Page([])]
            count = len(units)
        total = len(pages)
        for n, page in enumerate(pages, 1):
            if not self._send_page(
                peer_id, codec.KNOWLEDGE_SNAPSHOT, {"page": n, "total_pages": total}, page
            ):
                return
            self._queued(peer_id, page)
        ps.last_sync_epoch = now
        self._state_dirty = True
        log.info(
            "answered a knowledge request from {peer_id}: {count} unit(s) in {pages} page(s)",
            peer_id=peer_id,
            count=count,
            pages=total,
        )
        # Older units it has not had (outside since_epoch) go in a sync.
        # The state is saved with the next save (or at stop), not per request:
        # this only moved counters and the units in flight.  After a
        # since_epoch 0 answer there are none: every unit that may go to this
        # peer is in flight at its version now.
        if since:
            self._push_to([peer_id], stored, ctx)

    # --- receiving ----------------------------------------------------------------------
    def on_batch(self, peer_id: str, env: Envelope) -> None:
        if not self.active():
            return
        payload = env.payload if isinstance(env.payload, dict) else {}
        raw_units = payload.get("units")
        if not isinstance(raw_units, list):
            self.counters["bad_units"] += 1
            self.state.peer(peer_id).rejected += 1
            if self._may_warn(peer_id):
                log.info(
                    "{msg_type} from {peer_id} without a units list",
                    msg_type=env.msg_type,
                    peer_id=peer_id,
                )
            return
        if env.msg_type == codec.KNOWLEDGE_SNAPSHOT:
            self._snapshot_page(peer_id, payload, raw_units, env.id, env.wire_bytes)
            return
        charge = env.wire_bytes and env.wire_bytes + NODE_CHARGE * max(
            env.wire_nodes, len(raw_units)
        )
        self.receive(peer_id, raw_units, ack_id=env.id, nbytes=charge)

    def _may_warn(self, peer_id: str) -> bool:
        """Rate-limit the log lines a peer's bad input causes (per peer, per minute)."""
        return self._warnings.allow(peer_id)

    def buffered_bytes(self, peer_id: str) -> int:
        """What the snapshot pages buffered for ``peer_id`` are charged."""
        return self._page_bytes.get(peer_id, 0)

    def _snapshot_page(
        self,
        peer_id: str,
        payload: dict[str, Any],
        raw_units: list[Any],
        ack_id: str = "",
        frame_bytes: int = 0,
    ) -> None:
        """
        Collect a snapshot's pages and merge them in one go (bounded in bytes).
        A page is charged the bytes of its frame (``frame_bytes``, which hold
        its units' JSON) or, for a frame not read off the wire, its units
        encoded again.
        """
        spent = self._snapshot_bytes.get(peer_id, 0)
        if spent > SNAPSHOT_BUDGET_BYTES:
            return  # over budget: the link is closing, ignore what still arrives
        size = frame_bytes
        if size <= 0:
            try:
                size = _units_bytes(raw_units)
            except Exception:  # RecursionError on absurd nesting: charge a whole line
                size = codec.MAX_LINE_BYTES
        charge = size + SNAPSHOT_ENTRY_CHARGE * len(raw_units) + SNAPSHOT_PAGE_CHARGE
        spent += charge
        self._snapshot_bytes[peer_id] = spent
        if spent > SNAPSHOT_BUDGET_BYTES:
            self._drop_pages(peer_id)
            log.warn(
                "{peer_id} sent more than {budget} bytes of snapshot pages for one "
                "request: pages dropped, link closed",
                peer_id=peer_id,
                budget=SNAPSHOT_BUDGET_BYTES,
            )
            disconnect = getattr(self.mesh, "disconnect", None)
            if callable(disconnect):
                disconnect(peer_id, "snapshot budget exceeded")
            return
        page, total = payload.get("page"), payload.get("total_pages")
        buffered = self._pages.setdefault(peer_id, [])
        buffered.extend(raw_units)
        self._page_bytes[peer_id] = self._page_bytes.get(peer_id, 0) + charge
        self._page_ack[peer_id] = ack_id
        last = not isinstance(page, int) or not isinstance(total, int) or page >= total
        # Never hold more than a few MiB, nor a day's allowance, of a peer's units.
        if (
            last
            or self._page_bytes[peer_id] >= SNAPSHOT_FLUSH_BYTES
            or len(buffered) >= self.config.hive.max_units_per_peer_per_day
        ):
            self._flush_pages(peer_id)
        elif peer_id not in self._page_timers and self._call_later is not None:
            self._page_timers[peer_id] = self._later(
                SNAPSHOT_FLUSH_SECS, self._flush_pages, peer_id
            )

    def _drop_pages(self, peer_id: str) -> list[Any]:
        self._cancel(self._page_timers.pop(peer_id, None))
        self._page_bytes.pop(peer_id, None)
        self._page_ack.pop(peer_id, None)
        return self._pages.pop(peer_id, [])

    def _flush_pages(self, peer_id: str) -> None:
        ack_id = self._page_ack.get(peer_id, "")
        # An answer to our request is charged as its snapshot budget counts
        # it (that budget bounds it already): a big honest answer is not
        # held up -- holding it stalls the sender's backlog retries.
        charge = self._page_bytes.get(peer_id, 0)
        units = self._drop_pages(peer_id)
        if units:
            self.receive(peer_id, units, ack_id=ack_id, nbytes=charge)

    def receive(
        self, peer_id: str, raw_units: list[Any], ack_id: str = "", nbytes: int = 0
    ) -> dict[str, int]:
        """
        Validate, rate-limit and merge one batch from ``peer_id``; then pass it on.

        The batch waits for the one before it; validation and the file work
        run on the writer thread (the reactor only plans and bookkeeps).  A
        small batch is decided here first (:meth:`_forward_early`): what it
        brings that is new goes on at once, and a batch of copies of what
        the store already holds needs no writer job at all.  The returned
        counts are filled in once the batch is merged -- at once when there
        is no writer thread (reactor-free callers and tests).  ``nbytes``
        (the frames' size) is charged to the peer until then: a peer whose
        batches pile up faster than they are merged is not read meanwhile
        (:meth:`_charge`).
        """
        stats = {
            "received": len(raw_units),
            "bad": 0,
            "dropped": 0,
            "accepted": 0,
            "updated": 0,
            "rejected": 0,
            "duplicates": 0,
        }
        batch = _Received(peer_id, raw_units, ack_id, stats, nbytes)
        self._queued_raw[peer_id] = self._queued_raw.get(peer_id, 0) + len(raw_units)
        try:
            known = self._forward_early(peer_id, raw_units)
        except Exception:
            # The early path is an optimisation: the writer decides anyway.
            log.failure("deciding a batch from {peer_id} early failed", peer_id=peer_id)
            self._overlay_ok = False
            known = None
        if known is not None:
            # Copies of what is written, or being written: no writer job.
            self._queued_raw[peer_id] -= len(raw_units)
            now = self.now()
            self._unrecorded.setdefault((peer_id, now // DAY), 0)  # marks the contact
            if known.after_write:
                self._charge(batch)
                self._after_write.append((known, batch, self._merge_seq))
            else:
                self._committed(known, peer_id, ack_id, stats, now)
            return stats
        self._charge(batch)
        self._enqueue(batch)
        self._next_merge()
        return stats

    def _enqueue(self, batch: _Received) -> None:
        self._merge_seq += 1
        batch.seq = self._merge_seq
        self._merges.append(batch)

    def _charge(self, batch: _Received) -> None:
        """
        ``batch`` waits in memory: charge its peer.  Once a peer's waiting
        batches pass :data:`HOLD_BYTES`, its link is not read until they are
        down to half of that (TCP's flow control slows the sender; nothing
        is dropped).  A batch is charged its frame's bytes and
        :data:`NODE_CHARGE` per value in it (about what a small one costs
        in memory once parsed), so what a peer's waiting batches hold in
        memory stays within about 1.6 times HOLD_BYTES, whatever their
        shape (0.8 times for ordinary units; 1.6 for units read by pattern
        that are all 250-character strings, each held as a field and in
        its stored line).  An honest peer rarely gets
        here -- a big push to a slow disk; a peer flooding copies does.
        """
        peer_id = batch.peer_id
        left = self._unmerged_bytes.get(peer_id, 0) + batch.nbytes
        self._unmerged_bytes[peer_id] = left
        if left > HOLD_BYTES and peer_id not in self._holding:
            self._holding.add(peer_id)
            self.counters["reads_held"] += 1
            self.mesh.hold_reading(peer_id, True)
            if self._may_warn(peer_id):
                log.info(
                    "not reading from {peer_id} for now: {mib:.1f} MiB of its knowledge "
                    "waits to be merged",
                    peer_id=peer_id,
                    mib=left / 1048576,
                )

    def _discharge(self, batch: _Received) -> None:
        """``batch`` is merged (or dropped): its bytes are no longer held."""
        peer_id = batch.peer_id
        left = self._unmerged_bytes.get(peer_id, 0) - batch.nbytes
        if left > 0:
            self._unmerged_bytes[peer_id] = left
        else:
            self._unmerged_bytes.pop(peer_id, None)
        if peer_id in self._holding and left <= HOLD_BYTES // 2:
            self._holding.discard(peer_id)
            self.mesh.hold_reading(peer_id, False)

    def _forward_early(self, peer_id: str, raw_units: list[Any]) -> _Commit | None:
        """
        Forward before the durable write: decide a small batch here on the
        reactor, against the unit cache and what the batches queued before it
        will change (``_overlay``), with the merge's own rules
        (:func:`~claudectl.hive.merge.merge_unit`: local wins, version and
        score order, local-identity claims refused), and push the units it
        accepts or updates to the other peers at once -- the writer thread
        makes them durable meanwhile.  The ack to ``peer_id`` still waits for
        the write (:meth:`_merged`), so a crash before it loses nothing the
        sender does not offer again.

        Nothing goes early unless the decision is certain to match the
        writer's: the batch is small (:data:`FORWARD_MAX_UNITS`), the cache
        is what knowledge.jsonl holds now, every batch queued before this one
        was decided here too, the peer's daily rate cap has room for every
        unit queued from it, and the store stays within ``max_units`` (so no
        eviction can take the unit back).  Otherwise the batch takes the
        usual path (forwarded by the push round after its write) and early
        forwarding pauses until the queue is empty.

        Returns the batch's outcome when nothing in it needs the writer:
        every unit valid or not, the valid ones copies of units the written
        store holds (by no shorter path, none from its origin, whose delivery
        record may improve).  Such a batch is acknowledged without a write
        (within ACK_DELAY_SECS, with the other acks of that link).
        """
        if not raw_units:
            return None
        cache = self._units_cache
        cfg = self.config.hive
        now = self.now()
        current = cache is not None and cache[0] is not None and cache[0] == self._signature()
        if (
            self._gone
            and current
            and len(raw_units) <= FORWARD_MAX_UNITS
            and cache is not None
            and len(cache[1]) >= cfg.max_units  # still full (0: no cap, never gone)
        ):
            gone = self._gone_now(now)
            pairs = self._gone_pairs
            if all(_id_version(r) in pairs for r in raw_units):
                checked = validate_batch(raw_units)
                if checked[0] and all(eviction_key(u) in gone for u in checked[0]):
                    # Copies of units max_units took back as they were
                    # stored: nothing to write (the writer would store and
                    # evict each copy again).
                    return _Commit({}, *checked)
        rec = self._trust.get(peer_id)
        counted = rec.daily_received.get(str(now // DAY), 0) if rec is not None else 0
        counted += self._uncounted(peer_id, now) + self._queued_raw.get(peer_id, 0)
        if (
            not self._overlay_ok
            or len(raw_units) > FORWARD_MAX_UNITS
            or cache is None
            or not current
            or counted > cfg.max_units_per_peer_per_day
            or (
                cfg.max_units
                and len(cache[1]) + len(self._overlay) + len(raw_units) > cfg.max_units
            )
            or len(self._overlay) >= FORWARD_MAX_PENDING
        ):
            self._overlay_ok = False  # this batch's effect is unknown here
            return None
        assert cache is not None
        good, bad, error = validate_batch(raw_units)
        if any(self._evicted_at_once(u, now) for u in good):
            self._overlay_ok = False  # the store's bounds would take it back
            return None
        index = self._index(cache[1])
        if index is None:
            self._overlay_ok = False  # the index is being built
            return None
        forward: list[KnowledgeUnit] = []
        written = True  # every unit a copy of what the written store holds
        copies = True  # ... or of what a queued batch is writing
        for inc in good:
            key = inc.semantic_key
            pending = key in self._overlay
            held = self._overlay[key] if pending else index.get(key)
            if (
                held is not None
                and isinstance(held.content, ApproachCluster)
                and isinstance(inc.content, ApproachCluster)
                and (held.id, held.version) != (inc.id, inc.version)
            ):
                # A union is never passed on early; its cost (contributors
                # of every variant) belongs on the writer thread.
                self._overlay_ok = False
                return None
            outcome = merge_unit(held, inc, self.identity, now)
            if outcome.store is not None:
                self._overlay[key] = outcome.store
            if outcome.result in (ACCEPTED, UPDATED) and outcome.store is inc:
                forward.append(inc)
            copy = (
                held is not None
                and held.id == inc.id  # settled by id, as _all_known (collisions)
                and outcome.result == DUPLICATE
                and outcome.store is None
                and inc.source_peer != peer_id
            )
            if pending or not copy:
                written = False
            if not copy:
                copies = False
        ps = self.state.peer(peer_id)
        for u in good:
            # The sender has these: never echo them back.
            ps.sent[u.id] = max(ps.sent.get(u.id, 0), u.version)
        if forward:
            self._forwarded.update((u.id, u.version, u.propagation_count) for u in forward)
            # trust.json as it is now (a demotion by the CLI counts at once).
            ctx = self._contexts.get(cfg)
            self._push_to(self.mesh.connected_peers(), forward, ctx, news=True)
        if written:
            return _Commit({}, good, bad, error)
        if copies and good:
            # Copies of units a queued batch is writing: nothing for the
            # writer to do, but the ack waits for that write.
            return _Commit({}, good, bad, error, after_write=True)
        return None

    def _evicted_at_once(self, unit: KnowledgeUnit, now: int) -> bool:
        """Would the store's bounds (:func:`~claudectl.hive.store.compact`)
        evict this peer unit as soon as it is written (expired, or its origin
        not heard from for ``stale_peer_days`` as far as trust.json knows)?"""
        cfg = self.config.hive
        ttl = cfg.knowledge_ttl_days * DAY
        if ttl and now - unit.last_validated_at > ttl:
            return True
        stale = cfg.stale_peer_days * DAY
        rec = self._trust.get(unit.source_peer)
        return bool(stale and rec is not None and now - rec.last_sync > stale)

    def _prepare_index(self, units: list[KnowledgeUnit]) -> None:
        """A big store's index is started on the writer thread as soon as
        the store is known, so the next small batch finds it."""
        if len(units) > FORWARD_INDEX_INLINE and self._call_later is not None:
            self._index(units)

    def _index(self, units: list[KnowledgeUnit]) -> Mapping[str, KnowledgeUnit] | None:
        """The unit cache by semantic key, built once per cache -- for a big
        store on the writer thread: None until it is there."""
        index = self._key_index
        if index is not None and index[0] is units:
            return index[1]
        if len(units) <= FORWARD_INDEX_INLINE:
            self._key_index = (units, {u.semantic_key: u for u in units})
            return self._key_index[1]
        if self._indexing is not units:
            self._indexing = units

            def built(by_key: dict[str, KnowledgeUnit]) -> None:
                if self._indexing is units:
                    self._indexing = None
                self._key_index = (units, by_key)

            d = self.writer.run(lambda: {u.semantic_key: u for u in units})
            d.addCallback(built)
            d.addErrback(logged("indexing " + KNOWLEDGE))
        return None

    def _release_copies(self, written: int) -> None:
        """
        The batches up to place ``written`` in the queue are merged: the
        copies that waited for them are done -- acknowledged, or, if a write
        failed since the queue was last empty, merged the usual way (the
        writer decides them against what the store holds).
        """
        if not self._after_write:
            return
        ready = [c for c in self._after_write if c[2] <= written]
        if not ready:
            return
        self._after_write = [c for c in self._after_write if c[2] > written]
        if self._merge_failed:
            for _, batch, _ in ready:
                self._enqueue(batch)
            return
        now = self.now()
        for out, batch, _ in ready:
            self._discharge(batch)
            self._committed(out, batch.peer_id, batch.ack_id, batch.stats, now)

    def _merge_queue_idle(self) -> None:
        """Every received batch is written: the cache holds what the overlay held."""
        self._overlay.clear()
        self._forwarded.clear()
        self._queued_raw.clear()
        self._overlay_ok = True
        self._merge_failed = False
        if self._push_when_idle:
            self._push_when_idle = False
            self.schedule_push_all()

    def _next_merge(self) -> None:
        """
        Merge every batch waiting (one writer job, one store transaction for
        all of them, up to :data:`COALESCE_UNITS` units); the batches that
        arrive meanwhile wait for its commit and go together in the next job.
        """
        if self._merging or not self._merges:
            return
        self._merging = True
        batches = [self._merges.popleft()]
        units = len(batches[0].raw_units)
        while self._merges and units + len(self._merges[0].raw_units) <= COALESCE_UNITS:
            units += len(self._merges[0].raw_units)
            batches.append(self._merges.popleft())
        d = defer.maybeDeferred(self._merge_batches, batches)
        peers = ", ".join(dict.fromkeys(b.peer_id for b in batches))

        def failed(failure: Any) -> Any:
            self._merge_failed = True  # copies waiting for it go the usual way
            self._overlay_ok = False  # what the overlay expected was not written
            return failure

        d.addErrback(failed)
        d.addErrback(logged("merging knowledge from " + peers))

        def next_one(_: Any) -> None:
            self._merging = False
            for batch in batches:
                self._discharge(batch)
            self._release_copies(batches[-1].seq)
            if not self._merges:
                self._merge_queue_idle()
            if self._store_recheck:
                self._store_recheck = False
                self.on_store_changed()
            self._next_merge()
            if not self._merging and self._warm_pending:
                self._warm_when_quiet()

        d.addBoth(next_one)

    def _warm_when_quiet(self) -> None:
        """
        Encode the stored units once no batch has waited for WARM_QUIET_SECS:
        the pages of a snapshot arrive with gaps between them, and encoding
        in every gap would hold up the next page (the units go nowhere yet:
        their sender has them, and a push round or answer to another peer
        is seconds away).
        """
        if self._call_later is None:
            self._warm_stored()
            return
        if self._warm_timer is not None and self._warm_timer.active():
            self._warm_timer.reset(WARM_QUIET_SECS)
            return

        def run() -> None:
            self._warm_timer = None
            if self._merging or self._merges:
                return  # the merge's end starts the wait again
            if self._warm_pending:
                self._warm_stored()

        self._warm_timer = self._later(WARM_QUIET_SECS, run)

    def _warm_stored(self) -> None:
        """Encode the stored units for the push rounds and answers to come (writer thread)."""
        self._warm_pending = False
        if self._units_cache is None:
            return
        d = self.writer.run(_in_bulk, self._warm_units, self._units_cache[1])
        d.addErrback(logged("encoding the stored units"))

    def _warm_units(self, units: list[KnowledgeUnit]) -> None:
        # What a push round or a snapshot answer will need, made on the
        # writer thread rather than on the reactor, for the units not
        # encoded yet: a merge into a big store warms its new units, not the
        # whole store again (the verdicts of all of them if the sharing
        # filter dropped its cache meanwhile).
        cold = [u for u in units if "wire_size" not in u.__dict__]
        _warm_wire(cold)
        precompute_verdicts(self.config.hive, units, fresh=cold)

    def _allowance(self, peer_id: str, now: int) -> int:
        """
        New units ``peer_id`` may still bring today.  The daily rate cap
        counts new units only (accepted or updated): duplicates and echoes are
        free.  What trust.json counted plus what this process counted but has
        not written yet.  (A frozen peer still gossips: freezing keeps its
        knowledge out of the prompt, not off the mesh.)
        """
        day = str(now // DAY)
        rec_ro = self._trust.get(peer_id)
        already = rec_ro.daily_received.get(day, 0) if rec_ro is not None else 0
        already += self._uncounted(peer_id, now)
        return max(0, self.config.hive.max_units_per_peer_per_day - already)

    def _merge_batches(self, batches: list[_Received]) -> Any:
        now = self.now()
        allowances: dict[str, int] = {}
        for peer_id in (b.peer_id for b in batches):
            if peer_id not in allowances:
                allowances[peer_id] = self._allowance(peer_id, now)
                self._unrecorded.setdefault((peer_id, now // DAY), 0)  # marks the contact
        # The counts so far go to trust.json with these batches' (or come back).
        counts = self._hand_over()
        # Built here, not on the writer thread: the book and the tallies are
        # the reactor's (a published book is never changed, only replaced).
        contact = self._trust.last_contact()
        for peer, _day in (*counts, *self._recording):
            contact[peer] = now
        job = _Job(dict(counts), contact, self._gone_now(now))
        # The new units are encoded for sending in the same job when they go
        # on to another peer now (or are few); else once no batch waits, so
        # that a big snapshot's next pages are not kept waiting for it.
        warm = sum(len(b.raw_units) for b in batches) < BULK_UNITS or any(
            p not in allowances for p in self.mesh.connected_peers()
        )
        d = self.writer.run(
            self._commit,
            [(b.peer_id, b.raw_units) for b in batches],
            allowances,
            now,
            job,
            self._units_cache,
            warm,
        )

        def returned(result: Any) -> Any:
            # Whether trust.json took the counts is what the job says, not
            # whether it ended well (a later step may have failed).
            if job.book is not None:
                self._trust = job.book
                self._flush_done(None)  # trust.json can be written again
            self._handed_back(counts, written=job.book is not None)
            return result

        def committed(outs: list[_Commit]) -> None:
            if not warm:
                self._warm_pending = True
            # Every sender has its units before any push round this job's
            # first batch may start: none goes back to the peer it came from.
            for out, b in zip(outs, batches, strict=True):
                _mark_sent(self.state.peer(b.peer_id).sent, out.good)
            for out, b in zip(outs, batches, strict=True):
                self._committed(out, b.peer_id, b.ack_id, b.stats, now)

        d.addBoth(returned)
        d.addCallback(committed)
        return d

    def _uncounted(self, peer_id: str, now: int) -> int:
        """Units from ``peer_id`` counted on ``now``'s day but not in ``self._trust``."""
        key = (peer_id, now // DAY)
        return self._unrecorded.get(key, 0) + self._recording.get(key, 0)

    def _hand_over(self) -> DayCounts:
        """The unwritten counts, for a writer job (see :meth:`_handed_back`)."""
        counts, self._unrecorded = self._unrecorded, {}
        for key, n in counts.items():
            self._recording[key] = self._recording.get(key, 0) + n
        return counts

    def _handed_back(
        self, counts: DayCounts, written: bool, retry: bool = True, at_once: bool = True
    ) -> None:
        """A job with ``counts`` is back: written to trust.json (and the book
        it wrote is ``self._trust``), or they wait for the next write --
        which comes at once if a flush found them in this job."""
        for key, n in counts.items():
            left = self._recording.get(key, 0) - n
            if left > 0:
                self._recording[key] = left
            else:
                self._recording.pop(key, None)
            if not written:
                self._unrecorded[key] = self._unrecorded.get(key, 0) + n
        if not written and counts and retry:
            if self._flush_missed and at_once:
                self.flush_counts()
            else:
                self._record_soon()

    def _commit(
        self,
        batches: list[tuple[str, list[Any]]],
        allowances: dict[str, int],
        now: int,
        job: _Job,
        cache: tuple[Any, list[KnowledgeUnit]] | None,
        warm: bool = True,
    ) -> list[_Commit]:
        """The writer thread's job: :meth:`_commit_batches`, the collector paused if big."""
        with _collector_paused(sum(len(raw) for _, raw in batches)):
            return self._commit_batches(batches, allowances, now, job, cache, warm)

    def _commit_batches(
        self,
        batches: list[tuple[str, list[Any]]],
        allowances: dict[str, int],
        now: int,
        job: _Job,
        cache: tuple[Any, list[KnowledgeUnit]] | None,
        warm: bool = True,
    ) -> list[_Commit]:
        """
        Batches from one or more peers, in order, on the writer thread: each
        validated on its own; then ONE store transaction merges them all,
        ``delivery.json`` is written once (``trust.json`` too, when a freeze
        may follow), and the merge logs appended once.  Each batch's new
        units count against its peer's allowance, shared by that peer's
        batches.  Nothing is written when
        every batch is empty or already known.  With ``warm``, the stored
        units are encoded for sending here too (see :meth:`_warm_units`).
        """
        outs = [_Commit({}, *validate_batch(raw)) for _, raw in batches]
        stored = _stored_by_key(hive_file(self.home, KNOWLEDGE), cache, self._signature())
        recorded = self.delivery_file.load().entry_ids()
        cap = self.config.hive.max_units
        # What max_units evicted is gone while the store is still full.
        gone = job.gone if stored is not None and cap and len(stored) >= cap else frozenset()
        todo = [
            (peer_id, out)
            for (peer_id, _), out in zip(batches, outs, strict=True)
            if out.good and not _all_known(stored, out.good, peer_id, recorded, gone)
        ]
        if not todo:
            # Copies of what we hold (other paths of the same gossip): no
            # store transaction, no file rewrite, nothing counted.
            return outs
        cfg = self.config.hive
        remaining = dict(allowances)
        merged: list[tuple[str, _Commit, BatchResult, dict[str, KnowledgeUnit]]] = []
        # Two short transactions, never nested (no lock-order deadlocks
        # with the CLI): the merge, then the bookkeeping.
        # New units' lines are appended (a batch not written in full is
        # not acknowledged, so its peer sends it again).
        with store_transaction(
            self.home,
            local_id=self.identity,
            config=cfg,
            now=now,
            append=True,
            contact=lambda: last_contact(self.home, job.contact, self._keys),
        ) as store:
            existing = store.by_key()
            for peer_id, out in todo:
                # The store as this batch found it, at the batch's keys
                # (collisions are per batch; a copy of the whole store per
                # batch cost a flood of small batches O(store) each).
                before = _held_at(store.get, out.good) if merged else existing
                left = remaining.get(peer_id, 0)
                result = merge_batch(store, out.good, self.identity, now, budget=left)
                remaining[peer_id] = max(0, left - result.accepted - result.updated)
                merged.append((peer_id, out, result, before))
            remember_lines(_lines_stored(batches, merged))
            # Who delivered what, written before the store itself.
            record_deliveries(
                self.delivery_file,
                existing,
                [(peer_id, result) for peer_id, _, result, _ in merged],
                store.units(),
            )
        units = store.units()
        # Taken under the store's lock (a CLI write right after is not ours).
        sig = self._commit_sig = store.signature
        if store.evicted:
            evicted = {id(e.unit) for e in store.evicted if e.reason == "max_units"}
            for _, out, result, _ in merged:
                out.gone = [eviction_key(u) for u in result.stored if id(u) in evicted]
        logs = BatchResult()
        for _, _, result, _ in merged:
            logs.conflicts.extend(result.conflicts)
            logs.resolutions.extend(result.resolutions)
        write_merge_logs(self.home, logs, cfg.max_log_bytes)
        collisions = []
        tallies: dict[str, list[int]] = {}
        new: DayCounts = {}
        for peer_id, _, result, _ in merged:
            # Crossing the cap is counted too: that is what freezes the sender.
            key = (peer_id, now // DAY)
            new[key] = new.get(key, 0) + result.accepted + result.updated + len(result.left_out)
            tally = tallies.setdefault(peer_id, [0, 0])
            tally[0] += result.accepted + result.updated
            tally[1] += result.rejected
        # trust.json is written now (with the counts so far) only when a
        # freeze may follow: a crossed cap, a collision.  A plain merge's
        # counts and tallies go back to the reactor and are written within
        # RECORD_FLUSH_SECS (flush_counts).
        book: TrustBook | None = None
        if any(
            result.left_out or any_collision(before, out.good) for _, out, result, before in merged
        ):
            counts = dict(job.counts)
            for key, n in new.items():
                counts[key] = counts.get(key, 0) + n
            with trust_transaction(self.home, cfg.default_trust) as book:
                self._write_counts(book, counts, now, tallies)
                for peer_id, out, _, before in merged:
                    collisions += book.check_collisions(
                        before, out.good, peer_id, self.identity, now
                    )
            job.book = book  # written: whatever fails after this, not again
        else:
            outs[0].counts, outs[0].tallies = new, tallies
        if collisions:
            log_collisions(self.home, collisions, cfg.max_log_bytes)
        by_key = held_by_key(hive_file(self.home, KNOWLEDGE))
        for _, out, result, _ in merged:
            out.committed = (result, units, sig, book)
            out.by_key = by_key
        if warm:
            self._warm_units(units)
        return outs

    def _committed(
        self,
        out: _Commit,
        peer_id: str,
        ack_id: str,
        stats: dict[str, int],
        now: int,
    ) -> None:
        ps = self.state.peer(peer_id)
        good = out.good
        if out.bad and self._may_warn(peer_id):
            # One line per batch, however many bad units it holds.
            log.info(
                "rejected {count} knowledge unit(s) from {peer_id} (first {error})",
                count=out.bad,
                peer_id=peer_id,
                error=out.first_error,
            )
        self.counters["bad_units"] += out.bad
        ps.rejected += out.bad
        stats["bad"] = out.bad
        # What trust.json did not get yet waits for the next flush.
        for key, count in out.counts.items():
            self._unrecorded[key] = self._unrecorded.get(key, 0) + count
        for peer, (accepted, conflicted) in out.tallies.items():
            tally = self._untallied.setdefault(peer, [0, 0])
            tally[0] += accepted
            tally[1] += conflicted
        if out.counts or out.tallies or out.committed is None:
            self._record_soon()  # (a batch of copies still marks the contact)
        if out.committed is None:
            # Nothing written.
            stats["duplicates"] = len(good)
            self._merged(peer_id, good, good, ack_id, stats, now)
            return
        result, units, sig, book = out.committed
        # What we just wrote is the store now: no need to parse it again.
        self._units_cache = (sig, units)
        self._remember_gone(out.gone, len(units), now)
        if out.by_key is not None and len(out.by_key) == len(units):
            self._key_index = (units, out.by_key)  # the store's own key table
        self._prepare_index(units)
        stats.update(result.stats())
        have = good
        excess = len(result.left_out)
        if excess:
            cfg = self.config.hive
            self.counters["dropped_rate_cap"] += excess
            ps.dropped += excess
            stats["dropped"] = excess
            if self._may_warn(peer_id):
                log.warn(
                    "rate cap: dropped {count} new unit(s) from {peer_id} ({cap} per day)",
                    count=excess,
                    peer_id=peer_id,
                    cap=cfg.max_units_per_peer_per_day,
                )
            left = {id(u) for u in result.left_out}
            have = [u for u in good if id(u) not in left]
        # What went out before the write needs no push round after it.
        forwarded = self._forwarded
        # Only what the store holds after the commit: its bounds may have
        # evicted a unit the merge stored.
        rest = [u for u in result.stored if (u.id, u.version, u.propagation_count) not in forwarded]
        if rest:
            held = out.by_key if out.by_key is not None else {u.semantic_key: u for u in units}
            rest = [u for u in rest if held.get(u.semantic_key) is u]
        self._merged(peer_id, good, have, ack_id, stats, now, rest)

    def _remember_gone(self, gone: list[EvictionKey], stored: int, now: int = 0) -> None:
        """Units evicted as they were stored at ``now`` (see ``_gone``); all
        forgotten once the store (``stored`` units) has room again."""
        cap = self.config.hive.max_units
        if not cap or stored < cap:
            if self._gone:
                self._gone.clear()
                self._published_gone()
            return
        if not gone:
            return
        for key in gone:
            self._gone.pop(key, None)
            self._gone[key] = now
        while len(self._gone) > GONE_MAX:
            del self._gone[next(iter(self._gone))]
        self._published_gone()

    def _published_gone(self) -> None:
        self._gone_view = frozenset(self._gone)
        self._gone_pairs = frozenset((k[0], k[1]) for k in self._gone)

    def _gone_now(self, now: int) -> frozenset[EvictionKey]:
        """``_gone`` without what is older than GONE_SECS (oldest first)."""
        gone = self._gone
        if gone:
            # (Oldest first; an entry from "later" -- the clock was set back
            # -- is old too.)
            stale = [
                k
                for k, at in itertools.takewhile(
                    lambda e: not 0 <= now - e[1] < GONE_SECS, gone.items()
                )
            ]
            if stale:
                for k in stale:
                    del gone[k]
                self._published_gone()
        return self._gone_view

    def _merged(
        self,
        peer_id: str,
        good: list[KnowledgeUnit],
        have: list[KnowledgeUnit],
        ack_id: str,
        stats: dict[str, int],
        now: int,
        stored: list[KnowledgeUnit] | None = None,
    ) -> None:
        """
        A batch is merged (or was nothing new): ack, cursors, pass it on.
        ``stored``: what the batch stored that did not go out early (None: a
        batch that changed nothing).  New or updated units go in a push round;
        a shorter path to a unit we hold (a duplicate that lowered its hop
        count) goes on by itself -- at a longer path it may have been at the
        hop limit, so peers that got nothing get it now.
        """
        ps = self.state.peer(peer_id)
        self._ack(peer_id, ack_id, have)
        _mark_sent(ps.sent, good)  # (a merge job's batches: done already, a lookup each)
        for u in have:
            # The cursor follows only the units we kept (not those the cap cut).
            ps.cursor = max(ps.cursor, u.last_validated_at)
        ps.units_down += len(have)
        ps.last_sync_epoch = now
        self._save_soon()
        self.counters["merged_batches"] += 1
        self.counters["duplicate_units"] += stats["duplicates"]
        if any(stats[k] for k in ("accepted", "updated", "rejected", "bad", "dropped")):
            log.info(
                "knowledge from {peer_id}: {accepted} new, {updated} updated, "
                "{rejected} rejected, {duplicates} duplicate, {bad} invalid, {dropped} dropped",
                peer_id=peer_id,
                **{
                    k: stats[k]
                    for k in ("accepted", "updated", "rejected", "duplicates", "bad", "dropped")
                },
            )
        # A batch of copies only (a flooded unit's other paths: most batches
        # in a mesh) is counted, not logged: ``relay status --json`` shows
        # ``duplicate_units`` under "service" -> "hive".
        if stats["accepted"] or stats["updated"]:
            self._file_sig = self._units_cache[0] if self._units_cache else self._signature()
        if stored and self.active():
            self._push_soon(stored)

    def _push_soon(self, units: list[KnowledgeUnit]) -> None:
        """
        Send these newly stored units to every peer that lacks them, in the
        next reactor turn together with those of the other merges of this
        turn -- a push round of just them, not a scan of the whole store
        (a snapshot's merge of thousands of units is many commits).
        """
        if self._call_later is None:
            self._push_stored(units)
            return
        first = not self._to_push
        self._to_push.extend(units)
        if first:
            self._later(0, self._push_queued)

    def _push_queued(self) -> None:
        units, self._to_push = self._to_push, []
        try:
            self._push_stored(units)
        except Exception:
            log.failure("gossip push of merged units failed")

    def _push_stored(self, units: list[KnowledgeUnit]) -> None:
        if not self.active():
            return
        latest: dict[str, KnowledgeUnit] = {}
        for u in units:  # a later commit of this turn may hold a newer version
            held = latest.get(u.id)
            if held is None or u.version >= held.version:
                latest[u.id] = u
        ctx = self._contexts.get(self.config.hive)
        self._push_to(self.mesh.connected_peers(), list(latest.values()), ctx, news=True)
        if self._state_dirty:
            self._save_soon()

    def _write_counts(
        self,
        book: TrustBook,
        counts: DayCounts,
        now: int,
        tallies: dict[str, list[int]] | None = None,
    ) -> None:
        """Write daily receive counts (each on its own day) and the
        accepted/conflicted tallies into ``book`` (on the writer thread)."""
        cap = self.config.hive.max_units_per_peer_per_day
        for (peer, day), count in counts.items():
            at = min(now, (day + 1) * DAY - 1)  # on its day, however late written
            if count:
                book.record_batch(peer, count, at, cap=cap)
            else:
                rec = book.ensure(peer, at)
                rec.last_sync = max(rec.last_sync, at)
        for peer, (accepted, conflicted) in (tallies or {}).items():
            rec = book.ensure(peer, now)
            rec.knowledge_accepted += accepted
            rec.knowledge_conflicted += conflicted

    def _record_soon(self) -> None:
        """Flush the receive counts to trust.json within a few seconds."""
        if self._stopped:
            self.flush_counts()
            return
        if self._record_scheduled:
            return
        self._record_scheduled = True

        def run() -> None:
            self._record_scheduled = False
            self.flush_counts()

        # After failed writes (a full disk, a trust.json we may not write)
        # the next try waits longer: 10 s, 20 s, ... at most 5 minutes.
        failures = min(self._flush_failures, 6)
        self._later(min(RECORD_FLUSH_SECS * 2**failures, 300.0), run)

    def flush_counts(self) -> defer.Deferred[Any] | None:
        """Hand the receive counts and tallies held in memory to the writer thread."""
        # Counts in a merge job now are written with it, or flushed as soon
        # as it comes back without writing them.
        self._flush_missed = bool(self._recording)
        if not self._unrecorded and not self._untallied:
            return None
        counts = self._hand_over()
        tallies, self._untallied = self._untallied, {}
        d = self.writer.run(self._flush_counts, counts, self.now(), tallies)

        def returned(result: Any) -> Any:
            wrote = isinstance(result, TrustBook)
            if not wrote:
                self._flush_failures += 1  # (before the retry is timed)
            # A failed flush is tried again by the timer -- not at once where
            # that would loop (stopped, or no reactor: jobs run inline).
            again = not self._stopped and self._call_later is not None
            self._handed_back(counts, written=wrote, retry=again, at_once=False)
            if not wrote:  # the tallies wait for the next flush
                for peer, (accepted, conflicted) in tallies.items():
                    tally = self._untallied.setdefault(peer, [0, 0])
                    tally[0] += accepted
                    tally[1] += conflicted
                if again and tallies and not counts:
                    self._record_soon()
            return result

        d.addBoth(returned)
        d.addCallback(self._trust_read)
        d.addCallbacks(self._flush_done, self._flush_failed)
        return d

    def _flush_done(self, _: Any) -> None:
        if self._flush_failures:
            log.info(
                "receive counts recorded in trust.json again after {count} failed write(s)",
                count=self._flush_failures,
            )
        self._flush_failures = 0

    def _flush_failed(self, failure: Any) -> None:
        """The counts are kept and tried again later; the log gets the first
        failure whole, then one line at the 2nd, 4th, 8th... in a row."""
        n = self._flush_failures
        if n <= 1:  # (0: a later step failed after the write)
            log.failure(
                "recording receive counts in trust.json failed (kept, tried again)", failure
            )
        elif n & (n - 1) == 0:
            log.warn(
                "recording receive counts in trust.json failed {count} times in a row: {error}",
                count=n,
                error=failure.getErrorMessage(),
            )

    def _flush_counts(
        self, counts: DayCounts, now: int, tallies: dict[str, list[int]] | None = None
    ) -> TrustBook:
        with trust_transaction(self.home, self.config.hive.default_trust) as book:
            self._write_counts(book, counts, now, tallies)
        return book

    def _trust_read(self, book: TrustBook) -> None:
        self._trust = book

    # --- noticing changes by other processes -------------------------------------------------
    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._store_path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> None:
        """Push when knowledge.jsonl changed (reactor-free callers and tests)."""
        try:
            sig = self._signature()
            if sig != self._file_sig:
                self._file_sig = sig
                self._load_units()  # parse now, not when a request arrives
                self.schedule_push_all()
        except Exception:
            log.failure("gossip poll failed")

    def watch(self, changes: ChangeWatcher) -> None:
        """Keep the caches current through change notices (the service)."""
        self._watched = True
        # A unit written locally should start travelling at once (issue 16).
        changes.on(self.home.hive, KNOWLEDGE, self.on_store_changed, at_once=True)
        changes.on(self.home.hive, TRUST, self.on_trust_changed)
        changes.on(self.home.hive, EXPOSURE, self._contexts.invalidate)

    def on_store_changed(
        self, _name: str = KNOWLEDGE, *, first: bool = False
    ) -> defer.Deferred[Any] | None:
        """knowledge.jsonl was replaced: read it on the writer thread, then push.
        ``first``: the service starts -- read it now, not at the first request."""
        if not first:
            sig = self._signature()
            cache = self._units_cache
            if sig == self._file_sig or (cache is not None and cache[0] == sig):
                self._file_sig = sig
                return None  # our own write: the cache already holds it
            if self._merging or self._reading:
                # Likely the merge in progress (the notice comes before its
                # result), or a read already under way: look again when it
                # is done (a burst of notices costs one read, not several).
                self._store_recheck = True
                return None
        path = hive_file(self.home, KNOWLEDGE)
        self._reading = True

        def read() -> tuple[Any, list[KnowledgeUnit] | None]:
            sig = self._signature()
            if not first and sig is not None and sig == self._commit_sig:
                # Our own merge's write (its notice came after the commit's
                # callback was queued): the commit brought its units.
                return sig, None
            with bulk_work():  # a whole store's worth of objects
                units = read_units_file(path).store.units()
                _warm_wire(units)
                precompute_verdicts(self.config.hive, units)
                return sig, units

        def loaded(result: tuple[Any, list[KnowledgeUnit] | None]) -> None:
            sig, units = result
            if units is None:
                return
            self._units_cache = (sig, units)
            self._remember_gone([], len(units))  # room again: forget the evicted
            self._prepare_index(units)
            if sig != self._file_sig:
                self._file_sig = sig
                self.schedule_push_all()

        def done(_: Any) -> None:
            self._reading = False
            if self._store_recheck and not self._merging:
                self._store_recheck = False
                self.on_store_changed()

        d = self.writer.run(read)
        d.addCallback(loaded)
        d.addErrback(logged("reading " + KNOWLEDGE))
        d.addBoth(done)
        return d

    def on_trust_changed(self, _name: str = TRUST) -> defer.Deferred[Any]:
        self._contexts.invalidate()
        d = self.writer.run(load_trust, self.home, self.config.hive.default_trust)
        d.addCallback(self._trust_read)
        d.addErrback(logged("reading " + TRUST))
        return d

    def trust_level(self, peer_id: str) -> float:
        """A peer's trust level from the reactor's copy of trust.json."""
        return self._trust.level(peer_id)

    def distill_tick(self) -> defer.Deferred[Any] | None:
        """The distillation timer: look at the decision log on the writer thread."""
        if self._distilling:
            return None  # the last tick is still running
        self._distilling = True
        from claudectl.hive.distill import maybe_distill

        d = self.writer.run(
            _in_bulk, maybe_distill, self.home, self.config.hive, self.now(), local_id=self.identity
        )

        def done(_: Any) -> None:
            self._distilling = False

        d.addErrback(logged("distillation"))
        d.addBoth(done)
        return d

    def peer_info(self, peer_id: str) -> dict[str, Any]:
        ps = self.state.peers.get(peer_id)
        if ps is None:
            return {}
        return {
            "units_up": ps.units_up,
            "units_down": ps.units_down,
            "last_sync": ps.last_sync_epoch,
        }


class _GossipService(Service):
    """Stops the engine's timers with the service."""

    name = "gossip"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, gossip: Gossip) -> None:
        self.gossip = gossip

    def startService(self) -> None:
        super().startService()
        if self.gossip._watched:
            self.gossip.on_store_changed(first=True)

    def stopService(self) -> Any:
        self.gossip.stop()
        return super().stopService()


def hive_service(gossip: Gossip, clock: Any, changes: ChangeWatcher | None = None) -> MultiService:
    """
    The hive layer's services: the gossip engine's lifetime (``gossip``) and
    the distillation timer (``hive-distill``, its work on the engine's
    writer thread).  With ``changes``, the engine hears of changes to
    knowledge.jsonl and trust.json from it (inotify, or the CLI's notice);
    without, a poll of knowledge.jsonl (``gossip-poll``) stands in.  The
    caller registers the engine's handlers on the mesh (:meth:`Gossip.register`).
    """
    top = MultiService()
    top.setName("hive")
    _GossipService(gossip).setServiceParent(top)
    if changes is not None:
        gossip.watch(changes)
    else:
        poll = TimerService(POLL_SECS, gossip.poll)
        poll.clock = clock
        poll.setName("gossip-poll")
        poll.setServiceParent(top)
    distill = TimerService(DISTILL_POLL_SECS, gossip.distill_tick)
    distill.clock = clock
    distill.setName("hive-distill")
    distill.setServiceParent(top)
    return top


__all__ = ["Gossip", "SyncState", "PeerSync", "hive_service"]
_ = IMesh
