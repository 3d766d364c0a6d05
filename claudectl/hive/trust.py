# -*- test-case-name: tests.test_hive_trust -*-
"""
Trust in peers (docs/hive.md, Trust): the ``trust.json`` records, tiers,
drift, and the sybil checks run on every inbound batch.

:class:`TrustBook` is the in-memory model (no I/O, the clock is an argument).
:func:`load_trust`, :func:`save_trust` and :func:`trust_transaction` read and
write ``$HIVE/trust.json`` (atomic, under a lock).  :func:`trust_level` is the
one-call lookup other layers use (delegation's ``min_trust``).

Differences from claudectl 0.64, on purpose: new peers start at
``[hive] default_trust`` (H10), trust drifts with every decision that matches
a peer's unit when ``auto_trust_drift`` is on (H3), and ``last_sync`` is
refreshed on every batch so that ``stale_peer_days`` counts from the peer's
last contact (H11).
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claudectl.atomic import atomic_write, locked
from claudectl.hive.logs import COLLISIONS, append_log
from claudectl.hive.units import (
    DAY,
    U64_MAX,
    KnowledgeUnit,
    Pattern,
    UnitError,
    command_matches,
    dumps_pretty,
    dumps_record,
)
from claudectl.home import Home
from claudectl.lazylog import LazyLogger

log = LazyLogger(__name__)

QUARANTINE_SECS = 7 * DAY
DRIFT_STEP = 0.01
QUARANTINE_DRIFT_CAP = 0.5
COLLISION_DELTA = 0.3
#: A collision freeze needs this much independent evidence: the peer that
#: sent the contradicting unit is frozen once it contradicted stored
#: knowledge on this many distinct semantic keys; the peer whose unit was
#: contradicted, once this many distinct peers contradicted it.  One unit
#: from one peer never freezes anyone (issue 11, item 5).
COLLISION_EVIDENCE = 2
#: Evidence kept per peer (distinct keys or peers), newest last.
COLLISION_EVIDENCE_KEEP = 32
DAILY_KEEP_DAYS = 30
DEFAULT_RATE_CAP = 1000

POSITIVE_ACTIONS = frozenset({"accept", "auto", "user_approve", "rule_approve"})
NEGATIVE_ACTIONS = frozenset({"reject", "deny_rule_override", "rule_deny", "conflict_deny"})


class Tier(enum.Enum):
    """Trust tiers: (display name, prompt label, rank)."""

    CONFIRMED = ("Confirmed", "hive", 4)
    SUGGESTED = ("Suggested", "hive, suggested", 3)
    UNVERIFIED = ("Unverified", "hive, unverified", 2)
    IGNORED = ("Ignored", "hive, ignored", 1)

    @property
    def display(self) -> str:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]

    @property
    def rank(self) -> int:
        return self.value[2]


def tier_for(level: float) -> Tier:
    if level >= 0.8:
        return Tier.CONFIRMED
    if level >= 0.5:
        return Tier.SUGGESTED
    if level >= 0.2:
        return Tier.UNVERIFIED
    return Tier.IGNORED


def clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


def action_class(user_action: Any) -> int:
    """+1 for a positive user action, -1 for a negative one, 0 for neutral."""
    if user_action in POSITIVE_ACTIONS:
        return 1
    if user_action in NEGATIVE_ACTIONS:
        return -1
    return 0


@dataclass
class PeerTrust:
    peer_id: str
    trust_level: float
    knowledge_accepted: int = 0
    knowledge_conflicted: int = 0
    first_seen: int = 0
    last_sync: int = 0
    quarantined_until: int = 0
    frozen: bool = False
    freeze_reason: str | None = None
    daily_received: dict[str, int] = field(default_factory=dict)
    last_anomaly_at: int | None = None
    #: Collision evidence (ours; claudectl ignores these keys): the semantic
    #: keys on which this peer's units contradicted stored knowledge, and
    #: the peers whose units contradicted this peer's.
    collided_on: list[str] = field(default_factory=list)
    contradicted_by: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, peer_id: str, level: float, now: int) -> PeerTrust:
        return cls(
            peer_id,
            clamp01(level),
            first_seen=now,
            last_sync=now,
            quarantined_until=now + QUARANTINE_SECS,
        )

    @classmethod
    def from_json(cls, value: Any, where: str = "record") -> PeerTrust:
        if not isinstance(value, Mapping):
            raise UnitError(f"{where} must be an object")

        def num(key: str, default: Any = None) -> Any:
            v = value.get(key, default)
            if v is None and default is None and key not in value:
                raise UnitError(f"{where}.{key} is missing")
            return v

        def uint(key: str, default: Any = None) -> int:
            v = num(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= U64_MAX:
                raise UnitError(f"{where}.{key} must be a non-negative integer")
            return v

        level = num("trust_level")
        if isinstance(level, bool) or not isinstance(level, (int, float)):
            raise UnitError(f"{where}.trust_level must be a number")
        peer_id = num("peer_id")
        if not isinstance(peer_id, str):
            raise UnitError(f"{where}.peer_id must be a string")
        frozen = value.get("frozen", False)
        reason = value.get("freeze_reason")
        daily = value.get("daily_received", {})
        anomaly = value.get("last_anomaly_at")
        if not isinstance(frozen, bool):
            raise UnitError(f"{where}.frozen must be true or false")
        if reason is not None and not isinstance(reason, str):
            raise UnitError(f"{where}.freeze_reason must be a string or null")
        if not isinstance(daily, Mapping) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in daily.values()
        ):
            raise UnitError(f"{where}.daily_received must map day numbers to integers")
        if anomaly is not None and (isinstance(anomaly, bool) or not isinstance(anomaly, int)):
            raise UnitError(f"{where}.last_anomaly_at must be an integer or null")

        def strings(key: str) -> list[str]:
            v = value.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise UnitError(f"{where}.{key} must be a list of strings")
            return list(v[-COLLISION_EVIDENCE_KEEP:])

        return cls(
            peer_id,
            float(level),
            uint("knowledge_accepted"),
            uint("knowledge_conflicted"),
            uint("first_seen"),
            uint("last_sync"),
            uint("quarantined_until", 0),
            frozen,
            reason,
            dict(daily),
            anomaly,
            strings("collided_on"),
            strings("contradicted_by"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "trust_level": self.trust_level,
            "knowledge_accepted": self.knowledge_accepted,
            "knowledge_conflicted": self.knowledge_conflicted,
            "first_seen": self.first_seen,
            "last_sync": self.last_sync,
            "quarantined_until": self.quarantined_until,
            "frozen": self.frozen,
            "freeze_reason": self.freeze_reason,
            "daily_received": dict(self.daily_received),
            "last_anomaly_at": self.last_anomaly_at,
            # Ours, after claudectl's keys, and only once there is evidence.
            **({"collided_on": list(self.collided_on)} if self.collided_on else {}),
            **({"contradicted_by": list(self.contradicted_by)} if self.contradicted_by else {}),
        }

    def add_evidence(self, kind: str, item: str) -> int:
        """Remember one piece of collision evidence; returns how many distinct ones."""
        items: list[str] = getattr(self, kind)
        if item in items:
            items.remove(item)
        items.append(item)
        del items[:-COLLISION_EVIDENCE_KEEP]
        return len(items)

    @property
    def tier(self) -> Tier:
        return tier_for(self.trust_level)

    def is_quarantined(self, now: int) -> bool:
        return self.quarantined_until > now

    def is_blocked(self, now: int) -> bool:
        """Kept out of prompts unless ``inject_unverified`` (docs/hive.md, Trust)."""
        return self.frozen or self.is_quarantined(now)

    def drift_up(self, now: int) -> None:
        if self.frozen:
            return
        cap = QUARANTINE_DRIFT_CAP if self.is_quarantined(now) else 1.0
        # Never let the quarantine cap *lower* a level set above it.
        self.trust_level = max(self.trust_level, min(self.trust_level + DRIFT_STEP, cap))
        self.knowledge_accepted += 1
        self.last_sync = max(self.last_sync, now)

    def drift_down(self, now: int) -> None:
        self.trust_level = max(self.trust_level - DRIFT_STEP, 0.0)
        self.knowledge_conflicted += 1

    def freeze(self, reason: str, now: int) -> None:
        self.frozen = True
        self.freeze_reason = reason
        self.last_anomaly_at = now


@dataclass(frozen=True)
class Collision:
    semantic_key: str
    existing_peer: str
    existing_unit_id: str
    incoming_peer: str
    incoming_unit_id: str
    confidence_delta: float
    ts: int

    def to_record(self) -> dict[str, Any]:
        return {
            "confidence_delta": self.confidence_delta,
            "existing_peer": self.existing_peer,
            "existing_unit_id": self.existing_unit_id,
            "incoming_peer": self.incoming_peer,
            "incoming_unit_id": self.incoming_unit_id,
            "semantic_key": self.semantic_key,
            "ts": self.ts,
        }


def unit_matches_decision(unit: KnowledgeUnit, tool: Any, command: Any) -> bool:
    """A decision matches a pattern unit: same tool and, if set, the command contains it."""
    c = unit.content
    if not isinstance(c, Pattern) or c.tool != tool:
        return False
    return command_matches(c.command_pattern, command)


class TrustBook:
    """Every peer's trust record, plus the rules that change them."""

    def __init__(
        self, records: Mapping[str, PeerTrust] | None = None, default_trust: float = 0.5
    ) -> None:
        self.records: dict[str, PeerTrust] = dict(records or {})
        self.default_trust = clamp01(default_trust)

    # --- lookups ---------------------------------------------------------------------
    def get(self, peer_id: str) -> PeerTrust | None:
        return self.records.get(peer_id)

    def level(self, peer_id: str) -> float:
        rec = self.records.get(peer_id)
        return self.default_trust if rec is None else rec.trust_level

    def tier(self, peer_id: str) -> Tier:
        return tier_for(self.level(peer_id))

    def rank(self, peer_id: str) -> int:
        return self.tier(peer_id).rank

    def is_blocked(self, peer_id: str, now: int) -> bool:
        rec = self.records.get(peer_id)
        return rec is not None and rec.is_blocked(now)

    def is_frozen(self, peer_id: str) -> bool:
        rec = self.records.get(peer_id)
        return rec is not None and rec.frozen

    def last_contact(self) -> dict[str, int]:
        return {p: r.last_sync for p, r in self.records.items()}

    # --- changes ----------------------------------------------------------------------
    def ensure(self, peer_id: str, now: int) -> PeerTrust:
        rec = self.records.get(peer_id)
        if rec is None:
            rec = self.records[peer_id] = PeerTrust.new(peer_id, self.default_trust, now)
            log.info(
                "new trust record for {peer_id} at {trust_level}",
                peer_id=peer_id,
                trust_level=rec.trust_level,
            )
        return rec

    def set_level(self, peer_id: str, level: float, now: int) -> PeerTrust:
        """
        Set a peer's trust by hand, clamped to [0, 1].  An explicit choice
        also ends the new-peer quarantine (which only exists to hold back
        peers nobody has vouched for).
        """
        rec = self.ensure(peer_id, now)
        rec.trust_level = clamp01(float(level))
        rec.quarantined_until = min(rec.quarantined_until, now)
        return rec

    def unfreeze(self, peer_id: str) -> bool:
        rec = self.records.get(peer_id)
        if rec is None or not rec.frozen:
            return False
        rec.frozen = False
        rec.freeze_reason = None
        return True

    def record_batch(self, peer_id: str, count: int, now: int, cap: int = DEFAULT_RATE_CAP) -> bool:
        """
        Count ``count`` units received from ``peer_id`` today; freeze the peer
        when this batch takes it past ``cap`` units in one day.  Also marks
        the contact (``last_sync``).  Returns True if the cap was crossed.
        """
        rec = self.ensure(peer_id, now)
        today = now // DAY
        key = str(today)
        before = rec.daily_received.get(key, 0)
        after = before + count
        rec.daily_received[key] = after
        rec.daily_received = {
            d: n
            for d, n in rec.daily_received.items()
            if d.isdigit() and today - int(d) < DAILY_KEEP_DAYS
        }
        rec.last_sync = max(rec.last_sync, now)
        if before <= cap < after:
            rec.freeze(f"rate cap exceeded: {after} units in 24h", now)
            log.warn("peer {peer_id} frozen: {count} units in 24h", peer_id=peer_id, count=after)
            return True
        return False

    def check_collisions(
        self,
        existing: Mapping[str, KnowledgeUnit],
        incoming: Iterable[KnowledgeUnit],
        from_peer: str,
        local_id: str,
        now: int,
    ) -> list[Collision]:
        """
        Compare each incoming unit with the stored unit of its semantic key;
        a different source whose confidence differs by more than 0.3 (or a
        different type) is a collision, logged and counted as evidence.  A
        freeze needs evidence from more than one unit (never the local
        identity): the sending peer ``from_peer`` is frozen once it collided
        on :data:`COLLISION_EVIDENCE` distinct keys, the peer whose unit was
        contradicted once that many distinct peers contradicted it.
        ``existing`` maps key -> unit.
        """
        found = []
        for unit in incoming:
            ex = existing.get(unit.semantic_key)
            if ex is None or not _collide(ex, unit):
                continue
            delta = abs(ex.confidence - unit.confidence)
            col = Collision(
                unit.semantic_key, ex.source_peer, ex.id, from_peer, unit.id, round(delta, 6), now
            )
            found.append(col)
            reason = (
                f"collision on {unit.semantic_key} (\u0394conf {delta:.2f}) with {ex.source_peer}"
            )
            if from_peer != local_id and from_peer != ex.source_peer:
                rec = self.ensure(from_peer, now)
                if rec.add_evidence("collided_on", unit.semantic_key) >= COLLISION_EVIDENCE:
                    rec.freeze(reason, now)
            if ex.source_peer != local_id and ex.source_peer != from_peer:
                rec = self.ensure(ex.source_peer, now)
                if rec.add_evidence("contradicted_by", from_peer) >= COLLISION_EVIDENCE:
                    rec.freeze(reason, now)
            log.warn(
                "collision on {key} between {a} and {b}",
                key=unit.semantic_key,
                a=ex.source_peer,
                b=from_peer,
            )
        return found

    def apply_decision(
        self,
        tool: Any,
        command: Any,
        user_action: Any,
        units: Iterable[KnowledgeUnit],
        local_id: str,
        now: int,
    ) -> dict[str, int]:
        """
        Drift trust for one logged decision: each peer with a matching
        pattern unit moves +0.01 if the user agreed with it, -0.01 if not
        (once per peer per decision).  Returns {peer: +1/-1}.
        """
        sign = action_class(user_action)
        if sign == 0:
            return {}
        votes: dict[str, int] = {}
        for unit in units:
            if unit.source_peer == local_id or unit.source_peer in votes:
                continue
            if not unit_matches_decision(unit, tool, command):
                continue
            approve = unit.content.preferred_action == "approve"  # type: ignore[attr-defined]
            votes[unit.source_peer] = 1 if (sign > 0) == approve else -1
        for peer, vote in votes.items():
            rec = self.ensure(peer, now)
            if vote > 0:
                rec.drift_up(now)
            else:
                rec.drift_down(now)
        return votes

    # --- (de)serialization ---------------------------------------------------------------
    @classmethod
    def from_json(cls, value: Any, default_trust: float = 0.5) -> TrustBook:
        if not isinstance(value, Mapping):
            raise UnitError("trust.json must hold a JSON object")
        records = {}
        for peer, rec in value.items():
            records[peer] = PeerTrust.from_json(rec, f"trust.json[{peer!r}]")
        return cls(records, default_trust)

    def to_json(self) -> dict[str, Any]:
        return {p: self.records[p].to_json() for p in sorted(self.records)}


