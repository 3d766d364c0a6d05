"""Tests for claudectl.pairing.invites: the store of outstanding invites."""

from __future__ import annotations

import json
import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from claudectl.pairing import codes
from claudectl.pairing.detect import (
    RELAY_CODE,
    WORD_PHRASE,
    decode_join,
    detect_join_format,
    relay_code_is_ambiguous,
)
from claudectl.pairing.invites import (
    BURNED,
    CLOSED_RETENTION_SECS,
    EXPIRED,
    OPEN,
    REVOKED,
    USED,
    InviteNotFound,
    InviteNotOpen,
    InviteStore,
    InviteStoreError,
    describe_failure,
    public_view,
)
from claudectl.pairing.wordlist import WORDS
from claudectl.relay.keystore import KeyStore
from tests.common import temp_home

T0 = 1_714_000_000.0
DAY = 86400


class Counter:
    """Deterministic 'random' bytes, different on every call."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, size: int) -> bytes:
        self.n += 1
        return bytes((self.n * 37 + i * 11) % 256 for i in range(size))


class InviteStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.keys = KeyStore(self.home)
        self.store = InviteStore(self.home)

    def create(self, **kw: object) -> object:
        args = {
            "identity": "desk-1a2b3c4d",
            "host": "192.168.1.50",
            "port": 9847,
            "ttl_secs": DAY,
            "now": T0,
        }
        args.update(kw)
        return self.store.create(**args)  # type: ignore[arg-type]

    def test_create_saves_three_formats_and_pending_key(self) -> None:
        inv = self.create()
        self.assertEqual(inv.state, OPEN)
        self.assertEqual(inv.expires_at, int(T0) + DAY)
        self.assertEqual(len(inv.code_password), 4)
        # The link is claudectl's: the canonical PSK of its pair code...
        link = codes.parse_link(inv.link)
        self.assertEqual(
            (link.identity, str(link.address), link.psk),
            ("desk-1a2b3c4d", "192.168.1.50:9847", inv.link_psk),
        )
        # ...which is also the pending key, 0600, for a claudectl listener.
        self.assertEqual(self.keys.pending_key(), inv.link_psk)
        mode = stat.S_IMODE(os.stat(self.home.peers / "_pending.key").st_mode)
        self.assertEqual(mode, 0o600)
        # The code and phrase carry the address and the (independent) password.
        for text, kind in ((inv.relay_code, RELAY_CODE), (inv.word_phrase, WORD_PHRASE)):
            self.assertEqual(detect_join_format(text), kind)
            target = decode_join(text)
            self.assertEqual(
                (target.address, target.pake_password), ("192.168.1.50:9847", inv.code_password)
            )
        self.assertNotEqual(inv.code_password, inv.link_psk[:4])

    def test_file_is_private_and_round_trips(self) -> None:
        inv = self.create()
        self.assertEqual(stat.S_IMODE(os.stat(self.store.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.home.invites).st_mode), 0o700)
        again = InviteStore(self.home).list(T0)
        self.assertEqual(again, [inv])

    def test_several_outstanding(self) -> None:
        a = self.create()
        b = self.create(now=T0 + 5)
        self.assertNotEqual(a.id, b.id)
        self.assertNotEqual(a.link_psk, b.link_psk)
        self.assertEqual([i.id for i in self.store.list(T0 + 10)], [a.id, b.id])
        self.assertEqual(
            self.store.open_link_keys(T0 + 10), [(b.id, b.link_psk), (a.id, a.link_psk)]
        )
        self.assertEqual([i.id for i in self.store.open_code_invites(T0 + 10)], [b.id, a.id])
        # The newest invite owns the single claudectl pending slot.
        self.assertEqual(self.keys.pending_key(), b.link_psk)

    def test_mark_used_once(self) -> None:
        inv = self.create()
        self.assertTrue(self.store.mark_used(inv.id, "laptop-1", T0 + 1))
        self.assertFalse(self.store.mark_used(inv.id, "other-2", T0 + 2))
        got = self.store.get(inv.id)
        self.assertEqual((got.state, got.used_by, got.closed_at), (USED, "laptop-1", int(T0 + 1)))
        self.assertEqual(self.store.open_link_keys(T0 + 3), [])
        self.assertEqual(self.store.open_code_invites(T0 + 3), [])
        self.assertIsNone(self.keys.pending_key(), "a used invite's link must stop working")
        self.assertEqual(self.store.failure_for_link_key(inv.link_psk, T0 + 3), USED)

    def test_mark_used_refuses_bad_peer_id(self) -> None:
        inv = self.create()
        self.assertFalse(self.store.mark_used(inv.id, "../evil", T0 + 1))
        self.assertFalse(self.store.mark_used(inv.id, "_pending", T0 + 1))
        self.assertEqual(self.store.get(inv.id).state, OPEN)

    def test_mark_used_by_key(self) -> None:
        inv = self.create()
        self.assertEqual(self.store.mark_used_by_key(inv.link_psk, "p-1", T0 + 1), inv.id)
        self.assertIsNone(self.store.mark_used_by_key(inv.link_psk, "p-2", T0 + 2))

    def test_claimed_pending_key_closes_the_invite(self) -> None:
        """If a listener (a claudectl one, say) moved _pending.key to a peer, the
        invite is used: the link must not work a second time."""
        inv = self.create()
        self.assertTrue(self.keys.claim_pending("laptop-9", inv.link_psk))
        self.assertEqual(self.store.open_link_keys(T0 + 1), [])
        got = self.store.get(inv.id)
        self.assertEqual((got.state, got.used_by), (USED, "laptop-9"))

    def test_expiry(self) -> None:
        inv = self.create(ttl_secs=3600)
        self.assertEqual(len(self.store.open_link_keys(T0 + 3599)), 1)
        self.assertEqual(self.store.open_link_keys(T0 + 3600), [])
        self.assertEqual(inv.state_at(T0 + 3600), EXPIRED)
        self.assertFalse(self.store.mark_used(inv.id, "late-1", T0 + 3601))
        self.assertEqual(self.store.get(inv.id).state, EXPIRED)
        self.assertIsNone(self.keys.pending_key(), "an expired invite's pending key is removed")

    def test_pending_key_of_a_newer_invite_survives(self) -> None:
        a = self.create(ttl_secs=60)
        b = self.create(now=T0 + 1)
        self.store.list(T0 + 120)  # a expires
        self.assertEqual(self.store.get(a.id).state, EXPIRED)
        self.assertEqual(self.keys.pending_key(), b.link_psk)

    def test_revoke(self) -> None:
        inv = self.create()
        revoked = self.store.revoke(inv.id, T0 + 1)
        self.assertEqual(revoked.state, REVOKED)
        self.assertEqual(self.store.open_link_keys(T0 + 2), [])
        self.assertIsNone(self.keys.pending_key())
        e = self.assertRaises(InviteNotOpen, self.store.revoke, inv.id, T0 + 3)
        self.assertIn("already revoked", str(e))
        self.assertRaises(InviteNotFound, self.store.revoke, "nope", T0 + 3)

    def test_burn(self) -> None:
        a = self.create()
        b = self.create()
        self.store.mark_used(b.id, "x-1", T0 + 1)
        self.assertEqual(self.store.burn([a.id, b.id, "unknown"], T0 + 2), [a.id])
        self.assertEqual(self.store.get(a.id).state, BURNED)
        self.assertEqual(self.store.get(b.id).state, USED)

    def test_closed_invites_are_forgotten_after_retention(self) -> None:
        inv = self.create()
        self.store.revoke(inv.id, T0 + 1)
        self.assertEqual(len(self.store.list(T0 + CLOSED_RETENTION_SECS)), 1)
        self.assertEqual(self.store.list(T0 + 2 + CLOSED_RETENTION_SECS), [])

    def test_ipv6_invite_has_no_code(self) -> None:
        inv = self.create(host="fe80::1")
        self.assertFalse(inv.has_code)
        self.assertIsNone(inv.relay_code)
        self.assertIsNone(inv.word_phrase)
        self.assertIn("IPv6", inv.not_carried_reason)
        self.assertEqual(codes.parse_link(inv.link).address.host, "fe80::1")
        self.assertEqual(self.store.open_code_invites(T0), [])
        self.assertEqual(len(self.store.open_link_keys(T0)), 1)

    def test_port_9975_invite_has_no_code(self) -> None:
        inv = self.create(port=9975)
        self.assertIsNone(inv.relay_code)
        self.assertIn("9847", inv.not_carried_reason)

    def test_ambiguous_codes_are_never_issued(self) -> None:
        """A relay code whose five groups are all list words would read as a
        phrase; the store draws another password."""
        # Build a code from five list words, then read back what it carries.
        found = None
        for word in WORDS:
            text = f"ace-ace-{word}-ace-bay"
            payload = codes.decode_relay_code(text)
            if codes.not_carried_reason(payload.ip, payload.port) is None:
                found = payload
                break
        assert found is not None
        code = codes.relay_code(found.ip, found.port, found.secret)
        self.assertTrue(relay_code_is_ambiguous(code), code)
        target = found.secret
        draws = iter([bytes(8), target, bytes([1, 2, 3, 4]), bytes(4)])
        store = InviteStore(self.home, random=lambda n: next(draws))
        inv = store.create("me-1", found.ip, found.port, DAY, T0)
        self.assertEqual(inv.code_password, bytes([1, 2, 3, 4]))
        self.assertEqual(detect_join_format(inv.relay_code), RELAY_CODE)

    def test_damaged_file_is_reported_and_kept(self) -> None:
        self.create()
        self.store.path.write_text("{not json", encoding="utf-8")
        e = self.assertRaises(InviteStoreError, self.store.list, T0)
        self.assertIn("damaged", str(e))
        self.assertRaises(InviteStoreError, self.create)
        self.assertEqual(self.store.path.read_text(encoding="utf-8"), "{not json")
        # What the listener calls degrades to "no invites", with a log entry.
        self.assertEqual(self.store.open_link_keys(T0), [])
        self.assertFalse(self.store.mark_used("x", "p-1", T0))

    def test_bad_invite_entry_is_damage(self) -> None:
        inv = self.create()
        data = json.loads(self.store.path.read_text())
        data["invites"][0]["state"] = "weird"
        self.store.path.write_text(json.dumps(data))
        self.assertRaises(InviteStoreError, self.store.get, inv.id)

    def test_public_view_has_no_secrets(self) -> None:
        inv = self.create()
        view = json.dumps(public_view(inv, T0))
        self.assertNotIn(inv.link_psk.hex()[:16], view)
        self.assertNotIn(inv.code_password.hex(), view)
        self.assertNotIn(inv.link_psk.hex()[:8], repr(inv))

    def test_describe_failure(self) -> None:
        for reason in (USED, EXPIRED, BURNED, REVOKED, "wrong_code", "no_invite"):
            self.assertIn(" ", describe_failure(reason))
        self.assertIn("burned", describe_failure("wrong_code"))
        self.assertIn("expired", describe_failure(EXPIRED))
        self.assertIn("refused", describe_failure(None))

    def test_deterministic_random(self) -> None:
        store = InviteStore(self.home, random=Counter())
        a = store.create("me-1", "10.0.0.1", 9900, DAY, T0)
        self.assertEqual(len(a.id), 8)
