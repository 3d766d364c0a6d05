# -*- test-case-name: tests.test_hive_sharing -*-
"""
What may leave this machine, and to whom (docs/hive.md, Sharing).

* :class:`SharingFilter`: the ``[hive]`` settings ``share_categories``,
  ``exclude_tools``, ``exclude_commands`` and ``exclude_content_types``.
  Unlike claudectl (defect H21) it looks at every content type: a tool or
  command named in an outcome's ``approach_ref``, a cluster's
  ``problem_key`` or a temporal/insight text is filtered too.
* Exposure (``exposure.json``, ``share_mode``) for units that originated
  here, and the per-unit :class:`~claudectl.hive.units.SharingConsent`.
* :class:`ShareContext.shareable` / :func:`shareable`: the full outbound
  decision for one unit and one peer, which the gossip layer calls for every
  send, snapshots included (H4).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from claudectl.atomic import atomic_write, locked
from claudectl.config import HiveConfig
from claudectl.filesig import Signature, signature
from claudectl.hive.trust import TrustBook, load_trust, trust_path
from claudectl.hive.units import (
    CATEGORY_LABELS,
    DAY,
    ApproachCluster,
    ApproachOutcome,
    Command,
    HookConfig,
    Insight,
    KnowledgeUnit,
    Pattern,
    Skill,
    Temporal,
    ToolAccuracy,
    dumps_pretty,
)
from claudectl.home import Home

#: Verdicts a filter remembers (about the largest store a node keeps).
_MAX_VERDICTS = 100_000
#: One filter per config object (configs are frozen), so its verdicts last.
_FILTERS: dict[int, tuple[HiveConfig, SharingFilter]] = {}

#: exclude_content_types labels -> content type tags.
CONTENT_TYPE_LABELS = {"hook": "hook_config"}


def _ref_parts(ref: str) -> tuple[str, str | None]:
    """``pattern:<tool>:<cmd>`` or ``<tool>:<cmd>`` -> (tool, cmd or None)."""
    if ref.startswith("pattern:"):
        ref = ref[len("pattern:") :]
    tool, _, cmd = ref.partition(":")
    return tool, (None if cmd in ("", "*") else cmd)


@dataclass(frozen=True)
class SharingFilter:
    share_categories: frozenset[str] = frozenset()
    exclude_tools: frozenset[str] = frozenset()
    exclude_commands: tuple[str, ...] = ()
    exclude_content_types: frozenset[str] = frozenset()
    #: unit object id -> (unit, reason): units are immutable, so a unit's
    #: verdict is computed once per filter (gossip asks for every unit on
    #: every request and push round).
    _verdicts: dict[int, tuple[KnowledgeUnit, str | None]] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )

    @classmethod
    def from_config(cls, config: HiveConfig) -> SharingFilter:
        cats = set()
        for c in config.share_categories:
            cats.add("workflow" if c == "workflow_pattern" else c)
        return cls(
            frozenset(cats),
            frozenset(config.exclude_tools),
            tuple(c for c in config.exclude_commands if c),
            frozenset(CONTENT_TYPE_LABELS.get(t, t) for t in config.exclude_content_types),
        )

    def _tool_excluded(self, tool: str) -> bool:
        return tool in self.exclude_tools

    def _command_excluded(self, text: str | None) -> bool:
        return bool(text) and any(c in text for c in self.exclude_commands)  # type: ignore[operator]

    def _text_excluded(self, text: str) -> bool:
        if self._command_excluded(text):
            return True
        return any(re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text) for t in self.exclude_tools)

    def reason(self, unit: KnowledgeUnit) -> str | None:
        """Why ``unit`` must not be shared, or None if the filter lets it pass."""
        hit = self._verdicts.get(id(unit))
        if hit is not None and hit[0] is unit:
            return hit[1]
        why = self._reason(unit)
        if len(self._verdicts) >= _MAX_VERDICTS:
            self._verdicts.clear()
        self._verdicts[id(unit)] = (unit, why)
        return why

    def _reason(self, unit: KnowledgeUnit) -> str | None:
        if unit.category == "personal":
            return "personal"
        label = CATEGORY_LABELS[unit.category]
        if self.share_categories and label not in self.share_categories:
            return f"category {label} not in share_categories"
        if unit.type in self.exclude_content_types:
            return f"content type {unit.type} excluded"
        c = unit.content
        tool: str | None = None
        commands: list[str | None] = []
        texts: list[str] = []
        if isinstance(c, Pattern):
            tool, commands = c.tool, [c.command_pattern]
        elif isinstance(c, ToolAccuracy):
            tool = c.tool
        elif isinstance(c, ApproachOutcome):
            tool, cmd = _ref_parts(c.approach_ref)
            commands = [cmd]
            texts = list(c.conditions)
        elif isinstance(c, ApproachCluster):
            tool, cmd = _ref_parts(c.problem_key)
            commands = [cmd] + [v.outcome_ref for v in c.variants]
            texts = [v.approach_summary for v in c.variants]
        elif isinstance(c, Command):
            commands = [c.name]
        elif isinstance(c, Temporal):
            texts = [c.description]
        elif isinstance(c, Insight):
            texts = [c.summary_text, c.suggestion or ""]
        elif isinstance(c, (Skill, HookConfig)):
            texts = [c.name if isinstance(c, Skill) else c.matcher]
        if tool is not None and self._tool_excluded(tool):
            return f"tool {tool} excluded"
        for cmd in commands:
            if self._command_excluded(cmd):
                return f"command {cmd} excluded"
        for text in texts:
            if text and self._text_excluded(text):
                return "mentions an excluded tool or command"
        return None

    def allows(self, unit: KnowledgeUnit) -> bool:
        return self.reason(unit) is None


def _filter_for(config: HiveConfig) -> SharingFilter:
    hit = _FILTERS.get(id(config))
    if hit is None or hit[0] is not config:
        if len(_FILTERS) >= 64:
            _FILTERS.clear()
        hit = _FILTERS[id(config)] = (config, SharingFilter.from_config(config))
    return hit[1]


def precompute_verdicts(
    config: HiveConfig,
    units: Collection[KnowledgeUnit],
    fresh: Iterable[KnowledgeUnit] | None = None,
) -> None:
    """
    Work out the sharing filter's verdict on ``units`` now (the service does
    it on its writer thread when it reads or merges the store), so a push
    round or a snapshot answer on the reactor finds them cached: about 4 us
    a unit, 40 ms for 10,000 just-imported units (issue 13).  ``fresh``:
    only these are new among ``units`` -- the others are looked at only if
    the filter's cache cannot hold them all any more (it was cleared).
    """
    sharing_filter = _filter_for(config)
    reason = sharing_filter.reason
    todo = units if fresh is None or len(sharing_filter._verdicts) < len(units) else fresh
    for unit in todo:
        reason(unit)


# --- exposure ------------------------------------------------------------------------

EXPOSE = "expose"
HIDE = "hide"
EXPOSURE = "exposure.json"


def exposure_path(home: Home) -> Path:
    return home.hive / EXPOSURE


def load_exposure(home: Home) -> dict[str, str]:
    try:
        data = json.loads(exposure_path(home).read_bytes())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, Mapping):
        return {}
    return {k: v for k, v in data.items() if v in (EXPOSE, HIDE)}


def set_exposure(home: Home, unit_id: str, value: str | None) -> None:
    """Record ``expose``/``hide`` for one local unit (None removes the entry)."""
    path = exposure_path(home)
    with locked(path):
        data = load_exposure(home)
        if value is None:
            data.pop(unit_id, None)
        else:
            data[unit_id] = value
        atomic_write(path, dumps_pretty(data), mode=0o600)


def is_exposed(
    unit: KnowledgeUnit, local_id: str, exposure: Mapping[str, str], share_mode: str
) -> bool:
    """Local units follow ``exposure.json``, else ``share_mode``; peer units pass."""
    if unit.source_peer != local_id:
        return True
    explicit = exposure.get(unit.id)
    if explicit is not None:
        return explicit == EXPOSE
    return share_mode != "manual"


# --- the outbound decision ---------------------------------------------------------


@dataclass
class ShareContext:
    """Everything needed to decide what goes to which peer, loaded once."""

    local_id: str
    config: HiveConfig
    trust: TrustBook = field(default_factory=TrustBook)
    exposure: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, home: Home, local_id: str, config: HiveConfig) -> ShareContext:
        return cls(local_id, config, load_trust(home, config.default_trust), load_exposure(home))

    def __post_init__(self) -> None:
        self.filter = _filter_for(self.config)

    def propagatable(self, unit: KnowledgeUnit, now: int) -> str | None:
        """Why the unit may go to nobody, or None (docs/hive.md, Sharing)."""
        why = self.filter.reason(unit)
        if why:
            return why
        if unit.propagation_count >= self.config.max_propagation:
            return "hop limit reached"
        if unit.source_peer != self.local_id and self._flooding(unit.source_peer):
            # Defect H19: a peer frozen for flooding (the daily rate cap) does
            # not get its units passed on.  A collision freeze (two peers
            # disagreeing strongly) only keeps units out of the prompt:
            # honest disagreement must not cut knowledge off the mesh.
            return "source peer is frozen (rate cap)"
        ttl = self.config.knowledge_ttl_days * DAY
        if ttl and now - unit.last_validated_at > ttl:
            return "expired"
        if not is_exposed(unit, self.local_id, self.exposure, self.config.share_mode):
            return "hidden"
        return None

    def _flooding(self, peer_id: str) -> bool:
        rec = self.trust.get(peer_id)
        return rec is not None and rec.frozen and (rec.freeze_reason or "").startswith("rate cap")

    def refusal(self, unit: KnowledgeUnit, peer_id: str, now: int) -> str | None:
        """Why ``unit`` must not go to ``peer_id`` now, or None if it may."""
        if unit.source_peer == peer_id:
            return "originated at that peer"
        why = self.propagatable(unit, now)
        if why:
            return why
        consent = unit.sharing_consent
        if consent is not None and not consent.allows(peer_id, self.trust.rank(peer_id), now):
            return "consent does not allow that peer"
        return None

    def shareable(self, unit: KnowledgeUnit, peer_id: str, now: int) -> bool:
        return self.refusal(unit, peer_id, now) is None

    def shareable_units(
        self, units: Iterable[KnowledgeUnit], peer_id: str, now: int
    ) -> list[KnowledgeUnit]:
        """
        ``[u for u in units if self.shareable(u, peer_id, now)]``, with the
        per-call lookups hoisted out of the loop (gossip filters the whole
        store for every request and push round).
        """
        reason = self.filter.reason
        max_hops = self.config.max_propagation
        ttl = self.config.knowledge_ttl_days * DAY
        oldest = now - ttl if ttl else None
        local = self.local_id
        exposure = self.exposure
        manual = self.config.share_mode == "manual"
        flooding: dict[str, bool] = {}
        out = []
        for u in units:
            source = u.source_peer
            if source == peer_id or u.propagation_count >= max_hops:
                continue
            if oldest is not None and u.last_validated_at < oldest:
                continue
            if source == local:
                explicit = exposure.get(u.id)
                if (explicit != EXPOSE) if explicit is not None else manual:
                    continue
            else:
                frozen = flooding.get(source)
                if frozen is None:
                    frozen = flooding[source] = self._flooding(source)
                if frozen:
                    continue
            if reason(u) is not None:
                continue
            if u.sharing_consent is not None and self.refusal(u, peer_id, now) is not None:
                continue
            out.append(u)
        return out


#: A file rewritten this soon after its last change may keep its ``stat()``
#: signature (same inode and size when rewritten in place, as claudectl 0.64
#: does; file times of 1 s on ext3, ext4 with 128-byte inodes and HFS+, 2 s
#: on FAT, a jiffy on Linux before 6.13): compare its bytes until then.
RACY_NS = 2_000_000_000


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class ShareContexts:
    """
    :meth:`ShareContext.load`, done again only when trust.json or
    exposure.json changed (their ``stat()`` signatures: two system calls a
    request instead of reading and parsing both files), when the config
    object is another, or after :meth:`invalidate` (a change notice: it also
    covers a rewrite too quick for the file times to tell).  Each load is a
    new object, so caches keyed on it (:class:`~claudectl.hive.answers.AnswerCache`)
    see every change.
    """

    def __init__(self, home: Home, local_id: str) -> None:
        self.home = home
        self.local_id = local_id
        self._paths = (str(trust_path(home)), str(exposure_path(home)))
        self._ctx: ShareContext | None = None
        self._sigs: tuple[Signature, Signature] = (None, None)
        self._raw: tuple[bytes | None, bytes | None] = (None, None)
        #: Until then (wall clock, ns) a signature is not proof of no change.
        self._racy_until = 0
        #: Loads so far (tests and ``relay status`` figures).
        self.loads = 0

    def invalidate(self, _name: str = "") -> None:
        self._ctx = None

    def get(self, config: HiveConfig) -> ShareContext:
        sigs = (signature(self._paths[0]), signature(self._paths[1]))
        ctx = self._ctx
        if (
            ctx is None
            or ctx.config is not config
            or sigs != self._sigs
            or time.time_ns() < self._racy_until
        ):
            raw = (_read(self._paths[0]), _read(self._paths[1]))
            if ctx is None or ctx.config is not config or raw != self._raw:
                ctx = self._ctx = ShareContext.load(self.home, self.local_id, config)
                self.loads += 1
            self._sigs, self._raw = sigs, raw
            self._racy_until = max([s[0] for s in sigs if s is not None], default=0) + RACY_NS
        return ctx


def shareable(
    unit: KnowledgeUnit, peer_id: str, *, home: Home, local_id: str, config: HiveConfig, now: int
) -> bool:
    """One-off form of :meth:`ShareContext.shareable` (loads trust and exposure)."""
    return ShareContext.load(home, local_id, config).shareable(unit, peer_id, now)