# --- files ------------------------------------------------------------------------------


def trust_path(home: Home) -> Path:
    return home.hive / "trust.json"


def load_trust(
    home: Home,
    default_trust: float = 0.5,
    *,
    repair: bool = False,
    on_damage: Callable[[str], object] | None = None,
) -> TrustBook:
    """
    Read ``trust.json``.  An unreadable file gives an empty book (with a
    logged warning).  Only with ``repair`` -- inside :func:`trust_transaction`,
    under the lock, about to write a new file -- is it moved aside to
    ``trust.json.corrupt-<epoch>`` (never overwritten): a reader may just have
    caught claudectl, which rewrites the file in place, half-way.
    ``on_damage`` is told what happened in a sentence (the CLI prints it: every
    peer's trust changed to the default).
    """
    path = trust_path(home)
    error: Exception | None = None
    for _attempt in range(2):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return TrustBook(default_trust=default_trust)
        try:
            return TrustBook.from_json(json.loads(data), default_trust)
        except (ValueError, UnicodeDecodeError) as e:
            error = e
            # A writer may be half-way (claudectl rewrites in place): the
            # second read may see it done.  No sleep: the service reads on
            # its writer thread and reads again when the write's change
            # notice arrives.
    if not repair:
        log.warn(
            "cannot read {path} ({reason}); using default trust levels",
            path=str(path),
            reason=str(error),
        )
        if on_damage is not None:
            on_damage(
                f"{path} is damaged ({error}); every peer counts at the default trust "
                f"{default_trust:.2f} until it is fixed (the next trust change moves it "
                f"aside to {path.name}.corrupt-<time>)"
            )
        return TrustBook(default_trust=default_trust)
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    with contextlib.suppress(OSError):
        path.rename(aside)
    log.error(
        "unreadable {path} moved to {aside}: {reason}",
        path=str(path),
        aside=str(aside),
        reason=str(error),
    )
    if on_damage is not None:
        on_damage(
            f"{path} was damaged ({error}): moved aside to {aside.name}; every other "
            f"peer's trust starts again at the default {default_trust:.2f}"
        )
    return TrustBook(default_trust=default_trust)


