# -*- test-case-name: tests.test_handshake -*-
"""
The challenge / handshake / handshake_ack exchange (docs/protocol.md,
Handshake), sans I/O.

claudectl 0.64 authenticates one way only: the connector proves it holds the
PSK by answering the listener's nonce with ``hex(HMAC-SHA256(psk, nonce))``
(defect W1).  Peers of this project add, in payload fields claudectl
ignores, the reverse proof:

* the listener's ``challenge`` advertises ``"caps": ["mutual-v1", "pake-v1"]``;
* the connector's ``handshake`` carries ``"cnonce"``: 64 hex characters of
  its own;
* the listener's ``handshake_ack`` ``ok`` then carries ``"sproof"`` =
  ``hex(HMAC-SHA256(psk, "claudectl-listener-proof|" + cnonce + "|" + nonce))``.

A connector that sent a ``cnonce`` and gets an ``ok`` without a valid
``sproof`` is talking to a claudectl 0.64 listener (one-way mode) -- unless
that peer has spoken the mutual mode before, in which case the answer is a
downgrade and is refused.  The listener likewise refuses a one-way handshake
from a peer it has seen in mutual mode.  ``caps`` leaves room for transport
encryption later (a new cap, chosen when both sides list it).

Short invite codes (relay code, word phrase) carry a one-time password for a
PAKE instead of a key: the connector's first ``handshake`` then holds
``"pake": {"msg": hex}``, the listener answers ``handshake_ack`` with status
``"pake"`` and one SPAKE2 message per open code invite, and the connector's
second ``handshake`` holds ``"pake": {"confirm": [hex, …]}``.  On success
both sides hold a fresh 32-byte PSK and the ack ``ok`` carries ``sproof``
under it.  See :mod:`claudectl.pairing.pake`.

Both machines are plain objects: they take envelopes and return the
envelopes to send plus an outcome.  Nonces come from an injected random
source; proofs are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from claudectl import COMPAT_VERSION
from claudectl.relay import codec
from claudectl.relay.binding import (
    CAP_TLS,
    CONNECTOR_ROLE,
    LISTENER_ROLE,
    PLAINTEXT,
    TLS13,
    channel_proof,
)
from claudectl.relay.codec import Envelope, EnvelopeFactory
from claudectl.relay.crypto import RandomBytes, new_nonce, proof, verify_proof
from claudectl.relay.keystore import is_remote_peer_id

CAP_MUTUAL = "mutual-v1"
CAP_PAKE = "pake-v1"
OUR_CAPS = (CAP_MUTUAL, CAP_PAKE)

#: The most SPAKE2 messages a joiner answers (the listener sends one per
#: candidate invite: at most 16 open + 8 recently closed ones).
MAX_PAKE_CANDIDATES = 24

MUTUAL = "mutual"
ONEWAY = "oneway"

_LISTENER_LABEL = "claudectl-listener-proof|"


def listener_proof(psk: bytes, cnonce: str, nonce: str) -> str:
    msg = f"{_LISTENER_LABEL}{cnonce}|{nonce}".encode()
    return hmac.new(psk, msg, hashlib.sha256).hexdigest()


def _is_nonce(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


class HandshakeFailed(Exception):
    """The handshake did not authenticate; ``str()`` says why (no secrets)."""


@dataclass(frozen=True)
class Authenticated:
    peer_id: str
    psk: bytes
    mode: str  # MUTUAL or ONEWAY
    #: How the key was found: "stored", "pending", "invite:<id>", "pake".
    via: str = "stored"
    #: ``"tls1.3"`` or ``"plaintext"``.
    transport: str = PLAINTEXT


@dataclass
class Step:
    """What a handshake machine wants done after an input."""

    send: list[Envelope] = field(default_factory=list)
    done: Authenticated | None = None
    failed: str | None = None
    #: Start TLS on this connection once ``send`` is written (listener: as
    #: the TLS server; connector: as the client), then call
    #: ``tls_established`` with the exporter value.
    start_tls: bool = False
    #: The failure is a reflection attempt (logged as such).
    reflected: bool = False

    @property
    def finished(self) -> bool:
        return self.done is not None or self.failed is not None


# --- listener ----------------------------------------------------------------------


class KeyLookup(Protocol):
    """What the listener needs to know about keys (see ``node.ListenerKeys``)."""

    def stored_key(self, peer_id: str) -> bytes | None: ...

    def pending_candidates(self) -> Sequence[tuple[str, bytes]]:
        """``(label, psk)`` of unclaimed keys: ``_pending.key``, open invites."""

    def claim(self, peer_id: str, label: str, psk: bytes) -> bool:
        """Store ``psk`` as ``peer_id``'s key and consume the pending slot."""

    def store_new_key(self, peer_id: str, psk: bytes) -> bool:
        """Store a key that a PAKE produced."""

    def is_mutual(self, peer_id: str) -> bool: ...

    def is_tls(self, peer_id: str) -> bool:
        """This peer has authenticated over TLS before (plaintext is a downgrade)."""

    def closed_candidates(self) -> Sequence[tuple[str, bytes]]:
        """``(state, psk)`` of closed invite links: to tell a joiner why."""


