# -*- test-case-name: tests.test_pairing_codes -*-
"""
The three invite formats of claudectl 0.64 (docs/pairing.md, The formats),
pure functions.

* **Invite link** ``cctl://<identity>@<ip>:<port>/k/<16 hex>``: the
  identity, the address and the pair code whose canonical PSK the inviter
  stored.  Built and parsed exactly as claudectl does, with its error
  messages, except that a non-ASCII key is refused instead of crashing
  (defect P13).
* **Relay code** ``XXX-XXX-XXX-XXX-XXX`` and **word phrase**
  ``nut-may-act-…`` (nine words): two spellings of one 9-byte payload --
  IPv4 address, a port byte, 4 secret bytes.  Decoding is as lenient as
  claudectl's (any separators, either case, pad bits ignored, extra
  characters or words ignored).  Encoding is stricter than claudectl's: an
  address the payload cannot carry (IPv6, a host name, a port outside
  9848-10102 other than 9847, or 9975, which would read back as 9847) raises
  :class:`NotCarriedError` instead of silently becoming another address
  (defect P3), so the caller can offer the invite link.

What the 4 secret bytes *mean* is not decided here: claudectl uses them as
the first bytes of a key (defect P1); this project uses them as a one-time
PAKE password (:mod:`claudectl.pairing.pake`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from claudectl.pairing.wordlist import INDEX, WORDS
from claudectl.relay.crypto import PAIR_CODE_BYTES, CodeError, canonical_psk, parse_pair_code

LINK_SCHEME = "cctl://"
KEY_MARKER = "/k/"

#: The payload: 4 address bytes, 1 port byte, 4 secret bytes.
PAYLOAD_BYTES = 9
SECRET_BYTES = 4
#: Port byte values: ``128`` means :data:`BASE_PORT`, any other ``b`` means
#: ``BASE_PORT + b``.
BASE_PORT = 9847
DEFAULT_PORT_BYTE = 128
#: Ports a code can carry: 9847 and 9848-10102 except 9975.
LOWEST_CODE_PORT = BASE_PORT
HIGHEST_CODE_PORT = BASE_PORT + 255

BASE32_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_BASE32_VALUE = {c: i for i, c in enumerate(BASE32_ALPHABET)}
RELAY_CODE_CHARS = 15
PHRASE_WORDS = PAYLOAD_BYTES


class InviteCodeError(ValueError):
    """Text that is not a valid invite; ``str()`` is the message for the user."""


class LinkError(InviteCodeError):
    """An invite link that cannot be parsed."""


class RelayCodeError(InviteCodeError):
    """A relay code that cannot be decoded."""


class WordPhraseError(InviteCodeError):
    """A word phrase that cannot be decoded."""


class NotCarriedError(InviteCodeError):
    """An address that a relay code or word phrase cannot carry (defect P3)."""


# --- socket addresses (Rust's SocketAddr syntax) ------------------------------------

_IPV4 = re.compile(
    r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\."
    r"(0|[1-9][0-9]{0,2})$"
)
_PORT = re.compile(r"^[0-9]+$")
_SCOPE = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class SocketAddress:
    """An IP literal and a port.  ``host`` carries no brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_socket_address(self.host, self.port)


