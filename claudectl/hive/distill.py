# -*- test-case-name: tests.test_hive_distill -*-
"""
Distillation: from the brain's decision log to knowledge units (docs/hive.md, Distillation).

Input is claudectl's ``~/.claudectl/brain/decisions.jsonl`` (5.1) and, when
present, the brain's ``preferences.json`` (5.2).  Distillation has two
halves: :class:`Tallies` folds decision records, one at a time, into a few
small running counts, and :meth:`Distiller.units` turns those counts into
fresh units --

* ``pattern``: per tool and command pattern, the user's approve/deny rate
  (``sample_count >= export_min_evidence``);
* ``tool_accuracy``: how often the brain's approve/deny matched the user
  (``total >= export_min_tool_decisions``);
* ``temporal``: what the user does after error streaks, with a nearly full
  context or a high spend (strength >= 0.7);
* ``insight`` (claudectl never shares these, defect H13): error loops and
  friction (the user keeps overriding the brain's approvals), severity
  warning or worse.

The log is streamed (:class:`LogSegment`), never held in memory, and the
counts do not depend on the configuration, so they can be kept between
runs: :func:`maybe_distill`, the "every 10 decisions" trigger, keeps them
in ``hive/distill_state.json`` next to its cursor and only reads the
decisions logged since the last call.  It also drifts peers' trust for each
new decision.  :func:`distill_home` distils the whole log from scratch, and
:func:`redistill` folds fresh units into the store the way claudectl does
(same key and origin keeps the id and bumps the version).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claudectl.atomic import atomic_write, locked
from claudectl.config import HiveConfig
from claudectl.hive.store import (
    KnowledgeStore,
    hive_active,
    load_store,
    now_epoch,
    store_transaction,
)
from claudectl.hive.trust import NEGATIVE_ACTIONS, POSITIVE_ACTIONS, trust_transaction
from claudectl.hive.units import (
    DAY,
    U32_MAX,
    ApproachCluster,
    ApproachVariant,
    Insight,
    KnowledgeUnit,
    Pattern,
    Scope,
    Temporal,
    ToolAccuracy,
    UnitIds,
    pct,
)
from claudectl.home import Home
from claudectl.lazylog import LazyLogger

log = LazyLogger(__name__)

DISTILL_EVERY = 10
TEMPORAL_MIN_STRENGTH = 0.7
ERROR_STREAK = 3
HIGH_CONTEXT_PCT = 80
HIGH_COST_USD = 5.0
ERROR_LOOP_RUN = 3
FRICTION_MIN_OVERRIDES = 3
FRICTION_MIN_RATE = 0.5
#: A re-distilled unit that did not change is re-issued (new version) at most daily.
REVALIDATE_SECS = DAY
FILE_TOOLS = frozenset({"Write", "Edit", "MultiEdit", "Read", "NotebookEdit"})
CURSOR = "distill_cursor.json"
#: The running tallies of the trigger (hive/distill_state.json).
STATE = "distill_state.json"
#: The log is read in pieces of this size.
READ_CHUNK = 1 << 20
#: The state is trusted only while this much of the log's head and of the
#: bytes before its offset are unchanged (a rewritten log is re-read).
FINGERPRINT_BYTES = 4096

_SIGNS: dict[str, int] = {**{a: 1 for a in POSITIVE_ACTIONS}, **{a: -1 for a in NEGATIVE_ACTIONS}}
_SCAN = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # what json.loads() uses, minus its wrapping
_JSON_SPACE = " \t\n\r"
#: Distinct (tool, command) pairs remembered by :meth:`Tallies.feed`.
_PATTERN_CACHE_MAX = 4096


def decisions_path(home: Home) -> Path:
    return home.brain / "decisions.jsonl"


def preferences_path(home: Home) -> Path:
    return home.brain / "preferences.json"


# --- reading the brain's files -------------------------------------------------------


def parse_record(raw: str) -> dict[str, Any] | None:
    """One decision record from one log line; None for anything but a JSON object."""
    if not raw:
        return None
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def parse_decisions(data: bytes) -> Iterator[Mapping[str, Any]]:
    """Decision records from ``decisions.jsonl`` bytes; unreadable lines are skipped."""
    for raw in data.decode("utf-8", "replace").split("\n"):
        rec = parse_record(raw)
        if rec is not None:
            yield rec


class LogSegment:
    """
    The decision records on the complete lines of bytes ``[start, stop)`` of
    a log, read :data:`READ_CHUNK` bytes at a time (``stop=None``: to the
    end).  Lines that are not JSON objects are skipped, invalid UTF-8 is
    replaced, as :func:`parse_decisions` does.  After iterating, ``end``
    is the offset just past the last complete line and ``tail`` holds the
    bytes after it (a line still being written, usually empty); a missing
    file is an empty segment.
    """

    def __init__(
        self, path: Path, start: int = 0, stop: int | None = None, chunk: int = READ_CHUNK
    ) -> None:
        self.path = path
        self.start = start
        self.stop = stop
        self.chunk = chunk
        self.end = start
        self.tail = b""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        loads, scan = json.loads, _SCAN
        with f:
            f.seek(self.start)
            left = -1 if self.stop is None else max(0, self.stop - self.start)
            pieces: list[bytes] = []  # the line in progress
            while left:
                chunk = f.read(self.chunk if left < 0 else min(self.chunk, left))
                if not chunk:
                    break
                if left > 0:
                    left -= len(chunk)
                cut = chunk.rfind(b"\n") + 1
                if not cut:
                    pieces.append(chunk)
                    continue
                if pieces:
                    pieces.append(chunk[:cut])
                    block = b"".join(pieces)
                else:
                    block = chunk[:cut] if cut < len(chunk) else chunk
                pieces = [chunk[cut:]] if cut < len(chunk) else []
                self.end += len(block)
                # Blocks end at a newline, which UTF-8 never splits, so the
                # text is the same as decoding the whole log at once.
                for raw in block.decode("utf-8", "replace").split("\n"):
                    if not raw:
                        continue
                    try:
                        if raw[0] == "{":
                            # json.loads() without its per-call overhead: a
                            # line starting with "{" has no leading
                            # whitespace, and only whitespace may follow.
                            rec, end = scan(raw, 0)
                            if end != len(raw) and raw[end:].strip(_JSON_SPACE):
                                continue
                        else:
                            rec = loads(raw)
                    except (ValueError, StopIteration, RecursionError):
                        continue
                    if rec.__class__ is dict:
                        yield rec
            self.tail = b"".join(pieces)

    def tail_record(self) -> dict[str, Any] | None:
        """The unterminated last line as a record, if it already is one."""
        return parse_record(self.tail.decode("utf-8", "replace")) if self.tail else None


def read_preferences(home: Home) -> Mapping[str, Any] | None:
    try:
        data = json.loads(preferences_path(home).read_bytes())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, Mapping) else None


def command_pattern(tool: str, command: Any) -> str | None:
    """
    The pattern a command is grouped under: for shell commands the program
    and its first non-option argument (``cargo test``), for file tools the
    extension glob (``*.lock``); None means "any command of this tool".
    """
    if not isinstance(command, str):
        return None
    command = command.strip()
    if not command:
        return None
    if tool in FILE_TOOLS:
        name = command.rsplit("/", 1)[-1]
        if "." in name.strip("."):
            return "*." + name.rsplit(".", 1)[-1]
        return None
    words = command.split()
    if len(words) > 1 and not words[1].startswith("-") and words[1].replace("-", "").isalnum():
        return f"{words[0]} {words[1]}"
    return words[0]


def condition_label(cond: Any) -> str | None:
    """A preferences.json typed condition as claudectl's unit label (5.2)."""
    if not isinstance(cond, Mapping):
        return None
    kind, value = cond.get("type"), cond.get("value")
    if kind in ("cost_below", "cost_above") and isinstance(value, (int, float)):
        return ("cost<$" if kind == "cost_below" else "cost>$") + format(value, ".0f")
    if kind in ("context_below", "context_above") and isinstance(value, int):
        return ("ctx<" if kind == "context_below" else "ctx>") + f"{value}%"
    fixed = {
        "no_errors": "no errors",
        "has_errors": "errors",
        "no_file_conflict": "no conflict",
        "has_file_conflict": "conflict",
    }
    if kind in fixed:
        return fixed[kind]
    if kind == "hour_range":
        return f"{cond.get('start')}:00-{cond.get('end')}:00"
    return None


