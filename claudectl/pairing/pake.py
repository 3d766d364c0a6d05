# -*- test-case-name: tests.test_pairing_pake -*-
"""
SPAKE2 over the 4-byte password of a relay code or word phrase, sans I/O.

A relay code carries only 32 secret bits -- far too few for a key (claudectl
uses them as one and they never even match: defects P1, P2).  Here they are
a one-time password for SPAKE2 (the ``spake2`` package, as magic-wormhole
uses it), so:

* an eavesdropper learns nothing it could test offline;
* the joiner's first message names its invite (an 8-bit selector derived
  from the password, :func:`~claudectl.pairing.invites.invite_selector`),
  so the listener runs SPAKE2 against that one invite only: a wrong code
  burns at most the invite it names, and nothing when it names none (the
  listener then answers with a decoy message, so a prober cannot tell
  whether a selector is in use);
* an active attacker gets **one** online guess per attempt, against the one
  invite its selector names;
* a joiner answers exactly one listener message, so an impostor posing as
  the inviter tests one guessed password offline, among the 2^24 that
  match the selector it was sent;
* both sides end with a fresh 32-byte PSK derived from the SPAKE2 key with
  HKDF-SHA256 and its own label; the short code never becomes the key.

Flow (the lead's handshake carries the bytes, :mod:`claudectl.relay.handshake`)::

    joiner (side A)                         listener (side B)
    PakeInitiator(password).start()  --->   PakeResponder.respond(id, msg)
      msg = 0x02 ‖ selector ‖ SPAKE2          (selects at most one invite)
                                     <---   response.messages  (exactly one: real or decoy)
    .confirmations(messages)         --->   response.finish(confirms)
                                            -> new PSK (invite marked used) or None (that
                                               invite burned; a decoy burns nothing)
    .candidate_psks()  -- the PSK the listener's proof must verify with

The listener sends no confirmation of its own before the joiner's, so a
joiner cannot test guesses against the listener's messages offline; the
listener proves the new key afterwards in the mutual handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from spake2 import SPAKE2_A, SPAKE2_B
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from claudectl.pairing.invites import CLOSED_ANSWER_SECS, InviteStore, invite_selector
from claudectl.relay.crypto import RandomBytes

log = Logger()

_LABEL = b"claudectl-pake-v1"
ID_JOINER = _LABEL + b":joiner"
ID_LISTENER = _LABEL + b":listener"
_CONFIRM_LABEL = _LABEL + b":joiner-confirm"
_LISTENER_CONFIRM_LABEL = _LABEL + b":listener-confirm"
_PSK_LABEL = _LABEL + b":long-term-psk"

PSK_BYTES = 32
MAX_MESSAGE_BYTES = 1024
#: The first byte of a joiner message that names its invite:
#: ``0x02 ‖ selector (1 byte) ‖ SPAKE2 message``.  A bare SPAKE2 message
#: (first byte ``A``, from joiners before issue 11) is refused as "outdated".
JOINER_MSG_V2 = 0x02


class PakeError(Exception):
    """The PAKE exchange cannot go on; ``str()`` says why (never a secret)."""


def _password(code_password: bytes) -> bytes:
    return _LABEL + b":password:" + code_password


def _transcript(joiner_msg: bytes, listener_msg: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (joiner_msg, listener_msg):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _hkdf(key: bytes, salt: bytes, info: bytes, length: int = PSK_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def joiner_confirmation(spake_key: bytes, joiner_msg: bytes, listener_msg: bytes) -> bytes:
    """The joiner's proof that it derived ``spake_key`` (HMAC over the transcript)."""
    return hmac.new(
        spake_key, _CONFIRM_LABEL + _transcript(joiner_msg, listener_msg), hashlib.sha256
    ).digest()


def listener_confirmation(spake_key: bytes, joiner_msg: bytes, listener_msg: bytes) -> bytes:
    """An optional listener proof; the mutual handshake's ``sproof`` already covers it."""
    return hmac.new(
        spake_key, _LISTENER_CONFIRM_LABEL + _transcript(joiner_msg, listener_msg), hashlib.sha256
    ).digest()


def derive_psk(spake_key: bytes, joiner_msg: bytes, listener_msg: bytes) -> bytes:
    """The long-term 32-byte PSK both sides store after a successful PAKE."""
    return _hkdf(spake_key, _transcript(joiner_msg, listener_msg), _PSK_LABEL)


# --- joiner ---------------------------------------------------------------------------