def _never(_value: str) -> bool:
    return False


@dataclass(frozen=True)
class Policy:
    """What this node offers and insists on (``[relay]`` config, node state)."""

    #: Offer / ask for TLS (peers of this project).
    tls: bool = False
    #: ``[relay] require_encryption``: refuse every plaintext link.
    require_encryption: bool = False
    #: ``is_own_nonce(nonce)``: we issued this nonce (or cnonce) recently.
    is_own_nonce: Callable[[str], bool] = _never


class PakeResponse(Protocol):
    messages: list[bytes]

    def finish(self, confirms: list[bytes]) -> bytes | None: ...


class PakeResponderLike(Protocol):
    def respond(self, joiner_id: str, joiner_msg: bytes) -> PakeResponse | None: ...


class ListenerState(Enum):
    AWAIT_HANDSHAKE = "await_handshake"
    AWAIT_TLS = "await_tls"
    AWAIT_PAKE_CONFIRM = "await_pake_confirm"
    DONE = "done"


class ListenerHandshake:
    """
    The accepting side: challenge, verify, ack.

    With TLS (both sides of this project) the exchange is::

        challenge {nonce, caps:[…, tls-v1], identity}    (plaintext)
        handshake {starttls: "tls-v1", caps, version}    (plaintext; no answer:
                                                          the ClientHello follows)
        ---- TLS 1.3 handshake; everything after it is encrypted ----
        handshake {proof, cnonce, caps, version}          proof = channel_proof(connector)
        handshake_ack {status: "ok", sproof, caps}        sproof = channel_proof(listener)
    """

    def __init__(
        self,
        envelopes: EnvelopeFactory,
        keys: KeyLookup,
        random: RandomBytes = os.urandom,
        pake: PakeResponderLike | None = None,
        policy: Policy = Policy(),
    ) -> None:
        self._env = envelopes
        self._keys = keys
        self._random = random
        self._pake = pake
        self._policy = policy
        self.state = ListenerState.AWAIT_HANDSHAKE
        self.nonce = new_nonce(random)
        self._pake_response: PakeResponse | None = None
        self._pake_peer: str | None = None
        #: The id the connector claimed (for logs and rate limiting), if any.
        self.claimed_id: str | None = None
        #: The TLS exporter value once TLS is up (None: plaintext).
        self.exporter: bytes | None = None

    def _caps(self) -> list[str]:
        return list(OUR_CAPS) + ([CAP_TLS] if self._policy.tls else [])

    def start(self) -> list[Envelope]:
        payload: dict[str, Any] = {"nonce": self.nonce, "caps": self._caps()}
        if self._policy.tls:
            # Tells a connector of this project which key to use before it
            # answers (claudectl ignores the field).
            payload["identity"] = self._env.identity
        return [self._env.make(codec.CHALLENGE, payload, from_peer="")]

    def _ack(self, status: str, **extra: Any) -> Envelope:
        return self._env.make(codec.HANDSHAKE_ACK, {"status": status, **extra})

    def _deny(self, reason: str, tell: str | None = None, reflected: bool = False) -> Step:
        """
        Refuse.  ``tell`` is a short reason word for peers of this project
        (``used``, ``expired``, ``burned``, ``wrong_code``…) in a payload field
        claudectl ignores; the local ``reason`` is only logged.
        """
        self.state = ListenerState.DONE
        extra = {"reason": tell} if tell else {}
        return Step(send=[self._ack("denied", **extra)], failed=reason, reflected=reflected)

    def tls_established(self, exporter: bytes) -> None:
        """TLS is up on this connection: proofs from now on bind ``exporter``."""
        if self.state is ListenerState.AWAIT_TLS:
            self.exporter = exporter
            self.state = ListenerState.AWAIT_HANDSHAKE

    def receive(self, env: Envelope) -> Step:
        if self.state is ListenerState.DONE:
            return Step(failed="handshake already finished")
        if self.state is ListenerState.AWAIT_TLS:
            return self._deny("frame before the TLS handshake finished")
        if env.msg_type != codec.HANDSHAKE:
            return self._deny(f"expected handshake, got {env.msg_type}")
        payload = env.payload if isinstance(env.payload, dict) else {}
        peer = env.from_peer
        self.claimed_id = peer if isinstance(peer, str) else None
        if not is_remote_peer_id(peer):
            return self._deny("invalid peer id")
        if self.exporter is None and "starttls" in payload:
            return self._start_tls(payload)
        if self.exporter is None:
            refusal = self._plaintext_refusal(peer, payload)
            if refusal is not None:
                return refusal
        cnonce = payload.get("cnonce")
        if isinstance(cnonce, str) and self._policy.is_own_nonce(cnonce):
            return self._deny(
                f"reflection attempt: {peer} sent back a nonce we issued", reflected=True
            )
        if self.state is ListenerState.AWAIT_PAKE_CONFIRM:
            return self._pake_confirm(peer, payload)
        if isinstance(payload.get("pake"), dict):
            return self._pake_start(peer, payload)
        return self._key_handshake(peer, payload)

    def _start_tls(self, payload: dict[str, Any]) -> Step:
        if not self._policy.tls or payload.get("starttls") != CAP_TLS:
            # Closed without an answer: the connector already speaks TLS.
            self.state = ListenerState.DONE
            return Step(failed=f"cannot start TLS {str(payload.get('starttls'))[:40]!r}")
        self.state = ListenerState.AWAIT_TLS
        # No plaintext answer: the connector's ClientHello follows its frame.
        return Step(start_tls=True)

    def _plaintext_refusal(self, peer: str, payload: dict[str, Any]) -> Step | None:
        if self._policy.require_encryption:
            return self._deny(
                "plaintext handshake refused: [relay] require_encryption is true",
                "encryption_required",
            )
        if self._keys.is_tls(peer):
            return self._deny(f"downgrade refused: {peer} has used TLS before", "downgrade")
        if isinstance(payload.get("pake"), dict) and self._policy.tls:
            return self._deny("short-code pairing needs TLS", "no_tls")
        return None

    def _verify(self, psk: bytes, peer: str, candidate: str, cnonce: Any) -> bool:
        if self.exporter is None:
            return verify_proof(psk, self.nonce, candidate)
        expected = channel_proof(
            psk, CONNECTOR_ROLE, self.exporter, self.nonce, cnonce, peer, self._env.identity
        )
        return hmac.compare_digest(expected.encode(), candidate.encode("utf-8", "replace"))

    def _key_handshake(self, peer: str, payload: dict[str, Any]) -> Step:
        candidate = payload.get("proof")
        if not isinstance(candidate, str):
            return self._deny("proof missing")
        cnonce = payload.get("cnonce")
        mutual = _is_nonce(cnonce)
        if self.exporter is not None and not mutual:
            return self._deny("TLS handshake without a valid cnonce")
        stored = self._keys.stored_key(peer)
        match: tuple[str, bytes] | None = None
        if stored is not None:
            if self._verify(stored, peer, candidate, cnonce):
                match = ("stored", stored)
        else:
            for label, psk in self._keys.pending_candidates():
                if self._verify(psk, peer, candidate, cnonce):
                    match = (label, psk)
                    break
        if match is None:
            if stored is not None:
                return self._deny("wrong proof")
            tell = None
            for state, psk in self._keys.closed_candidates():
                if self._verify(psk, peer, candidate, cnonce):
                    tell = state
                    break
            return self._deny(f"no key for this peer ({tell or 'unknown key'})", tell)
        label, psk = match
        if not mutual and self._keys.is_mutual(peer):
            return self._deny("downgrade to one-way authentication refused")
        if label != "stored" and not self._keys.claim(peer, label, psk):
            return self._deny("pending key already claimed")
        return self._accept(
            peer, psk, MUTUAL if mutual else ONEWAY, label, cnonce if mutual else None
        )

    def _accept(self, peer: str, psk: bytes, mode: str, via: str, cnonce: str | None) -> Step:
        self.state = ListenerState.DONE
        extra: dict[str, Any] = {}
        transport = PLAINTEXT
        if cnonce is not None and self.exporter is not None:
            transport = TLS13
            extra = {
                "sproof": channel_proof(
                    psk, LISTENER_ROLE, self.exporter, self.nonce, cnonce, peer, self._env.identity
                ),
                "caps": self._caps(),
            }
        elif cnonce is not None:
            extra = {"sproof": listener_proof(psk, cnonce, self.nonce), "caps": self._caps()}
        return Step(
            send=[self._ack("ok", **extra)], done=Authenticated(peer, psk, mode, via, transport)
        )

    def _pake_start(self, peer: str, payload: dict[str, Any]) -> Step:
        if self._pake is None:
            return self._deny("short-code pairing is not available")
        if self._keys.stored_key(peer) is not None:
            return self._deny("peer id already paired", "already_paired")
        msg = payload["pake"].get("msg")
        try:
            raw = bytes.fromhex(msg) if isinstance(msg, str) else None
        except ValueError:
            raw = None
        if not raw or len(raw) > 1024:
            return self._deny("malformed pake message")
        response = self._pake.respond(peer, raw)
        if response is None:
            return self._deny("no open invite for a short code", "no_invite")
        self._pake_response = response
        self._pake_peer = peer
        self.state = ListenerState.AWAIT_PAKE_CONFIRM
        return Step(send=[self._ack("pake", pake={"msgs": [m.hex() for m in response.messages]})])

    def _pake_confirm(self, peer: str, payload: dict[str, Any]) -> Step:
        assert self._pake_response is not None
        if peer != self._pake_peer:
            return self._deny("peer id changed during pairing")
        pake = payload.get("pake")
        confirms = _hex_list(pake.get("confirm") if isinstance(pake, dict) else None)
        cnonce = payload.get("cnonce")
        if not _is_nonce(cnonce):
            # Checked before finish(): a denied pairing stores no key.
            return self._deny("pake handshake without cnonce")
        psk = self._pake_response.finish(confirms)
        if psk is None:
            tell = getattr(self._pake_response, "failure", None) or "wrong_code"
            return self._deny(f"short code refused ({tell})", tell)
        if self.exporter is not None:
            # The joiner proves the new key on this very connection too, so
            # a PAKE relayed between two TLS sessions gives nobody a link.
            proofs = pake.get("proofs") if isinstance(pake, dict) else None
            if not isinstance(proofs, list) or not any(
                isinstance(p, str) and self._verify(psk, peer, p, cnonce)
                for p in proofs[:MAX_PAKE_CANDIDATES]
            ):
                return self._deny("short-code pairing not bound to this connection")
        if not self._keys.store_new_key(peer, psk):
            return self._deny("could not store the new key")
        return self._accept(peer, psk, MUTUAL, "pake", cnonce)


