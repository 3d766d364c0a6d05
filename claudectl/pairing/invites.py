# -*- test-case-name: tests.test_pairing_invites -*-
"""
Outstanding invites, kept in ``~/.claudectl/relay/invites/invites.json``.

Each invite carries two independent secrets:

* the **link key**: the canonical PSK of a fresh 8-byte pair code, exactly
  what claudectl's ``relay invite`` makes.  It goes into the invite link and
  is also written to ``peers/_pending.key`` (0600), so a claudectl 0.64
  ``relay serve`` on the same home accepts the link too;
* the **code password**: 4 random bytes carried by the relay code and the
  word phrase.  It is never a key: it only feeds the PAKE
  (:mod:`claudectl.pairing.pake`), which derives a fresh 32-byte key.

The code password also names its invite: :func:`invite_selector` (8 bits
of a hash of it) travels in the joiner's first PAKE message, so the listener
runs the PAKE against that one invite only, and a wrong code burns at most
the invite it names (issue 11, item 5a).  No two invites the listener still
answers for share a selector: :meth:`InviteStore.create` draws the password
again until its selector is free.

An invite is ``open`` until it is ``used`` (by whichever format comes
first), ``burned`` (a wrong PAKE attempt), ``revoked`` or ``expired``
(``relay.invite_ttl_hours``).  Closing an invite also removes
``_pending.key`` when that still holds the invite's link key.  Closed
invites are kept for :data:`CLOSED_RETENTION_SECS` so that ``--list`` shows
them and a late joiner is told what happened.

The file is 0600 in a 0700 directory; every change is a locked
read-modify-write with an atomic replace.  A damaged file is reported, never
overwritten.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from claudectl.atomic import atomic_write, locked
from claudectl.home import Home
from claudectl.pairing import codes
from claudectl.pairing.detect import relay_code_is_ambiguous
from claudectl.relay.crypto import RandomBytes, canonical_psk, format_pair_code, key_from_hex
from claudectl.relay.interfaces import IInvite, IInviteBook
from claudectl.relay.keystore import KeyStore, is_remote_peer_id

log = Logger()

OPEN = "open"
USED = "used"
BURNED = "burned"
REVOKED = "revoked"
EXPIRED = "expired"
STATES = (OPEN, USED, BURNED, REVOKED, EXPIRED)

HOUR = 3600
DAY = 24 * HOUR
CLOSED_RETENTION_SECS = 7 * DAY
FILE_VERSION = 1
PAIR_CODE = "pair"
INVITE_ID_BYTES = 4
#: How long after an invite closed a late joiner is still told why (the
#: listener answers its PAKE for this long, so its selector stays taken).
CLOSED_ANSWER_SECS = 600
_SELECTOR_LABEL = b"claudectl-pake-v1:invite-selector:"
#: A password is drawn at most this often to find a free selector.
_SELECTOR_DRAWS = 4096


def invite_selector(code_password: bytes) -> int:
    """
    The non-secret byte that names an invite: the first byte of
    SHA-256(label ‖ password).  It reveals 8 of the password's 32 bits to
    whoever receives the joiner's first message (inside TLS: the inviter,
    or an impostor posing as it).
    """
    return hashlib.sha256(_SELECTOR_LABEL + code_password).digest()[0]


class InviteStoreError(Exception):
    """The invites file cannot be read or changed; ``str()`` says why."""


class InviteNotFound(InviteStoreError):
    pass


class InviteNotOpen(InviteStoreError):
    pass


@implementer(IInvite)
@dataclass(frozen=True)
class Invite:
    id: str
    created_at: int
    expires_at: int
    identity: str
    host: str
    port: int
    link_psk: bytes
    code_password: bytes
    #: False when the address cannot travel in a relay code (IPv6, port).
    has_code: bool
    state: str = OPEN
    used_by: str | None = None
    closed_at: int | None = None
    #: ``invite`` (``relay invite``) or ``pair`` (a raw ``relay pair`` code:
    #: only its link key, no address, no relay code).
    kind: str = "invite"
    #: The address is a NAT hub's (``relay invite --hub``; docs/hub.md): the
    #: joiner asks it for a channel to ``identity``.  Codes cannot name an
    #: identity, so such an invite has the link only.
    via_hub: bool = False

    def __repr__(self) -> str:  # secrets stay out of logs and tracebacks
        return f"Invite(id={self.id!r}, state={self.state!r}, address={self.address!r})"

    def state_at(self, now: float) -> str:
        if self.state == OPEN and now >= self.expires_at:
            return EXPIRED
        return self.state

    def is_open(self, now: float) -> bool:
        return self.state_at(now) == OPEN

    @property
    def address(self) -> str:
        if self.kind == PAIR_CODE:
            return "(relay pair code)"
        return codes.format_socket_address(self.host, self.port)

    @property
    def selector(self) -> int:
        return invite_selector(self.code_password)

    def answered_at(self, now: float) -> bool:
        """The listener still runs its PAKE: open, or closed less than CLOSED_ANSWER_SECS ago."""
        if not self.has_code:
            return False
        if self.is_open(now):
            return True
        closed = self.closed_at if self.closed_at is not None else self.expires_at
        return now - closed <= CLOSED_ANSWER_SECS

    @property
    def pair_code(self) -> str:
        return format_pair_code(self.link_psk)

    @property
    def link(self) -> str:
        return codes.build_link(self.identity, self.host, self.port, self.link_psk)

    @property
    def not_carried_reason(self) -> str | None:
        if self.via_hub:
            return (
                "the invite names a hub, and a code cannot carry the identity a hub "
                "needs; share the invite link instead"
            )
        return codes.not_carried_reason(self.host, self.port)

    def _payload(self) -> bytes | None:
        if not self.has_code:
            return None
        return codes.encode_payload(self.host, self.port, self.code_password)

    @property
    def relay_code(self) -> str | None:
        payload = self._payload()
        return None if payload is None else codes.encode_relay_code(payload)

    @property
    def word_phrase(self) -> str | None:
        payload = self._payload()
        return None if payload is None else codes.encode_word_phrase(payload)

    # --- storage form ---------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "identity": self.identity,
            "host": self.host,
            "port": self.port,
            "link_key": self.link_psk.hex(),
            "code_password": self.code_password.hex(),
            "has_code": self.has_code,
            "state": self.state,
            "used_by": self.used_by,
            "closed_at": self.closed_at,
            "kind": self.kind,
            "via_hub": self.via_hub,
        }

    @classmethod
    def from_json(cls, data: Any) -> Invite:
        if not isinstance(data, dict):
            raise ValueError("an invite must be an object")
        link_psk = key_from_hex(data["link_key"])
        password = bytes.fromhex(data["code_password"])
        if link_psk is None or len(password) != codes.SECRET_BYTES:
            raise ValueError("bad invite secrets")
        if data["state"] not in STATES:
            raise ValueError(f"unknown invite state {data['state']!r}")
        for name in ("created_at", "expires_at", "port"):
            if isinstance(data[name], bool) or not isinstance(data[name], int):
                raise ValueError(f"{name} must be an integer")
        return cls(
            id=str(data["id"]),
            created_at=data["created_at"],
            expires_at=data["expires_at"],
            identity=str(data["identity"]),
            host=str(data["host"]),
            port=data["port"],
            link_psk=link_psk,
            code_password=password,
            has_code=bool(data.get("has_code", True)),
            state=data["state"],
            used_by=data.get("used_by"),
            closed_at=data.get("closed_at"),
            kind=PAIR_CODE if data.get("kind") == PAIR_CODE else "invite",
            via_hub=data.get("via_hub") is True,
        )


def public_view(invite: Invite, now: float) -> dict[str, Any]:
    """What ``relay invite --list --json`` shows: no secrets."""
    return {
        "id": invite.id,
        "state": invite.state_at(now),
        "address": invite.address,
        "created_at": invite.created_at,
        "expires_at": invite.expires_at,
        "used_by": invite.used_by,
        "kind": invite.kind,
    }


@implementer(IInviteBook)
class InviteStore:
    """Outstanding invites of one home."""

    def __init__(
        self, home: Home, keystore: KeyStore | None = None, random: RandomBytes = os.urandom
    ) -> None:
        self.home = home
        self.keystore = keystore if keystore is not None else KeyStore(home)
        self._random = random

    @property
    def path(self) -> Path:
        return self.home.invites / "invites.json"

    # --- file -----------------------------------------------------------------------
    def _read(self) -> list[Invite]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise InviteStoreError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("invites"), list):
                raise ValueError("no invites list")
            return [Invite.from_json(item) for item in data["invites"]]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise InviteStoreError(
                f"{self.path} is damaged ({e}); move it away to start afresh "
                f"(no invite has been changed)"
            ) from None

    def _write(self, invites: Iterable[Invite]) -> None:
        self.home.ensure_private_dir(self.home.invites)
        data = {"version": FILE_VERSION, "invites": [i.to_json() for i in invites]}
        atomic_write(self.path, json.dumps(data, indent=2) + "\n", mode=0o600)

    @contextmanager
    def _editing(self) -> Iterator[list[Invite]]:
        """Locked read-modify-write: mutate the yielded list in place."""
        self.home.ensure_private_dir(self.home.invites)
        with locked(self.path):
            invites = self._read()
            before = list(invites)
            yield invites
            if invites != before:
                self._write(invites)

    def _close(self, invite: Invite, state: str, now: float, used_by: str | None = None) -> Invite:
        closed = replace(invite, state=state, used_by=used_by, closed_at=int(now))
        self._drop_pending(invite)
        return closed

    def _drop_pending(self, invite: Invite) -> None:
        if self.keystore.pending_key() == invite.link_psk:
            self.keystore.clear_pending()

    def _sweep(self, invites: list[Invite], now: float) -> None:
        """Persist expiry and forget long-closed invites (in place)."""
        keep = []
        for inv in invites:
            if inv.state == OPEN and inv.state_at(now) == EXPIRED:
                inv = replace(inv, state=EXPIRED, closed_at=inv.expires_at)
                if inv.kind != PAIR_CODE:  # the newest pair code never expires (claudectl)
                    self._drop_pending(inv)
            if inv.state != OPEN and (inv.closed_at or 0) + CLOSED_RETENTION_SECS < now:
                continue
            keep.append(inv)
        invites[:] = keep

    # --- creating and listing -------------------------------------------------------
    def create(
        self,
        identity: str,
        host: str,
        port: int,
        ttl_secs: int,
        now: float,
        via_hub: bool = False,
    ) -> Invite:
        """A new open invite; its link key also becomes ``_pending.key``."""
        if ttl_secs <= 0:
            raise ValueError("an invite needs a positive lifetime")
        raw = self._random(8)
        has_code = not via_hub and codes.not_carried_reason(host, port) is None
        with self._editing() as invites:
            self._sweep(invites, now)
            password = self._draw_password(
                host, port, has_code, {i.selector for i in invites if i.answered_at(now)}
            )
            taken = {i.id for i in invites}
            invite_id = self._random(INVITE_ID_BYTES).hex()
            while invite_id in taken:
                invite_id = self._random(INVITE_ID_BYTES).hex()
            invite = Invite(
                id=invite_id,
                created_at=int(now),
                expires_at=int(now + ttl_secs),
                identity=identity,
                host=host,
                port=port,
                link_psk=canonical_psk(raw),
                code_password=password,
                has_code=has_code,
                via_hub=via_hub,
            )
            invites.append(invite)
            self.keystore.save_pending_key(invite.link_psk)
        log.info(
            "invite {invite_id} created for {address}, open for {ttl} s",
            invite_id=invite.id,
            address=invite.address,
            ttl=ttl_secs,
        )
        return invite

    def _draw_password(
        self, host: str, port: int, has_code: bool, taken_selectors: set[int]
    ) -> bytes:
        """A code password whose code is unambiguous and whose selector is free."""
        for _ in range(_SELECTOR_DRAWS):
            password = self._random(codes.SECRET_BYTES)
            if not has_code:
                return password
            if relay_code_is_ambiguous(codes.relay_code(host, port, password)):
                continue
            if invite_selector(password) not in taken_selectors:
                return password
        raise InviteStoreError(
            f"too many invites with a relay code are open ({len(taken_selectors)}); "
            f"revoke some first (claudectl relay invite --list, --revoke ID)"
        )

    def remember_pair_code(
        self, identity: str, psk: bytes, ttl_secs: int, now: float
    ) -> tuple[Invite, list[Invite]]:
        """
        Keep a ``relay pair`` code's key as an open invite, so that it stays
        valid after the next ``relay pair`` overwrites ``_pending.key`` (the
        listener accepts the link key of every open invite).  Returns the new
        record and the earlier pair codes that are still open.  The caller
        writes ``_pending.key`` itself.
        """
        if ttl_secs <= 0:
            raise ValueError("a pair code needs a positive lifetime")
        with self._editing() as invites:
            self._sweep(invites, now)
            self._reconcile(invites, now)
            taken = {i.id for i in invites}
            invite_id = self._random(INVITE_ID_BYTES).hex()
            while invite_id in taken:
                invite_id = self._random(INVITE_ID_BYTES).hex()
            earlier = [i for i in invites if i.kind == PAIR_CODE and i.is_open(now)]
            record = Invite(
                id=invite_id,
                created_at=int(now),
                expires_at=int(now + ttl_secs),
                identity=identity,
                host="",
                port=0,
                link_psk=psk,
                code_password=self._random(codes.SECRET_BYTES),
                has_code=False,
                kind=PAIR_CODE,
            )
            invites.append(record)
        log.info("pair code {invite_id} open for {ttl} s", invite_id=record.id, ttl=ttl_secs)
        return record, earlier

    def list(self, now: float) -> list[Invite]:
        """Every remembered invite, oldest first, with expiry applied."""
        with self._editing() as invites:
            self._sweep(invites, now)
            return list(invites)

    def get(self, invite_id: str) -> Invite | None:
        return next((i for i in self._read() if i.id == invite_id), None)

    def revoke(self, invite_id: str, now: float) -> Invite:
        with self._editing() as invites:
            self._sweep(invites, now)
            for n, inv in enumerate(invites):
                if inv.id == invite_id:
                    if not inv.is_open(now):
                        raise InviteNotOpen(f"invite {invite_id} is already {inv.state_at(now)}")
                    invites[n] = self._close(inv, REVOKED, now)
                    log.info("invite {invite_id} revoked", invite_id=invite_id)
                    return invites[n]
        raise InviteNotFound(f"no invite with id {invite_id!r} (see claudectl relay invite --list)")

    # --- what the listener calls ----------------------------------------------------
    def _reconcile(self, invites: builtins.list[Invite], now: float) -> None:
        """
        Mark invites used whose link key some peer already holds: that peer
        claimed ``_pending.key`` (for instance through a claudectl listener
        sharing this home), so the link must not work a second time.
        """
        for n, inv in enumerate(invites):
            if not inv.is_open(now):
                continue
            for peer in self.keystore.known_peers():
                if self.keystore.key(peer) == inv.link_psk:
                    invites[n] = self._close(inv, USED, now, used_by=peer)
                    log.info(
                        "invite {invite_id} was claimed by {peer_id} via the pending key",
                        invite_id=inv.id,
                        peer_id=peer,
                    )
                    break

    def _safe_edit(self, now: float, action: Callable[[builtins.list[Invite]], Any]) -> Any:
        try:
            with self._editing() as invites:
                self._sweep(invites, now)
                return action(invites)
        except InviteStoreError as e:
            log.error("invites unavailable: {error}", error=str(e))
            return None

    def open_link_keys(self, now: float) -> builtins.list[tuple[str, bytes]]:
        """``(invite_id, link psk)`` of every open invite (newest first)."""

        def action(invites: builtins.list[Invite]) -> builtins.list[tuple[str, bytes]]:
            self._reconcile(invites, now)
            return [(i.id, i.link_psk) for i in reversed(invites) if i.is_open(now)]

        return self._safe_edit(now, action) or []

    def open_code_invites(self, now: float) -> builtins.list[Invite]:
        """Open invites whose relay code / word phrase was handed out (newest first)."""

        def action(invites: builtins.list[Invite]) -> builtins.list[Invite]:
            self._reconcile(invites, now)
            return [i for i in reversed(invites) if i.is_open(now) and i.has_code]

        return self._safe_edit(now, action) or []

    def closed_code_invites(self, now: float) -> builtins.list[Invite]:
        """Recently closed code invites (newest first), to tell a late joiner why."""

        def action(invites: builtins.list[Invite]) -> builtins.list[Invite]:
            return [i for i in reversed(invites) if not i.is_open(now) and i.has_code]

        return self._safe_edit(now, action) or []

    def mark_used(self, invite_id: str, peer_id: str, now: float) -> bool:
        """Close an open invite as used by ``peer_id``; False if it is not open."""
        if not is_remote_peer_id(peer_id):
            return False

        def action(invites: builtins.list[Invite]) -> bool:
            for n, inv in enumerate(invites):
                if inv.id == invite_id and inv.is_open(now):
                    invites[n] = self._close(inv, USED, now, used_by=peer_id)
                    log.info(
                        "invite {invite_id} used by {peer_id}", invite_id=invite_id, peer_id=peer_id
                    )
                    return True
            return False

        return bool(self._safe_edit(now, action))

    def mark_used_by_key(self, psk: bytes, peer_id: str, now: float) -> str | None:
        """Close the open invite whose link key is ``psk``; its id, or None."""
        for invite_id, key in self.open_link_keys(now):
            if key == psk and self.mark_used(invite_id, peer_id, now):
                return invite_id
        return None

    def burn(self, invite_ids: Iterable[str], now: float) -> builtins.list[str]:
        """Close every still-open invite of ``invite_ids`` as burned."""
        wanted = set(invite_ids)

        def action(invites: builtins.list[Invite]) -> builtins.list[str]:
            burned = []
            for n, inv in enumerate(invites):
                if inv.id in wanted and inv.is_open(now):
                    invites[n] = self._close(inv, BURNED, now)
                    burned.append(inv.id)
            if burned:
                log.warn(
                    "wrong short code: burned invite(s) {invite_ids}", invite_ids=",".join(burned)
                )
            return burned

        return self._safe_edit(now, action) or []

    def state_of(self, invite_id: str, now: float) -> str | None:
        inv = self.get(invite_id)
        return None if inv is None else inv.state_at(now)

    def failure_for_link_key(self, psk: bytes, now: float) -> str | None:
        """Why a link key is not accepted (used/expired/burned/revoked), if it is ours."""
        try:
            invites = self._read()
        except InviteStoreError:
            return None
        for inv in invites:
            if inv.link_psk == psk and not inv.is_open(now):
                return inv.state_at(now)
        return None


FAILURE_TEXT = {
    "wrong_code": (
        "wrong code: it matches no open invite of the inviter. Each invite allows "
        "one wrong attempt: if a mistyped code still named one of the inviter's "
        "invites, that invite is now burned; check the code, or ask for a new one "
        "(claudectl relay invite)"
    ),
    "no_invite": "the inviter has no open invite for a relay code or word phrase",
    "already_paired": (
        "the inviter is already paired with this machine: connect with "
        "`claudectl relay connect <host:port>`, or run `claudectl relay forget` "
        "on both sides to pair again"
    ),
    USED: "this invite was already used; ask for a new one (claudectl relay invite)",
    EXPIRED: "this invite has expired; ask for a new one (claudectl relay invite)",
    BURNED: (
        "this invite was burned by a wrong attempt; ask for a new one (claudectl relay invite)"
    ),
    REVOKED: "this invite was revoked by the inviter",
}


def describe_failure(reason: str | None) -> str:
    """The sentence a joiner reads for a PAKE/invite failure reason."""
    if reason is None:
        return "the inviter refused the pairing"
    return FAILURE_TEXT.get(reason, f"the inviter refused the pairing ({reason})")
