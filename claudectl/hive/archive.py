# -*- test-case-name: tests.test_hive_archive -*-
"""
Cold storage and the curriculum (docs/hive.md, Files).

``archive.jsonl`` receives every unit the store evicts (expired, from stale
peers, over the cap) and every stored duplicate, one unit per line.
:func:`archive_stats` summarises it, :func:`prune_archive` drops archived
units older than a given age (unreadable lines go to the quarantine file,
never away).

:func:`cold_distill` condenses archive + store into ``curriculum.json``
(at most 100 units, confidence >= 0.7, deny patterns first) and
``curriculum_meta.json``, as claudectl's ``hive distill`` does.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from claudectl.atomic import atomic_write, locked
from claudectl.hive.store import (
    ARCHIVE,
    BadLine,
    hive_file,
    load_store,
    quarantine_lines,
)
from claudectl.hive.units import (
    U32_MAX,
    KnowledgeUnit,
    Pattern,
    UnitError,
    dumps_line,
    dumps_pretty,
    parse_line,
)
from claudectl.home import Home

CURRICULUM = "curriculum.json"
CURRICULUM_META = "curriculum_meta.json"
CURRICULUM_MAX = 100
CURRICULUM_MIN_CONFIDENCE = 0.7
CURRICULUM_MIN_DENY_CONFIDENCE = 0.8
CONDENSE_MIN = 3
CONDENSE_MIN_RATE = 0.8

_AGE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 86400}


def parse_age(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s`` (a bare number means days) -> seconds."""
    m = _AGE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not an age such as 30d, 12h, 90m or 45s")
    return int(m.group(1)) * _UNIT_SECS[m.group(2)]


def read_lines(data: bytes) -> tuple[list[KnowledgeUnit], list[BadLine]]:
    """Every unit line (duplicates kept) and every unreadable line."""
    units, bad = [], []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            units.append(parse_line(raw.decode("utf-8")))
        except UnicodeDecodeError:
            bad.append(BadLine(lineno, "not UTF-8", raw.decode("utf-8", "backslashreplace")))
        except UnitError as e:
            bad.append(BadLine(lineno, str(e), raw.decode("utf-8")))
    return units, bad


def read_archive(home: Home) -> tuple[list[KnowledgeUnit], list[BadLine]]:
    try:
        return read_lines(hive_file(home, ARCHIVE).read_bytes())
    except FileNotFoundError:
        return [], []


@dataclass
class ArchiveStats:
    units: int = 0
    bytes: int = 0
    unreadable: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    by_peer: dict[str, int] = field(default_factory=dict)
    oldest: int | None = None
    newest: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "units": self.units,
            "bytes": self.bytes,
            "unreadable": self.unreadable,
            "by_type": self.by_type,
            "by_peer": self.by_peer,
            "oldest_validated_at": self.oldest,
            "newest_validated_at": self.newest,
        }


def archive_stats(home: Home) -> ArchiveStats:
    path = hive_file(home, ARCHIVE)
    units, bad = read_archive(home)
    stamps = [u.last_validated_at for u in units]
    return ArchiveStats(
        units=len(units),
        bytes=path.stat().st_size if path.exists() else 0,
        unreadable=len(bad),
        by_type=dict(Counter(u.type for u in units).most_common()),
        by_peer=dict(Counter(u.source_peer for u in units).most_common()),
        oldest=min(stamps) if stamps else None,
        newest=max(stamps) if stamps else None,
    )


def prune_archive(home: Home, older_than: int, now: int) -> tuple[int, int]:
    """
    Remove archived units last validated more than ``older_than`` seconds
    ago; return (removed, kept).  Unreadable lines are quarantined first.
    """
    path = hive_file(home, ARCHIVE)
    with locked(path):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0, 0
        units, bad = read_lines(data)
        kept = [u for u in units if now - u.last_validated_at <= older_than]
        if bad:
            quarantine_lines(home, bad, ARCHIVE, now)
        if len(kept) != len(units) or bad:
            atomic_write(path, "".join(dumps_line(u) for u in kept), mode=0o600)
        return len(units) - len(kept), len(kept)


# --- curriculum ------------------------------------------------------------------------


def _is_deny(unit: KnowledgeUnit) -> bool:
    return isinstance(unit.content, Pattern) and unit.content.preferred_action != "approve"


