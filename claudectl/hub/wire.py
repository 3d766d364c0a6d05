# -*- test-case-name: tests.test_hub -*-
"""
The hub's control lines (docs/hub.md, "Channel protocol"): one compact JSON
object per ``\\n``-terminated line, at most :data:`MAX_LINE_BYTES`.  Pure
functions, no I/O: the hub server and the peer side both use them.
"""

from __future__ import annotations

import json
from typing import Any

from claudectl.relay.keystore import is_remote_peer_id

#: The hub speaks first on every connection; a relay listener's first line
#: is a challenge envelope (``{"id":...``), so one prefix tells them apart.
GREETING: dict[str, Any] = {"hub": "claudectl-hub", "version": 1}
GREETING_PREFIX = b'{"hub":'
MAX_LINE_BYTES = 1024
MAX_TOKEN_CHARS = 256
CHANNEL_ID_BYTES = 16
DEFAULT_HUB_PORT = 9849

# Client → hub.
REGISTER = "register"
OPEN = "open"
ACCEPT = "accept"
STATUS = "status"
PING = "ping"
# Hub → client.
REGISTERED = "registered"
INCOMING = "incoming"
SPLICED = "spliced"
ERROR = "error"
PONG = "pong"

#: Refusal reasons a client may see (``{"op":"error","reason":...}``).
NOT_REGISTERED = "not_registered"
BAD_TOKEN = "bad_token"
REPLACED = "replaced"
TOO_MANY = "too_many"
TIMEOUT = "timeout"
MALFORMED = "malformed"
NO_SUCH_CHANNEL = "no_such_channel"


class HubProtocolError(Exception):
    """A control line that breaks the rules; ``str()`` says which (no secrets)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def greeting() -> bytes:
    return encode(GREETING)


def error(reason: str, message: str) -> bytes:
    return encode({"op": ERROR, "reason": reason, "message": message})


def is_greeting(line: bytes) -> bool:
    try:
        data = json.loads(line)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("hub") == GREETING["hub"]


def is_channel_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 2 * CHANNEL_ID_BYTES
        and all(c in "0123456789abcdef" for c in value)
    )


def _is_ip(value: object) -> bool:
    import ipaddress

    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def _token(data: dict[str, Any]) -> str:
    token = data.get("token", "")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise HubProtocolError("token must be a string of at most 256 characters")
    return token


def decode(line: bytes) -> dict[str, Any]:
    """
    One control line to a checked dict: ``op`` is known and its fields have
    the right shapes (``identity``/``to`` well-formed peer ids, ``channel``
    32 hex digits, ``token`` a short string).  Anything else raises
    :class:`HubProtocolError`.
    """
    if len(line) > MAX_LINE_BYTES:
        raise HubProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        data = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HubProtocolError("not a JSON line") from None
    if not isinstance(data, dict):
        raise HubProtocolError("not a JSON object")
    op = data.get("op")
    if op == REGISTER:
        if not is_remote_peer_id(data.get("identity")):
            raise HubProtocolError("register: identity is not a well-formed peer id")
        _token(data)
    elif op == OPEN:
        if not is_remote_peer_id(data.get("to")):
            raise HubProtocolError("open: 'to' is not a well-formed peer id")
        _token(data)
    elif op in (ACCEPT, INCOMING, SPLICED):
        if not is_channel_id(data.get("channel")):
            raise HubProtocolError(f"{op}: channel is not {2 * CHANNEL_ID_BYTES} hex digits")
        if op == SPLICED and "peer" in data and not _is_ip(data["peer"]):
            raise HubProtocolError("spliced: peer is not an IP address")
    elif op == STATUS:
        _token(data)
    elif op in (PING, PONG, REGISTERED):
        pass
    elif op == ERROR:
        if not isinstance(data.get("reason"), str):
            raise HubProtocolError("error: reason missing")
    elif "hub" in data:
        pass  # the greeting
    else:
        raise HubProtocolError("unknown op")
    return data  # type: ignore[no-any-return]
