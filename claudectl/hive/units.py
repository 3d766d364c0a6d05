# -*- test-case-name: tests.test_hive_units -*-
"""
Knowledge units, exactly as claudectl 0.64 writes them (docs/hive.md,
Knowledge units).

A :class:`KnowledgeUnit` holds a :class:`Scope`, a content object (one of the
ten content dataclasses below, tagged by ``type`` on disk) and the bookkeeping
fields.  :meth:`KnowledgeUnit.from_json` accepts what claudectl accepts --
unknown keys ignored, legacy lines without the newer keys read with their
defaults, integer fields only as JSON integers -- and raises
:class:`UnitError` (naming the field) for anything else.
:meth:`KnowledgeUnit.to_json` gives the fields back in claudectl's struct
order, so :func:`dumps_line` reproduces claudectl's bytes.

Also here: semantic keys (2.5), summary lines (2.7), staleness and decay (2.6),
per-unit sharing consent (2.4), the prompt rollout hash (9.3) and
:func:`paginate` for snapshots (6.6).  Everything is pure.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar, TypeVar

DAY = 86_400
U8_MAX = 2**8 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1

CATEGORIES = ("best_practice", "technique", "workflow_pattern", "personal")
#: Config/CLI labels of the categories (``workflow`` means ``workflow_pattern``).
CATEGORY_LABELS = {
    "best_practice": "best_practice",
    "technique": "technique",
    "workflow_pattern": "workflow",
    "personal": "personal",
}
INJECTION_STATES = ("draft", "canary", "staged", "live")
TRUST_TIERS = ("confirmed", "suggested", "unverified", "any")

#: Decay per overdue interval and its cap (docs/hive.md, Knowledge units).
DECAY = 0.9
MAX_DECAY_STEPS = 50
#: Snapshot page budget in bytes of compact unit JSON (docs/gossip.md,
#: Asking: requests and snapshots).
SNAPSHOT_PAGE_BYTES = 512_000


class UnitError(ValueError):
    """A unit (or part of one) that claudectl 0.64 would not read."""


# --- JSON field readers ---------------------------------------------------------

_MISSING: Any = object()


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _obj(value: Any, path: str) -> Mapping[str, Any]:
    if type(value) is dict:  # what JSON gives: no ABC check
        return value
    if not isinstance(value, Mapping):
        raise UnitError(f"{path or 'unit'} must be a JSON object")
    return value


def _get(obj: Mapping[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
    if key in obj:
        return obj[key]
    if default is _MISSING:
        raise UnitError(f"{_where(path, key)} is missing")
    return default


def _int(value: Any, where: str, hi: int) -> int:
    # JSON integers only: 5.0 is rejected, as serde rejects it for u32/u64.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnitError(f"{where} must be an integer, not {value!r}")
    if not 0 <= value <= hi:
        raise UnitError(f"{where} must be an integer 0..{hi}, not {value}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnitError(f"{where} must be a number, not {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer literal of hundreds of digits
        raise UnitError(f"{where} is out of range") from None
    if not math.isfinite(value):
        raise UnitError(f"{where} must be a finite number")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UnitError(f"{where} must be a string, not {value!r}")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise UnitError(f"{where} must be an array of strings")
    return tuple(_str(v, f"{where}[{i}]") for i, v in enumerate(value))


# A content field: (name, kind, default).  Kinds: str, f64, u32, u64, strs
# (array of strings), requires, variants; a trailing "?" allows null.  A
# default of _MISSING makes the key required.
_FieldSpec = tuple[str, str, Any]


#: Kinds whose well-formed values pass through :func:`_read_field` with one
#: type check (the common case); anything else takes the checked path below,
#: which gives the exact error.
_U_MAX = {"u32": U32_MAX, "u32?": U32_MAX, "u64": U64_MAX, "u64?": U64_MAX}
_STR_KINDS = frozenset({"str", "str?"})
_F64_KINDS = frozenset({"f64", "f64?"})
_isfinite = math.isfinite


def _read_field(obj: Mapping[str, Any], spec: _FieldSpec, path: str) -> Any:
    name, kind, default = spec
    value = obj.get(name, _MISSING)
    t = type(value)
    if t is str:
        if kind in _STR_KINDS:
            return value
    elif t is float:
        if kind in _F64_KINDS and _isfinite(value):
            return value
    elif t is int:
        hi = _U_MAX.get(kind)
        if hi is not None and 0 <= value <= hi:
            return value
    elif t is list and kind == "strs":
        if all(type(v) is str for v in value):
            return tuple(value)
    elif value is _MISSING and default is not _MISSING:
        return default
    return _read_field_checked(obj, spec, path)


def _field_reader(
    specs: tuple[_FieldSpec, ...],
) -> Callable[[Mapping[str, Any], str, dict[str, Any]], None]:
    """
    ``read(obj, path, out)``: ``out[name] = _read_field(obj, spec, path)`` for
    each spec in order, as straight-line code made once per spec list (a
    merged snapshot reads ~15 fields of every unit): each well-formed value
    passes one inline type check, anything else goes to :func:`_read_field`
    itself, so the result and the errors are the same.
    """
    lines = ["def read(obj, path, out):", "    get = obj.get"]
    env: dict[str, Any] = {"_M": _MISSING, "_rf": _read_field, "_isf": math.isfinite}
    for n, spec in enumerate(specs):
        name, kind, _ = spec
        env[f"S{n}"] = spec
        fallback = f"_rf(obj, S{n}, path)"
        lines.append(f"    v = get({name!r}, _M)")
        if kind in _STR_KINDS:
            lines.append(f"    if type(v) is not str: v = {fallback}")
        elif kind in _F64_KINDS:
            lines.append(f"    if type(v) is not float or not _isf(v): v = {fallback}")
        elif kind in _U_MAX:
            lines.append(
                f"    if type(v) is not int or not 0 <= v <= {_U_MAX[kind]}: v = {fallback}"
            )
        else:  # lists and records: the shared reader
            lines.append(f"    v = {fallback}")
        lines.append(f"    out[{name!r}] = v")
    exec("\n".join(lines), env)  # noqa: S102  # our own fixed specs, no input
    return env["read"]  # type: ignore[no-any-return]


def _read_field_checked(obj: Mapping[str, Any], spec: _FieldSpec, path: str) -> Any:
    name, kind, default = spec
    where = _where(path, name)
    optional = kind.endswith("?")
    if name not in obj:
        if default is _MISSING and not optional:
            raise UnitError(f"{where} is missing")
        return None if default is _MISSING else default  # Option<T>: absent is None
    value = obj[name]
    if value is None and optional:
        return None
    kind = kind.rstrip("?")
    if kind == "str":
        return _str(value, where)
    if kind == "f64":
        return _float(value, where)
    if kind == "u32":
        return _int(value, where, U32_MAX)
    if kind == "u64":
        return _int(value, where, U64_MAX)
    if kind == "strs":
        return _str_list(value, where)
    if kind == "requires":
        return Requires.from_json(value, where)
    if kind == "variants":
        if not isinstance(value, list):
            raise UnitError(f"{where} must be an array")
        return tuple(ApproachVariant.from_json(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise AssertionError(kind)  # pragma: no cover


def _write_field(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_write_field(v) for v in value]
    if hasattr(value, "to_json"):
        return value.to_json()
    return value


# --- small records ----------------------------------------------------------------


@dataclass(frozen=True)
class Requires:
    """What an artifact needs on the installing machine; empty keys are omitted."""

    cli: tuple[str, ...] = ()
    os: tuple[str, ...] = ()
    min_version: str | None = None

    @classmethod
    def from_json(cls, value: Any, path: str = "requires") -> Requires:
        obj = _obj(value, path)
        cli = obj.get("cli")
        os_ = obj.get("os")
        mv = obj.get("min_version")
        return cls(
            cli=() if cli is None else _str_list(cli, _where(path, "cli")),
            os=() if os_ is None else _str_list(os_, _where(path, "os")),
            min_version=None if mv is None else _str(mv, _where(path, "min_version")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.cli:
            out["cli"] = list(self.cli)
        if self.os:
            out["os"] = list(self.os)
        if self.min_version:
            out["min_version"] = self.min_version
        return out


@dataclass(frozen=True)
class ApproachVariant:
    approach_summary: str
    evidence: int
    conditions: tuple[str, ...] = ()
    contributing_peers: tuple[str, ...] = ()
    outcome_ref: str | None = None

    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("approach_summary", "str", _MISSING),
        ("conditions", "strs", ()),
        ("evidence", "u32", _MISSING),
        ("contributing_peers", "strs", ()),
        ("outcome_ref", "str?", None),
    )

    @classmethod
    def from_json(cls, value: Any, path: str = "variant") -> ApproachVariant:
        obj = _obj(value, path)
        return cls(**{s[0]: _read_field(obj, s, path) for s in cls._SPEC})

    def to_json(self) -> dict[str, Any]:
        return {s[0]: _write_field(getattr(self, s[0])) for s in self._SPEC}

    @property
    def match_key(self) -> str:
        """Variants of two clusters are the same when this is equal (docs/hive.md)."""
        return self.approach_summary + "|" + ",".join(sorted(self.conditions))


# --- content types ---------------------------------------------------------------


#: Each content type's field reader (:func:`_field_reader`), made when first used.
_READERS: dict[type, Callable[[Mapping[str, Any], str, dict[str, Any]], None]] = {}


class Content:
    """Base of the content types; ``TYPE`` is the on-disk tag."""

    TYPE: ClassVar[str]
    _SPEC: ClassVar[tuple[_FieldSpec, ...]]

    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any], path: str) -> Content:
        # Every field is checked (_read_field's checks), and _SPEC names every
        # field (tests.test_hive_units): fill the frozen instance directly
        # rather than through __init__'s object.__setattr__ per field.
        read = _READERS.get(cls)
        if read is None:
            read = _READERS[cls] = _field_reader(cls._SPEC)
        content = object.__new__(cls)
        read(obj, path, content.__dict__)
        return content

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for s in self._SPEC:
            out[s[0]] = _write_field(getattr(self, s[0]))
        return out

    # Overridden per type.
    def key_part(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def pct(x: float) -> str:
    """``x`` as a whole percentage, ties to even (docs/hive.md, Knowledge units)."""
    return format(x * 100.0, ".0f")


@dataclass(frozen=True)
class Pattern(Content):
    TYPE: ClassVar[str] = "pattern"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("tool", "str", _MISSING),
        ("command_pattern", "str?", None),
        ("preferred_action", "str", _MISSING),
        ("accept_rate", "f64", _MISSING),
        ("sample_count", "u32", _MISSING),
        ("conditions", "strs", _MISSING),
    )
    tool: str
    command_pattern: str | None
    preferred_action: str
    accept_rate: float
    sample_count: int
    conditions: tuple[str, ...] = ()

    def key_part(self) -> str:
        return f"pattern:{self.tool}:{self.command_pattern or '*'}"

    def summary(self) -> str:
        return (
            f"[{self.tool}, {self.command_pattern or '*'}] {self.preferred_action} "
            f"({pct(self.accept_rate)}%)"
        )


@dataclass(frozen=True)
class ToolAccuracy(Content):
    TYPE: ClassVar[str] = "tool_accuracy"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("tool", "str", _MISSING),
        ("total", "u32", _MISSING),
        ("correct", "u32", _MISSING),
        ("confidence_threshold", "f64", _MISSING),
    )
    tool: str
    total: int
    correct: int
    confidence_threshold: float

    def key_part(self) -> str:
        return f"accuracy:{self.tool}"

    def summary(self) -> str:
        rate = self.correct / self.total if self.total else 0.0
        return f"[{self.tool}] accuracy {self.correct}/{self.total} ({pct(rate)}%)"


@dataclass(frozen=True)
class Temporal(Content):
    TYPE: ClassVar[str] = "temporal"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("description", "str", _MISSING),
        ("strength", "f64", _MISSING),
    )
    description: str
    strength: float

    def key_part(self) -> str:
        return f"temporal:{self.description[:40]}"

    def summary(self) -> str:
        return f"temporal: {self.description} (strength {self.strength:.2f})"


@dataclass(frozen=True)
class Insight(Content):
    TYPE: ClassVar[str] = "insight"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("category", "str", _MISSING),
        ("severity", "str", _MISSING),
        ("summary", "str", _MISSING),
        ("suggestion", "str?", None),
    )
    category: str
    severity: str
    summary_text: str
    suggestion: str | None = None

    # The JSON key is "summary", which would shadow the method.
    @classmethod
    def _from_obj(cls, obj: Mapping[str, Any], path: str) -> Insight:
        vals = {s[0]: _read_field(obj, s, path) for s in cls._SPEC}
        return cls(vals["category"], vals["severity"], vals["summary"], vals["suggestion"])

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "category": self.category,
            "severity": self.severity,
            "summary": self.summary_text,
            "suggestion": self.suggestion,
        }

    def key_part(self) -> str:
        return f"insight:{self.category}:{self.summary_text[:40]}"

    def summary(self) -> str:
        return f"[{self.severity}] {self.category}: {self.summary_text}"


@dataclass(frozen=True)
class PromotedRule(Content):
    TYPE: ClassVar[str] = "promoted_rule"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("rule", "str", _MISSING),
        ("source_type", "str", _MISSING),
    )
    rule: str
    source_type: str

    def key_part(self) -> str:
        return f"rule:{self.rule[:40]}"

    def summary(self) -> str:
        return f"rule: {self.rule}"


@dataclass(frozen=True)
class Skill(Content):
    TYPE: ClassVar[str] = "skill"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("name", "str", _MISSING),
        ("description", "str", _MISSING),
        ("version", "str", _MISSING),
        ("body", "str", _MISSING),
        ("requires", "requires", Requires()),
    )
    name: str
    description: str
    version: str
    body: str
    requires: Requires = field(default_factory=Requires)

    def key_part(self) -> str:
        return "skill:" + self.name.lower().replace(" ", "-")

    def summary(self) -> str:
        return f"skill: {self.name} v{self.version} ({len(self.body.encode('utf-8'))} bytes)"


@dataclass(frozen=True)
class Command(Content):
    TYPE: ClassVar[str] = "command"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("name", "str", _MISSING),
        ("description", "str", _MISSING),
        ("args", "str?", None),
        ("body", "str", _MISSING),
        ("requires", "requires", Requires()),
    )
    name: str
    description: str
    args: str | None
    body: str
    requires: Requires = field(default_factory=Requires)

    def key_part(self) -> str:
        return f"command:{self.name.lower()}"

    def summary(self) -> str:
        return f"command: /{self.name}" + (f" {self.args}" if self.args else "")


@dataclass(frozen=True)
class HookConfig(Content):
    TYPE: ClassVar[str] = "hook_config"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("event", "str", _MISSING),
        ("matcher", "str", _MISSING),
        ("description", "str", _MISSING),
        ("config_json", "str", _MISSING),
        ("requires", "requires", Requires()),
    )
    event: str
    matcher: str
    description: str
    config_json: str
    requires: Requires = field(default_factory=Requires)

    def key_part(self) -> str:
        return f"hook:{self.event.lower()}:{self.matcher.lower()}"

    def summary(self) -> str:
        return f"hook: {self.event}[{self.matcher}] \u2014 {self.description}"


@dataclass(frozen=True)
class ApproachOutcome(Content):
    TYPE: ClassVar[str] = "approach_outcome"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("approach_ref", "str", _MISSING),
        ("success_rate", "f64", _MISSING),
        ("sample_count", "u32", _MISSING),
        ("median_cost_usd", "f64?", None),
        ("median_duration_ms", "u64?", None),
        ("conditions", "strs", ()),
    )
    approach_ref: str
    success_rate: float
    sample_count: int
    median_cost_usd: float | None = None
    median_duration_ms: int | None = None
    conditions: tuple[str, ...] = ()

    def key_part(self) -> str:
        return f"outcome:{self.approach_ref}"

    def summary(self) -> str:
        return (
            f"outcome: {self.approach_ref} \u2014 {pct(self.success_rate)}% "
            f"over {self.sample_count}"
        )


@dataclass(frozen=True)
class ApproachCluster(Content):
    TYPE: ClassVar[str] = "approach_cluster"
    _SPEC: ClassVar[tuple[_FieldSpec, ...]] = (
        ("problem_key", "str", _MISSING),
        ("variants", "variants", _MISSING),
    )
    problem_key: str
    variants: tuple[ApproachVariant, ...]

    def key_part(self) -> str:
        return f"cluster:{self.problem_key}"

    def summary(self) -> str:
        return f"cluster: {self.problem_key} ({len(self.variants)} variants)"


CONTENT_TYPES: dict[str, type[Content]] = {
    c.TYPE: c
    for c in (
        Pattern,
        ToolAccuracy,
        Temporal,
        Insight,
        PromotedRule,
        Skill,
        Command,
        HookConfig,
        ApproachOutcome,
        ApproachCluster,
    )
}

#: Default revalidation interval per content type, seconds (docs/hive.md, Knowledge units).
DEFAULT_INTERVALS: dict[str, int] = {
    "pattern": 30 * DAY,
    "tool_accuracy": 30 * DAY,
    "promoted_rule": 30 * DAY,
    "approach_cluster": 30 * DAY,
    "approach_outcome": 14 * DAY,
    "temporal": 7 * DAY,
    "insight": 7 * DAY,
    "skill": 90 * DAY,
    "command": 90 * DAY,
    "hook_config": 90 * DAY,
}


def content_from_json(value: Any, path: str = "content") -> Content:
    obj = _obj(value, path)
    tag = _get(obj, "type", path)
    cls = CONTENT_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise UnitError(f"{path}.type {tag!r} is not a known content type")
    return cls._from_obj(obj, path)


# --- scope --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """``universal``, ``language:<x>`` or ``project:<x>`` (adjacently tagged on disk)."""

    kind: str = "universal"
    value: str | None = None

    KINDS: ClassVar[dict[str, str]] = {
        "universal": "universal",
        "language": "lang",
        "project": "proj",
    }

    @classmethod
    def from_json(cls, value: Any, path: str = "scope") -> Scope:
        obj = _obj(value, path)
        kind = _get(obj, "type", path)
        if kind == "universal":
            if obj.get("value") is not None:
                raise UnitError(f"{path}.value must be null for a universal scope")
            return cls()
        if kind in ("language", "project"):
            return cls(kind, _str(_get(obj, "value", path), f"{path}.value"))
        raise UnitError(f"{path}.type {kind!r} is not universal, language or project")

    @classmethod
    def parse(cls, text: str) -> Scope:
        """CLI text: ``universal``, ``language:x``, ``project:x``; anything else is a project."""
        if text == "universal":
            return cls()
        for kind in ("language", "project"):
            if text.startswith(kind + ":"):
                return cls(kind, text[len(kind) + 1 :])
        return cls("project", text)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "universal":
            return {"type": "universal"}
        return {"type": self.kind, "value": self.value}

    def display(self) -> str:
        return "universal" if self.kind == "universal" else f"{self.kind}:{self.value}"

    def key_prefix(self) -> str:
        prefix = self.KINDS[self.kind]
        return prefix if self.kind == "universal" else f"{prefix}:{self.value}"


# --- sharing consent ------------------------------------------------------------------

TIER_RANK = {"confirmed": 4, "suggested": 3, "unverified": 2, "any": 1}


@dataclass(frozen=True)
class SharingConsent:
    """Per-unit outbound gate that travels with the unit (docs/hive.md, Sharing)."""

    expires_at: int | None = None
    allow_peers: tuple[str, ...] | None = None
    exclude_peers: tuple[str, ...] | None = None
    min_trust_tier: str = "any"

    @classmethod
    def from_json(cls, value: Any, path: str = "sharing_consent") -> SharingConsent:
        obj = _obj(value, path)
        exp = obj.get("expires_at")
        allow = obj.get("allow_peers")
        excl = obj.get("exclude_peers")
        tier = obj.get("min_trust_tier", "any")
        if tier not in TIER_RANK:
            raise UnitError(
                f"{path}.min_trust_tier {tier!r} is not one of " + ", ".join(TRUST_TIERS)
            )
        return cls(
            expires_at=None if exp is None else _int(exp, f"{path}.expires_at", U64_MAX),
            allow_peers=None if allow is None else _str_list(allow, f"{path}.allow_peers"),
            exclude_peers=None if excl is None else _str_list(excl, f"{path}.exclude_peers"),
            min_trust_tier=tier,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        if self.allow_peers is not None:
            out["allow_peers"] = list(self.allow_peers)
        if self.exclude_peers is not None:
            out["exclude_peers"] = list(self.exclude_peers)
        out["min_trust_tier"] = self.min_trust_tier
        return out

    def allows(self, peer_id: str, peer_rank: int, now: int) -> bool:
        """May this unit go to ``peer_id`` (whose tier rank is ``peer_rank``) at ``now``?"""
        if self.expires_at is not None and now > self.expires_at:
            return False
        if self.exclude_peers is not None and peer_id in self.exclude_peers:
            return False
        if self.allow_peers is not None and peer_id not in self.allow_peers:
            return False
        return peer_rank >= TIER_RANK[self.min_trust_tier]


# --- injection stats ------------------------------------------------------------------


@dataclass(frozen=True)
class InjectionStats:
    injected_count: int = 0
    accepted_count: int = 0
    overridden_count: int = 0
    last_injected_at: int = 0
    last_outcome_at: int = 0

    _NAMES: ClassVar[tuple[str, ...]] = (
        "injected_count",
        "accepted_count",
        "overridden_count",
        "last_injected_at",
        "last_outcome_at",
    )

    @classmethod
    def from_json(cls, value: Any, path: str = "injection_stats") -> InjectionStats:
        obj = _obj(value, path)
        values = [obj.get(name, 0) for name in cls._NAMES]
        if not all(type(v) is int and 0 <= v <= U64_MAX for v in values):
            values = [
                _int(v, f"{path}.{n}", U64_MAX) for n, v in zip(cls._NAMES, values, strict=True)
            ]
        if not any(values):
            return _NO_STATS  # the usual case: nothing injected yet
        stats = object.__new__(cls)  # checked above: no __init__ needed
        stats.__dict__.update(zip(cls._NAMES, values, strict=True))
        return stats

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._NAMES}


# --- the unit -------------------------------------------------------------------------

_ID: _FieldSpec = ("id", "str", _MISSING)
#: The unit's checked scalar fields after ``content``, in claudectl's order.
_UNIT_NUMBERS: tuple[_FieldSpec, ...] = (
    ("evidence_count", "u32", _MISSING),
    ("confidence", "f64", _MISSING),
    ("source_peer", "str", _MISSING),
    ("originated_at", "u64", _MISSING),
    ("last_validated_at", "u64", _MISSING),
    ("propagation_count", "u32", _MISSING),
    ("version", "u32", _MISSING),
    ("revalidation_interval_secs", "u64", 0),
)


_NO_STATS = InjectionStats()
_read_unit_numbers = _field_reader(_UNIT_NUMBERS)


@dataclass(frozen=True)
class KnowledgeUnit:
    id: str
    scope: Scope
    content: Content
    evidence_count: int
    confidence: float
    source_peer: str
    originated_at: int
    last_validated_at: int
    propagation_count: int = 0
    version: int = 1
    category: str = "best_practice"
    revalidation_interval_secs: int = 0
    injection_state: str = "live"
    injection_stats: InjectionStats = field(default_factory=InjectionStats)
    sharing_consent: SharingConsent | None = None

    @classmethod
    def from_json(cls, value: Any, hops: int = 0) -> KnowledgeUnit:
        """
        Read and check a unit; ``hops`` is added to its ``propagation_count``
        (capped at 2^32-1): a unit received from a peer travelled one more hop.
        """
        obj = _obj(value, "")
        category = _get(obj, "category", "", "best_practice")
        if category not in CATEGORIES:
            raise UnitError(f"category {category!r} is not one of {', '.join(CATEGORIES)}")
        state = _get(obj, "injection_state", "", "live")
        if state not in INJECTION_STATES:
            raise UnitError(
                f"injection_state {state!r} is not one of " + ", ".join(INJECTION_STATES)
            )
        consent = obj.get("sharing_consent")
        # The fields in claudectl's order, each checked by _read_field (one
        # type check when well-formed; the exact error otherwise).
        fields_ = {
            "id": _read_field(obj, _ID, ""),
            "scope": Scope.from_json(_get(obj, "scope", "")),
            "content": content_from_json(_get(obj, "content", "")),
        }
        _read_unit_numbers(obj, "", fields_)
        if hops:
            fields_["propagation_count"] = min(fields_["propagation_count"] + hops, U32_MAX)
        fields_["category"] = category
        fields_["injection_state"] = state
        stats = obj.get("injection_stats", _MISSING)
        fields_["injection_stats"] = (
            _NO_STATS if stats is _MISSING else InjectionStats.from_json(stats)
        )
        fields_["sharing_consent"] = None if consent is None else SharingConsent.from_json(consent)
        # Every field is checked above: fill the frozen instance directly
        # rather than through __init__'s 15 object.__setattr__ calls.
        unit = object.__new__(cls)
        unit.__dict__.update(fields_)
        return unit

    def to_json(self) -> dict[str, Any]:
        """The unit as a dict in claudectl's field order."""
        out: dict[str, Any] = {
            "id": self.id,
            "scope": self.scope.to_json(),
            "category": self.category,
            "content": self.content.to_json(),
            "evidence_count": self.evidence_count,
            "confidence": self.confidence,
            "source_peer": self.source_peer,
            "originated_at": self.originated_at,
            "last_validated_at": self.last_validated_at,
            "propagation_count": self.propagation_count,
            "version": self.version,
            "revalidation_interval_secs": self.revalidation_interval_secs,
            "injection_state": self.injection_state,
            "injection_stats": self.injection_stats.to_json(),
        }
        if self.sharing_consent is not None:
            out["sharing_consent"] = self.sharing_consent.to_json()
        return out

    # --- the unit on the wire -------------------------------------------------
    # Cached per unit object (frozen: dataclasses.replace() makes a new one
    # with empty caches).  Not by (id, version): two units may share an id
    # (defect H16), and a shorter path changes propagation_count alone.
    @cached_property
    def wire_dict(self) -> dict[str, Any]:
        """:meth:`to_json`, built once; shared, so callers must not change it."""
        return self.to_json()

    @cached_property
    def wire_json(self) -> str:
        """The unit as it appears inside a frame: compact, keys sorted, no NaN."""
        return _UNIT_WIRE_ENCODE(self.wire_dict)

    @cached_property
    def wire_size(self) -> int:
        """Bytes of :attr:`wire_json` in UTF-8 (what snapshot pages count)."""
        text = self.wire_json
        return len(text) if text.isascii() else len(text.encode("utf-8"))

    # --- derived values ---------------------------------------------------------
    @property
    def type(self) -> str:
        return self.content.TYPE

    @cached_property
    def semantic_key(self) -> str:
        # cached_property writes the instance __dict__ directly, which a
        # frozen dataclass allows; dataclasses.replace() makes a fresh unit.
        return f"{self.scope.key_prefix()}/{self.content.key_part()}"

    def summary(self) -> str:
        return self.content.summary()

    @property
    def score(self) -> float:
        """Raw merge score: confidence times evidence (docs/hive.md, Merging)."""
        return self.confidence * self.evidence_count

    def interval(self) -> int:
        return self.revalidation_interval_secs or DEFAULT_INTERVALS[self.type]

    def age(self, now: int) -> int:
        return max(0, now - self.last_validated_at)

    def is_stale(self, now: int) -> bool:
        return self.age(now) > self.interval()

    def effective_confidence(self, now: int) -> float:
        age, interval = self.age(now), self.interval()
        if age <= interval:
            return self.confidence
        return self.confidence * DECAY ** min((age - 1) // interval, MAX_DECAY_STEPS)

    def weight(self, now: int) -> float:
        """Decayed score, used to rank units for eviction and prompts."""
        return self.effective_confidence(now) * self.evidence_count

    def with_(self, **changes: Any) -> KnowledgeUnit:
        return replace(self, **changes)


# --- serialization -----------------------------------------------------------------------


#: The frame encoder's settings (claudectl/relay/codec.py), made once.
_WIRE_ENCODE = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False
).encode