class PakeInitiator:
    """The joiner's side (SPAKE2 side A), for one relay code or word phrase."""

    def __init__(self, password: bytes, entropy: RandomBytes = os.urandom) -> None:
        if len(password) != 4:
            raise ValueError("a code password is 4 bytes")
        self._password = password
        self._entropy = entropy
        self._state: bytes | None = None
        self._msg: bytes | None = None
        self._psks: list[bytes] = []

    def start(self) -> bytes:
        """Our SPAKE2 message (call once)."""
        if self._msg is not None:
            raise PakeError("start() may be called only once")
        side = SPAKE2_A(
            _password(self._password), idA=ID_JOINER, idB=ID_LISTENER, entropy_f=self._entropy
        )
        # The whole message, selector included, is the transcript.
        self._msg = bytes([JOINER_MSG_V2, invite_selector(self._password)]) + side.start()
        self._state = side.serialize()
        return self._msg

    def confirmations(self, listener_messages: list[bytes]) -> list[bytes]:
        """
        The confirmation of the one listener message.  An inviter of this
        version answers exactly one; more would let an impostor test several
        guessed passwords offline, so they are refused.  A message that
        cannot be used gets a random confirmation that matches nothing.
        """
        if self._state is None or self._msg is None:
            raise PakeError("start() first")
        if self._psks:
            raise PakeError("confirmations() may be called only once")
        if len(listener_messages) != 1:
            raise PakeError(
                f"the listener sent {len(listener_messages)} PAKE messages instead "
                f"of one (an older claudectl relay, or not the inviter)"
            )
        confirms: list[bytes] = []
        psks: list[bytes] = []
        usable = 0
        for listener_msg in listener_messages:
            key = None
            if isinstance(listener_msg, bytes) and 0 < len(listener_msg) <= MAX_MESSAGE_BYTES:
                side = SPAKE2_A.from_serialized(self._state)
                try:
                    key = side.finish(listener_msg)
                except Exception:  # hostile bytes: spake2 raises several types
                    key = None
            if key is None:
                confirms.append(self._entropy(32))
                psks.append(self._entropy(PSK_BYTES))
                continue
            usable += 1
            confirms.append(joiner_confirmation(key, self._msg, listener_msg))
            psks.append(derive_psk(key, self._msg, listener_msg))
        if not usable:
            raise PakeError("the listener sent no usable PAKE message")
        self._psks = psks
        return confirms

    def candidate_psks(self) -> list[bytes]:
        """The PSK each listener message would give, in the same order."""
        return list(self._psks)


# --- listener -------------------------------------------------------------------------


@dataclass
class _Candidate:
    invite_id: str
    #: "open", or the state of a closed invite ("used", "expired", ...).
    state: str
    message: bytes
    confirm: bytes
    psk: bytes


@dataclass
class PakeResponse:
    """The listener's answer to one joiner; :meth:`finish` settles it."""

    messages: list[bytes]
    _store: InviteStore
    _clock: IReactorTime
    _joiner_id: str
    _candidates: list[_Candidate] = field(repr=False)
    #: After :meth:`finish`: None on success, else "wrong_code", "used", "expired",
    #: "burned", "revoked" (see :func:`claudectl.pairing.invites.describe_failure`).
    failure: str | None = None
    #: After a successful :meth:`finish`: the invite that was used.
    invite_id: str | None = None
    _finished: bool = False
    #: Set for a decoy answer: why :meth:`finish` will refuse ("wrong_code":
    #: the selector named no invite; "outdated": a joiner without selector).
    _refusal: str | None = None

    def finish(self, confirms: list[bytes]) -> bytes | None:
        """
        Check the joiner's confirmations.  A match with an open invite marks
        it used and returns the new PSK.  No match burns the invite that was
        tried, if it was open (a decoy answer burns nothing).  A match with an already-closed invite changes
        nothing and sets :attr:`failure` to its state.
        """
        if self._finished:
            self.failure = self.failure or "wrong_code"
            return None
        self._finished = True
        now = self._clock.seconds()
        if self._refusal is not None:
            # Nothing was tried, so nothing is burned.
            self.failure = self._refusal
            log.info(
                "pairing attempt by {peer_id} refused ({reason}); no invite tried",
                peer_id=self._joiner_id,
                reason=self._refusal,
            )
            return None
        match: _Candidate | None = None
        for i, cand in enumerate(self._candidates):
            given = confirms[i] if i < len(confirms) else b""
            if isinstance(given, bytes) and hmac.compare_digest(given, cand.confirm):
                match = cand
        if match is None:
            self._store.burn([c.invite_id for c in self._candidates if c.state == "open"], now)
            self.failure = "wrong_code"
            log.warn(
                "pairing attempt by {peer_id} with a wrong short code", peer_id=self._joiner_id
            )
            return None
        if match.state != "open":
            self.failure = match.state
            return None
        if not self._store.mark_used(match.invite_id, self._joiner_id, now):
            self.failure = self._store.state_of(match.invite_id, now) or "wrong_code"
            return None
        self.invite_id = match.invite_id
        log.info(
            "{peer_id} paired through invite {invite_id} (short code)",
            peer_id=self._joiner_id,
            invite_id=match.invite_id,
        )
        return match.psk


