# -*- test-case-name: tests.test_codec -*-
"""
The NDJSON envelope of the claudectl relay protocol (docs/protocol.md, Framing).

Every frame is one compact JSON object with exactly five members, in this
order: ``id``, ``msg_type``, ``from_peer``, ``timestamp`` (ms), ``payload``;
payload keys are sorted at every depth; then one ``\\n``.

:func:`encode` produces claudectl 0.64's bytes exactly.  :func:`decode`
accepts what a claudectl peer may send (and a little more: a missing
``payload`` is an error, as in claudectl) and raises :class:`ProtocolError`
for anything else -- never another exception.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Frames may be up to 1 MiB, not counting the ``\n``.
MAX_LINE_BYTES = 1_048_576
MAX_TIMESTAMP = 2**64 - 1

CHALLENGE = "challenge"
HANDSHAKE = "handshake"
HANDSHAKE_ACK = "handshake_ack"
HEARTBEAT = "heartbeat"
ACK = "ack"
DELEGATE_TASK = "delegate_task"
TASK_STATUS = "task_status"
TASK_HANDOFF = "task_handoff"
TASK_INTERRUPT = "task_interrupt"
KNOWLEDGE_SYNC = "knowledge_sync"
KNOWLEDGE_REQUEST = "knowledge_request"
KNOWLEDGE_SNAPSHOT = "knowledge_snapshot"

#: All 12 message types, in claudectl's order.
MSG_TYPES: tuple[str, ...] = (
    CHALLENGE,
    HANDSHAKE,
    HANDSHAKE_ACK,
    HEARTBEAT,
    ACK,
    DELEGATE_TASK,
    TASK_STATUS,
    TASK_HANDOFF,
    TASK_INTERRUPT,
    KNOWLEDGE_SYNC,
    KNOWLEDGE_REQUEST,
    KNOWLEDGE_SNAPSHOT,
)
_MSG_TYPE_SET = frozenset(MSG_TYPES)
HANDSHAKE_TYPES = frozenset({CHALLENGE, HANDSHAKE, HANDSHAKE_ACK})


class ProtocolError(Exception):
    """A frame that is not a valid envelope."""


@dataclass(frozen=True)
class Envelope:
    id: str
    msg_type: str
    from_peer: str
    timestamp: int
    payload: Any = field(default_factory=dict)
    #: Bytes of the frame this envelope was decoded from (0 when it was not
    #: decoded): what the hive charges a snapshot page without encoding its
    #: units again.  Not part of the message (equality, repr).
    wire_bytes: int = field(default=0, compare=False, repr=False)
    #: About how many values that frame holds: its ``{``, ``[`` and ``,``
    #: (those inside strings count too).  Each value costs a few dozen bytes
    #: in memory once parsed, however short its text.
    wire_nodes: int = field(default=0, compare=False, repr=False)


# One encoder and one decoder for every frame: json.dumps/json.loads with
# keyword arguments build a new one per call, which dominates a small frame.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_ENCODE_SORTED = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True
).encode


def _dumps(value: Any, sort_keys: bool = False) -> str:
    return _ENCODE_SORTED(value) if sort_keys else _ENCODE(value)


class EncodedPayload(dict):  # type: ignore[type-arg]
    """
    A payload that already knows its frame text: ``json`` (str) and ``raw``
    (its UTF-8 bytes) are exactly what the sorted compact encoder would
    write for this dict, so :func:`encode` splices the bytes in instead of
    encoding again (the hive builds snapshot and sync pages from each unit's
    cached JSON, and keeps whole snapshot answers encoded).  Give either
    form; the other is made when first asked for and kept.  In-process
    readers see an ordinary dict.  The caller vouches that the two agree.
    """

    __slots__ = ("_json", "_raw")

    def __init__(
        self, value: dict[str, Any], json_text: str | None = None, *, raw: bytes | None = None
    ) -> None:
        if json_text is None and raw is None:
            raise TypeError("EncodedPayload needs json_text or raw")
        super().__init__(value)
        self._json = json_text
        self._raw = raw

    @property
    def json(self) -> str:
        if self._json is None:
            assert self._raw is not None
            self._json = self._raw.decode("utf-8")
        return self._json

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            assert self._json is not None
            self._raw = self._json.encode("utf-8")
        return self._raw


def _head(env: Envelope) -> str:
    """The frame's text up to its payload (checking what :func:`encode` checks)."""
    if env.msg_type not in _MSG_TYPE_SET:
        raise ValueError(f"unknown msg_type {env.msg_type!r}")
    if (
        isinstance(env.timestamp, bool)
        or not isinstance(env.timestamp, int)
        or not 0 <= env.timestamp <= MAX_TIMESTAMP
    ):
        raise ValueError("timestamp must be an integer 0..2^64-1")
    # msg_type is one of the 12 plain ASCII names and timestamp an int:
    # neither needs escaping.
    return "".join(
        (
            '{"id":',
            _ENCODE(env.id),
            ',"msg_type":"',
            env.msg_type,
            '","from_peer":',
            _ENCODE(env.from_peer),
            ',"timestamp":',
            str(env.timestamp),
            ',"payload":',
        )
    )