_LINE_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _unit_encoder(sort_keys: bool) -> Callable[[dict[str, Any]], str]:
    """
    The JSON encoder of a unit's dict (``wire_dict``): what ``_WIRE_ENCODE``
    (``sort_keys``) or ``_LINE_ENCODE`` give, from one C encoder made once
    (``JSONEncoder.encode`` makes a new one per call, a fifth of the cost of
    encoding a unit).  No check for reference cycles: a unit's dict is a
    tree.  Where the C encoder is missing, the plain encoder.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has it
        return _WIRE_ENCODE if sort_keys else _LINE_ENCODE
    encoder = make(
        None,  # markers: no cycle check
        _no_default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,  # indent
        ":",
        ",",
        sort_keys,
        False,  # skipkeys
        False,  # allow_nan
    )

    def encode(value: dict[str, Any]) -> str:
        return "".join(encoder(value, 0))

    return encode


def _no_default(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_UNIT_WIRE_ENCODE = _unit_encoder(sort_keys=True)
_UNIT_LINE_ENCODE = _unit_encoder(sort_keys=False)


def _dumps(value: Any, sort_keys: bool = False) -> str:
    return _WIRE_ENCODE(value) if sort_keys else _LINE_ENCODE(value)


def _reject_constant(name: str) -> Any:
    raise UnitError(f"{name} is not valid JSON")


def loads_json(text: str | bytes) -> Any:
    """Strict JSON (no NaN/Infinity), raising :class:`UnitError`."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except UnitError:
        raise
    except (ValueError, RecursionError) as e:
        raise UnitError(f"not valid JSON: {e}") from None