def save_trust(home: Home, book: TrustBook) -> None:
    atomic_write(trust_path(home), dumps_pretty(book.to_json()), mode=0o600)


@contextlib.contextmanager
def trust_transaction(
    home: Home, default_trust: float = 0.5, on_damage: Callable[[str], object] | None = None
) -> Iterator[TrustBook]:
    """Load, let the caller change, and save ``trust.json`` under its lock."""
    with locked(trust_path(home)):
        book = load_trust(home, default_trust, repair=True, on_damage=on_damage)
        before = book.to_json()
        yield book
        if book.to_json() != before:
            save_trust(home, book)


def log_collisions(
    home: Home, collisions: Iterable[Collision], max_bytes: int = 16 * 1024 * 1024
) -> None:
    """Append to ``collisions.jsonl`` (rotated past ``max_bytes``)."""
    append_log(home, COLLISIONS, (dumps_record(c.to_record()) for c in collisions), max_bytes)


def trust_level(home: Home, peer_id: str, default: float = 0.5) -> float:
    """A peer's trust level, or ``default`` when it has no record."""
    book = load_trust(home, default)
    return book.level(peer_id)


def _collide(stored: KnowledgeUnit, incoming: KnowledgeUnit) -> bool:
    """Two units of one semantic key from different sources that disagree:
    another type, or confidences more than :data:`COLLISION_DELTA` apart."""
    if stored.source_peer == incoming.source_peer:
        return False
    return (
        stored.type != incoming.type
        or abs(stored.confidence - incoming.confidence) > COLLISION_DELTA
    )


def any_collision(existing: Mapping[str, KnowledgeUnit], incoming: Iterable[KnowledgeUnit]) -> bool:
    """Would :meth:`TrustBook.check_collisions` find a collision (no side effects)?"""
    for unit in incoming:
        ex = existing.get(unit.semantic_key)
        if ex is not None and _collide(ex, unit):
            return True
    return False
