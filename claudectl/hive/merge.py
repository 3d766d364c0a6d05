# -*- test-case-name: tests.test_hive_merge -*-
"""
Merging incoming knowledge into the store: local always wins (docs/hive.md, Merging).

:func:`merge_unit` decides one unit against the unit that holds its semantic
key and returns a :class:`MergeOutcome` with the log records of docs/hive.md (Merging);
:func:`merge_batch` applies a batch to an in-memory
:class:`~claudectl.hive.store.KnowledgeStore`.  Neither touches files:
:func:`write_merge_logs` appends the records to ``conflicts.jsonl`` and
``resolutions.jsonl``.

The rules are claudectl's, made into a total order so that the result does
not depend on the order in which units arrive:

* a unit that originated here is never replaced by a peer's unit;
* between peers' units the higher ``confidence x evidence_count`` wins
  (scores equal to 9 decimal places tie), then the higher ``version``, then
  -- only to make ties deterministic -- the larger ``id`` and JSON text.

Cluster units are unioned, not replaced (their evidence adds up).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from claudectl.config import HiveConfig
from claudectl.hive.store import CONFLICTS, RESOLUTIONS, KnowledgeStore, append_log
from claudectl.hive.units import (
    U32_MAX,
    ApproachCluster,
    ApproachVariant,
    KnowledgeUnit,
    dumps_line,
    dumps_record,
)
from claudectl.home import Home

ACCEPTED = "accepted"
DUPLICATE = "duplicate"
UPDATED = "updated"
CLUSTER_UNIONED = "cluster_unioned"
REJECTED_LOCAL = "rejected_local"
REJECTED_PEER = "rejected_peer"

SCORE_DECIMALS = 9


@dataclass(frozen=True)
class MergeOutcome:
    result: str
    #: The unit to store at the key (None: leave the store as it is).
    store: KnowledgeUnit | None = None
    conflict: dict[str, Any] | None = None
    resolution: dict[str, Any] | None = None
    rationale: str = ""


def rank(unit: KnowledgeUnit) -> tuple[float, int, str]:
    """
    The order between two peers' units of one semantic key; when two units
    rank equal, :func:`outranks` breaks the tie on their JSON text.
    """
    return (round(unit.score, SCORE_DECIMALS), unit.version, unit.id)


def outranks(a: KnowledgeUnit, b: KnowledgeUnit) -> bool:
    """Is ``a`` strictly above ``b`` in the (total) merge order?"""
    ra, rb = rank(a), rank(b)
    if ra != rb:
        return ra > rb
    return a != b and dumps_line(a) > dumps_line(b)


def _conflict(ex: KnowledgeUnit, inc: KnowledgeUnit, now: int) -> dict[str, Any]:
    return {
        "incoming_confidence": inc.confidence,
        "incoming_id": inc.id,
        "incoming_peer": inc.source_peer,
        "local_confidence": ex.confidence,
        "local_id": ex.id,
        "local_peer": ex.source_peer,
        "semantic_key": inc.semantic_key,
        "ts": now,
    }


def _resolution(
    result: str,
    winner: KnowledgeUnit,
    loser: KnowledgeUnit,
    rationale: str,
    now: int,
    scores: tuple[float, float] | None = None,
) -> dict[str, Any]:
    ws, ls = scores if scores is not None else (winner.score, loser.score)
    return {
        "loser_id": loser.id,
        "loser_peer": loser.source_peer,
        "loser_score": ls,
        "rationale": rationale,
        "result": result,
        "semantic_key": winner.semantic_key,
        "ts": now,
        "winner_id": winner.id,
        "winner_peer": winner.source_peer,
        "winner_score": ws,
    }


def union_clusters(ex: KnowledgeUnit, inc: KnowledgeUnit) -> KnowledgeUnit:
    """``ex`` with ``inc``'s variants folded in (docs/hive.md, Merging)."""
    assert isinstance(ex.content, ApproachCluster) and isinstance(inc.content, ApproachCluster)
    merged: dict[str, ApproachVariant] = {v.match_key: v for v in ex.content.variants}
    for v in inc.content.variants:
        old = merged.get(v.match_key)
        if old is None:
            merged[v.match_key] = v
            continue
        seen = set(old.contributing_peers)
        extra = []
        for p in v.contributing_peers:
            if p not in seen:  # new here and first in v (linear, not quadratic)
                seen.add(p)
                extra.append(p)
        peers = old.contributing_peers + tuple(extra)
        # Evidence adds up only when the incoming variant brings a contributor
        # the stored one has not counted yet; otherwise it is the same
        # evidence coming back (gossip echoes it) and the larger count stands.
        # This keeps the union idempotent, so two nodes converge.
        new_contributors = len(peers) > len(old.contributing_peers) or not v.contributing_peers
        evidence = old.evidence + v.evidence if new_contributors else max(old.evidence, v.evidence)
        merged[v.match_key] = ApproachVariant(
            approach_summary=old.approach_summary,
            evidence=min(evidence, U32_MAX),
            conditions=old.conditions,
            contributing_peers=peers,
            outcome_ref=old.outcome_ref or v.outcome_ref,
        )
    variants = tuple(sorted(merged.values(), key=lambda v: (-v.evidence, v.approach_summary)))
    return ex.with_(
        content=ApproachCluster(ex.content.problem_key, variants),
        evidence_count=min(sum(v.evidence for v in variants), U32_MAX),
        last_validated_at=max(ex.last_validated_at, inc.last_validated_at),
        version=min(max(ex.version, inc.version) + 1, U32_MAX),
    )