def dumps_line(unit: KnowledgeUnit) -> str:
    """
    One ``knowledge.jsonl`` line (compact, struct order, with ``\\n``):
    exactly what encoding :meth:`KnowledgeUnit.to_json` gives, put together
    from the unit's fields (the scope's and the rollout stats' JSON is cached
    by value, only the content is encoded) rather than from a dict built
    for it: a merged snapshot writes a line per unit.
    """
    u = unit
    parts = [
        '{"id":',
        _str_json(u.id),
        ',"scope":',
        _cached_json(u.scope),
        ',"category":',
        _str_json(u.category),
        ',"content":',
        _UNIT_LINE_ENCODE(u.content.to_json()),
        ',"evidence_count":',
        _num_json(u.evidence_count),
        ',"confidence":',
        _num_json(u.confidence),
        ',"source_peer":',
        _str_json(u.source_peer),
        ',"originated_at":',
        _num_json(u.originated_at),
        ',"last_validated_at":',
        _num_json(u.last_validated_at),
        ',"propagation_count":',
        _num_json(u.propagation_count),
        ',"version":',
        _num_json(u.version),
        ',"revalidation_interval_secs":',
        _num_json(u.revalidation_interval_secs),
        ',"injection_state":',
        _str_json(u.injection_state),
        ',"injection_stats":',
        _NO_STATS_JSON
        if u.injection_stats is _NO_STATS
        else _UNIT_LINE_ENCODE(u.injection_stats.to_json()),
    ]
    if u.sharing_consent is not None:
        parts += (',"sharing_consent":', _UNIT_LINE_ENCODE(u.sharing_consent.to_json()))
    parts.append("}\n")
    return "".join(parts)


