# -*- test-case-name: tests.test_hive_distill -*-
"""
Distillation: from the brain's decision log to knowledge units (hive.md 5).

Input is claudectl's ``~/.claudectl/brain/decisions.jsonl`` (5.1) and, when
present, the brain's ``preferences.json`` (5.2).  :func:`distill_decisions`
is pure: it turns decision records into fresh units --

* ``pattern``: per tool and command pattern, the user's approve/deny rate
  (``sample_count >= export_min_evidence``);
* ``tool_accuracy``: how often the brain's approve/deny matched the user
  (``total >= export_min_tool_decisions``);
* ``temporal``: what the user does after error streaks, with a nearly full
  context or a high spend (strength >= 0.7);
* ``insight`` (claudectl never shares these, defect H13): error loops and
  friction (the user keeps overriding the brain's approvals), severity
  warning or worse.

:func:`redistill` folds fresh units into the store the way claudectl does
(same key and origin keeps the id and bumps the version), and
:func:`maybe_distill` is the "every 10 decisions" trigger: it follows a
cursor over the log, drifts peers' trust for each new decision and distils
when 10 new decisions have arrived (or when forced, as ``hive distill`` does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from claudectl.atomic import atomic_write, locked
from claudectl.config import HiveConfig
from claudectl.hive.store import (
    KnowledgeStore,
    hive_active,
    load_store,
    now_epoch,
    store_transaction,
)
from claudectl.hive.trust import action_class, trust_transaction
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

log = Logger()

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


def decisions_path(home: Home) -> Path:
    return home.brain / "decisions.jsonl"


def preferences_path(home: Home) -> Path:
    return home.brain / "preferences.json"


# --- reading the brain's files -------------------------------------------------------


def parse_decisions(data: bytes) -> Iterator[Mapping[str, Any]]:
    """Decision records from ``decisions.jsonl`` bytes; unreadable lines are skipped."""
    loads = json.loads
    for raw in data.decode("utf-8", "replace").split("\n"):
        if not raw:
            continue
        try:
            rec = loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def read_decisions(home: Home) -> list[Mapping[str, Any]]:
    try:
        return list(parse_decisions(decisions_path(home).read_bytes()))
    except FileNotFoundError:
        return []


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


# --- pure distillation -----------------------------------------------------------------


@dataclass
class _Tally:
    pos: int = 0
    neg: int = 0

    def add(self, sign: int) -> None:
        if sign > 0:
            self.pos += 1
        elif sign < 0:
            self.neg += 1

    @property
    def n(self) -> int:
        return self.pos + self.neg


@dataclass
class _Friction:
    approvals: int = 0
    overridden: int = 0


def condition_label(cond: Any) -> str | None:
    """A preferences.json typed condition as claudectl's unit label (5.2)."""
    if not isinstance(cond, Mapping):
        return None
    kind, value = cond.get("type"), cond.get("value")
    if kind in ("cost_below", "cost_above") and isinstance(value, (int, float)):
        return ("cost<$" if kind == "cost_below" else "cost>$") + format(value, ".0f")
    if kind in ("context_below", "context_above") and isinstance(value, int):
        return ("ctx<" if kind == "context_below" else "ctx>") + f"{value}%"
    fixed = {"no_errors": "no errors", "has_errors": "errors",
             "no_file_conflict": "no conflict", "has_file_conflict": "conflict"}
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