class PakeResponder:
    """The listener's side (SPAKE2 side B), over the open invites of a store."""

    def __init__(
        self, store: InviteStore, clock: IReactorTime, entropy: RandomBytes = os.urandom
    ) -> None:
        self._store = store
        self._clock = clock
        self._entropy = entropy

    def respond(self, joiner_id: str, joiner_msg: bytes) -> PakeResponse | None:
        """
        Run SPAKE2 side B against the one invite the joiner's selector names
        (open, else recently closed).  When it names none, answer with a
        decoy that :meth:`PakeResponse.finish` refuses as ``wrong_code``
        without burning anything.  None when there is nothing to run against
        at all, or when the joiner's message is unusable.
        """
        if not (0 < len(joiner_msg) <= MAX_MESSAGE_BYTES):
            return None
        now = self._clock.seconds()
        # Every open invite is looked at (a selector comparison each); SPAKE2
        # runs for the one named only.
        invites = [(inv, "open") for inv in self._store.open_code_invites(now)]
        # Recently closed invites too (even with none open), so that a late
        # joiner learns its invite was used, expired, revoked or burned.
        # ... but only for a while: an old invite must not keep the door open
        # to unauthenticated callers.
        invites += [
            (inv, inv.state_at(now))
            for inv in self._store.closed_code_invites(now)
            if now - (inv.closed_at or inv.expires_at) <= CLOSED_ANSWER_SECS
        ]
        if not invites:
            return None
        if joiner_msg[0] != JOINER_MSG_V2 or len(joiner_msg) < 3:
            if joiner_msg[:1] == b"A":
                # A joiner from before invite selectors: it would have every
                # open invite tried.  Refused without trying any.
                return self._decoy(joiner_id, joiner_msg, "outdated")
            log.info("unusable PAKE message from {peer_id}", peer_id=joiner_id)
            return None
        selector = joiner_msg[1]
        # Open invites come first (newest first), so the newest open invite
        # with this selector wins; create() keeps selectors unique anyway.
        named = next(((inv, state) for inv, state in invites if inv.selector == selector), None)
        if named is None:
            return self._decoy(joiner_id, joiner_msg, "wrong_code")
        inv, state = named
        side = SPAKE2_B(
            _password(inv.code_password), idA=ID_JOINER, idB=ID_LISTENER, entropy_f=self._entropy
        )
        listener_msg = side.start()
        try:
            key = side.finish(joiner_msg[2:])
        except Exception:  # hostile bytes: spake2 raises several types
            log.info("unusable PAKE message from {peer_id}", peer_id=joiner_id)
            return None
        candidates = [
            _Candidate(
                inv.id,
                state,
                listener_msg,
                joiner_confirmation(key, joiner_msg, listener_msg),
                derive_psk(key, joiner_msg, listener_msg),
            )
        ]
        return PakeResponse([listener_msg], self._store, self._clock, joiner_id, candidates)

    def _decoy(self, joiner_id: str, joiner_msg: bytes, refusal: str) -> PakeResponse | None:
        """
        A listener message under a random password: it looks like a real one,
        costs the same work, and an unusable joiner message is refused the
        same way as for a real invite -- nothing tells a prober whether its
        selector named an invite.
        """
        side = SPAKE2_B(
            _password(self._entropy(4)), idA=ID_JOINER, idB=ID_LISTENER, entropy_f=self._entropy
        )
        message = side.start()
        try:
            key = side.finish(joiner_msg[2:] if refusal == "wrong_code" else joiner_msg)
            joiner_confirmation(key, joiner_msg, message)
            derive_psk(key, joiner_msg, message)
        except Exception:  # hostile bytes: spake2 raises several types
            if refusal == "wrong_code":
                log.info("unusable PAKE message from {peer_id}", peer_id=joiner_id)
                return None
        return PakeResponse([message], self._store, self._clock, joiner_id, [], _refusal=refusal)