def _hex_list(raw: Any, limit: int = 64) -> list[bytes]:
    out: list[bytes] = []
    if isinstance(raw, list):
        for c in raw[:limit]:
            try:
                out.append(bytes.fromhex(c) if isinstance(c, str) else b"")
            except ValueError:
                out.append(b"")
    return out


# --- connector -------------------------------------------------------------------


@dataclass
class KeyAuth:
    """Authenticate with a known PSK."""

    psk: bytes
    #: The id we expect the listener to have; None = take the ack's id (first
    #: contact via invite link or pair code).
    expected_peer: str | None = None


@dataclass
class KeyByIdentity:
    """
    Authenticate with the key of the peer the listener says it is.

    A listener of this project that offers TLS announces its identity in the
    challenge (``"identity"``).  The connector then looks up that one key --
    it never tries its keys in turn -- and, with no key for that identity,
    fails before it sends anything.  The announcement is unauthenticated, but
    the proof that follows is bound to the TLS connection and to both
    identities (channel binding) and the listener must prove the same key
    back, so a listener that lies gains nothing.

    A listener that announces no identity over TLS (a claudectl 0.64 peer,
    which speaks plaintext) gets the key ``fallback()`` picks (the node's
    rule: the peer last seen at that address, or the only paired peer
    without an address), or the handshake fails with ``fallback``'s reason.
    """

    #: ``key_for(peer_id)``: the stored key of that peer, or None.
    key_for: Callable[[str], bytes | None]
    #: ``fallback()``: ``(peer_id, psk)``, or a sentence saying why there is none.
    fallback: Callable[[], tuple[str, bytes] | str] = lambda: "the listener did not say who it is"
    #: Called with ``(peer_id, how)`` once a key is chosen (for the node's log).
    chosen: Callable[[str, str], None] = lambda _peer, _how: None


