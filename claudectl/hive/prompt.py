# -*- test-case-name: tests.test_hive_prompt -*-
"""
The ``## Hive Knowledge`` section of the brain prompt (docs/hive.md, The prompt section).

:func:`select` picks and orders the peer units to show; :func:`render` writes
the text exactly as claudectl does, except that the header counts units
rather than lines (defect H12).  :func:`build_prompt` does both for a home.

What is shown, and why (the mission's rules, where claudectl differs):

* only peers' knowledge -- local knowledge is the brain's own -- and never a
  peer unit about something a local unit or local preference already
  covers: local preferences are never overridden;
* trust by path: a unit counts at the lower of its origin's trust and the
  trust of every peer that delivered it to us (:mod:`claudectl.hive.delivery`),
  so nobody borrows a better-trusted peer's name;
* each unit labelled with that tier; units whose path has an Ignored
  (< 0.2) peer, and frozen peers' own units, are never shown, nor units
  decayed below 0.1 (H9); with ``inject_unverified = false`` Unverified
  tiers and quarantined origins are left out too;
* ranked by effective confidence x evidence x the path's trust (trust
  weighting, H9), at most ``max_prompt_units`` (0 = all);
* every piece of peer text on one line, without control characters
  (:func:`claudectl.text.clean_line`): a peer cannot start a line, a
  heading or an escape sequence of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from claudectl.config import HiveConfig
from claudectl.hive.delivery import DeliveryBook, load_delivery, path_peers
from claudectl.hive.distill import read_preferences
from claudectl.hive.store import load_store
from claudectl.hive.trust import Tier, TrustBook, load_trust, tier_for
from claudectl.hive.units import (
    ApproachCluster,
    ApproachOutcome,
    KnowledgeUnit,
    Pattern,
    ToolAccuracy,
    command_matches,
    rollout_admits,
)
from claudectl.home import Home
from claudectl.text import clean_line

HIDDEN_TYPES = frozenset({"skill", "command", "hook_config"})
CONFIDENCE_FLOOR = 0.1
MAX_VARIANT_LINES = 3


@dataclass(frozen=True)
class VariantLine:
    approach_summary: str
    evidence: int
    conditions: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptItem:
    tier_label: str
    summary: str
    evidence_count: int
    source_peer: str
    stale: bool = False
    score: float = 0.0
    variants: tuple[VariantLine, ...] = ()


def render(items: list[PromptItem], total: int | None = None) -> str:
    """
    The section for already-selected ``items`` (best first); ``total`` is
    how many units qualified before the cap.  No items, no section.
    """
    if not items:
        return ""
    total = len(items) if total is None else total
    shown = len(items)
    peers = len({i.source_peer for i in items})
    more = f" (showing top {shown} of {total})" if shown < total else ""
    lines = [f"## Hive Knowledge ({peers} peers, {shown} units{more})"]
    for item in items:
        line = (
            f"- [{item.tier_label}] {clean_line(item.summary)} \u2014 {item.evidence_count} "
            f"decisions from {clean_line(item.source_peer)}"
        )
        lines.append(line + (" [stale]" if item.stale else ""))
        variants = sorted(item.variants, key=lambda v: -v.evidence)
        for letter, v in zip("ABC", variants[:MAX_VARIANT_LINES], strict=False):
            when = f" [when: {clean_line(', '.join(v.conditions))}]" if v.conditions else ""
            lines.append(
                f"    ({letter}) {clean_line(v.approach_summary)} \u2014 n={v.evidence}{when}"
            )
        if len(variants) > MAX_VARIANT_LINES:
            lines.append(f"    (\u2026 {len(variants) - MAX_VARIANT_LINES} more variants)")
    return "\n".join(lines)


def _unit_tool(unit: KnowledgeUnit) -> tuple[str | None, str | None]:
    c = unit.content
    if isinstance(c, Pattern):
        return c.tool, c.command_pattern
    if isinstance(c, ToolAccuracy):
        return c.tool, None
    ref = None
    if isinstance(c, ApproachCluster):
        ref = c.problem_key
    elif isinstance(c, ApproachOutcome):
        ref = c.approach_ref.removeprefix("pattern:")
    if ref is None:
        return None, None
    tool, _, cmd = ref.partition(":")
    return tool, (None if cmd in ("", "*") else cmd)


def relevant(
    unit: KnowledgeUnit, tool: str | None, command: str | None, project: str | None
) -> bool:
    """Is ``unit`` about this tool / command / project (unset = anything)?"""
    if project is not None and unit.scope.kind == "project" and unit.scope.value != project:
        return False
    utool, ucmd = _unit_tool(unit)
    if tool is not None and utool is not None and utool != tool:
        return False
    if command is not None and ucmd is not None and not command_matches(ucmd, command):
        return False
    return True


def local_coverage(
    units: Iterable[KnowledgeUnit], local_id: str, preferences: Mapping[str, object] | None = None
) -> set[str]:
    """Key parts (without scope) that local knowledge already speaks about."""
    keys = {u.content.key_part() for u in units if u.source_peer == local_id}
    for p in (preferences or {}).get("patterns") or ():  # type: ignore[attr-defined]
        if isinstance(p, Mapping) and isinstance(p.get("tool"), str):
            cp = p.get("command_pattern")
            keys.add(f"pattern:{p['tool']}:{cp if isinstance(cp, str) and cp else '*'}")
    return keys


def select(
    units: Iterable[KnowledgeUnit],
    *,
    trust: TrustBook,
    config: HiveConfig,
    local_id: str,
    now: int,
    pid: int | None = None,
    tool: str | None = None,
    command: str | None = None,
    project: str | None = None,
    local_keys: set[str] | None = None,
    delivery: DeliveryBook | None = None,
) -> tuple[list[PromptItem], int]:
    """
    The prompt items to show (best first) and how many qualified in all.
    ``delivery`` says who delivered each unit (none: every unit counts as
    delivered by its origin).
    """
    units = list(units)
    delivery = delivery or DeliveryBook()
    covered = local_coverage(units, local_id) if local_keys is None else local_keys
    scored: list[tuple[float, str, KnowledgeUnit, Tier, bool]] = []
    for unit in units:
        peer = unit.source_peer
        if unit.type in HIDDEN_TYPES or peer == local_id:
            continue
        if unit.content.key_part() in covered:
            continue
        path = path_peers(unit, delivery)
        level = min(trust.level(p) for p in path)
        tier = tier_for(level)
        # A freeze (the sybil checks) hides the frozen peer's own knowledge;
        # what it relayed is held down by its tier like anyone's.
        if tier is Tier.IGNORED or trust.is_frozen(peer):
            continue
        if not config.inject_unverified and (
            tier is Tier.UNVERIFIED or trust.is_blocked(peer, now)
        ):
            continue
        eff = unit.effective_confidence(now)
        if eff < CONFIDENCE_FLOOR:
            continue
        if not rollout_admits(unit.injection_state, unit.id, pid):
            continue
        if not relevant(unit, tool, command, project):
            continue
        score = eff * unit.evidence_count * level
        scored.append((score, unit.id, unit, tier, unit.is_stale(now)))
    scored.sort(key=lambda s: (-s[0], s[1]))
    total = len(scored)
    cap = config.max_prompt_units
    if cap:
        scored = scored[:cap]
    items = []
    for score, _, unit, tier, stale in scored:
        variants: tuple[VariantLine, ...] = ()
        if isinstance(unit.content, ApproachCluster):
            variants = tuple(
                VariantLine(v.approach_summary, v.evidence, v.conditions)
                for v in unit.content.variants
            )
        items.append(
            PromptItem(
                tier.label,
                unit.summary(),
                unit.evidence_count,
                unit.source_peer,
                stale,
                score,
                variants,
            )
        )
    return items, total


def build_prompt(
    home: Home,
    config: HiveConfig,
    local_id: str,
    now: int,
    pid: int | None = None,
    tool: str | None = None,
    command: str | None = None,
    project: str | None = None,
) -> str:
    """The section for this home's store and trust records ("" when nothing qualifies)."""
    units = load_store(home).store.units()
    keys = local_coverage(units, local_id, read_preferences(home))
    items, total = select(
        units,
        trust=load_trust(home, config.default_trust),
        config=config,
        local_id=local_id,
        now=now,
        pid=pid,
        tool=tool,
        command=command,
        project=project,
        local_keys=keys,
        delivery=load_delivery(home),
    )
    return render(items, total)