_encode_basestring = json.encoder.encode_basestring
_isfinite_float = math.isfinite


def _str_json(value: Any) -> str:
    if type(value) is str:
        return _encode_basestring(value)
    return _LINE_ENCODE(value)  # (what json makes of anything else, or its error)


def _num_json(value: Any) -> str:
    t = type(value)
    if t is int:
        return int.__repr__(value)
    if t is float and _isfinite_float(value):
        return float.__repr__(value)
    return _LINE_ENCODE(value)  # (bool, None, NaN refused: as json does)


#: The JSON of scopes by value (strings only: equal scopes encode alike);
#: most units share a handful.
_SCOPE_JSON: dict[Scope, str] = {}
_NO_STATS_JSON = json.dumps(_NO_STATS.to_json(), separators=(",", ":"))


def _cached_json(scope: Scope) -> str:
    text = _SCOPE_JSON.get(scope)
    if text is None:
        text = _UNIT_LINE_ENCODE(scope.to_json())
        if len(_SCOPE_JSON) >= 4096:
            _SCOPE_JSON.clear()
        _SCOPE_JSON[scope] = text
    return text


def parse_line(line: str | bytes) -> KnowledgeUnit:
    """Parse one stored line; raises :class:`UnitError` with the reason."""
    return KnowledgeUnit.from_json(loads_json(line))