class PakeInitiatorLike(Protocol):
    def start(self) -> bytes: ...

    def confirmations(self, listener_messages: list[bytes]) -> list[bytes]: ...

    def candidate_psks(self) -> list[bytes]: ...


@dataclass
class PakeAuth:
    initiator: PakeInitiatorLike


class ConnectorState(Enum):
    AWAIT_CHALLENGE = "await_challenge"
    AWAIT_TLS = "await_tls"
    AWAIT_ACK = "await_ack"
    DONE = "done"


class ConnectorHandshake:
    """The connecting side: answer the challenge, check the ack."""

    def __init__(
        self,
        envelopes: EnvelopeFactory,
        auth: KeyAuth | KeyByIdentity | PakeAuth,
        is_mutual: Callable[[str], bool] = lambda _peer: False,
        random: RandomBytes = os.urandom,
        version: str = COMPAT_VERSION,
        stored_key: Callable[[str], bytes | None] = lambda _peer: None,
        is_tls: Callable[[str], bool] = lambda _peer: False,
        policy: Policy = Policy(),
    ) -> None:
        self._env = envelopes
        self._auth: KeyAuth | PakeAuth
        #: Resolved into a KeyAuth when the challenge arrives.
        self._by_identity: KeyByIdentity | None = None
        if isinstance(auth, KeyByIdentity):
            self._by_identity = auth
            self._auth = KeyAuth(b"", None)
        else:
            self._auth = auth
        self._is_mutual = is_mutual
        self._is_tls = is_tls
        self._stored_key = stored_key
        self._version = version
        self._policy = policy
        self.cnonce = new_nonce(random)
        self.nonce: str | None = None
        self.state = ConnectorState.AWAIT_CHALLENGE
        self._pake_round = 0
        self.remote_caps: list[str] = []
        #: The listener's identity as it announced it before TLS (TLS only).
        self.listener_id: str | None = None
        #: The TLS exporter value once TLS is up (None: plaintext).
        self.exporter: bytes | None = None
        #: What the handshake proved, once it did (kept even if the link is
        #: refused afterwards, e.g. because the peer is connected already).
        self.result: Authenticated | None = None
        #: TLS was started before the challenge came (see :meth:`early_tls`).
        self.early = False

    @property
    def auth(self) -> KeyAuth | PakeAuth:
        """The credentials in use (a :class:`KeyByIdentity` resolves at the challenge)."""
        return self._auth

    def _fail(self, reason: str, reflected: bool = False) -> Step:
        self.state = ConnectorState.DONE
        return Step(failed=reason, reflected=reflected)

    def early_tls(self) -> Step | None:
        """
        Toward a peer that has authenticated over TLS before (its ``.tls``
        marker: a plaintext link to it would be refused as a downgrade
        anyway), the ``starttls`` request and the ClientHello go out as soon
        as the connection is up, without waiting for the challenge: one
        round trip less.  The challenge still comes first on the wire, in
        plaintext, and is checked as always before any proof is made
        (:meth:`receive`).  None: wait for the challenge.
        """
        expected = self._expected()
        if (
            self.state is not ConnectorState.AWAIT_CHALLENGE
            or not self._policy.tls
            or self._by_identity is not None
            or expected is None
            or not self._is_tls(expected)
        ):
            return None
        self.early = True
        self.listener_id = expected
        self.state = ConnectorState.AWAIT_TLS
        return Step(send=[self._starttls()], start_tls=True)

    def _starttls(self) -> Envelope:
        return self._env.make(
            codec.HANDSHAKE, {"starttls": CAP_TLS, "version": self._version, "caps": self._caps()}
        )

    def receive(self, env: Envelope) -> Step:
        if self.state is ConnectorState.AWAIT_CHALLENGE:
            return self._on_challenge(env)
        if self.state is ConnectorState.AWAIT_ACK:
            return self._on_ack(env)
        if self.state is ConnectorState.AWAIT_TLS:
            if self.early and self.nonce is None and env.msg_type == codec.CHALLENGE:
                return self._on_early_challenge(env)
            return self._fail("frame before the TLS handshake finished")
        return Step(failed="handshake already finished")

    def _expected(self) -> str | None:
        return self._auth.expected_peer if isinstance(self._auth, KeyAuth) else None

    def _take_challenge(self, env: Envelope) -> tuple[dict[str, Any], Step | None]:
        """The challenge's payload, its nonce and caps taken; a Step on failure."""
        payload = env.payload if isinstance(env.payload, dict) else {}
        nonce = payload.get("nonce")
        if not isinstance(nonce, str):
            return payload, self._fail("challenge missing nonce")
        if self._policy.is_own_nonce(nonce):
            # Someone handed us a challenge our own listener issued, to make
            # us answer it for them (a reflection attack).
            return payload, self._fail(
                "reflection attempt: the challenge carries a nonce we issued", reflected=True
            )
        self.nonce = nonce
        caps = payload.get("caps")
        self.remote_caps = [c for c in caps if isinstance(c, str)] if isinstance(caps, list) else []
        return payload, None

    def _on_early_challenge(self, env: Envelope) -> Step:
        """The challenge, after our early ``starttls`` (see :meth:`early_tls`)."""
        payload, failed = self._take_challenge(env)
        if failed is not None:
            return failed
        expected = self.listener_id
        if CAP_TLS not in self.remote_caps:
            return self._fail(
                f"downgrade refused: {expected} has used TLS before, but the listener "
                "offers no encryption"
            )
        announced = payload.get("identity")
        if announced != expected:
            shown = announced if is_remote_peer_id(announced) else "another identity"
            return self._fail(
                f"remote identity mismatch: the listener at this address is {shown}, not {expected}"
            )
        # Nothing to send: our ClientHello is on its way already.
        return Step()

    def _on_challenge(self, env: Envelope) -> Step:
        payload, failed = self._take_challenge(env)
        if failed is not None:
            return failed
        will_tls = self._policy.tls and CAP_TLS in self.remote_caps
        announced = payload.get("identity") if will_tls else None
        if announced is not None and not is_remote_peer_id(announced):
            return self._fail("the listener announced an invalid identity")
        if self._by_identity is not None:
            failure = self._choose_key(announced)
            if failure is not None:
                return self._fail(failure)
        expected = self._expected()
        if announced is not None and expected is not None and announced != expected:
            # A wrong address (or port): say so before sending anything.
            return self._fail(
                f"remote identity mismatch: the listener at this address is "
                f"{announced}, not {expected}"
            )
        if will_tls:
            if announced is None:
                return self._fail("the listener offers TLS but does not name itself")
            # No answer is awaited: the TLS ClientHello follows the frame at
            # once (one round trip less); the listener switches on reading it.
            self.listener_id = announced
            self.state = ConnectorState.AWAIT_TLS
            return Step(send=[self._starttls()], start_tls=True)
        refusal = self._plaintext_refusal(self._expected())
        if refusal is not None:
            return refusal
        return self._answer()

    def _choose_key(self, announced: str | None) -> str | None:
        """Resolve a :class:`KeyByIdentity` into one key; a reason on failure."""
        by_identity = self._by_identity
        assert by_identity is not None
        if announced is not None:
            if announced == self._env.identity:
                return "the listener at this address is this instance itself"
            psk = by_identity.key_for(announced)
            if psk is None:
                return (
                    f"the listener at this address is {announced}, a peer this "
                    "instance is not paired with (no key stored for it); pair first"
                )
            self._auth = KeyAuth(psk, announced)
            by_identity.chosen(announced, "announced")
            return None
        picked = by_identity.fallback()
        if isinstance(picked, str):
            return picked
        peer, psk = picked
        self._auth = KeyAuth(psk, peer)
        by_identity.chosen(peer, "fallback")
        return None

    def _caps(self) -> list[str]:
        return list(OUR_CAPS) + ([CAP_TLS] if self._policy.tls else [])

    def _plaintext_refusal(self, peer: str | None) -> Step | None:
        if self._policy.require_encryption:
            return self._fail(
                "the listener offers no encryption (a claudectl 0.64 peer?) and "
                "[relay] require_encryption is true"
            )
        if peer is not None and self._is_tls(peer):
            return self._fail(
                f"downgrade refused: {peer} has used TLS before, but the listener "
                "offers no encryption"
            )
        if isinstance(self._auth, PakeAuth):
            if CAP_PAKE not in self.remote_caps:
                return self._fail(
                    "the listener does not support short codes "
                    "(a claudectl 0.64 listener?); use the invite link"
                )
            if self._policy.tls:
                return self._fail("the listener offers no encryption: short codes need it")
        return None

    def tls_established(self, exporter: bytes) -> Step:
        """TLS is up: send the handshake, bound to this connection."""
        if self.state is not ConnectorState.AWAIT_TLS:
            return self._fail("TLS started at the wrong moment")
        if self.nonce is None:
            # Early TLS: the listener's challenge precedes its TLS flight.
            return self._fail("TLS finished before the listener's challenge")
        self.exporter = exporter
        return self._answer()

    def _proof(self, psk: bytes) -> str:
        assert self.nonce is not None
        if self.exporter is None:
            return proof(psk, self.nonce)
        assert self.listener_id is not None
        return channel_proof(
            psk,
            CONNECTOR_ROLE,
            self.exporter,
            self.nonce,
            self.cnonce,
            self._env.identity,
            self.listener_id,
        )

    def _sproof(self, psk: bytes, remote: str) -> str:
        assert self.nonce is not None
        if self.exporter is None:
            return listener_proof(psk, self.cnonce, self.nonce)
        return channel_proof(
            psk, LISTENER_ROLE, self.exporter, self.nonce, self.cnonce, self._env.identity, remote
        )

    def _answer(self) -> Step:
        body: dict[str, Any] = {
            "version": self._version,
            "cnonce": self.cnonce,
            "caps": self._caps(),
        }
        if isinstance(self._auth, KeyAuth):
            body["proof"] = self._proof(self._auth.psk)
        else:
            body["pake"] = {"msg": self._auth.initiator.start().hex()}
        self.state = ConnectorState.AWAIT_ACK
        return Step(send=[self._env.make(codec.HANDSHAKE, body)])

    def _denied(self, payload: dict[str, Any]) -> Step:
        status = payload.get("status")
        text = f"handshake denied: {status if isinstance(status, str) else 'unknown'}"
        why = payload.get("reason")
        if isinstance(why, str) and why.replace("_", "").isalnum() and len(why) <= 32:
            text += f" ({why})"
        return self._fail(text)

    def _on_ack(self, env: Envelope) -> Step:
        if env.msg_type != codec.HANDSHAKE_ACK:
            return self._fail(f"expected handshake_ack, got {env.msg_type}")
        payload = env.payload if isinstance(env.payload, dict) else {}
        status = payload.get("status")
        if status == "pake" and isinstance(self._auth, PakeAuth) and self._pake_round == 0:
            return self._on_pake_messages(payload)
        if status != "ok":
            return self._denied(payload)
        remote = env.from_peer
        if not is_remote_peer_id(remote):
            return self._fail(f"listener sent an invalid identity {remote!r}")
        expected = self._expected()
        if expected not in (None, remote):
            return self._fail(f"remote identity mismatch: expected {expected}, got {remote}")
        if self.listener_id not in (None, remote):
            return self._fail(
                f"the listener changed its identity during the handshake "
                f"({self.listener_id} → {remote})"
            )
        sproof = payload.get("sproof")
        candidates = (
            [self._auth.psk]
            if isinstance(self._auth, KeyAuth)
            else self._auth.initiator.candidate_psks()
        )
        via = "pake" if isinstance(self._auth, PakeAuth) else "stored"
        if isinstance(sproof, str):
            for psk in candidates:
                if hmac.compare_digest(
                    self._sproof(psk, remote).encode(), sproof.encode("utf-8", "replace")
                ):
                    transport = PLAINTEXT if self.exporter is None else TLS13
                    return self._done(remote, psk, MUTUAL, via, transport)
            return self._fail("the listener could not prove it holds the key")
        if isinstance(self._auth, PakeAuth):
            return self._fail("the listener did not confirm the pairing")
        if self.exporter is not None:
            return self._fail("the listener did not prove the key over TLS")
        refusal = self._plaintext_refusal(remote)
        if refusal is not None:
            return refusal
        if self._is_mutual(remote):
            return self._fail(f"downgrade refused: {remote} has authenticated mutually before")
        return self._done(remote, self._auth.psk, ONEWAY, "stored", PLAINTEXT)

    def _done(self, remote: str, psk: bytes, mode: str, via: str, transport: str) -> Step:
        # Whoever hands us an invite must not take over the key of a peer we
        # already trust by claiming its identity.
        existing = self._stored_key(remote)
        if existing is not None and existing != psk:
            return self._fail(
                f"already paired with {remote} under a different key; run "
                f"`claudectl relay forget {remote}` first to pair again"
            )
        if transport == PLAINTEXT and self._is_tls(remote):
            return self._fail(f"downgrade refused: {remote} has used TLS before")
        self.state = ConnectorState.DONE
        self.result = Authenticated(remote, psk, mode, via, transport)
        return Step(done=self.result)

    def _on_pake_messages(self, payload: dict[str, Any]) -> Step:
        assert isinstance(self._auth, PakeAuth)
        self._pake_round = 1
        pake = payload.get("pake")
        msgs_raw = pake.get("msgs") if isinstance(pake, dict) else None
        # Each listener message we answer lets a fake listener test one
        # guessed password offline: answer at most MAX_PAKE_CANDIDATES.
        if not isinstance(msgs_raw, list) or not msgs_raw or len(msgs_raw) > MAX_PAKE_CANDIDATES:
            return self._fail("malformed pake reply")
        try:
            msgs = [bytes.fromhex(m) for m in msgs_raw]
        except (TypeError, ValueError):
            return self._fail("malformed pake reply")
        try:
            confirms = self._auth.initiator.confirmations(msgs)
        except Exception as e:  # a hostile reply must not crash us
            return self._fail(f"pake failed: {e}")
        body_pake: dict[str, Any] = {"confirm": [c.hex() for c in confirms]}
        if self.exporter is not None:
            body_pake["proofs"] = [
                self._proof(psk) for psk in self._auth.initiator.candidate_psks()
            ]
        body = {
            "version": self._version,
            "cnonce": self.cnonce,
            "caps": self._caps(),
            "pake": body_pake,
        }
        return Step(send=[self._env.make(codec.HANDSHAKE, body)])
