# -*- test-case-name: tests.test_crypto -*-
"""
Pair codes, the canonical PSK, nonces and HMAC proofs (docs/protocol.md,
Handshake; docs/pairing.md, The formats).

* A pair code is 8 random bytes as ``xxxx-xxxx-xxxx-xxxx`` (lowercase hex).
* The canonical PSK is ``P || SHA-256(P)[8:32]`` (32 bytes).
* A proof is ``hex(HMAC-SHA256(psk, nonce_string.encode("ascii")))``.

Pure functions; randomness is a parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

PSK_BYTES = 32
NONCE_BYTES = 32
PAIR_CODE_BYTES = 8

RandomBytes = Callable[[int], bytes]


class CodeError(ValueError):
    """A pair code or key that cannot be parsed."""


def canonical_psk(code_bytes: bytes) -> bytes:
    if len(code_bytes) != PAIR_CODE_BYTES:
        raise CodeError(f"pair code must be {PAIR_CODE_BYTES} bytes")
    return code_bytes + hashlib.sha256(code_bytes).digest()[PAIR_CODE_BYTES:]


def parse_pair_code(code: str) -> bytes:
    """
    The 8 bytes of a pair code.  As in claudectl, every character that is not
    an ASCII hex digit is dropped first, so dashes, spaces, colons and either
    case all work.
    """
    digits = "".join(c for c in code if c in "0123456789abcdefABCDEF")
    if len(digits) != 2 * PAIR_CODE_BYTES:
        raise CodeError(f"invalid PSK code: expected 16 hex chars, got {len(digits)}")
    return bytes.fromhex(digits)


def psk_from_code(code: str) -> bytes:
    return canonical_psk(parse_pair_code(code))


def format_pair_code(code_bytes: bytes) -> str:
    h = code_bytes[:PAIR_CODE_BYTES].hex()
    return "-".join(h[i : i + 4] for i in range(0, 16, 4))


def new_pair_code(random: RandomBytes = os.urandom) -> tuple[str, bytes]:
    """A fresh ``(pair code, canonical psk)``."""
    raw = random(PAIR_CODE_BYTES)
    return format_pair_code(raw), canonical_psk(raw)


def new_nonce(random: RandomBytes = os.urandom) -> str:
    """
    32 random bytes as 64 lowercase hex characters.  ``os.urandom`` raises
    rather than returning weak bytes; we never fall back (defect W16).
    """
    raw = random(NONCE_BYTES)
    if len(raw) != NONCE_BYTES:
        raise RuntimeError("random source returned too few bytes")
    return raw.hex()


def proof(psk: bytes, nonce: str) -> str:
    return hmac.new(psk, nonce.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_proof(psk: bytes, nonce: str, candidate: object) -> bool:
    """Constant-time check of a proof; uppercase hex is refused as by claudectl."""
    if not isinstance(candidate, str):
        return False
    expected = proof(psk, nonce)
    try:
        return hmac.compare_digest(expected.encode("ascii"), candidate.encode("ascii"))
    except UnicodeEncodeError:
        return False


def key_to_hex(psk: bytes) -> str:
    return psk.hex()


def key_from_hex(text: str) -> bytes | None:
    """A stored key (trimmed, any case) or ``None`` when it is not 32 bytes of hex."""
    text = text.strip()
    # bytes.fromhex would also skip spaces *inside* the text; claudectl's hex
    # decoder does not, and treats such a file as "not paired".
    if len(text) != 2 * PSK_BYTES or not all(c in "0123456789abcdefABCDEF" for c in text):
        return None
    return bytes.fromhex(text)