@dataclass
class Distiller:
    """Builds fresh units from decisions; ``local_id`` stamps ``source_peer``."""

    local_id: str
    config: HiveConfig = field(default_factory=HiveConfig)
    ids: UnitIds = field(default_factory=UnitIds)

    def _unit(self, content: Any, evidence: int, confidence: float, category: str,
              now: int) -> KnowledgeUnit:
        return KnowledgeUnit(id=self.ids.new(), scope=Scope(), content=content,
                             evidence_count=min(evidence, U32_MAX), confidence=confidence,
                             source_peer=self.local_id, originated_at=now,
                             last_validated_at=now, category=category)

    def distill(self, decisions: Iterable[Mapping[str, Any]], now: int,
                preferences: Mapping[str, Any] | None = None) -> list[KnowledgeUnit]:
        cfg = self.config
        patterns: dict[tuple[str, str | None], _Tally] = {}
        accuracy: dict[str, list[float]] = {}  # tool -> [total, correct, conf sum]
        streak = _Tally()
        high_ctx = _Tally()
        high_cost = _Tally()
        friction: dict[tuple[str, str | None], _Friction] = {}
        loops: dict[tuple[str, str | None], list[int]] = {}  # key -> [loops, failures]
        runs: dict[Any, tuple[tuple[str, str | None], int]] = {}  # pid -> (key, run)
        pattern_cache: dict[tuple[str, Any], str | None] = {}

        for d in decisions:
            tool = d.get("tool")
            if not isinstance(tool, str) or not tool:
                continue
            command = d.get("command")
            ck = (tool, command)
            cp = pattern_cache.get(ck, "\0")
            if cp == "\0":
                cp = pattern_cache[ck] = command_pattern(tool, command)
            key = (tool, cp)
            sign = action_class(d.get("user_action"))
            if sign:
                tally = patterns.get(key)
                if tally is None:
                    tally = patterns[key] = _Tally()
                tally.add(sign)
                brain = d.get("brain_action")
                if brain in ("approve", "deny"):
                    acc = accuracy.get(tool)
                    if acc is None:
                        acc = accuracy[tool] = [0, 0, 0.0]
                    acc[0] += 1
                    if (brain == "approve") == (sign > 0):
                        acc[1] += 1
                    conf = d.get("brain_confidence")
                    if isinstance(conf, (int, float)) and not isinstance(conf, bool):
                        acc[2] += conf
                    if brain == "approve":
                        fr = friction.get(key)
                        if fr is None:
                            fr = friction[key] = _Friction()
                        fr.approvals += 1
                        if sign < 0:
                            fr.overridden += 1
            ctx = d.get("context")
            if not isinstance(ctx, Mapping):
                continue
            if sign:
                errs = ctx.get("recent_error_count")
                if isinstance(errs, int) and errs >= ERROR_STREAK:
                    streak.add(sign)
                pct_used = ctx.get("context_pct")
                if isinstance(pct_used, int) and pct_used >= HIGH_CONTEXT_PCT:
                    high_ctx.add(sign)
                cost = ctx.get("cost_usd")
                if isinstance(cost, (int, float)) and cost >= HIGH_COST_USD:
                    high_cost.add(sign)
            pid = d.get("pid")
            if ctx.get("last_tool_error") is True:
                prev_key, run = runs.get(pid, (key, 0))
                run = run + 1 if prev_key == key else 1
                runs[pid] = (key, run)
                if run >= ERROR_LOOP_RUN:
                    lp = loops.setdefault(key, [0, 0])
                    if run == ERROR_LOOP_RUN:
                        lp[0] += 1
                        lp[1] += ERROR_LOOP_RUN
                    else:
                        lp[1] += 1
            else:
                runs.pop(pid, None)

        units: dict[str, KnowledgeUnit] = {}

        def add(unit: KnowledgeUnit) -> None:
            units[unit.semantic_key] = unit

        for (tool, cp), t in patterns.items():
            if t.n == 0 or t.n < cfg.export_min_evidence:
                continue
            rate = t.pos / t.n
            approve = rate >= 0.5
            # Confidence in the preferred action (claudectl uses the accept rate,
            # which makes strong deny patterns look weak -- see H14).
            conf = rate if approve else 1.0 - rate
            add(self._unit(Pattern(tool, cp, "approve" if approve else "deny", rate, t.n, ()),
                           t.n, conf, "best_practice", now))
        for tool, (total, correct, conf_sum) in accuracy.items():
            total, correct = int(total), int(correct)
            if total == 0 or total < cfg.export_min_tool_decisions:
                continue
            add(self._unit(ToolAccuracy(tool, total, correct, round(conf_sum / total, 2)),
                           total, correct / total, "best_practice", now))
        for label, t in (("After 3+ errors", streak),
                         (f"Above {HIGH_CONTEXT_PCT}% context", high_ctx),
                         (f"Above ${HIGH_COST_USD:.0f} spent", high_cost)):
            if t.n == 0 or t.n < cfg.export_min_evidence:
                continue
            strength = max(t.pos, t.neg) / t.n
            if strength < TEMPORAL_MIN_STRENGTH:
                continue
            verb = "approves" if t.pos >= t.neg else "denies"
            desc = f"{label}: user usually {verb} (n={t.n})"
            add(self._unit(Temporal(desc, strength), t.n, strength,
                           _temporal_category(desc), now))
        for (tool, cp), (n_loops, failures) in loops.items():
            what = f"{tool} {cp}" if cp else tool
            severity = "critical" if n_loops >= 3 else "warning"
            add(self._unit(Insight("error_loop", severity, f"Repeated failures: {what}",
                                   f"{n_loops} streak(s) of {ERROR_LOOP_RUN}+ failures; "
                                   "change approach instead of retrying"),
                           failures, min(1.0, 0.5 + 0.1 * n_loops), "technique", now))
        for (tool, cp), fr in friction.items():
            if fr.overridden < FRICTION_MIN_OVERRIDES or fr.approvals == 0:
                continue
            rate = fr.overridden / fr.approvals
            if rate < FRICTION_MIN_RATE:
                continue
            what = f"{tool} {cp}" if cp else tool
            add(self._unit(Insight("friction", "warning", f"Approvals overridden: {what}",
                                   f"user rejected {fr.overridden} of {fr.approvals} "
                                   f"approvals ({pct(rate)}%); do not auto-approve"),
                           fr.approvals, rate, "best_practice", now))
        if preferences is not None:
            for unit in self.from_preferences(preferences, now):
                add(unit)
        return list(units.values())

    def from_preferences(self, prefs: Mapping[str, Any], now: int) -> list[KnowledgeUnit]:
        """Units from the brain's ``preferences.json`` (hive.md 5.2/5.3)."""
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
            personal = any(c.get("type") in ("cost_below", "cost_above", "hour_range")
                           for c in raw)
            conf = rate if action == "approve" else 1.0 - rate
            out.append(self._unit(Pattern(tool, cp, action, rate, n, labels), n, conf,
                                  "personal" if personal else "best_practice", now))
        for a in prefs.get("tool_accuracy") or ():
            try:
                tool, total, correct = str(a["tool"]), int(a["total"]), int(a["correct"])
                thr = float(a.get("confidence_threshold", 0.0))
            except (KeyError, TypeError, ValueError):
                continue
            if total == 0 or total < cfg.export_min_tool_decisions:
                continue
            out.append(self._unit(ToolAccuracy(tool, total, correct, thr), total,
                                  correct / total, "best_practice", now))
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
                labels = tuple(lbl for lbl in map(condition_label, m.get("conditions") or ())
                               if lbl)
                rate = float(m.get("accept_rate", 0.0))
                variants.append(ApproachVariant(
                    f"{m.get('preferred_action')} ({pct(rate)}% accept over "
                    f"{m['sample_count']})", m["sample_count"], labels, (self.local_id,),
                    f"pattern:{problem}"))
            variants.sort(key=lambda v: (-v.evidence, v.approach_summary))
            confs = [float(m.get("confidence", 0.0)) for m in members]
            out.append(self._unit(ApproachCluster(problem, tuple(variants)),
                                  sum(v.evidence for v in variants), sum(confs) / len(confs),
                                  "technique", now))
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
        return {"decisions": self.decisions, "new": self.new, "updated": self.updated,
                "unchanged": self.unchanged, "replaced_peer": self.replaced_peer}