def merge_unit(
    existing: KnowledgeUnit | None,
    inc: KnowledgeUnit,
    local_id: str,
    now: int,
    allow_local_origin: bool = False,
) -> MergeOutcome:
    """
    Decide one incoming unit against ``existing`` (the unit holding its
    semantic key, or None).  ``allow_local_origin`` admits units that claim
    to come from this machine (``hive import`` of one's own export); from the
    network such a claim is rejected.
    """
    ex = existing
    if inc.source_peer == local_id and not allow_local_origin:
        if ex is not None and ex.id == inc.id and ex.version >= inc.version:
            return MergeOutcome(DUPLICATE)  # our own unit, echoed back
        # Whatever holds the key: nobody else may plant "local" knowledge.
        return MergeOutcome(REJECTED_PEER, rationale="incoming unit claims the local identity")
    if ex is None:
        return MergeOutcome(ACCEPTED, store=inc)
    if (
        ex.id == inc.id
        and ex.version == inc.version
        and ex.propagation_count != inc.propagation_count
        and ex.with_(propagation_count=inc.propagation_count) == inc
    ):
        # The same unit reached us along another path: a duplicate.  Keep the
        # shorter path (so the result does not depend on arrival order, and
        # the hop count stays the true distance).
        if inc.propagation_count < ex.propagation_count:
            return MergeOutcome(DUPLICATE, store=inc)
        return MergeOutcome(DUPLICATE)
    if ex.id == inc.id and ex.version >= inc.version and not outranks(inc, ex):
        return MergeOutcome(DUPLICATE)
    if (
        isinstance(ex.content, ApproachCluster)
        and isinstance(inc.content, ApproachCluster)
        and ex.id == inc.id
        and inc.version > ex.version
        and ex.source_peer != local_id
    ):
        # The originator re-distilled its cluster: the new version replaces
        # the old one (a union would count the same evidence twice).
        why = f"newer version v{inc.version} of the same cluster"
        return MergeOutcome(
            UPDATED, store=inc, rationale=why, resolution=_resolution(UPDATED, inc, ex, why, now)
        )
    if isinstance(ex.content, ApproachCluster) and isinstance(inc.content, ApproachCluster):
        merged = union_clusters(ex, inc)
        if (
            merged.content == ex.content
            and merged.evidence_count == ex.evidence_count
            and merged.last_validated_at == ex.last_validated_at
        ):
            return MergeOutcome(DUPLICATE)  # nothing new: no version bump, no echo
        why = (
            f"cluster union: {len(ex.content.variants)} + {len(inc.content.variants)} "
            f"\u2192 {len(merged.content.variants)} variants"  # type: ignore[attr-defined]
        )
        return MergeOutcome(
            CLUSTER_UNIONED,
            store=merged,
            rationale=why,
            resolution=_resolution(CLUSTER_UNIONED, merged, inc, why, now, (0.0, 0.0)),
        )
    if ex.source_peer == local_id:
        why = "local-originated unit wins by policy"
        return MergeOutcome(
            REJECTED_LOCAL,
            rationale=why,
            conflict=_conflict(ex, inc, now),
            resolution=_resolution(REJECTED_LOCAL, ex, inc, why, now),
        )
    if outranks(inc, ex):
        r_inc, r_ex = rank(inc), rank(ex)
        if r_inc[0] > r_ex[0]:
            why = f"incoming score {inc.score:.2f} > existing {ex.score:.2f}"
        elif inc.version > ex.version:
            why = f"scores tied at {inc.score:.2f}; newer version v{inc.version} > v{ex.version}"
        else:
            why = f"scores tied at {inc.score:.2f}, same version v{inc.version}; tie broken by id"
        return MergeOutcome(
            UPDATED, store=inc, rationale=why, resolution=_resolution(UPDATED, inc, ex, why, now)
        )
    why = f"existing score {ex.score:.2f} \u2265 incoming {inc.score:.2f}"
    return MergeOutcome(
        REJECTED_PEER,
        rationale=why,
        conflict=_conflict(ex, inc, now),
        resolution=_resolution(REJECTED_PEER, ex, inc, why, now),
    )


