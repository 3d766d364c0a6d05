# -*- test-case-name: tests.test_discovery_beacon -*-
"""
claudectl's LAN announcement (docs/pairing.md, LAN discovery) and the table a
scanner keeps.

A beacon is the ASCII bytes ``CCTL`` followed by compact JSON
``{"identity":…,"port":…,"version":…}`` (keys in this order), e.g.
``CCTL{"identity":"laptop-a3f2","port":9847,"version":"0.36.0"}``.  It
carries no secret: only who is there and which TCP port they listen on.

Parsing accepts what claudectl sends (extra keys ignored, ``version``
optional) and rejects, with a counted reason, anything malformed: no magic,
not one JSON object, nested over 32 deep, over 1024 bytes, an identity that
is not a valid peer id (it is printed in a terminal), a port outside 1-65535
(claudectl would wrap it to 16 bits; we refuse it), or a non-integer port.

:class:`DiscoveryTable` keeps one row per identity (the newest announcement
wins; at most :data:`MAX_ROWS` identities), leaves out our own identity,
connects to the datagram's *source* IP with the *announced* port, and drops
rows not heard from for 30 s.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from claudectl.relay.keystore import is_remote_peer_id

MAGIC = b"CCTL"
MAX_DATAGRAM_BYTES = 1024
STALE_AFTER_SECS = 30.0
UNKNOWN_VERSION = "unknown"
MAX_VERSION_CHARS = 32
#: Rows a scanner keeps; a flood of made-up identities cannot grow it further.
MAX_ROWS = 1024
#: Arrays/objects nested deeper than this are refused before decoding.
MAX_JSON_DEPTH = 32


class BeaconError(ValueError):
    """A datagram that is not a valid announcement; ``reason`` names the check."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Beacon:
    identity: str
    port: int
    version: str


def encode_beacon(identity: str, port: int, version: str) -> bytes:
    """The datagram claudectl sends, byte for byte."""
    body = json.dumps(
        {"identity": identity, "port": port, "version": version},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return MAGIC + body.encode("utf-8")


def _clean_version(value: object) -> str:
    if not isinstance(value, str):
        return UNKNOWN_VERSION
    text = "".join(c if c.isprintable() else "?" for c in value)[:MAX_VERSION_CHARS]
    return text or UNKNOWN_VERSION


def _deeper_than(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects more than ``limit`` deep."""
    depth = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def loads_bounded(body: bytes) -> object:
    """
    One JSON value from at most 1 KiB of UTF-8, or :class:`BeaconError`.

    ~1000 levels of ``[[[[…`` fit in 1 KiB and make the decoder raise
    RecursionError (issue 11: a traceback).  Values nested more than
    :data:`MAX_JSON_DEPTH` deep are refused before decoding ("too nested");
    brackets inside strings do not count.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BeaconError("not json") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(text, MAX_JSON_DEPTH):
        raise BeaconError("too nested")
    try:
        return json.loads(text)
    except ValueError:
        raise BeaconError("not json") from None
    except RecursionError:  # cannot happen below MAX_JSON_DEPTH; never let it out
        raise BeaconError("too nested") from None


def parse_beacon(data: bytes) -> Beacon:
    """A :class:`Beacon`, or :class:`BeaconError` with a short reason."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise BeaconError("oversized")
    if len(data) < len(MAGIC) + 1 or not data.startswith(MAGIC):
        raise BeaconError("no magic")
    value = loads_bounded(data[len(MAGIC) :])
    if not isinstance(value, dict):
        raise BeaconError("not an object")
    identity = value.get("identity")
    if not isinstance(identity, str):
        raise BeaconError("no identity")
    if not is_remote_peer_id(identity):
        raise BeaconError("bad identity")
    port = value.get("port")
    if isinstance(port, bool) or not isinstance(port, int):
        raise BeaconError("no port")
    if not 0 < port <= 65535:
        raise BeaconError("bad port")
    return Beacon(identity, port, _clean_version(value.get("version")))


def connect_address(source_host: str, port: int) -> str:
    """The datagram's source IP with the announced port (``[v6]:port`` for IPv6)."""
    return f"[{source_host}]:{port}" if ":" in source_host else f"{source_host}:{port}"


@dataclass(frozen=True)
class Row:
    """One discovered instance."""

    identity: str
    host: str
    port: int
    version: str
    last_seen: float

    @property
    def address(self) -> str:
        return connect_address(self.host, self.port)

    def is_stale(self, now: float, stale_after: float = STALE_AFTER_SECS) -> bool:
        return now - self.last_seen > stale_after

    def to_json(self) -> dict[str, str]:
        return {"identity": self.identity, "addr": self.address, "version": self.version}


class DiscoveryTable:
    """What a scanner has heard, one row per identity."""

    def __init__(
        self,
        own_identity: str | None = None,
        stale_after: float = STALE_AFTER_SECS,
        max_rows: int = MAX_ROWS,
    ) -> None:
        self.own_identity = own_identity
        self.stale_after = stale_after
        self.max_rows = max_rows
        self._rows: dict[str, Row] = {}
        self.accepted = 0
        #: Rejected datagrams by reason.
        self.rejected: Counter[str] = Counter()
        self.last_rejected = ""
        self._pruned_at = float("-inf")

    def observe(self, data: bytes, source: tuple[str, int], now: float) -> Row | None:
        """Feed one datagram; the row it produced, or None (rejected or our own)."""
        try:
            beacon = parse_beacon(data)
        except BeaconError as e:
            self.rejected[e.reason] += 1
            self.last_rejected = e.reason
            return None
        self.accepted += 1
        if beacon.identity == self.own_identity:
            return None
        if beacon.identity not in self._rows and len(self._rows) >= self.max_rows:
            if now - self._pruned_at >= 1.0:  # a flood cannot make every datagram O(rows)
                self._pruned_at = now
                self._prune(now)
            if len(self._rows) >= self.max_rows:
                self.rejected["table full"] += 1
                self.last_rejected = "table full"
                return None
        row = Row(beacon.identity, source[0], beacon.port, beacon.version, now)
        self._rows[beacon.identity] = row
        return row

    def _prune(self, now: float) -> None:
        for ident in [i for i, r in self._rows.items() if r.is_stale(now, self.stale_after)]:
            del self._rows[ident]

    def rows(self, now: float) -> list[Row]:
        """Fresh rows, by identity; stale ones are forgotten."""
        self._prune(now)
        return sorted(self._rows.values(), key=lambda r: r.identity)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())
