# -*- test-case-name: tests.test_hive_store -*-
"""
The knowledge store: ``$HIVE/knowledge.jsonl`` (docs/hive.md, Files).

:class:`KnowledgeStore` is the in-memory model: one unit per semantic key
(inserting a unit replaces the unit of its key, as in claudectl).  Unlike
claudectl it is keyed by semantic key rather than by id, so two units that
happen to share an id (defect H16) no longer overwrite each other.

:func:`store_transaction` is the only way stored knowledge changes: it takes
the advisory lock, loads the file, lets the caller change the store, applies
the bounds (:func:`compact`), archives what was evicted and writes the file
atomically -- or, for gossip (``append=True``), when the transaction only
added units at new keys to a file that ends in a whole line, appends their
lines (one write, fsync).  A
file this process left as it is (same signature and last bytes) is not read
again: the transaction starts from the units it wrote.  Lines that cannot be
read are appended, with the reason, to ``quarantine.jsonl`` before the
rewrite, so nothing is lost silently (H5); a line torn by a crash during an
append is such a line.
"""

from __future__ import annotations

import contextlib
import operator
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from claudectl.atomic import append_line, atomic_write, fsync_append, locked
from claudectl.config import HiveConfig
from claudectl.filesig import signature
from claudectl.hive.logs import COLLISIONS as COLLISIONS  # re-exported
from claudectl.hive.logs import append_log as append_log  # re-exported
from claudectl.hive.units import (
    DAY,
    KnowledgeUnit,
    UnitError,
    dumps_line,
    dumps_record,
    parse_line,
)
from claudectl.home import Home
from claudectl.lazylog import LazyLogger

if TYPE_CHECKING:
    from claudectl.relay.keystore import KeyStore

log = LazyLogger(__name__)

KNOWLEDGE = "knowledge.jsonl"
QUARANTINE = "quarantine.jsonl"
ARCHIVE = "archive.jsonl"
CONFLICTS = "conflicts.jsonl"
RESOLUTIONS = "resolutions.jsonl"
MODE = "mode"


def hive_file(home: Home, name: str) -> Path:
    return home.hive / name


def now_epoch() -> int:
    return int(time.time())


# --- the in-memory store -----------------------------------------------------------