@dataclass
class BatchResult:
    accepted: int = 0
    updated: int = 0
    rejected: int = 0
    duplicates: int = 0
    #: New units left out because the batch's budget was used up.
    left_out: list[KnowledgeUnit] = field(default_factory=list)
    outcomes: list[tuple[KnowledgeUnit, MergeOutcome]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    resolutions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stored(self) -> list[KnowledgeUnit]:
        """Units this batch put into the store (what gossip may pass on)."""
        return [o.store for _, o in self.outcomes if o.store is not None]

    def stats(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "updated": self.updated,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
        }


#: Results that bring something new into the store (what a budget counts).
NEW_RESULTS = frozenset({ACCEPTED, UPDATED, CLUSTER_UNIONED})


def merge_batch(
    store: KnowledgeStore,
    incoming: Iterable[KnowledgeUnit],
    local_id: str,
    now: int,
    allow_local_origin: bool = False,
    budget: int | None = None,
) -> BatchResult:
    """
    Merge each unit in turn into ``store`` (in memory) and count the results.

    With a ``budget``, at most that many units that would bring something
    new (accepted, updated, unioned) are merged; the rest are left out and
    listed in ``left_out``.  Duplicates and rejected units cost nothing.
    """
    out = BatchResult()
    for inc in incoming:
        o = merge_unit(store.get(inc.semantic_key), inc, local_id, now, allow_local_origin)
        if budget is not None and o.result in NEW_RESULTS:
            if budget <= 0:
                out.left_out.append(inc)
                continue
            budget -= 1
        out.outcomes.append((inc, o))
        if o.store is not None:
            store.insert(o.store)
        if o.result == ACCEPTED:
            out.accepted += 1
        elif o.result in (UPDATED, CLUSTER_UNIONED):
            out.updated += 1
        elif o.result == DUPLICATE:
            out.duplicates += 1
        else:
            out.rejected += 1
        if o.conflict is not None:
            out.conflicts.append(o.conflict)
        if o.resolution is not None:
            out.resolutions.append(o.resolution)
    return out


def write_merge_logs(
    home: Home, result: BatchResult, max_bytes: int = HiveConfig.max_log_bytes
) -> None:
    """
    Append the batch's records to ``conflicts.jsonl`` / ``resolutions.jsonl``
    (each rotated past ``max_bytes``, ``[hive] max_log_bytes``).
    """
    append_log(home, CONFLICTS, (dumps_record(r) for r in result.conflicts), max_bytes)
    append_log(home, RESOLUTIONS, (dumps_record(r) for r in result.resolutions), max_bytes)