def _same_knowledge(a: KnowledgeUnit, b: KnowledgeUnit) -> bool:
    return (a.content == b.content and a.confidence == b.confidence
            and a.evidence_count == b.evidence_count and a.category == b.category)


def redistill(store: KnowledgeStore, fresh: Iterable[KnowledgeUnit], local_id: str,
              now: int) -> DistillReport:
    """
    Fold freshly distilled units into ``store`` (hive.md 5.3 "stable
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
            store.insert(unit.with_(
                id=ex.id, originated_at=ex.originated_at,
                propagation_count=ex.propagation_count, injection_state=ex.injection_state,
                injection_stats=ex.injection_stats, sharing_consent=ex.sharing_consent,
                revalidation_interval_secs=ex.revalidation_interval_secs,
                version=min(ex.version + 1, U32_MAX)))
            report.updated += 1
        elif ex is None:
            store.insert(unit.with_(injection_state="canary"))
            report.new += 1
        else:
            store.insert(unit)
            report.replaced_peer += 1
    return report


def distill_home(home: Home, config: HiveConfig, local_id: str, now: int | None = None,
                 decisions: list[Mapping[str, Any]] | None = None) -> DistillReport:
    """Distil the whole decision log into the store (under the store lock)."""
    t = now_epoch() if now is None else now
    if decisions is None:
        decisions = read_decisions(home)
    fresh = Distiller(local_id, config).distill(decisions, t, read_preferences(home))
    with store_transaction(home, local_id=local_id, config=config, now=t) as store:
        report = redistill(store, fresh, local_id, t)
    report.decisions = len(decisions)
    log.info("distilled {decisions} decisions: {new} new, {updated} updated units",
             decisions=report.decisions, new=report.new, updated=report.updated)
    return report


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
        return json.dumps({"last_distill": self.last_distill, "offset": self.offset,
                           "pending": self.pending}, indent=2)


@dataclass
class TriggerResult:
    new_decisions: int
    drift: int
    report: DistillReport | None


def _read_new(path: Path, offset: int) -> tuple[bytes, int, int]:
    """Complete lines of ``path`` after ``offset``: (data, new offset, size)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return b"", 0, 0
    if size < offset:  # rotated or truncated: start over
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size - offset)
    end = data.rfind(b"\n") + 1
    return data[:end], offset + end, size


