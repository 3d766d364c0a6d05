# -*- test-case-name: tests.test_pairing_detect -*-
"""
What did the user type after ``claudectl relay join``?

:func:`detect_join_format` tells the four accepted forms apart without
guessing (claudectl 0.64's detection misroutes all-letter relay codes,
phrases typed with spaces and ``CCTL://``: defect P6):

1. **link**: starts with ``cctl://`` in any case;
2. **pair code**: exactly 16 hex digits once separators are removed
   (``a3f2-9b1c-d4e5-f678``, ``A3F2:9B1C:…``, ``a3f29b1cd4e5f678``);
3. **word phrase**: two or more all-letter words separated by dashes, spaces
   or both, that are (nearly all) words of the list -- a relay code has five
   groups and we never issue one whose groups are all list words;
4. **relay code**: 15 or more base32-looking letters and digits, with any
   separators or none, in either case (so an all-letter code is still a code).

Anything else gets one error naming the four forms with an example of each.
:func:`decode_join` then turns the text into a :class:`JoinTarget`: where to
connect and with what secret.  A pair code carries no address, so it must be
followed by the inviter's ``host:port``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from claudectl.pairing import codes
from claudectl.pairing.codes import InviteCodeError, format_socket_address
from claudectl.pairing.wordlist import INDEX
from claudectl.relay.crypto import CodeError, psk_from_code
from claudectl.relay.keystore import is_remote_peer_id

LINK = "link"
RELAY_CODE = "relay_code"
WORD_PHRASE = "word_phrase"
PAIR_CODE = "pair_code"
FORMATS = (LINK, RELAY_CODE, WORD_PHRASE, PAIR_CODE)

#: Real, self-consistent examples (defect P12: claudectl's docs show invalid ones).
EXAMPLE_LINK = "cctl://laptop-a3f29b1c@192.168.1.50:9847/k/a3f29b1cd4e5f678"
EXAMPLE_RELAY_CODE = "YCU-ACM-UAU-PZJ-WHA"
EXAMPLE_WORD_PHRASE = "nut-may-act-dub-jag-mad-ray-let-cap"
EXAMPLE_PAIR_CODE = "a3f2-9b1c-d4e5-f678 192.168.1.50:9847"

ACCEPTED_FORMS = (
    "expected one of:\n"
    f"  an invite link   {EXAMPLE_LINK}\n"
    f"  a relay code     {EXAMPLE_RELAY_CODE}\n"
    f"  a word phrase    {EXAMPLE_WORD_PHRASE}\n"
    f"  a pair code      {EXAMPLE_PAIR_CODE}  (followed by the inviter's address)"
)

_SEPARATORS = re.compile(r"[\s\-_:,.]+")
_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")
_HOSTNAME_ADDR = re.compile(r"^(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+):[0-9]{1,5}$")
MIN_RELAY_CODE_CHARS = codes.RELAY_CODE_CHARS
MAX_RELAY_CODE_CHARS = 24


class JoinFormatError(InviteCodeError):
    """Text that is none of the accepted forms."""


def _tokens(text: str) -> list[str]:
    return [t for t in _SEPARATORS.split(text) if t]


def _looks_like_phrase(tokens: list[str]) -> bool:
    if len(tokens) < 2 or not all(t.isascii() and t.isalpha() for t in tokens):
        return False
    known = sum(1 for t in tokens if t.lower() in INDEX)
    if known == len(tokens):
        return True
    return len(tokens) >= 6 and 2 * known >= len(tokens)


def relay_code_is_ambiguous(code: str) -> bool:
    """True if a relay code would be read as a word phrase (all groups are words)."""
    return _looks_like_phrase(_tokens(code))


def detect_join_format(text: str) -> str:
    """One of :data:`FORMATS`, or :class:`JoinFormatError` naming all four."""
    stripped = text.strip()
    if stripped.lower().startswith(codes.LINK_SCHEME):
        return LINK
    tokens = _tokens(stripped)
    compact = "".join(tokens)
    if _HEX16.match(compact):
        return PAIR_CODE
    if _looks_like_phrase(tokens):
        return WORD_PHRASE
    if (
        compact.isascii()
        and compact.isalnum()
        and MIN_RELAY_CODE_CHARS <= len(compact) <= MAX_RELAY_CODE_CHARS
    ):
        return RELAY_CODE
    if not stripped:
        raise JoinFormatError(f"no invite given; {ACCEPTED_FORMS}")
    raise JoinFormatError(f"not a valid invite; {ACCEPTED_FORMS}")


@dataclass(frozen=True)
class JoinTarget:
    """Everything ``relay join`` needs to reach and authenticate an inviter."""

    kind: str
    host: str
    port: int
    #: The identity the link names; the joiner must refuse any other (P7).
    expected_identity: str | None = None
    #: The canonical PSK for a link or pair code.
    psk: bytes | None = None
    #: The 4-byte one-time PAKE password of a relay code or word phrase.
    pake_password: bytes | None = None

    @property
    def address(self) -> str:
        return format_socket_address(self.host, self.port)

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return (
            f"JoinTarget(kind={self.kind!r}, address={self.address!r}, "
            f"expected_identity={self.expected_identity!r})"
        )


def _split_address(text: str) -> tuple[str, str | None]:
    """Peel a trailing ``host:port`` word off ``text`` (pair code + address)."""
    words = text.split()
    if len(words) < 2:
        return text, None
    last = words[-1]
    try:
        codes.parse_socket_address(last)
    except InviteCodeError:
        if not _HOSTNAME_ADDR.match(last):
            return text, None
    return " ".join(words[:-1]), last


def _parse_host_port(text: str) -> tuple[str, int]:
    try:
        addr = codes.parse_socket_address(text)
        return addr.host, addr.port
    except InviteCodeError:
        host, _, port = text.rpartition(":")
        value = int(port)
        if not 0 < value <= 65535:
            raise JoinFormatError(f"invalid port in address '{text}'") from None
        return host, value


def decode_join(text: str) -> JoinTarget:
    """Detect the format of ``text`` and decode it; InviteCodeError says what is wrong."""
    body, address = _split_address(text.strip())
    kind = detect_join_format(body)
    if address is not None and kind != PAIR_CODE:
        raise JoinFormatError(
            f"only a pair code is followed by an address; a {kind.replace('_', ' ')} "
            f"carries its own (remove '{address}')"
        )
    if kind == LINK:
        link_text = body.strip()
        link = codes.parse_link(codes.LINK_SCHEME + link_text[len(codes.LINK_SCHEME) :])
        identity = link.identity or None
        if identity is not None and not is_remote_peer_id(identity):
            raise InviteCodeError(f"the invite link names an invalid identity '{identity}'")
        return JoinTarget(
            LINK, link.address.host, link.address.port, expected_identity=identity, psk=link.psk
        )
    if kind == PAIR_CODE:
        if address is None:
            raise JoinFormatError(
                "a pair code carries no address: add the inviter's host:port, e.g. "
                f"claudectl relay join {EXAMPLE_PAIR_CODE}"
            )
        host, port = _parse_host_port(address)
        try:
            psk = psk_from_code(body)
        except CodeError as e:
            raise InviteCodeError(str(e)) from None
        return JoinTarget(PAIR_CODE, host, port, psk=psk)
    if kind == WORD_PHRASE:
        payload = codes.decode_word_phrase("-".join(_tokens(body)))
    else:
        payload = codes.decode_relay_code(body)
    return JoinTarget(kind, payload.ip, payload.port, pake_password=payload.secret)
