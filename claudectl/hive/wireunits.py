# -*- test-case-name: tests.test_hive_wireunits -*-
"""
Knowledge frames' units read straight from their text (issue 16).

Every peer -- claudectl 0.64 and this project -- writes a unit inside a
``knowledge_sync`` or ``knowledge_snapshot`` frame in one canonical form:
compact, keys sorted, every field present, strings as they are (docs/hive.md,
Knowledge units).  For a unit in that form, :func:`read_units_payload` makes
the checked :class:`~claudectl.hive.units.KnowledgeUnit` and its
``knowledge.jsonl`` line from one match of a compiled pattern, without the
JSON parser's dicts, the field-by-field checks and the line encoder: about a
third of the work per unit of a merged snapshot.

Only what is certain takes this path: strings of at most 256 characters
without a backslash or a control character (their JSON text is then the same
in a frame and in a line), integers in canonical form, finite numbers with a
fraction or an exponent, the six content types without nested records, no
``sharing_consent``.  A frame with any other unit, or anything unexpected
around the units, makes the reader give up: the codec reads the whole frame
the strict way, and its units are checked later as always.
``tests.test_hive_wireunits`` checks that both ways give the same units,
lines and errors.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from claudectl.hive.units import (
    _NO_STATS,
    _NO_STATS_JSON,
    CATEGORIES,
    INJECTION_STATES,
    ApproachOutcome,
    Content,
    InjectionStats,
    Insight,
    KnowledgeUnit,
    Pattern,
    PromotedRule,
    Scope,
    Temporal,
    ToolAccuracy,
)

__all__ = ["Prechecked", "read_units_payload"]


class Prechecked(NamedTuple):
    """
    A unit read from its canonical text: the unit (one hop added to its
    ``propagation_count``, as a received unit is stored) and its stored line
    (bytes, with ``\\n``).  What :func:`~claudectl.hive.units.KnowledgeUnit.from_json`
    and :func:`~claudectl.hive.units.dumps_line` would give for the JSON
    the text holds.
    """

    unit: KnowledgeUnit
    line: bytes


# --- the patterns -------------------------------------------------------------------
# Bounded so that every value they match is in range: up to 9 digits for a
# u32, 19 for a u64, a two-digit exponent for an f64 (finite whatever its
# digits).  A longer value is read the strict way, which checks it.

#: A string of at most 256 characters: a unit read this way holds its text
#: about three times (its fields, its line, its semantic key), which the
#: per-peer charge of waiting batches covers only for short strings; longer
#: ones take the strict way.
_STR = r'"[^"\\\x00-\x1f]{0,256}"'
#: A list of at most 16 such strings.
_STRS = r'\[(?:"[^"\\\x00-\x1f]{0,256}"(?:,"[^"\\\x00-\x1f]{0,256}"){0,15})?\]'
_U32 = r"(?:0|[1-9][0-9]{0,8})"
_U64 = r"(?:0|[1-9][0-9]{0,18})"
#: A JSON number with a fraction or an exponent: what an f64 field holds in
#: canonical form (an integer literal, which JSON reads as an int, takes the
#: strict path: ``-0`` is the integer 0 there, ``-0.0`` here).
_F64 = r"-?(?:0|[1-9][0-9]{0,19})(?:\.[0-9]{1,24}(?:[eE][-+]?[0-9]{1,2})?|[eE][-+]?[0-9]{1,2})"

#: kind -> (pattern of the value; the statement that sets the value ``{v}``
#: from the matched text ``{g}``; the value's text in the stored line).
#: Numbers keep (value, Python's spelling) in ``{p}``, from :func:`_fpair`.
_KINDS: dict[str, tuple[str, str, str]] = {
    "str": (_STR, "{v} = {g}[1:-1]", "{g}"),
    "str?": (f"null|{_STR}", "{v} = None if {g} == 'null' else {g}[1:-1]", "{g}"),
    "f64": (_F64, "{p} = _flget({g}) or _fpair({g}); {v} = {p}[0]", "{p}[1]"),
    "f64?": (
        f"null|{_F64}",
        "{p} = None if {g} == 'null' else (_flget({g}) or _fpair({g}));"
        " {v} = None if {p} is None else {p}[0]",
        "{g} if {p} is None else {p}[1]",
    ),
    "u32": (_U32, "{v} = _int({g})", "{g}"),
    "u64": (_U64, "{v} = _int({g})", "{g}"),
    "u64?": (f"null|{_U64}", "{v} = None if {g} == 'null' else _int({g})", "{g}"),
    "strs": (_STRS, "{v} = () if {g} == '[]' else _tuple({g}[2:-2].split('\",\"'))", "{g}"),
}

#: Numbers' text -> (value, its text in a stored line); most units share a few.
_FLOATS: dict[str, tuple[float, str]] = {}


def _fpair(text: str) -> tuple[float, str]:
    value = float(text)
    pair = _FLOATS[text] = (value, float.__repr__(value))
    if len(_FLOATS) > 4096:
        _FLOATS.clear()
    return pair


#: The content types read here, and the attribute each JSON key fills where
#: the two differ.  The rest (records inside: requires, variants) take the
#: strict path.
_TYPES: tuple[type[Content], ...] = (
    Pattern,
    ToolAccuracy,
    Temporal,
    Insight,
    PromotedRule,
    ApproachOutcome,
)
_ATTRS: dict[type[Content], dict[str, str]] = {Insight: {"summary": "summary_text"}}

_STATS_NAMES = InjectionStats._NAMES  # struct order (the line's)
_STATS_SORTED = tuple(sorted(_STATS_NAMES))  # the frame's order
#: The unit's members and their kinds; "content", "scope" and "stats" are
#: records, "category" and "state" names from a fixed set.
_UNIT_KINDS = {
    "category": "category",
    "confidence": "f64",
    "content": "content",
    "evidence_count": "u32",
    "id": "str",
    "injection_state": "state",
    "injection_stats": "stats",
    "last_validated_at": "u64",
    "originated_at": "u64",
    "propagation_count": "u32",
    "revalidation_interval_secs": "u64",
    "scope": "scope",
    "source_peer": "str",
    "version": "u32",
}

_SCOPES: dict[tuple[str, str], Scope] = {}
_UNIVERSAL = Scope()


def _scope(kind: str, quoted: str) -> Scope:
    key = (kind, quoted[1:-1])
    scope = _SCOPES.get(key)
    if scope is None:
        if len(_SCOPES) >= 4096:
            _SCOPES.clear()
        scope = _SCOPES[key] = Scope(*key)
    return scope


_ZEROS = ("0",) * len(_STATS_NAMES)


def _stats(values: tuple[str, ...]) -> tuple[InjectionStats, str]:
    """Rollout stats that are not all zero (``build`` takes those itself),
    from their numbers in frame order, and their line text."""
    by_name = dict(zip(_STATS_SORTED, values, strict=True))
    stats = object.__new__(InjectionStats)
    stats.__dict__.update({n: int(by_name[n]) for n in _STATS_NAMES})
    text = "{" + ",".join(f'"{n}":{by_name[n]}' for n in _STATS_NAMES) + "}"
    return stats, text


def _one_of(names: Iterable[str]) -> str:
    """A pattern of exactly these names (the same sets the strict checks use)."""
    return "|".join(map(re.escape, names))


def _compile(cls: type[Content]) -> tuple[re.Pattern[str], Callable[..., Prechecked]]:
    """
    The pattern of a whole unit whose content is ``cls``, and the function
    that makes the :class:`Prechecked` from its groups (generated once, as
    straight-line code: it runs for every unit of a snapshot).
    """
    groups: list[str] = []  # the variable of each group, in the pattern's order

    def group(var: str, pattern: str) -> str:
        groups.append(var)
        return f"({pattern})"

    def content_pattern() -> str:
        kinds = {name: kind for name, kind, _ in cls._SPEC}
        parts = []
        for key in sorted([*kinds, "type"]):
            value = f'"{cls.TYPE}"' if key == "type" else group(f"c_{key}", _KINDS[kinds[key]][0])
            parts.append(f'"{key}":{value}')
        return r"\{" + ",".join(parts) + r"\}"

    parts = []
    for key in sorted(_UNIT_KINDS):
        kind = _UNIT_KINDS[key]
        if kind == "content":
            value = content_pattern()
        elif kind == "category":
            value = '"' + group("category", _one_of(CATEGORIES)) + '"'
        elif kind == "state":
            value = '"' + group("state", _one_of(INJECTION_STATES)) + '"'
        elif kind == "stats":
            nums = [f'"{n}":' + group(f"s_{n}", _U64) for n in _STATS_SORTED]
            value = r"\{" + ",".join(nums) + r"\}"
        elif kind == "scope":
            groups.append("scope_text")  # the outer group is numbered first
            value = (
                r'(\{"type":"universal"\}|\{"type":"'
                + group("scope_kind", _one_of(k for k in Scope.KINDS if k != "universal"))
                + '","value":'
                + group("scope_value", _STR)
                + r"\})"
            )
        else:
            value = group(f"u_{key}", _KINDS[kind][0])
        parts.append(f'"{key}":{value}')
    pattern = re.compile(r"\{" + ",".join(parts) + r"\}")

    attrs = _ATTRS.get(cls, {})
    code = [f"def build({', '.join(groups)}):"]
    for name, kind, _ in cls._SPEC:
        code.append("    " + _KINDS[kind][1].format(g=f"c_{name}", v=f"v_{name}", p=f"p_{name}"))
    for key, kind in _UNIT_KINDS.items():
        if kind in _KINDS and key != "id" and key != "source_peer":
            code.append("    " + _KINDS[kind][1].format(g=f"u_{key}", v=f"v_{key}", p=f"p_{key}"))
    fill = ", ".join(f"{attrs.get(name, name)!r}: v_{name}" for name, _, _ in cls._SPEC)
    stats_args = ", ".join(f"s_{n}" for n in _STATS_SORTED)
    code += [
        "    content = _new(_cls)",
        f"    content.__dict__.update({{{fill}}})",
        "    hopped = v_propagation_count + 1  # at most 999,999,999 + 1 (the pattern)",
        f"    stats_values = ({stats_args})",
        "    if stats_values == _ZEROS:",
        "        stats, stats_text = _NO_STATS, _NO_STATS_JSON",
        "    else:",
        "        stats, stats_text = _stats(stats_values)",
        "    unit = _new(_KU)",
        "    scope = _UNIVERSAL if scope_kind is None else _scope(scope_kind, scope_value)",
        # semantic_key is a cached property: filled here, as it would be.
        "    unit.__dict__.update({'id': u_id[1:-1], 'scope': scope,"
        " 'semantic_key': scope.key_prefix() + '/' + content.key_part(),"
        " 'content': content, 'evidence_count': v_evidence_count,"
        " 'confidence': v_confidence, 'source_peer': u_source_peer[1:-1],"
        " 'originated_at': v_originated_at, 'last_validated_at': v_last_validated_at,"
        " 'propagation_count': hopped, 'version': v_version, 'category': category,"
        " 'revalidation_interval_secs': v_revalidation_interval_secs,"
        " 'injection_state': state, 'injection_stats': stats, 'sharing_consent': None})",
    ]
    # The stored line: the unit's fields in struct order, the content's
    # "type" first and then its fields (dumps_line's order).
    line: list[str] = [
        repr('{"id":'),
        "u_id",
        repr(',"scope":'),
        "scope_text",
        repr(',"category":"'),
        "category",
        repr('","content":{"type":"' + cls.TYPE + '"'),
    ]
    for name, kind, _ in cls._SPEC:
        line += [repr(f',"{name}":'), _KINDS[kind][2].format(g=f"c_{name}", p=f"p_{name}")]
    line += [
        repr('},"evidence_count":'),
        "u_evidence_count",
        repr(',"confidence":'),
        "p_confidence[1]",
        repr(',"source_peer":'),
        "u_source_peer",
        repr(',"originated_at":'),
        "u_originated_at",
        repr(',"last_validated_at":'),
        "u_last_validated_at",
        repr(',"propagation_count":'),
        "_str(hopped)",
        repr(',"version":'),
        "u_version",
        repr(',"revalidation_interval_secs":'),
        "u_revalidation_interval_secs",
        repr(',"injection_state":"'),
        "state",
        repr('","injection_stats":'),
        "stats_text",
        repr("}\n"),
    ]
    code.append(
        f"    return _pre(_Pre, (unit, ''.join(({', '.join(_merged(line))})).encode('utf-8')))"
    )
    env: dict[str, Any] = {
        "_new": object.__new__,
        "_cls": cls,
        "_KU": KnowledgeUnit,
        "_flget": _FLOATS.get,
        "_fpair": _fpair,
        "_int": int,
        "_str": str,
        "_tuple": tuple,
        "_scope": _scope,
        "_stats": _stats,
        "_ZEROS": _ZEROS,
        "_NO_STATS": _NO_STATS,
        "_NO_STATS_JSON": _NO_STATS_JSON,
        "_UNIVERSAL": _UNIVERSAL,
        "_pre": tuple.__new__,
        "_Pre": Prechecked,
    }
    exec("\n".join(code), env)  # noqa: S102  # our own fixed specs, no input
    return pattern, env["build"]


def _merged(parts: list[str]) -> list[str]:
    """Code of the line's parts with neighbouring string literals made one."""
    out: list[str] = []
    for part in parts:
        if out and part[0] in "'\"" and out[-1][0] in "'\"":
            out[-1] = repr(ast.literal_eval(out[-1]) + ast.literal_eval(part))
        else:
            out.append(part)
    return out