def format_socket_address(host: str, port: int) -> str:
    """``a.b.c.d:port`` or ``[v6]:port``, as claudectl writes addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_ipv4(text: str) -> str | None:
    m = _IPV4.match(text)
    if m is None or not text.isascii():
        return None
    if any(int(g) > 255 for g in m.groups()):
        return None
    return text


def _parse_ipv6(text: str) -> str | None:
    if not text.isascii():
        return None
    addr, sep, scope = text.partition("%")
    if sep and (not _SCOPE.match(scope) or int(scope) > 0xFFFFFFFF):
        return None
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return None
    return text


def parse_socket_address(text: str) -> SocketAddress:
    """
    Parse ``a.b.c.d:port`` or ``[v6(%scope)]:port`` with the rules of Rust's
    ``SocketAddr`` (no host names, no leading zeros in IPv4 octets, a decimal
    port 0-65535 that may have leading zeros but no sign).
    """
    error = LinkError(f"invalid address '{text}': invalid socket address syntax")
    host_part, sep, port_part = text.rpartition(":")
    if not sep or not _PORT.match(port_part) or not port_part.isascii():
        raise error
    port = int(port_part)
    if port > 65535:
        raise error
    if host_part.startswith("[") and host_part.endswith("]"):
        host = _parse_ipv6(host_part[1:-1])
    else:
        host = _parse_ipv4(host_part)
    if host is None:
        raise error
    return SocketAddress(host, port)


def parse_ip(text: str) -> str:
    """An IPv4 or IPv6 literal (no brackets, no port), normalised; else ValueError."""
    if not text.isascii():
        raise ValueError(f"not an IP address: {text!r}")
    return str(ipaddress.ip_address(text.strip("[]")))


# --- invite link --------------------------------------------------------------------


@dataclass(frozen=True)
class InviteLink:
    identity: str
    address: SocketAddress
    psk: bytes


def build_link(identity: str, host: str, port: int, psk: bytes) -> str:
    """
    ``cctl://<identity>@<addr>/k/<pair code without dashes>``; ``psk`` is a
    canonical PSK (its first 8 bytes are the pair code).
    """
    if len(psk) < PAIR_CODE_BYTES:
        raise ValueError("the link key needs the 8 pair-code bytes")
    return (
        f"{LINK_SCHEME}{identity}@{format_socket_address(host, port)}"
        f"{KEY_MARKER}{psk[:PAIR_CODE_BYTES].hex()}"
    )


def parse_link(text: str) -> InviteLink:
    """Parse an invite link with claudectl 0.64's rules and messages."""
    if not text.startswith(LINK_SCHEME):
        raise LinkError("invite link must start with cctl://")
    rest = text[len(LINK_SCHEME) :]
    left, sep, key = rest.partition(KEY_MARKER)
    if not sep:
        raise LinkError("missing /k/ in invite link")
    identity, sep, addr = left.partition("@")
    if not sep:
        raise LinkError("missing @ in invite link")
    address = parse_socket_address(addr)
    key = key.strip()
    if not key.isascii():
        raise LinkError("invalid PSK code: the link key must be 16 ASCII hex digits")
    if len(key) != 2 * PAIR_CODE_BYTES:
        raise LinkError(f"invalid PSK code length: expected 16, got {len(key)}")
    try:
        psk = canonical_psk(parse_pair_code(key))
    except CodeError as e:
        raise LinkError(str(e)) from None
    return InviteLink(identity, address, psk)


# --- the 9-byte payload -------------------------------------------------------------


@dataclass(frozen=True)
class CodePayload:
    """What a relay code or word phrase carries."""

    ip: str
    port: int
    secret: bytes

    def __str__(self) -> str:
        return format_socket_address(self.ip, self.port)


def port_byte(port: int) -> int:
    """The port byte for ``port``; :class:`NotCarriedError` if none reads back as it."""
    if port == BASE_PORT:
        return DEFAULT_PORT_BYTE
    offset = port - BASE_PORT
    if 0 < offset <= 255 and offset != DEFAULT_PORT_BYTE:
        return offset
    if offset == DEFAULT_PORT_BYTE:
        raise NotCarriedError(
            f"port {port} cannot be carried by a relay code or word phrase "
            f"(it would read back as {BASE_PORT}); share the invite link instead"
        )
    raise NotCarriedError(
        f"port {port} cannot be carried by a relay code or word phrase (only "
        f"{LOWEST_CODE_PORT}-{HIGHEST_CODE_PORT} except {BASE_PORT + DEFAULT_PORT_BYTE}); "
        f"share the invite link instead"
    )


def port_from_byte(value: int) -> int:
    return BASE_PORT if value == DEFAULT_PORT_BYTE else BASE_PORT + value


def not_carried_reason(host: str, port: int) -> str | None:
    """Why a code cannot carry ``host:port``, or None when it can."""
    try:
        encode_payload(host, port, bytes(SECRET_BYTES))
    except NotCarriedError as e:
        return str(e)
    return None