def _temporal_category(description: str) -> str:
    d = description.lower()
    if any(w in d for w in ("hour", "time of day", "morning", "evening", "approval")):
        return "personal"
    if any(w in d for w in ("cost", "spend", "budget")):
        return "personal"
    if any(w in d for w in ("error", "context", "retry")):
        return "technique"
    return "best_practice"


# --- pure distillation -----------------------------------------------------------------

#: A pattern key: tool and command pattern (None: any command of the tool).
Key = tuple[str, str | None]


class StateError(ValueError):
    """A saved :class:`Tallies` document is unusable."""


def _finite(x: float) -> bool:
    return x - x == 0.0


class Tallies:
    """
    Running counts over decision records, in log order.  They depend only on
    the records (thresholds are applied later, by :meth:`Distiller.units`),
    so feeding a log in several pieces gives the same counts as feeding it
    at once, and they survive a round trip through :meth:`to_json`.

    Records are mappings as in docs/hive.md (Distillation); anything malformed in one is
    ignored field by field (a non-string tool skips the record, a
    non-numeric or non-finite confidence is not summed, an unhashable
    ``pid`` takes no part in error-loop tracking).
    """

    VERSION = 1

    def __init__(self) -> None:
        #: records fed, usable or not
        self.records = 0
        #: (tool, pattern) -> [approved, denied]
        self.patterns: dict[Key, list[int]] = {}
        #: tool -> [total, correct, sum of brain confidence]
        self.accuracy: dict[str, list[Any]] = {}
        #: [approved, denied] after 3+ errors, above 80% context, above $5 spent
        self.temporal: list[int] = [0, 0, 0, 0, 0, 0]
        #: (tool, pattern) -> [brain approvals, overridden by the user]
        self.friction: dict[Key, list[int]] = {}
        #: (tool, pattern) -> [loops, failures]
        self.loops: dict[Key, list[int]] = {}
        #: session pid -> (key of its last failing call, failures in a row)
        self.runs: dict[Any, tuple[Key, int]] = {}
        self._keys: dict[tuple[str, Any], Key] = {}

    def feed(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Count ``records``; returns how many there were."""
        # The hot loop of distillation: every lookup is hoisted into a local.
        patterns, accuracy, friction = self.patterns, self.accuracy, self.friction
        loops, runs, keys, temporal = self.loops, self.runs, self._keys, self.temporal
        signs, pattern_of, mapping = _SIGNS, command_pattern, Mapping
        run_min, streak_min = ERROR_LOOP_RUN, ERROR_STREAK
        ctx_min, cost_min = HIGH_CONTEXT_PCT, HIGH_COST_USD
        n = 0
        for d in records:
            n += 1
            tool = d.get("tool")
            if not isinstance(tool, str) or not tool:
                continue
            command = d.get("command")
            try:
                key = keys[tool, command]
            except KeyError:
                if len(keys) >= _PATTERN_CACHE_MAX:
                    keys.clear()
                key = keys[tool, command] = (tool, pattern_of(tool, command))
            except TypeError:  # an unhashable command: not a string, so no pattern
                key = (tool, None)
            action = d.get("user_action")
            sign = signs.get(action, 0) if isinstance(action, str) else 0
            if sign:
                tally = patterns.get(key)
                if tally is None:
                    tally = patterns[key] = [0, 0]
                if sign > 0:
                    tally[0] += 1
                else:
                    tally[1] += 1
                brain = d.get("brain_action")
                if brain == "approve" or brain == "deny":
                    acc = accuracy.get(tool)
                    if acc is None:
                        acc = accuracy[tool] = [0, 0, 0.0]
                    acc[0] += 1
                    approved = brain == "approve"
                    if approved == (sign > 0):
                        acc[1] += 1
                    conf = d.get("brain_confidence")
                    if isinstance(conf, (int, float)) and not isinstance(conf, bool):
                        try:
                            total = acc[2] + conf
                        except OverflowError:
                            total = acc[2]
                        if _finite(total):
                            acc[2] = total
                    if approved:
                        fr = friction.get(key)
                        if fr is None:
                            fr = friction[key] = [0, 0]
                        fr[0] += 1
                        if sign < 0:
                            fr[1] += 1
            ctx = d.get("context")
            if ctx.__class__ is not dict and not isinstance(ctx, mapping):
                continue
            if sign:
                side = 0 if sign > 0 else 1
                errs = ctx.get("recent_error_count")
                if isinstance(errs, int) and errs >= streak_min:
                    temporal[side] += 1
                used = ctx.get("context_pct")
                if isinstance(used, int) and used >= ctx_min:
                    temporal[2 + side] += 1
                cost = ctx.get("cost_usd")
                if isinstance(cost, (int, float)) and cost >= cost_min:
                    temporal[4 + side] += 1
            pid = d.get("pid")
            try:
                if ctx.get("last_tool_error") is True:
                    if pid != pid:  # NaN: never equal to itself, so no session either
                        raise TypeError(pid)
                    prev = runs.get(pid)
                    run = prev[1] + 1 if prev is not None and prev[0] == key else 1
                    runs[pid] = (key, run)
                    if run >= run_min:
                        lp = loops.get(key)
                        if lp is None:
                            lp = loops[key] = [0, 0]
                        if run == run_min:
                            lp[0] += 1
                            lp[1] += run_min
                        else:
                            lp[1] += 1
                elif runs:
                    runs.pop(pid, None)
            except TypeError:  # an unhashable pid belongs to no session
                pass
        self.records += n
        return n

    def copy(self) -> Tallies:
        new = Tallies()
        new.records = self.records
        new.patterns = {k: v[:] for k, v in self.patterns.items()}
        new.accuracy = {k: v[:] for k, v in self.accuracy.items()}
        new.temporal = self.temporal[:]
        new.friction = {k: v[:] for k, v in self.friction.items()}
        new.loops = {k: v[:] for k, v in self.loops.items()}
        new.runs = dict(self.runs)
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tallies):
            return NotImplemented
        return self.to_json() == other.to_json()

    # Lists keep the dicts' order, which is the order units come out in.
    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "records": self.records,
            "patterns": [[t, c, *v] for (t, c), v in self.patterns.items()],
            "accuracy": [[t, *v] for t, v in self.accuracy.items()],
            "temporal": self.temporal,
            "friction": [[t, c, *v] for (t, c), v in self.friction.items()],
            "loops": [[t, c, *v] for (t, c), v in self.loops.items()],
            "runs": [[pid, t, c, run] for pid, ((t, c), run) in self.runs.items()],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Tallies:
        """The inverse of :meth:`to_json`; raises :class:`StateError`."""
        try:
            if doc["version"] != cls.VERSION:
                raise StateError(f"version {doc['version']!r}")
            new = cls()
            new.records = _count(doc["records"])
            new.patterns = {
                _key(e): [_count(e[2]), _count(e[3])] for e in _rows(doc["patterns"], 4)
            }
            for e in _rows(doc["accuracy"], 4):
                if (
                    not isinstance(e[0], str)
                    or not isinstance(e[3], (int, float))
                    or isinstance(e[3], bool)
                    or not _finite(e[3])
                ):
                    raise StateError("bad accuracy row")
                new.accuracy[e[0]] = [_count(e[1]), _count(e[2]), float(e[3])]
            temporal = doc["temporal"]
            if not isinstance(temporal, list) or len(temporal) != 6:
                raise StateError("bad temporal counts")
            new.temporal = [_count(x) for x in temporal]
            new.friction = {
                _key(e): [_count(e[2]), _count(e[3])] for e in _rows(doc["friction"], 4)
            }
            new.loops = {_key(e): [_count(e[2]), _count(e[3])] for e in _rows(doc["loops"], 4)}
            for e in _rows(doc["runs"], 4):
                new.runs[e[0]] = (_key(e[1:]), _count(e[3]))
        except (KeyError, TypeError, IndexError) as e:
            raise StateError(f"malformed tallies: {e!r}") from None
        return new


def _count(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise StateError(f"bad count {x!r}")
    return x


def _rows(rows: Any, width: int) -> list[list[Any]]:
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == width for r in rows):
        raise StateError("bad rows")
    return rows


def _key(row: list[Any]) -> Key:
    tool, cp = row[0], row[1]
    if not isinstance(tool, str) or not (cp is None or isinstance(cp, str)):
        raise StateError("bad pattern key")
    return (tool, cp)


@dataclass
class Distiller:
    """Builds fresh units from decisions; ``local_id`` stamps ``source_peer``."""

    local_id: str
    config: HiveConfig = field(default_factory=HiveConfig)
    ids: UnitIds = field(default_factory=UnitIds)

    def _unit(
        self, content: Any, evidence: int, confidence: float, category: str, now: int
    ) -> KnowledgeUnit:
        return KnowledgeUnit(
            id=self.ids.new(),
            scope=Scope(),
            content=content,
            evidence_count=min(evidence, U32_MAX),
            confidence=confidence,
            source_peer=self.local_id,
            originated_at=now,
            last_validated_at=now,
            category=category,
        )

    def distill(
        self,
        decisions: Iterable[Mapping[str, Any]],
        now: int,
        preferences: Mapping[str, Any] | None = None,
    ) -> list[KnowledgeUnit]:
        tallies = Tallies()
        tallies.feed(decisions)
        return self.units(tallies, now, preferences)

    def units(
        self, tallies: Tallies, now: int, preferences: Mapping[str, Any] | None = None
    ) -> list[KnowledgeUnit]:
        """The units ``tallies`` (and ``preferences``) support under this config."""
        cfg = self.config
        units: dict[str, KnowledgeUnit] = {}

        def add(unit: KnowledgeUnit) -> None:
            units[unit.semantic_key] = unit

        for (tool, cp), (pos, neg) in tallies.patterns.items():
            n = pos + neg
            if n == 0 or n < cfg.export_min_evidence:
                continue
            rate = pos / n
            approve = rate >= 0.5
            # Confidence in the preferred action (claudectl uses the accept rate,
            # which makes strong deny patterns look weak -- see H14).
            conf = rate if approve else 1.0 - rate
            add(
                self._unit(
                    Pattern(tool, cp, "approve" if approve else "deny", rate, n, ()),
                    n,
                    conf,
                    "best_practice",
                    now,
                )
            )
        for tool, (total, correct, conf_sum) in tallies.accuracy.items():
            if total == 0 or total < cfg.export_min_tool_decisions:
                continue
            add(
                self._unit(
                    ToolAccuracy(tool, total, correct, round(conf_sum / total, 2)),
                    total,
                    correct / total,
                    "best_practice",
                    now,
                )
            )
        t = tallies.temporal
        for label, pos, neg in (
            ("After 3+ errors", t[0], t[1]),
            (f"Above {HIGH_CONTEXT_PCT}% context", t[2], t[3]),
            (f"Above ${HIGH_COST_USD:.0f} spent", t[4], t[5]),
        ):
            n = pos + neg
            if n == 0 or n < cfg.export_min_evidence:
                continue
            strength = max(pos, neg) / n
            if strength < TEMPORAL_MIN_STRENGTH:
                continue
            verb = "approves" if pos >= neg else "denies"
            desc = f"{label}: user usually {verb} (n={n})"
            add(self._unit(Temporal(desc, strength), n, strength, _temporal_category(desc), now))
        for (tool, cp), (n_loops, failures) in tallies.loops.items():
            what = f"{tool} {cp}" if cp else tool
            severity = "critical" if n_loops >= 3 else "warning"
            add(
                self._unit(
                    Insight(
                        "error_loop",
                        severity,
                        f"Repeated failures: {what}",
                        f"{n_loops} streak(s) of {ERROR_LOOP_RUN}+ failures; "
                        "change approach instead of retrying",
                    ),
                    failures,
                    min(1.0, 0.5 + 0.1 * n_loops),
                    "technique",
                    now,
                )
            )
        for (tool, cp), (approvals, overridden) in tallies.friction.items():
            if overridden < FRICTION_MIN_OVERRIDES or approvals == 0:
                continue
            rate = overridden / approvals
            if rate < FRICTION_MIN_RATE:
                continue
            what = f"{tool} {cp}" if cp else tool
            add(
                self._unit(
                    Insight(
                        "friction",
                        "warning",
                        f"Approvals overridden: {what}",
                        f"user rejected {overridden} of {approvals} "
                        f"approvals ({pct(rate)}%); do not auto-approve",
                    ),
                    approvals,
                    rate,
                    "best_practice",
                    now,
                )
            )
        if preferences is not None:
            for unit in self.from_preferences(preferences, now):
                add(unit)
        return list(units.values())

    def from_preferences(self, prefs: Mapping[str, Any], now: int) -> list[KnowledgeUnit]:
        """Units from the brain's ``preferences.json`` (docs/hive.md, Distillation)."""
        cfg = self.config
        out: list[KnowledgeUnit] = []
        pats = [p for p in prefs.get("patterns") or () if isinstance(p, Mapping)]
        for p in pats:
            try:
                tool, action = str(p["tool"]), str(p["preferred_action"])
                n, rate = int(p["sample_count"]), float(p["accept_rate"])
            except (KeyError, TypeError, ValueError):
                continue
            if n < max(cfg.export_min_evidence, 1):
                continue
            cp = p.get("command_pattern") if isinstance(p.get("command_pattern"), str) else None
            raw = [c for c in p.get("conditions") or () if isinstance(c, Mapping)]
            labels = tuple(lbl for lbl in map(condition_label, raw) if lbl)
            personal = any(c.get("type") in ("cost_below", "cost_above", "hour_range") for c in raw)
            conf = rate if action == "approve" else 1.0 - rate
            out.append(
                self._unit(
                    Pattern(tool, cp, action, rate, n, labels),
                    n,
                    conf,
                    "personal" if personal else "best_practice",
                    now,
                )
            )
        for a in prefs.get("tool_accuracy") or ():
            try:
                tool, total, correct = str(a["tool"]), int(a["total"]), int(a["correct"])
                thr = float(a.get("confidence_threshold", 0.0))
            except (KeyError, TypeError, ValueError):
                continue
            if total == 0 or total < cfg.export_min_tool_decisions:
                continue
            out.append(
                self._unit(
                    ToolAccuracy(tool, total, correct, thr),
                    total,
                    correct / total,
                    "best_practice",
                    now,
                )
            )
        for t in prefs.get("temporal") or ():
            try:
                desc, n, s = str(t["description"]), int(t["sample_count"]), float(t["strength"])
            except (KeyError, TypeError, ValueError):
                continue
            if s >= TEMPORAL_MIN_STRENGTH:
                out.append(self._unit(Temporal(desc, s), n, s, _temporal_category(desc), now))
        out.extend(self._clusters(pats, now))
        return out

    def _clusters(self, pats: list[Mapping[str, Any]], now: int) -> list[KnowledgeUnit]:
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for p in pats:
            if not isinstance(p.get("sample_count"), int) or p["sample_count"] < 3:
                continue
            cmd = p.get("command_pattern")
            cmd = " ".join(cmd.split()) if isinstance(cmd, str) and cmd.strip() else "*"
            groups.setdefault(f"{p.get('tool')}:{cmd}", []).append(p)
        out = []
        for problem, members in groups.items():
            if len(members) < 2 or len({m.get("preferred_action") for m in members}) < 2:
                continue
            variants = []
            for m in members:
                labels = tuple(
                    lbl for lbl in map(condition_label, m.get("conditions") or ()) if lbl
                )
                rate = float(m.get("accept_rate", 0.0))
                variants.append(
                    ApproachVariant(
                        f"{m.get('preferred_action')} ({pct(rate)}% accept over "
                        f"{m['sample_count']})",
                        m["sample_count"],
                        labels,
                        (self.local_id,),
                        f"pattern:{problem}",
                    )
                )
            variants.sort(key=lambda v: (-v.evidence, v.approach_summary))
            confs = [float(m.get("confidence", 0.0)) for m in members]
            out.append(
                self._unit(
                    ApproachCluster(problem, tuple(variants)),
                    sum(v.evidence for v in variants),
                    sum(confs) / len(confs),
                    "technique",
                    now,
                )
            )
        return out


# --- folding into the store --------------------------------------------------------------


@dataclass
class DistillReport:
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    replaced_peer: int = 0
    decisions: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "decisions": self.decisions,
            "new": self.new,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "replaced_peer": self.replaced_peer,
        }