class KnowledgeStore:
    """Units by semantic key, in insertion order."""

    def __init__(self, units: Iterable[KnowledgeUnit] = ()) -> None:
        #: knowledge.jsonl's stat() signature when a transaction left it.
        self.signature: tuple[int, int, int] | None = None
        #: What the store's bounds evicted when a transaction ended.
        self.evicted: list[Eviction] = []
        self._by_key: dict[str, KnowledgeUnit] = {}
        for unit in units:
            self.insert(unit)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[KnowledgeUnit]:
        return iter(list(self._by_key.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def units(self) -> list[KnowledgeUnit]:
        return list(self._by_key.values())

    def by_key(self) -> dict[str, KnowledgeUnit]:
        return dict(self._by_key)

    def get(self, semantic_key: str) -> KnowledgeUnit | None:
        return self._by_key.get(semantic_key)

    def with_id(self, unit_id: str) -> list[KnowledgeUnit]:
        return [u for u in self._by_key.values() if u.id == unit_id]

    def insert(self, unit: KnowledgeUnit) -> KnowledgeUnit | None:
        """Store ``unit`` at its semantic key; return the unit it replaced."""
        key = unit.semantic_key
        old = self._by_key.get(key)
        self._by_key[key] = unit
        return old

    def remove(self, semantic_key: str) -> KnowledgeUnit | None:
        return self._by_key.pop(semantic_key, None)

    def remove_id(self, unit_id: str) -> list[KnowledgeUnit]:
        gone = self.with_id(unit_id)
        for unit in gone:
            del self._by_key[unit.semantic_key]
        return gone

    @classmethod
    def _of(cls, by_key: dict[str, KnowledgeUnit]) -> KnowledgeStore:
        """A store that takes ``by_key`` as it is (units already keyed)."""
        store = cls()
        store._by_key = by_key
        return store

    def replace_all(self, units: Iterable[KnowledgeUnit]) -> None:
        self._by_key = {}
        for unit in units:
            self.insert(unit)

    def to_bytes(self) -> bytes:
        """The file: one compact unit per line; an empty store is ``\\n``."""
        if not self._by_key:
            return b"\n"
        return b"".join(_line_for(u) for u in self._by_key.values())

    def snapshot(self) -> tuple[KnowledgeUnit, ...]:
        return tuple(self._by_key.values())


@dataclass(frozen=True)
class BadLine:
    lineno: int
    reason: str
    raw: str

    def to_record(self, source: str, now: int) -> dict[str, object]:
        return {
            "line": self.raw,
            "lineno": self.lineno,
            "reason": self.reason,
            "source": source,
            "ts": now,
        }


@dataclass
class LoadResult:
    store: KnowledgeStore
    bad: list[BadLine] = field(default_factory=list)
    #: Units of a key that a later line of the same key replaced.
    superseded: list[KnowledgeUnit] = field(default_factory=list)


#: Parsed lines by their exact bytes.  Units are immutable, and the same
#: lines are read again and again (every transaction re-reads the file), so
#: only changed lines pay for JSON parsing and validation.
_LINE_CACHE: dict[bytes, KnowledgeUnit] = {}
#: Enough for the largest stores gossip meets (a 50,000-unit snapshot is
#: merged in several batches, each re-reading the file: misses would make
#: that quadratic).
_LINE_CACHE_MAX = 200_000


def _parse_cached(raw: bytes) -> KnowledgeUnit:
    unit = _LINE_CACHE.get(raw)
    if unit is None:
        unit = parse_line(raw.decode("utf-8"))
        if len(_LINE_CACHE) >= _LINE_CACHE_MAX:
            _LINE_CACHE.clear()
            _BYTES_OF.clear()
        _LINE_CACHE[raw] = unit
        _BYTES_OF[id(unit)] = (unit, raw + b"\n", False)
    return unit


#: The stored line of a unit object (by identity; the entry keeps the unit
#: alive, so an id is never reused while it is cached), and whether it is
#: :func:`dumps_line`'s (else: the line as read from the file, kept as it was).
_BYTES_OF: dict[int, tuple[KnowledgeUnit, bytes, bool]] = {}


def _line_for(unit: KnowledgeUnit) -> bytes:
    hit = _BYTES_OF.get(id(unit))
    if hit is not None and hit[0] is unit:
        return hit[1]
    return _encode_line(unit)


def _encode_line(unit: KnowledgeUnit) -> bytes:
    line = dumps_line(unit).encode("utf-8")
    remember_line(unit, line)
    return line


def remember_line(unit: KnowledgeUnit, line: bytes) -> None:
    """
    ``line`` (with its ``\\n``) is ``dumps_line(unit)`` in UTF-8: write it
    for this unit object rather than encoding the unit.
    """
    remember_lines(((unit, line),))


def remember_lines(pairs: Collection[tuple[KnowledgeUnit, bytes]]) -> None:
    """:func:`remember_line` for each (unit, line): a unit read from a
    frame's canonical text comes with its line (claudectl.hive.wireunits)."""
    if len(_BYTES_OF) + len(pairs) > _LINE_CACHE_MAX or len(_LINE_CACHE) >= _LINE_CACHE_MAX:
        _BYTES_OF.clear()
        _LINE_CACHE.clear()
    bytes_of, parsed = _BYTES_OF, _LINE_CACHE.setdefault
    for unit, line in pairs:
        bytes_of[id(unit)] = (unit, line, True)
        # The next read of the file we are writing finds this line parsed: a
        # unit read back from its own line is this unit (no second validation).
        parsed(line[:-1], unit)


def canonical_line(unit: KnowledgeUnit) -> bytes:
    """
    ``dumps_line(unit)`` as bytes, cached like the lines :func:`to_bytes`
    writes (a unit's fingerprint is made from it, then its line is written
    without being encoded again).  A line read from a file, which may be
    spelled otherwise, is kept for writing; this gives the canonical one.
    """
    hit = _BYTES_OF.get(id(unit))
    if hit is not None and hit[0] is unit:
        if hit[2]:
            return hit[1]
        return dumps_line(unit).encode("utf-8")
    return _encode_line(unit)


def parse_units(data: bytes) -> LoadResult:
    """Read a units file: good lines into a store, the rest reported."""
    result = LoadResult(KnowledgeStore())
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            unit = _parse_cached(raw)
        except UnicodeDecodeError:
            result.bad.append(BadLine(lineno, "not UTF-8", raw.decode("utf-8", "backslashreplace")))
            continue
        except UnitError as e:
            result.bad.append(BadLine(lineno, str(e), raw.decode("utf-8")))
            continue
        old = result.store.insert(unit)
        if old is not None:
            result.superseded.append(old)
    return result


def read_units_file(path: Path) -> LoadResult:
    """
    Read a units file.  A ``knowledge.jsonl`` this process left as it is
    (:func:`store_transaction`) is not read again: its units are the ones
    written (the same objects).
    """
    held = _held_units(path)
    if held is not None:
        return LoadResult(KnowledgeStore._of(held))
    return _read_file(path)


def _read_file(path: Path) -> LoadResult:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadResult(KnowledgeStore())
    return parse_units(data)


def load_store(home: Home) -> LoadResult:
    """Read ``knowledge.jsonl`` without changing anything (for listings)."""
    return read_units_file(hive_file(home, KNOWLEDGE))


def save_store(home: Home, store: KnowledgeStore) -> None:
    atomic_write(hive_file(home, KNOWLEDGE), store.to_bytes(), mode=0o600)


# --- the store as this process last wrote it ------------------------------------------
#
# A transaction that finds knowledge.jsonl exactly as this process left it
# (same signature, same last bytes) starts from the units it wrote instead of
# reading and parsing the file again; and one that only adds units at new keys
# appends their lines (one write, fsync) instead of rewriting the file.  See
# docs/hive.md, "Appending to knowledge.jsonl".

#: How many of the file's last bytes are compared before the held store is used.
_TAIL_BYTES = 256

FileSig = tuple[int, int, int, int]


@dataclass
class _Held:
    sig: FileSig
    tail: bytes
    by_key: dict[str, KnowledgeUnit]


#: knowledge.jsonl path -> what this process last wrote (or read clean) there.
_HELD: dict[str, _Held] = {}
#: Files held at most (the least recently written go first).
_HELD_FILES = 4


def _file_sig(fd: int) -> FileSig:
    st = os.fstat(fd)
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def _tail_of(fd: int, size: int, n: int = _TAIL_BYTES) -> bytes:
    start = max(0, size - n)
    return os.pread(fd, size - start, start)


def _probe(path: Path) -> tuple[FileSig, bytes] | None:
    """The file's signature and last bytes (None when it is missing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        sig = _file_sig(fd)
        return sig, _tail_of(fd, sig[2])
    finally:
        os.close(fd)


def _hold(path: Path, by_key: dict[str, KnowledgeUnit]) -> None:
    """Remember ``by_key`` as what ``path`` holds now (call it holding the lock)."""
    probe = _probe(path)
    _HELD.pop(str(path), None)
    if probe is None:
        return
    if len(_HELD) >= _HELD_FILES:  # (one home in a service; tests make many)
        for other in list(_HELD)[: len(_HELD) - _HELD_FILES + 1]:
            _HELD.pop(other, None)
    _HELD[str(path)] = _Held(probe[0], probe[1], dict(by_key))


def _held_units(path: Path) -> dict[str, KnowledgeUnit] | None:
    """A copy of the units of ``path`` if it is as this process left it."""
    by_key = held_by_key(path)
    return None if by_key is None else dict(by_key)


def held_by_key(path: Path) -> Mapping[str, KnowledgeUnit] | None:
    """
    The units of ``path`` by semantic key if it is as this process left it:
    the held mapping itself, not a copy (never change it).
    """
    held = _HELD.get(str(path))
    if held is None:
        return None
    probe = _probe(path)
    if probe is None or probe[0] != held.sig or probe[1] != held.tail:
        if _HELD.get(str(path)) is held:  # (readers on other threads look too)
            _HELD.pop(str(path), None)
        return None
    return held.by_key


def forget_held(path: Path | None = None) -> None:
    """Drop what is held of ``path`` (of every file with None): read it next time."""
    if path is None:
        _HELD.clear()
    else:
        _HELD.pop(str(path), None)


def _appended(
    before: dict[str, KnowledgeUnit], after: dict[str, KnowledgeUnit]
) -> list[KnowledgeUnit] | None:
    """
    The units ``after`` adds at new keys behind every unit of ``before``,
    each unchanged and in place; None when ``after`` changed or dropped any.
    """
    n = len(before)
    if len(after) < n:
        return None
    keys = list(after)
    units = list(after.values())
    if keys[:n] != list(before) or not all(map(operator.is_, units, before.values())):
        return None
    return units[n:]


def _append_lines(path: Path, units: list[KnowledgeUnit]) -> bool:
    """
    Append the lines of ``units`` to ``path`` (one write, then fsync) if its
    last byte ends a line; False (nothing written) otherwise.
    """
    probe = _probe(path)
    if probe is None or probe[0][2] < 2 or not probe[1].endswith(b"\n"):
        return False  # missing, the empty store's lone "\n", or a torn last line
    fsync_append(path, b"".join([_line_for(u) for u in units]))
    return True


def quarantine_lines(home: Home, bad: Iterable[BadLine], source: str, now: int) -> None:
    for b in bad:
        append_line(hive_file(home, QUARANTINE), dumps_record(b.to_record(source, now)))
        log.warn(
            "unreadable line {lineno} of {source} moved to quarantine: {reason}",
            lineno=b.lineno,
            source=source,
            reason=b.reason,
        )


def archive_units(home: Home, units: Iterable[KnowledgeUnit]) -> int:
    n = 0
    for unit in units:
        append_line(hive_file(home, ARCHIVE), dumps_line(unit))
        n += 1
    return n


# --- bounds -------------------------------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    unit: KnowledgeUnit
    reason: str  # "ttl", "stale_peer" or "max_units"


def compact(
    units: Iterable[KnowledgeUnit],
    *,
    local_id: str,
    config: HiveConfig,
    last_contact: Mapping[str, int],
    now: int,
) -> tuple[list[KnowledgeUnit], list[Eviction]]:
    """
    Apply the store bounds; local units are never evicted.

    1. Peer units not validated for ``knowledge_ttl_days`` expire.
    2. Units of peers not heard from for ``stale_peer_days`` (by their last
       contact; peers we know nothing about are kept) are pruned.
    3. Above ``max_units``, the peer units with the lowest decayed weight
       (effective confidence x evidence) go first.
    A setting of 0 disables its rule.
    """
    ttl = config.knowledge_ttl_days * DAY
    stale = config.stale_peer_days * DAY
    kept: list[KnowledgeUnit] = []
    evicted: list[Eviction] = []
    for unit in units:
        peer = unit.source_peer
        if peer == local_id:
            kept.append(unit)
        elif ttl and now - unit.last_validated_at > ttl:
            evicted.append(Eviction(unit, "ttl"))
        elif stale and peer in last_contact and now - last_contact[peer] > stale:
            evicted.append(Eviction(unit, "stale_peer"))
        else:
            kept.append(unit)
    cap = config.max_units
    if cap and len(kept) > cap:
        peer_units = sorted(
            (u for u in kept if u.source_peer != local_id),
            key=lambda u: (u.weight(now), u.last_validated_at, u.id),
        )
        over = len(kept) - cap
        drop = {id(u) for u in peer_units[:over]}
        evicted.extend(Eviction(u, "max_units") for u in kept if id(u) in drop)
        kept = [u for u in kept if id(u) not in drop]
    return kept, evicted


def last_contact(
    home: Home, records: Mapping[str, int] | None = None, keys: KeyStore | None = None
) -> dict[str, int]:
    """
    When each peer was last heard from (epoch): the later of its trust
    record's ``last_sync`` (``records``: a trust book's
    :meth:`~claudectl.hive.trust.TrustBook.last_contact`, else trust.json
    is read) and the relay's ``.meta`` ``last_seen`` (through ``keys``, a
    key store whose caches save the reads, else a new one).
    """
    from claudectl.hive.trust import load_trust
    from claudectl.relay.keystore import KeyStore

    contact = dict(load_trust(home).last_contact() if records is None else records)
    ks = keys if keys is not None else KeyStore(home)
    for peer in ks.known_peers():
        meta = ks.meta(peer)
        if meta is not None:
            contact[peer] = max(contact.get(peer, 0), meta.last_seen // 1000)
    return contact


# --- transactions ---------------------------------------------------------------------


@contextlib.contextmanager
def store_transaction(
    home: Home,
    *,
    local_id: str,
    config: HiveConfig | None = None,
    now: int | None = None,
    apply_bounds: bool = True,
    append: bool = False,
    contact: Callable[[], Mapping[str, int]] | None = None,
) -> Iterator[KnowledgeStore]:
    """
    Read-modify-write ``knowledge.jsonl`` under its lock.

    Unreadable lines are quarantined; superseded duplicates and evicted
    units go to ``archive.jsonl``; the file is written only if something
    changed, atomically (all or nothing).  With ``append``, a change that
    only adds units at new keys appends their lines instead (one write,
    fsync): for a writer whose input is sent again when it was not written
    in full (gossip: a batch is acknowledged after its commit), since a
    crash during the append can store part of them and leave a torn last
    line (quarantined by the next transaction).  ``contact`` gives each
    peer's last contact for the bounds (default: :func:`last_contact`, which
    reads trust.json and every peer's ``.meta``).  If the block raises,
    nothing is written.
    """
    config = config or HiveConfig()
    path = hive_file(home, KNOWLEDGE)
    with locked(path):
        t = now_epoch() if now is None else now
        loaded = read_units_file(path)
        store = loaded.store
        before = store.by_key()
        yield store
        evicted: list[Eviction] = []
        if apply_bounds:
            kept, evicted = compact(
                store.units(),
                local_id=local_id,
                config=config,
                last_contact=last_contact(home) if contact is None else contact(),
                now=t,
            )
            if evicted:
                store.replace_all(kept)
                store.evicted = evicted
        after = store._by_key
        if loaded.bad:
            quarantine_lines(home, loaded.bad, KNOWLEDGE, t)
        if loaded.superseded:
            archive_units(home, loaded.superseded)
        if evicted:
            archive_units(home, (e.unit for e in evicted))
            for e in evicted:
                log.info("evicted {unit_id} ({reason})", unit_id=e.unit.id, reason=e.reason)
        forget_held(path)  # until the file is known again
        added = _appended(before, after)  # None: a unit changed or went
        if loaded.bad or loaded.superseded or not path.exists() or added is None:
            save_store(home, store)
        elif added and not (append and _append_lines(path, added)):
            save_store(home, store)
        _hold(path, after)
        # The file as this transaction leaves it, taken under its lock: a
        # write by another process right after is not taken for ours.
        store.signature = signature(path)


def hive_active(home: Home, config: HiveConfig) -> bool:
    """``$HIVE/mode`` says ``on``/``off``; otherwise ``[hive] enabled`` decides."""
    try:
        mode = hive_file(home, MODE).read_text(encoding="utf-8").strip().lower()
    except (FileNotFoundError, UnicodeDecodeError):
        mode = ""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return config.enabled