def _condense(best: dict[str, KnowledgeUnit], source: str, now: int) -> None:
    """Fold >= 3 strongly approved command patterns of one tool into ``<tool>, *``."""
    by_tool: dict[tuple[str, str], list[KnowledgeUnit]] = {}
    for unit in best.values():
        c = unit.content
        if (
            isinstance(c, Pattern)
            and c.command_pattern
            and c.preferred_action == "approve"
            and c.accept_rate > CONDENSE_MIN_RATE
        ):
            by_tool.setdefault((unit.scope.key_prefix(), c.tool), []).append(unit)
    for (_, tool), members in by_tool.items():
        if len(members) < CONDENSE_MIN:
            continue
        samples = sum(m.content.sample_count for m in members)  # type: ignore[attr-defined]
        rate = sum(
            m.content.accept_rate * m.content.sample_count  # type: ignore[attr-defined]
            for m in members
        ) / max(samples, 1)
        first = max(members, key=lambda m: m.score)
        condensed = first.with_(
            id=f"{first.id}_c",
            source_peer=source,
            content=Pattern(tool, None, "approve", rate, min(samples, U32_MAX), ()),
            evidence_count=min(sum(m.evidence_count for m in members), U32_MAX),
            confidence=sum(m.confidence for m in members) / len(members),
            last_validated_at=max(m.last_validated_at for m in members),
            originated_at=min(m.originated_at for m in members),
            sharing_consent=None,
        )
        for m in members:
            best.pop(m.semantic_key, None)
        old = best.get(condensed.semantic_key)
        if old is None or condensed.score > old.score:
            best[condensed.semantic_key] = condensed


def cold_distill(units: Iterable[KnowledgeUnit], source: str, now: int) -> list[KnowledgeUnit]:
    """The curriculum from ``units`` (archive then store), best first."""
    best: dict[str, KnowledgeUnit] = {}
    for unit in units:
        old = best.get(unit.semantic_key)
        if old is None or unit.score >= old.score:
            best[unit.semantic_key] = unit
    _condense(best, source, now)
    # approve/deny contradictions on one tool+command (across scopes): best score wins
    winners: dict[str, KnowledgeUnit] = {}
    rest: list[KnowledgeUnit] = []
    for unit in best.values():
        c = unit.content
        if isinstance(c, Pattern):
            k = f"{c.tool}:{c.command_pattern or '*'}"
            old = winners.get(k)
            if old is None or unit.score > old.score:
                winners[k] = unit
        else:
            rest.append(unit)
    chosen = [
        u
        for u in list(winners.values()) + rest
        if u.confidence
        >= (CURRICULUM_MIN_DENY_CONFIDENCE if _is_deny(u) else CURRICULUM_MIN_CONFIDENCE)
    ]
    chosen.sort(key=lambda u: (not _is_deny(u), -u.score, u.id))
    return [u.with_(version=min(u.version + 1, U32_MAX)) for u in chosen[:CURRICULUM_MAX]]


@dataclass
class CurriculumResult:
    units: list[KnowledgeUnit]
    meta: dict[str, Any]


def read_curriculum(home: Home) -> CurriculumResult:
    try:
        data = json.loads(hive_file(home, CURRICULUM).read_bytes())
        units = [KnowledgeUnit.from_json(u) for u in data] if isinstance(data, list) else []
    except (FileNotFoundError, ValueError, UnitError):
        units = []
    try:
        meta = json.loads(hive_file(home, CURRICULUM_META).read_bytes())
    except (FileNotFoundError, ValueError):
        meta = {}
    return CurriculumResult(units, meta if isinstance(meta, dict) else {})


def write_curriculum(home: Home, source: str, now: int) -> CurriculumResult:
    """Run the cold distillation over archive + store and write both files."""
    path = hive_file(home, CURRICULUM)
    with locked(path):
        archived, _ = read_archive(home)
        stored = load_store(home).store.units()
        units = cold_distill(archived + stored, source, now)
        prev = read_curriculum(home).meta.get("version", 0)
        meta = {
            "version": (prev if isinstance(prev, int) else 0) + 1,
            "timestamp": now,
            "unit_count": len(units),
            "source_archive_units": len(archived),
        }
        atomic_write(path, dumps_pretty([u.to_json() for u in units]), mode=0o600)
        atomic_write(hive_file(home, CURRICULUM_META), dumps_pretty(meta), mode=0o600)
    return CurriculumResult(units, meta)