def _same_knowledge(a: KnowledgeUnit, b: KnowledgeUnit) -> bool:
    return (
        a.content == b.content
        and a.confidence == b.confidence
        and a.evidence_count == b.evidence_count
        and a.category == b.category
    )


def redistill(
    store: KnowledgeStore, fresh: Iterable[KnowledgeUnit], local_id: str, now: int
) -> DistillReport:
    """
    Fold freshly distilled units into ``store`` (docs/hive.md, Distillation: "stable
    re-distillation"): a key already held by a local unit keeps that unit's
    id, origin time, hop count, rollout state and stats and gets version + 1
    (only when the knowledge changed, or daily to re-validate it); a new key
    starts in ``canary``; a key held by a peer's unit is taken over (local
    always wins).
    """
    report = DistillReport()
    for unit in fresh:
        ex = store.get(unit.semantic_key)
        if ex is not None and ex.source_peer == local_id:
            if _same_knowledge(ex, unit) and now - ex.last_validated_at < REVALIDATE_SECS:
                report.unchanged += 1
                continue
            store.insert(
                unit.with_(
                    id=ex.id,
                    originated_at=ex.originated_at,
                    propagation_count=ex.propagation_count,
                    injection_state=ex.injection_state,
                    injection_stats=ex.injection_stats,
                    sharing_consent=ex.sharing_consent,
                    revalidation_interval_secs=ex.revalidation_interval_secs,
                    version=min(ex.version + 1, U32_MAX),
                )
            )
            report.updated += 1
        elif ex is None:
            store.insert(unit.with_(injection_state="canary"))
            report.new += 1
        else:
            store.insert(unit)
            report.replaced_peer += 1
    return report