def encode(env: Envelope) -> bytes:
    """The frame for ``env``, byte for byte as claudectl writes it."""
    head = _head(env)
    payload = env.payload
    if type(payload) is EncodedPayload:
        # One copy of the (possibly large) encoded payload, no re-encoding.
        return b"".join((head.encode("utf-8"), payload.raw, b"}\n"))
    return (head + _ENCODE_SORTED(payload) + "}\n").encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicate member makes the dict shorter than the list of pairs: one
    # C-level dict() and a length compare per object instead of a Python loop
    # over its members (a 512,000-byte snapshot page has ~25,000 of them).
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ProtocolError(f"duplicate member {k!r}")
            seen.add(k)
    return result


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"invalid JSON number {name}")


def _finite_float(text: str) -> float:
    # serde_json refuses numbers out of f64 range (1e400); so do we, or the
    # value could not be encoded again (encode uses allow_nan=False).
    value = float(text)
    if value in (math.inf, -math.inf):
        raise ProtocolError(f"number out of range: {text[:20]}")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
)

#: A JSON \u escape of a UTF-16 surrogate (prefilter for _has_lone_surrogate).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """True if a string anywhere in ``value`` holds an unpaired surrogate."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


#: The exact shape of an empty heartbeat as :func:`encode` (and claudectl)
#: writes it, with ids and a peer name that need no escaping: such a line is
#: an envelope whatever the JSON parser would say, so it skips the parser.
#: Anything else -- whitespace, escapes, another order, a payload -- takes
#: the full path (tests.test_codec checks that both agree).
EMPTY_HEARTBEAT_MATCH = _EMPTY_HEARTBEAT = re.compile(
    rb'\{"id":"([A-Za-z0-9_.:-]{1,256})","msg_type":"heartbeat",'
    rb'"from_peer":"([A-Za-z0-9_.:-]{0,256})","timestamp":(0|[1-9][0-9]{0,19}),'
    rb'"payload":\{\}\}\r?\n?'
).fullmatch


def empty_heartbeat(line: bytes) -> tuple[str, str, int] | None:
    """
    ``(id, from_peer, timestamp)`` if ``line`` is an empty heartbeat in the
    exact shape :func:`encode` writes (what :func:`decode` would return for
    it, without the JSON parser); None for anything else.
    """
    m = _EMPTY_HEARTBEAT(line)
    if m is None:
        return None
    ts = int(m[3])
    if ts > MAX_TIMESTAMP:
        return None
    return m[1].decode("ascii"), m[2].decode("ascii"), ts


#: Reads a payload from ``(text, index of its first character)``: the
#: payload and the index after it, or None to leave the frame to the strict
#: parser.  It must give what that parser gives, or None.
PayloadReader = Callable[[str, int], "tuple[Any, int] | None"]

#: A frame's head in the exact shape :func:`encode` writes, with an id and a
#: peer name that need no escaping (what a payload reader may follow).
_PLAIN_HEAD = re.compile(
    rb'\{"id":"([A-Za-z0-9_.:-]{1,256})","msg_type":"([a-z_]{1,24})",'
    rb'"from_peer":"([A-Za-z0-9_.:-]{0,256})","timestamp":(0|[1-9][0-9]{0,19}),"payload":'
).match