def dumps_record(record: Mapping[str, Any]) -> str:
    """A log record line: compact, sorted keys (docs/hive.md, Files)."""
    return _dumps(record, sort_keys=True) + "\n"


def dumps_pretty(value: Any) -> str:
    """
    Pretty JSON as claudectl prints exports: 2-space indent, UTF-8.  Exactly
    ``json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)``,
    without its pure-Python encoder's cost per item (the json module only
    uses its C encoder without indent): strings, keys and numbers are encoded
    by the C functions, the layout is put around them here.  Values of other
    types (subclasses, non-string keys) take ``json.dumps`` itself.
    """
    out: list[str] = []
    try:
        _pretty(value, "\n", out)
    except _NotPlain:
        return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
    return "".join(out)


class _NotPlain(Exception):
    """A value :func:`_pretty` leaves to ``json.dumps``."""


_ENCODE_STR = json.encoder.encode_basestring
_ENCODE_SCALAR = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_SCALARS = (float, bool, type(None))
_INTS = {int}
_MEMBER = "{}: {}".format


def _pretty(value: Any, newline: str, out: list[str]) -> None:
    t = type(value)
    if t is str:
        out.append(_ENCODE_STR(value))
    elif t is int:
        out.append(int.__repr__(value))
    elif t is dict:
        if not value:
            out.append("{}")
            return
        inner = newline + "  "
        if len(value) >= 8 and set(map(type, value.values())) == _INTS:
            # A map to whole numbers (ids to versions): no Python call per member.
            try:
                body = ("," + inner).join(
                    map(_MEMBER, map(_ENCODE_STR, value), map(int.__repr__, value.values()))
                )
            except TypeError:  # a key that is not a string
                raise _NotPlain from None
            out.append("{" + inner + body + newline + "}")
            return
        sep = "{" + inner
        for k, v in value.items():
            if type(k) is not str:
                raise _NotPlain
            out.append(sep + _ENCODE_STR(k) + ": ")
            _pretty(v, inner, out)
            sep = "," + inner
        out.append(newline + "}")
    elif t is list or t is tuple:
        if not value:
            out.append("[]")
            return
        inner = newline + "  "
        if type(value[0]) is str:
            # A list of strings (ids): encoded and joined in C.
            try:
                body = ("," + inner).join(map(_ENCODE_STR, value))
            except TypeError:  # not all strings: member by member
                pass
            else:
                out.append("[" + inner + body + newline + "]")
                return
        sep = "[" + inner
        for v in value:
            out.append(sep)
            _pretty(v, inner, out)
            sep = "," + inner
        out.append(newline + "]")
    elif t in _SCALARS:
        out.append(_ENCODE_SCALAR(value))
    else:
        raise _NotPlain