def fold_tallies(
    home: Home, config: HiveConfig, local_id: str, now: int, tallies: Tallies
) -> DistillReport:
    """Turn ``tallies`` into units and fold them into the store (under its lock)."""
    fresh = Distiller(local_id, config).units(tallies, now, read_preferences(home))
    with store_transaction(home, local_id=local_id, config=config, now=now) as store:
        report = redistill(store, fresh, local_id, now)
    report.decisions = tallies.records
    log.info(
        "distilled {decisions} decisions: {new} new, {updated} updated units",
        decisions=report.decisions,
        new=report.new,
        updated=report.updated,
    )
    return report


def log_tallies(path: Path) -> Tallies:
    """Tallies of a whole decision log, streamed (its unterminated last line too)."""
    tallies = Tallies()
    segment = LogSegment(path)
    tallies.feed(segment)
    last = segment.tail_record()
    if last is not None:
        tallies.feed((last,))
    return tallies


def distill_home(
    home: Home,
    config: HiveConfig,
    local_id: str,
    now: int | None = None,
    decisions: Iterable[Mapping[str, Any]] | None = None,
) -> DistillReport:
    """Distil the whole decision log (or ``decisions``) into the store."""
    t = now_epoch() if now is None else now
    if decisions is None:
        tallies = log_tallies(decisions_path(home))
    else:
        tallies = Tallies()
        tallies.feed(decisions)
    return fold_tallies(home, config, local_id, t, tallies)