_READERS: list[tuple[Callable[[str, int], re.Match[str] | None], Callable[..., Prechecked]]] = [
    (pattern.match, build) for pattern, build in map(_compile, _TYPES)
]


def _read_unit(text: str, pos: int) -> tuple[Prechecked, int] | None:
    """
    The unit whose canonical text starts at ``text[pos]``, and where it
    ends; None when there is none in canonical form there.
    """
    readers = _READERS
    for n, (match, build) in enumerate(readers):
        m = match(text, pos)
        if m is not None:
            found = build(*m.groups())
            if n:  # the type seen last is tried first next time
                readers.insert(0, readers.pop(n))
            return found, m.end()
    return None


#: A payload member before or after the units: a name and an integer.
_MEMBER = re.compile(r'"([a-z_]{1,40})":(0|[1-9][0-9]{0,19})(,?)')
_UNITS_KEY = '"units":['


def read_units_payload(text: str, pos: int) -> tuple[dict[str, Any], int] | None:
    """
    A knowledge frame's payload from ``text[pos]``: ``{`` members with
    integer values, ``"units":[...]``, more such members, ``}``; every unit
    in canonical form, as a :class:`Prechecked`.  Returns the payload and
    the index after its ``}``, or None where the strict parser must read the
    frame (then it finds what is wrong, or reads what is merely unusual).
    """
    if not text.startswith("{", pos):
        return None
    pos += 1
    payload: dict[str, Any] = {}
    members = 0
    units: list[Any] | None = None
    while True:
        if units is None and text.startswith(_UNITS_KEY, pos):
            units, pos = _read_units(text, pos + len(_UNITS_KEY))  # type: ignore[misc]
            if units is None:
                return None
            payload["units"] = units
            members += 1
            if text.startswith(",", pos):
                pos += 1
                continue
        else:
            m = _MEMBER.match(text, pos)
            if m is None:
                return None
            payload[m[1]] = int(m[2])
            members += 1
            pos = m.end()
            if m[3]:
                continue
        break
    if len(payload) != members or not text.startswith("}", pos):
        return None  # a duplicate member, or more than this reader knows
    return payload, pos + 1


def _read_units(text: str, pos: int) -> tuple[list[Any] | None, int]:
    units: list[Any] = []
    if text.startswith("]", pos):
        return units, pos + 1
    append = units.append
    match, build = _READERS[0]  # the type of the last unit read (most are alike)
    while True:
        m = match(text, pos)
        if m is not None:
            append(build(*m.groups()))
            pos = m.end()
        else:
            found = _read_unit(text, pos)
            if found is None:
                # A unit in another form: the strict reader takes the whole
                # frame (one parse of it shares its keys' strings between
                # units, where a parse per unit would not: half as much
                # memory again for frames of such units).
                return None, pos
            append(found[0])
            pos = found[1]
            match, build = _READERS[0]
        sep = text[pos : pos + 1]
        pos += 1
        if sep == ",":
            continue
        if sep == "]":
            return units, pos
        return None, pos