def unit_json_len(unit: KnowledgeUnit) -> int:
    """Bytes of the unit's compact JSON, as counted for snapshot pages."""
    return unit.wire_size


T = TypeVar("T")


def paginate(
    items: Iterable[T],
    limit: int = SNAPSHOT_PAGE_BYTES,
    size: Callable[[T], int] = unit_json_len,  # type: ignore[assignment]
) -> list[list[T]]:
    """
    Split units into snapshot pages as claudectl does (docs/gossip.md): a page
    closes before a unit that would take it past ``limit`` bytes; an oversize
    unit gets a page of its own.  No units gives no pages.  ``size`` gives an
    item's bytes (callers that already know them pass their own).
    """
    pages: list[list[T]] = []
    page: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if page and total + n > limit:
            pages.append(page)
            page, total = [], 0
        page.append(item)
        total += n
    if page:
        pages.append(page)
    return pages


# --- ids ------------------------------------------------------------------------------------


class UnitIds:
    """
    New unit ids in claudectl's ``ku_<epoch>_<n>`` shape.

    claudectl counts ``n`` from 0 in every process, so two processes (or two
    machines) distilling in the same second collide (defect H16).  Here ``n``
    starts at a random 32-bit value, so ids are unique in practice.
    """

    def __init__(
        self, clock: Callable[[], float] = time.time, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        self._clock = clock
        self._next = int.from_bytes(random(4), "big")

    def new(self) -> str:
        n = self._next
        self._next += 1
        return f"ku_{int(self._clock())}_{n}"


# --- rollout (docs/hive.md, The prompt section) ---------------------------------------------------

ROLLOUT_OFFSET_BASIS = 0x14650FB0739D0383
ROLLOUT_PRIME = 1099511628211
ROLLOUT_BUCKETS = {"draft": 0, "canary": 1, "staged": 5, "live": 10}


def rollout_hash(pid: int, unit_id: str) -> int:
    h = ROLLOUT_OFFSET_BASIS
    for byte in (pid & 0xFFFFFFFF).to_bytes(4, "little") + unit_id.encode("utf-8"):
        h = ((h ^ byte) * ROLLOUT_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def rollout_admits(state: str, unit_id: str, pid: int | None) -> bool:
    """Does the rollout state let this unit into the prompt of session ``pid``?"""
    if pid is None:
        return True
    buckets = ROLLOUT_BUCKETS[state]
    if buckets >= 10:
        return True
    if buckets <= 0:
        return False
    return rollout_hash(pid, unit_id) % 10 < buckets


def advance_state(state: str, accepted: int, overridden: int) -> str:
    """The rollout state after feedback (docs/hive.md, The prompt section)."""
    decided = accepted + overridden
    win = accepted / decided if decided else 0.0
    if state == "draft":
        return "draft"
    if decided >= 10 and win < 0.40:
        return "draft"
    if state == "canary" and decided >= 20 and win >= 0.70:
        return "staged"
    if state == "staged" and decided >= 50 and win >= 0.70:
        return "live"
    return state


def command_matches(pattern: str | None, command: object) -> bool:
    """
    Does a pattern's ``command_pattern`` cover ``command``?  No pattern covers
    everything; a glob (``*.lock``) is matched against the command and its
    last path component; anything else must be contained in the command.
    """
    if not pattern:
        return True
    if not isinstance(command, str):
        return False
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(command, pattern) or fnmatch.fnmatchcase(
            command.rsplit("/", 1)[-1], pattern
        )
    return pattern in command


def version_gte(have: str, want: str) -> bool:
    """Dotted-triple comparison; missing or non-numeric parts count as 0."""

    def triple(v: str) -> tuple[int, int, int]:
        parts = v.split(".")
        nums = []
        for i in range(3):
            try:
                n = int(parts[i]) if i < len(parts) else 0
            except ValueError:
                n = 0
            nums.append(n if 0 <= n <= U32_MAX else 0)
        return nums[0], nums[1], nums[2]

    return triple(have) >= triple(want)