def encode_payload(host: str, port: int, secret: bytes) -> bytes:
    """The 9 payload bytes; refuses what claudectl would silently change."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"the code secret must be {SECRET_BYTES} bytes")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise NotCarriedError(
            f"a relay code or word phrase carries an IPv4 address, not {host!r}; "
            f"share the invite link instead"
        ) from None
    if ip.version != 4:
        raise NotCarriedError(
            f"a relay code or word phrase cannot carry the IPv6 address {host}; "
            f"share the invite link instead"
        )
    return ip.packed + bytes([port_byte(port)]) + secret


def decode_payload(data: bytes) -> CodePayload:
    """Address, port and secret from (at least) 9 payload bytes; extra bytes ignored."""
    if len(data) < PAYLOAD_BYTES:
        raise InviteCodeError(f"payload too short: {len(data)} bytes")
    ip = str(ipaddress.IPv4Address(bytes(data[:4])))
    return CodePayload(ip, port_from_byte(data[4]), bytes(data[5:9]))


# --- relay code ---------------------------------------------------------------------


def base32_encode(data: bytes) -> str:
    """RFC 4648 base32 without padding (claudectl's encoder)."""
    out = []
    bits = 0
    nbits = 0
    for byte in data:
        bits = (bits << 8) | byte
        nbits += 8
        while nbits >= 5:
            nbits -= 5
            out.append(BASE32_ALPHABET[(bits >> nbits) & 31])
    if nbits:
        out.append(BASE32_ALPHABET[(bits << (5 - nbits)) & 31])
    return "".join(out)


def group3(text: str) -> str:
    """``ABCDEFGH`` -> ``ABC-DEF-GH``."""
    return "-".join(text[i : i + 3] for i in range(0, len(text), 3))


def encode_relay_code(payload: bytes) -> str:
    """``XXX-XXX-XXX-XXX-XXX`` for a 9-byte payload."""
    if len(payload) != PAYLOAD_BYTES:
        raise ValueError(f"payload must be {PAYLOAD_BYTES} bytes")
    return group3(base32_encode(payload))


def relay_code_bytes(text: str) -> bytes:
    """
    The bytes of a relay code, decoded like claudectl: everything but ASCII
    letters and digits is dropped, either case, leftover bits ignored.
    """
    out = bytearray()
    bits = 0
    nbits = 0
    for c in text:
        if not (c.isascii() and c.isalnum()):
            continue
        value = _BASE32_VALUE.get(c.upper())
        if value is None:
            raise RelayCodeError(f"invalid base32 character: '{c}'")
        bits = ((bits << 5) | value) & 0xFFFF
        nbits += 5
        if nbits >= 8:
            nbits -= 8
            out.append((bits >> nbits) & 0xFF)
    return bytes(out)


def decode_relay_code(text: str) -> CodePayload:
    data = relay_code_bytes(text)
    if len(data) < PAYLOAD_BYTES:
        raise RelayCodeError(f"relay code too short: {len(data)} bytes")
    return decode_payload(data)


# --- word phrase --------------------------------------------------------------------


def encode_word_phrase(payload: bytes) -> str:
    if len(payload) != PAYLOAD_BYTES:
        raise ValueError(f"payload must be {PAYLOAD_BYTES} bytes")
    return "-".join(WORDS[b] for b in payload)


def decode_word_phrase(text: str) -> CodePayload:
    """claudectl's rules: split on ``-`` only, first nine pieces, any case."""
    pieces = text.split("-")
    if len(pieces) < PHRASE_WORDS:
        raise WordPhraseError(f"word phrase too short: {len(pieces)} words, need {PHRASE_WORDS}")
    data = bytearray()
    for piece in pieces[:PHRASE_WORDS]:
        index = INDEX.get(piece.lower())
        if index is None:
            raise WordPhraseError(f"unknown word: '{piece}'")
        data.append(index)
    return decode_payload(bytes(data))


# --- conveniences -------------------------------------------------------------------


def relay_code(host: str, port: int, secret: bytes) -> str:
    return encode_relay_code(encode_payload(host, port, secret))


def word_phrase(host: str, port: int, secret: bytes) -> str:
    return encode_word_phrase(encode_payload(host, port, secret))