def maybe_distill(home: Home, config: HiveConfig, now: int | None = None, *,
                  local_id: str | None = None, force: bool = False,
                  every: int = DISTILL_EVERY) -> TriggerResult:
    """
    Look at the decisions logged since the last call: drift peers' trust
    for each (with ``auto_trust_drift``) and distil once ``every`` new
    decisions have accumulated, or now if ``force``.  Nothing is distilled
    while the hive is off.  Safe to call from a timer in the service and
    from the CLI at the same time.
    """
    t = now_epoch() if now is None else now
    if local_id is None:
        from claudectl.relay.keystore import KeyStore
        local_id = KeyStore(home).ensure_identity()
    cursor_path = home.hive / CURSOR
    with locked(cursor_path):
        cursor = Cursor.load(cursor_path)
        first_run = cursor is None
        cursor = cursor or Cursor()
        data, cursor.offset, _ = _read_new(decisions_path(home), cursor.offset)
        new = list(parse_decisions(data))
        drift = 0
        if new and not first_run and config.auto_trust_drift:
            drift = apply_drift(home, config, new, local_id, t)
        cursor.pending += len(new)
        report = None
        if (force or cursor.pending >= every) and (force or hive_active(home, config)):
            report = distill_home(home, config, local_id, t)
            cursor.pending = 0
            cursor.last_distill = t
        atomic_write(cursor_path, cursor.to_bytes(), mode=0o600)
    return TriggerResult(len(new), drift, report)


def apply_drift(home: Home, config: HiveConfig, decisions: Iterable[Mapping[str, Any]],
                local_id: str, now: int) -> int:
    """Move peers' trust for each decision that matches one of their units."""
    peer_units = [u for u in load_store(home).store if u.source_peer != local_id
                  and isinstance(u.content, Pattern)]
    if not peer_units:
        return 0
    moved = 0
    with trust_transaction(home, config.default_trust) as book:
        for d in decisions:
            moved += len(book.apply_decision(d.get("tool"), d.get("command"),
                                             d.get("user_action"), peer_units, local_id, now))
    return moved