def _decode_read(line: bytes, readers: Mapping[str, PayloadReader]) -> Envelope | None:
    """The frame through the payload reader of its type; None: not that way."""
    m = _PLAIN_HEAD(line)
    if m is None:
        return None
    msg_type = m[2].decode("ascii")
    reader = readers.get(msg_type)
    ts = int(m[4])
    if reader is None or ts > MAX_TIMESTAMP or len(line.rstrip(b"\n")) > MAX_LINE_BYTES:
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    found = reader(text, m.end())  # the head is ASCII: bytes and characters agree
    if found is None:
        return None
    payload, end = found
    if not text.startswith("}", end) or text[end + 1 :].strip():
        return None
    return Envelope(
        m[1].decode("ascii"),
        msg_type,
        m[3].decode("ascii"),
        ts,
        payload,
        len(line),
        line.count(b"{") + line.count(b"[") + line.count(b","),
    )


def decode(line: bytes, readers: Mapping[str, PayloadReader] | None = None) -> Envelope:
    """
    Parse one frame (without or with its ``\\n``).  Raises
    :class:`ProtocolError` with a short reason on any defect.  ``readers``:
    payload readers by message type (:data:`PayloadReader`), tried first
    for a frame of their type in the plain shape.
    """
    if readers:
        env = _decode_read(line, readers)
        if env is not None:
            return env
    hb = empty_heartbeat(line)
    if hb is not None:
        return Envelope(hb[0], HEARTBEAT, hb[1], hb[2], {})
    if len(line.rstrip(b"\n")) > MAX_LINE_BYTES:
        raise ProtocolError("line too long")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8") from None
    text = text.strip()
    if not text:
        raise ProtocolError("empty line")
    try:
        obj = _DECODER.decode(text)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"invalid JSON: {e}") from None
    # serde_json refuses lone surrogate escapes ("\ud800"); Python keeps them
    # in a str that cannot be encoded to UTF-8 again.  Only frames that
    # contain such an escape pay for the walk.
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise ProtocolError("invalid JSON: lone surrogate in a string")
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    for name in ("id", "msg_type", "from_peer", "timestamp", "payload"):
        if name not in obj:
            raise ProtocolError(f"missing member {name!r}")
    msg_id, msg_type, from_peer, ts = obj["id"], obj["msg_type"], obj["from_peer"], obj["timestamp"]
    if not isinstance(msg_id, str):
        raise ProtocolError("'id' must be a string")
    if not isinstance(from_peer, str):
        raise ProtocolError("'from_peer' must be a string")
    if not isinstance(msg_type, str) or msg_type not in _MSG_TYPE_SET:
        raise ProtocolError(f"unknown msg_type {msg_type!r}")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_TIMESTAMP:
        raise ProtocolError("'timestamp' must be an integer 0..2^64-1")
    return Envelope(
        msg_id,
        msg_type,
        from_peer,
        ts,
        obj["payload"],
        len(line),
        line.count(b"{") + line.count(b"[") + line.count(b","),
    )


def now_ms(clock: Callable[[], float] = time.time) -> int:
    return int(clock() * 1000)


class MessageIds:
    """
    Makes message ids ``<prefix>_<epoch ms>_<n>``.

    claudectl starts ``n`` at 0 in every process, so two processes collide
    (defect W9).  Here ``n`` starts at a random 48-bit value, which keeps the
    claudectl shape while making ids unique in practice.
    """

    def __init__(self, clock: Callable[[], float] = time.time, start: int | None = None) -> None:
        self._clock = clock
        self._seq = int.from_bytes(os.urandom(6), "big") if start is None else start

    def next(self, prefix: str = "msg") -> str:
        n = self._seq
        self._seq += 1
        return f"{prefix}_{now_ms(self._clock)}_{n}"


class EnvelopeFactory:
    """Builds outgoing envelopes for one local identity."""

    def __init__(
        self, identity: str, clock: Callable[[], float] = time.time, ids: MessageIds | None = None
    ) -> None:
        self.identity = identity
        self.clock = clock
        self.ids = ids or MessageIds(clock)

    def make(self, msg_type: str, payload: Any, from_peer: str | None = None) -> Envelope:
        return Envelope(
            self.ids.next(),
            msg_type,
            self.identity if from_peer is None else from_peer,
            now_ms(self.clock),
            payload,
        )
