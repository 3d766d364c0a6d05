# -*- test-case-name: tests.test_hooks_gate -*-
"""
The permission gate (``[hive] gate``; docs/claude-code.md, "The gate").

At a ``PermissionRequest`` the gate looks at the knowledge about this tool
and command:

* ``suggest``: the relevant knowledge is shown to the user (the hook's
  ``systemMessage``); the dialog is left to the user.
* ``auto``: the request is allowed without the dialog only when **local**
  knowledge approves it -- a local ``pattern`` unit for this tool whose
  ``command_pattern`` covers the command, preferring ``approve`` with at
  least ``export_min_evidence`` decisions and an accept rate of at least
  :data:`AUTO_MIN_ACCEPT_RATE` -- and nothing says deny: no pattern unit
  from anyone (local, or a peer at any trust tier, frozen or ignored
  included) and no pattern of claudectl's brain (``preferences.json``)
  preferring ``deny`` for it.  Peer knowledge never allows on its own.
  Shell commands with control operators, substitutions or redirections
  (``;``, ``&``, ``|``, `````, ``$(``, ``<``, ``>``, a newline) are never
  allowed automatically: a pattern such as ``cargo test`` covers
  ``cargo test; rm -rf ~`` by substring.  Otherwise the dialog is shown as
  with ``suggest``.

The gate never denies by itself.  Pure: the caller loads the units, trust
and deliveries and logs the automatic allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from claudectl.hive.delivery import DeliveryBook, path_peers
from claudectl.hive.trust import TrustBook, tier_for
from claudectl.hive.units import KnowledgeUnit, Pattern, command_matches
from claudectl.text import clean_line

GATE_MODES = ("off", "suggest", "auto")
AUTO_MIN_ACCEPT_RATE = 0.9
MAX_SHOWN = 5
_SHELL_TOOLS = frozenset({"Bash"})
_UNSAFE_SHELL = (";", "&", "|", "`", "$(", "<", ">", "\n", "\r")
LOCAL_LABEL = "local"


@dataclass(frozen=True)
class Finding:
    """One piece of knowledge about the request."""

    unit_id: str
    label: str
    summary: str
    evidence: int
    source: str
    approves: bool
    local: bool


@dataclass
class GateView:
    findings: list[Finding] = field(default_factory=list)
    allow: bool = False
    #: Why the request was (not) allowed automatically.
    reason: str = ""
    #: The local units that allowed it.
    allowed_by: list[str] = field(default_factory=list)

    def message(self) -> str:
        """The text shown to the user ("" when there is nothing to show)."""
        if not self.findings:
            return ""
        head = "Hive gate: allowed by local knowledge." if self.allow else "Hive knowledge:"
        lines = [head]
        for f in self.findings[:MAX_SHOWN]:
            lines.append(
                f"- [{f.label}] {clean_line(f.summary)} \u2014 {f.evidence} decisions"
                + ("" if f.local else f" from {clean_line(f.source)}")
            )
        if len(self.findings) > MAX_SHOWN:
            lines.append(f"- (\u2026 {len(self.findings) - MAX_SHOWN} more)")
        return "\n".join(lines)


def shell_is_simple(command: str) -> bool:
    return not any(op in command for op in _UNSAFE_SHELL)


def _brain_denies(preferences: Mapping[str, object] | None, tool: str, command: str | None) -> bool:
    for p in (preferences or {}).get("patterns") or ():  # type: ignore[attr-defined]
        if not isinstance(p, Mapping) or p.get("tool") != tool:
            continue
        cp = p.get("command_pattern")
        cp = cp if isinstance(cp, str) and cp else None
        if p.get("preferred_action") == "deny" and command_matches(cp, command):
            return True
    return False


def evaluate(
    units: Iterable[KnowledgeUnit],
    *,
    mode: str,
    tool: str,
    command: str | None,
    local_id: str,
    trust: TrustBook,
    min_evidence: int,
    delivery: DeliveryBook | None = None,
    preferences: Mapping[str, object] | None = None,
) -> GateView:
    """What the gate makes of a request for ``tool`` / ``command``."""
    view = GateView()
    if mode not in ("suggest", "auto"):
        view.reason = "gate off"
        return view
    delivery = delivery or DeliveryBook()
    deny_seen = _brain_denies(preferences, tool, command)
    approving: list[Finding] = []
    for unit in units:
        c = unit.content
        if not isinstance(c, Pattern) or c.tool != tool:
            continue
        if not command_matches(c.command_pattern, command):
            continue
        local = unit.source_peer == local_id
        approves = c.preferred_action == "approve"
        if local:
            label = LOCAL_LABEL
        else:
            level = min(trust.level(p) for p in path_peers(unit, delivery))
            label = tier_for(level).label
        finding = Finding(
            unit.id, label, unit.summary(), unit.evidence_count, unit.source_peer, approves, local
        )
        view.findings.append(finding)
        if not approves:
            deny_seen = True
        elif (
            local
            and c.command_pattern is not None
            and unit.evidence_count >= min_evidence
            and c.accept_rate >= AUTO_MIN_ACCEPT_RATE
        ):
            approving.append(finding)
    # Local first, then by evidence.
    view.findings.sort(key=lambda f: (not f.local, -f.evidence, f.unit_id))
    if mode != "auto":
        view.reason = "gate suggests only"
    elif deny_seen:
        view.reason = "some knowledge says deny"
    elif not approving:
        view.reason = "no local knowledge approves with enough evidence"
    elif tool in _SHELL_TOOLS and not (isinstance(command, str) and shell_is_simple(command)):
        view.reason = "shell command with control operators: never allowed automatically"
    else:
        view.allow = True
        view.allowed_by = [f.unit_id for f in approving]
        view.reason = "local knowledge approves and nothing denies"
    return view
