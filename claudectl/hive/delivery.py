# -*- test-case-name: tests.test_hive_delivery -*-
"""
Who delivered each peer unit to us: ``$HIVE/delivery.json`` (trust by path).

A unit names its origin in ``source_peer``, but any peer can write any name
there.  What we know for certain is which authenticated peer handed the unit
to us -- its *deliverer*.  A unit is therefore trusted no more than the
lower of its origin's trust and its deliverers' (:func:`path_peers`, used by
the prompt): a peer at 0.2 that relays a unit naming a 0.9 peer gets it
labelled at 0.2's tier, never at 0.9's.

The deliverer is kept beside the unit, not in it, because claudectl 0.64
drops unknown keys whenever it rewrites ``knowledge.jsonl`` (its brain does
on every injection) -- ``knowledge.jsonl`` stays byte for byte claudectl's.
``delivery.json`` is one compact JSON object (shown pretty here)::

    {"version": 1, "units": {"<fingerprint>": {"id": "ku_..", "source_peer": "peer-b",
                                               "delivered_by": ["peer-c"]}}}

The fingerprint is a hash of what the unit *says* (id, origin, version,
scope, category, content, numbers, timestamps) and leaves out what the
brain's feedback and the hop count change, so an entry follows its unit
through claudectl's rewrites but never applies to a different unit that
reuses the id.  A unit with no entry (received by claudectl's own relay,
imported by hand, stored before this file existed) counts as delivered by
its origin, as in claudectl -- so a unit that only its origin delivered
gets no entry either (a snapshot from the node that made its units writes
no fingerprint at all).  Only gossip writes the file, under the lock of
``knowledge.jsonl``, before the store itself is written; entries of units
no longer stored are dropped on each write.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from math import isfinite
from typing import Any

from claudectl.atomic import atomic_write
from claudectl.hive.store import canonical_line
from claudectl.hive.units import KnowledgeUnit
from claudectl.home import Home
from claudectl.lazylog import LazyLogger

log = LazyLogger(__name__)

DELIVERY = "delivery.json"
FORMAT_VERSION = 1
#: Deliverers remembered per unit (a unioned cluster collects them).
MAX_DELIVERERS = 16

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode


#: Fingerprints by unit object (units are immutable, and the store hands out
#: the same objects for unchanged lines); the entry keeps the unit alive, so
#: an id() is never reused while it is cached.
_FP_CACHE: dict[int, tuple[KnowledgeUnit, str]] = {}
_FP_CACHE_MAX = 200_000


def fingerprint(unit: KnowledgeUnit) -> str:
    hit = _FP_CACHE.get(id(unit))
    if hit is not None and hit[0] is unit:
        return hit[1]
    text = _text_from_line(unit, canonical_line(unit))
    if text is None:
        text = fingerprint_text(unit).encode("ascii")
    fp = hashlib.sha256(text).hexdigest()[:32]
    if len(_FP_CACHE) >= _FP_CACHE_MAX:
        _FP_CACHE.clear()
    _FP_CACHE[id(unit)] = (unit, fp)
    return fp


def fingerprint_text(unit: KnowledgeUnit) -> str:
    """
    What the fingerprint hashes: what makes it another unit as far as trust
    goes (content keys in claudectl's fixed order); not rollout state,
    feedback or hops.  Compact JSON, ASCII only.
    """
    as_json = unit.wire_dict  # built once per unit object
    return _ENCODE(
        [
            unit.id,
            unit.source_peer,
            unit.version,
            as_json["scope"],
            unit.category,
            as_json["content"],
            unit.evidence_count,
            unit.confidence,
            unit.originated_at,
            unit.last_validated_at,
            unit.revalidation_interval_secs,
        ]
    )


def _text_from_line(unit: KnowledgeUnit, line: bytes) -> bytes | None:
    """
    :func:`fingerprint_text` cut from the unit's canonical ``knowledge.jsonl``
    line (compact, claudectl's key order), which holds the same JSON for the
    scope and the content: the content is not encoded a second time.  Only
    for an ASCII line (the fingerprint escapes everything else); None when
    the line is not laid out as expected (then the text is encoded).
    """
    if not line.isascii():
        return None
    # The members before "evidence_count" are id, scope, category and content,
    # in that order; a quote inside a string is escaped, so each marker is
    # found where that member starts.
    i = line.find(b',"scope":')
    j = line.find(b',"category":', i)
    k = line.find(b',"content":', j)
    m = line.find(b',"evidence_count":', k)
    if not (line.startswith(b'{"id":') and 0 < i < j < k < m):
        return None
    ints = (
        unit.version,
        unit.evidence_count,
        unit.originated_at,
        unit.last_validated_at,
        unit.revalidation_interval_secs,
    )
    conf = unit.confidence
    if any(type(n) is not int for n in ints) or type(conf) is not float or not isfinite(conf):
        return None  # JSON's spelling of anything else is left to the encoder
    return b"".join(
        (
            b"[",
            line[6:i],
            b",",
            _ENCODE(unit.source_peer).encode("ascii"),
            b",%d," % unit.version,
            line[i + 9 : j],
            b",",
            line[j + 12 : k],
            b",",
            line[k + 11 : m],
            b",%d,%s,%d,%d,%d]"
            % (
                unit.evidence_count,
                float.__repr__(conf).encode("ascii"),
                unit.originated_at,
                unit.last_validated_at,
                unit.revalidation_interval_secs,
            ),
        )
    )


class DeliveryBook:
    """Fingerprint -> the peers that delivered that unit to us."""

    def __init__(self, entries: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.entries: dict[str, dict[str, Any]] = dict(entries or {})
        #: Set by every change (the file is written only then).
        self.changed = False
        #: The ``"units"`` members as last encoded (fingerprint -> text), and
        #: how many entries, in order, the text ``_body`` of the last
        #: encoding covers; ``_stale`` once an entry in it changed or went.
        self._texts: dict[str, str] = {}
        self._body = ""
        self._covered = 0
        self._stale = True
        #: Ids of the entries' units (built when first needed).
        self._ids: set[str] | None = None

    def entry_ids(self) -> set[str]:
        """The unit ids that have entries (a unit with another id has none)."""
        if self._ids is None:
            self._ids = {e.get("id") for e in self.entries.values()}  # type: ignore[misc]
        return self._ids

    def deliverers(self, unit: KnowledgeUnit) -> tuple[str, ...]:
        """The recorded deliverers of ``unit`` (empty when unknown)."""
        if unit.id not in self.entry_ids():
            return ()
        entry = self.entries.get(fingerprint(unit))
        if entry is None:
            return ()
        return tuple(entry["delivered_by"])

    def record(self, unit: KnowledgeUnit, deliverers: Iterable[str]) -> None:
        peers = list(dict.fromkeys(deliverers))[:MAX_DELIVERERS]
        if not peers:
            return
        if peers == [unit.source_peer]:
            # Delivered by its origin alone: what no entry means.
            self._forget(unit)
            return
        entry = {"id": unit.id, "source_peer": unit.source_peer, "delivered_by": peers}
        fp = fingerprint(unit)
        old = self.entries.get(fp)
        if old != entry:
            self._texts.pop(fp, None)  # (an entry dropped earlier may come back changed)
            if old is not None:
                self._stale = True  # an entry inside the encoded text changed
            self.entries[fp] = entry
            self.entry_ids().add(unit.id)
            self.changed = True

    def _forget(self, unit: KnowledgeUnit) -> None:
        if unit.id not in self.entry_ids():
            return
        fp = fingerprint(unit)
        if fp in self.entries:
            del self.entries[fp]
            self._ids = None
            self.changed = True
            self._stale = True

    def keep_only(self, units: Iterable[KnowledgeUnit]) -> None:
        """Drop the entries of units that are no longer stored."""
        ids = self.entry_ids()
        if not ids:
            return
        # Only units with an entry's id can have its fingerprint.
        live = {fingerprint(u) for u in units if u.id in ids}
        kept = {fp: e for fp, e in self.entries.items() if fp in live}
        if len(kept) != len(self.entries):
            self.entries = kept
            self._ids = None
            self.changed = True
            self._stale = True

    def to_json(self) -> dict[str, Any]:
        """The file's object; entries in the order they were first recorded."""
        return {"version": FORMAT_VERSION, "units": dict(self.entries)}

    def encode(self) -> str:
        """
        The file's text: ``json.dumps(self.to_json(), separators=(",", ":"))``,
        built from each entry's text encoded once.  When entries were only
        added since the last encoding, their text is put behind the last one's
        (a book of 50,000 entries is not encoded again for each batch, nor in
        one long call on the writer thread).
        """
        texts = self._texts
        if self._stale:
            self._body, self._covered, self._stale = "", 0, False
        parts = [self._body] if self._covered else []
        if self._covered < len(self.entries):
            for fp, e in list(self.entries.items())[self._covered :]:
                text = texts.get(fp)
                if text is None:
                    text = texts[fp] = _ENCODE(fp) + ":" + _ENCODE(e)
                parts.append(text)
            self._body = ",".join(parts)
            self._covered = len(self.entries)
        if len(texts) > 2 * len(self.entries) + 1024:
            self._texts = {fp: texts[fp] for fp in self.entries if fp in texts}
        return '{"version":' + str(FORMAT_VERSION) + ',"units":{' + self._body + "}}"

    @classmethod
    def from_json(cls, value: Any) -> DeliveryBook:
        entries: dict[str, dict[str, Any]] = {}
        units = value.get("units") if isinstance(value, dict) else None
        if isinstance(units, dict):
            for fp, e in units.items():
                peers = e.get("delivered_by") if isinstance(e, dict) else None
                if (
                    isinstance(peers, list)
                    and peers
                    and len(peers) <= MAX_DELIVERERS
                    and all(isinstance(p, str) for p in peers)
                ):
                    entries[fp] = e
        return cls(entries)


def delivery_path(home: Home) -> Any:
    return home.hive / DELIVERY


def load_delivery(home: Home) -> DeliveryBook:
    """Read ``delivery.json``; missing or unreadable gives an empty book (logged)."""
    path = delivery_path(home)
    try:
        return DeliveryBook.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return DeliveryBook()
    except (ValueError, UnicodeDecodeError, OSError) as e:
        log.warn("ignoring unreadable {path}: {error}", path=str(path), error=str(e))
        return DeliveryBook()


def save_delivery(home: Home, book: DeliveryBook) -> None:
    """Write ``delivery.json`` atomically (call it holding the store's lock)."""
    atomic_write(delivery_path(home), book.encode(), mode=0o600)
    book.changed = False


class DeliveryFile:
    """
    ``delivery.json`` for its one writer (the gossip engine): the book is
    parsed again only when the file changed under it.
    """

    def __init__(self, home: Home) -> None:
        self.home = home
        self._book: DeliveryBook | None = None
        self._sig: tuple[int, int, int] | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(delivery_path(self.home))
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> DeliveryBook:
        sig = self._signature()
        if self._book is None or sig is None or sig != self._sig:
            self._book = load_delivery(self.home)
            self._sig = sig
        return self._book

    def save(self, book: DeliveryBook) -> None:
        save_delivery(self.home, book)
        self._book, self._sig = book, self._signature()


def path_peers(unit: KnowledgeUnit, book: DeliveryBook) -> tuple[str, ...]:
    """Every peer whose trust bounds ``unit``'s: its origin, then its deliverers."""
    return tuple(dict.fromkeys((unit.source_peer, *book.deliverers(unit))))


__all__ = [
    "DeliveryBook",
    "DeliveryFile",
    "fingerprint",
    "load_delivery",
    "save_delivery",
    "path_peers",
    "DELIVERY",
]