# --- the "every 10 decisions" trigger -------------------------------------------------------


@dataclass
class Cursor:
    offset: int = 0
    pending: int = 0
    last_distill: int = 0

    @classmethod
    def load(cls, path: Path) -> Cursor | None:
        try:
            data = json.loads(path.read_bytes())
            return cls(int(data["offset"]), int(data["pending"]), int(data["last_distill"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> str:
        return json.dumps(
            {"last_distill": self.last_distill, "offset": self.offset, "pending": self.pending},
            indent=2,
        )


def _fingerprint(path: Path, offset: int) -> str:
    """A digest of the first and the last :data:`FINGERPRINT_BYTES` before ``offset``."""
    h = hashlib.sha256(str(offset).encode())
    if offset:
        with open(path, "rb") as f:
            h.update(f.read(min(offset, FINGERPRINT_BYTES)))
            f.seek(max(0, offset - FINGERPRINT_BYTES))
            h.update(f.read(min(offset, FINGERPRINT_BYTES)))
    return h.hexdigest()


@dataclass
class DistillState:
    """
    The trigger's running tallies: they cover the log's bytes up to
    ``offset`` (always the end of a line), and ``fingerprint`` ties them to
    that content, so a rewritten or replaced log is counted afresh.
    """

    offset: int = 0
    fingerprint: str = ""
    tallies: Tallies = field(default_factory=Tallies)

    @classmethod
    def load(cls, path: Path, log_path: Path, offset: int) -> DistillState | None:
        """The saved state if it covers exactly ``log_path[:offset]``, else None."""
        try:
            doc = json.loads(path.read_bytes())
            state = cls(doc["offset"], doc["fingerprint"], Tallies.from_json(doc["tallies"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # StateError too
            log.warn(
                "ignoring unusable distillation state {path}: {error}", path=str(path), error=str(e)
            )
            return None
        if state.offset != offset:
            return None
        try:
            if state.fingerprint != _fingerprint(log_path, offset):
                log.info("decision log was rewritten: counting it afresh")
                return None
        except FileNotFoundError:
            return None
        return state

    def save(self, path: Path, log_path: Path) -> None:
        self.fingerprint = _fingerprint(log_path, self.offset)
        atomic_write(
            path,
            json.dumps(
                {
                    "offset": self.offset,
                    "fingerprint": self.fingerprint,
                    "tallies": self.tallies.to_json(),
                },
                separators=(",", ":"),
            ),
            mode=0o600,
        )


@dataclass
class TriggerResult:
    new_decisions: int
    drift: int
    report: DistillReport | None


def _keeping(
    records: Iterable[dict[str, Any]], into: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    for rec in records:
        into.append(rec)
        yield rec


def maybe_distill(
    home: Home,
    config: HiveConfig,
    now: int | None = None,
    *,
    local_id: str | None = None,
    force: bool = False,
    every: int = DISTILL_EVERY,
) -> TriggerResult:
    """
    Look at the decisions logged since the last call: drift peers' trust
    for each (with ``auto_trust_drift``), add them to the running tallies and
    distil once ``every`` new decisions have accumulated, or now if
    ``force``.  Nothing is distilled while the hive is off.  Safe to call
    from a timer in the service and from the CLI at the same time.
    """
    t = now_epoch() if now is None else now
    if local_id is None:
        from claudectl.relay.keystore import KeyStore

        local_id = KeyStore(home).ensure_identity()
    cursor_path = home.hive / CURSOR
    state_path = home.hive / STATE
    log_path = decisions_path(home)
    with locked(cursor_path):
        cursor = Cursor.load(cursor_path)
        first_run = cursor is None
        cursor = cursor or Cursor()
        before = None if first_run else cursor.to_bytes()
        try:
            size = os.path.getsize(log_path)
        except FileNotFoundError:
            size = 0
        if size < cursor.offset:  # rotated or truncated: start over
            cursor.offset = 0
        state = DistillState.load(state_path, log_path, cursor.offset)
        changed = state is None
        if state is None:  # count what the cursor has already seen
            state = DistillState()
            seen = LogSegment(log_path, 0, cursor.offset)
            state.tallies.feed(seen)
            state.offset = cursor.offset = seen.end
        segment = LogSegment(log_path, cursor.offset, size)
        new: list[dict[str, Any]] = []
        drifting = not first_run and config.auto_trust_drift
        count = state.tallies.feed(_keeping(segment, new) if drifting else segment)
        if changed or segment.end != state.offset:
            state.offset = cursor.offset = segment.end
            state.save(state_path, log_path)
        drift = apply_drift(home, config, new, local_id, t) if new else 0
        cursor.pending += count
        report = None
        if (force or cursor.pending >= every) and (force or hive_active(home, config)):
            tallies = state.tallies
            last = segment.tail_record()
            if last is not None:  # complete but for its newline: count it, once
                tallies = tallies.copy()
                tallies.feed((last,))
            report = fold_tallies(home, config, local_id, t, tallies)
            cursor.pending = 0
            cursor.last_distill = t
        if cursor.to_bytes() != before:  # an idle tick writes nothing (issue 16)
            atomic_write(cursor_path, cursor.to_bytes(), mode=0o600)
    return TriggerResult(count, drift, report)


def apply_drift(
    home: Home, config: HiveConfig, decisions: Iterable[Mapping[str, Any]], local_id: str, now: int
) -> int:
    """Move peers' trust for each decision that matches one of their units."""
    peer_units = [
        u
        for u in load_store(home).store
        if u.source_peer != local_id and isinstance(u.content, Pattern)
    ]
    if not peer_units:
        return 0
    moved = 0
    with trust_transaction(home, config.default_trust) as book:
        for d in decisions:
            moved += len(
                book.apply_decision(
                    d.get("tool"), d.get("command"), d.get("user_action"), peer_units, local_id, now
                )
            )
    return moved
