"""Tests for claudectl.pairing.pake: SPAKE2 over one-time invite codes."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.pairing.invites import (
    BURNED,
    EXPIRED,
    OPEN,
    REVOKED,
    USED,
    InviteStore,
    describe_failure,
    invite_selector,
)
from claudectl.pairing.pake import (
    PakeError,
    PakeInitiator,
    PakeResponder,
    derive_psk,
    joiner_confirmation,
    listener_confirmation,
)
from claudectl.relay.keystore import KeyStore
from tests.common import temp_home, wrong_password_naming

T0 = 1_714_000_000.0
DAY = 86400


class PakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.store = InviteStore(self.home)
        self.clock = Clock()
        self.clock.advance(T0)
        self.responder = PakeResponder(self.store, self.clock)

    def invite(self, ttl: int = DAY) -> Any:
        return self.store.create("desk-1", "192.168.1.50", 9900, ttl, self.clock.seconds())

    def attempt(self, password: bytes, joiner: str = "laptop-1") -> tuple[Any, Any, bytes | None]:
        """One full exchange; (initiator, response, psk from finish)."""
        init = PakeInitiator(password)
        response = self.responder.respond(joiner, init.start())
        if response is None:
            return init, None, None
        confirms = init.confirmations(response.messages)
        return init, response, response.finish(confirms)

    def test_success(self) -> None:
        inv = self.invite()
        init, response, psk = self.attempt(inv.code_password)
        self.assertIsNotNone(psk)
        self.assertEqual(len(psk), 32)
        self.assertEqual(init.candidate_psks(), [psk])
        self.assertIsNone(response.failure)
        self.assertEqual(response.invite_id, inv.id)
        got = self.store.get(inv.id)
        self.assertEqual((got.state, got.used_by), (USED, "laptop-1"))
        # The key is neither the code nor the link key, and never repeats.
        self.assertNotIn(inv.code_password, psk)
        self.assertNotEqual(psk, inv.link_psk)
        inv2 = self.invite()
        _, _, psk2 = self.attempt(inv2.code_password)
        self.assertNotEqual(psk, psk2)

    def test_wrong_code_burns(self) -> None:
        inv = self.invite()
        wrong = wrong_password_naming(inv.code_password)  # a typo that still names it
        init, response, psk = self.attempt(wrong)
        self.assertIsNone(psk)
        self.assertEqual(response.failure, "wrong_code")
        self.assertEqual(self.store.get(inv.id).state, BURNED)
        self.assertNotIn(init.candidate_psks()[0], (inv.link_psk,))
        # The right code no longer works: one online guess per code -- and the
        # joiner is told why.
        _, response, psk = self.attempt(inv.code_password)
        self.assertIsNone(psk)
        self.assertEqual(response.failure, BURNED)

    def test_wrong_code_burns_only_the_invite_it_names(self) -> None:
        """Issue 11 item 5a: one junk code no longer burns every open invite."""
        invites = [self.invite() for _ in range(3)]
        self.assertEqual(len({i.selector for i in invites}), 3)
        _, response, psk = self.attempt(wrong_password_naming(invites[1].code_password))
        self.assertIsNone(psk)
        self.assertEqual(len(response.messages), 1)
        self.assertEqual(response.failure, "wrong_code")
        self.assertEqual([self.store.get(i.id).state for i in invites], [OPEN, BURNED, OPEN])
        # The others still pair.
        self.assertIsNotNone(self.attempt(invites[0].code_password)[2])
        self.assertIsNotNone(self.attempt(invites[2].code_password)[2])

    def test_junk_code_naming_no_invite_burns_nothing(self) -> None:
        invites = [self.invite() for _ in range(3)]
        taken = {i.selector for i in invites}
        junk = [
            p
            for p in (n.to_bytes(4, "big") for n in range(2000))
            if invite_selector(p) not in taken
        ][:50]
        real = self.responder.respond("laptop-1", PakeInitiator(invites[0].code_password).start())
        for password in junk:
            _, response, psk = self.attempt(password)
            self.assertIsNone(psk)
            self.assertEqual(response.failure, "wrong_code")
            # A decoy looks like a real answer: one message of the same size.
            self.assertEqual([len(m) for m in response.messages], [len(m) for m in real.messages])
        self.assertEqual({self.store.get(i.id).state for i in invites}, {OPEN})

    def test_unusable_message_refused_alike_whatever_the_selector(self) -> None:
        """No oracle: a junk SPAKE2 element is refused the same way, named invite or not."""
        inv = self.invite()
        junk = b"A" + b"\xff" * 32
        other = (inv.selector + 1) % 256
        self.assertIsNone(self.responder.respond("laptop-1", bytes([2, inv.selector]) + junk))
        self.assertIsNone(self.responder.respond("laptop-1", bytes([2, other]) + junk))
        self.assertEqual(self.store.get(inv.id).state, OPEN)

    def test_joiner_from_before_selectors_is_refused_without_burning(self) -> None:
        from spake2 import SPAKE2_A

        inv = self.invite()
        old_style = SPAKE2_A(
            b"claudectl-pake-v1:password:" + inv.code_password,
            idA=b"claudectl-pake-v1:joiner",
            idB=b"claudectl-pake-v1:listener",
        ).start()
        response = self.responder.respond("laptop-1", old_style)
        self.assertEqual(len(response.messages), 1)
        self.assertIsNone(response.finish([bytes(32)]))
        self.assertEqual(response.failure, "outdated")
        self.assertEqual(self.store.get(inv.id).state, OPEN)

    def test_joiner_answers_exactly_one_listener_message(self) -> None:
        """An impostor inviter gets one offline guess, not one per message it sends."""
        init = PakeInitiator(b"abcd")
        init.start()
        e = self.assertRaises(
            PakeError, init.confirmations, [self._listener_msg(), self._listener_msg()]
        )
        self.assertIn("2 PAKE messages", str(e))
        self.assertEqual(init.candidate_psks(), [])

    def test_selectors_of_answered_invites_are_unique(self) -> None:
        made = [self.invite() for _ in range(60)]
        self.assertEqual(len({i.selector for i in made}), 60)
        # Every one of them pairs with its own code, and only its own invite is used.
        inv = made[17]
        init, response, psk = self.attempt(inv.code_password)
        self.assertIsNotNone(psk)
        self.assertEqual(response.invite_id, inv.id)
        self.assertEqual(sum(1 for i in made if self.store.get(i.id).state == USED), 1)

    def test_no_confirmations_burn(self) -> None:
        inv = self.invite()
        init = PakeInitiator(inv.code_password)
        response = self.responder.respond("laptop-1", init.start())
        self.assertIsNone(response.finish([]))
        self.assertEqual(self.store.get(inv.id).state, BURNED)

    def test_several_outstanding(self) -> None:
        a, b, c = (self.invite() for _ in range(3))
        init, response, psk = self.attempt(b.code_password)
        self.assertIsNotNone(psk)
        self.assertEqual(len(response.messages), 1)
        self.assertIn(psk, init.candidate_psks())
        self.assertEqual(init.candidate_psks().count(psk), 1)
        self.assertEqual([self.store.get(i.id).state for i in (a, b, c)], [OPEN, USED, OPEN])

    def test_expired(self) -> None:
        inv = self.invite(ttl=60)
        self.clock.advance(61)
        _, response, psk = self.attempt(inv.code_password)
        self.assertIsNone(psk)
        self.assertEqual(response.failure, EXPIRED)
        self.assertEqual(self.store.get(inv.id).state_at(self.clock.seconds()), EXPIRED)

    def test_expired_while_other_invites_open(self) -> None:
        old = self.invite(ttl=60)
        self.clock.advance(61)
        fresh = self.invite()
        _, response, psk = self.attempt(old.code_password)
        self.assertIsNone(psk)
        self.assertEqual(response.failure, EXPIRED)
        self.assertIn("expired", describe_failure(response.failure))
        # Knowing an old code is not a wrong guess: the open invite survives.
        self.assertEqual(self.store.get(fresh.id).state, OPEN)

    def test_reused_invite(self) -> None:
        inv = self.invite()
        other = self.invite()
        self.assertIsNotNone(self.attempt(inv.code_password)[2])
        _, response, psk = self.attempt(inv.code_password, joiner="laptop-2")
        self.assertIsNone(psk)
        self.assertEqual(response.failure, USED)
        self.assertEqual(self.store.get(inv.id).used_by, "laptop-1")
        self.assertEqual(self.store.get(other.id).state, OPEN)

    def test_reused_invite_alone(self) -> None:
        inv = self.invite()
        self.assertIsNotNone(self.attempt(inv.code_password)[2])
        _, response, psk = self.attempt(inv.code_password, joiner="laptop-2")
        self.assertIsNone(psk)
        self.assertEqual(response.failure, USED)

    def test_burned_invite_is_reported(self) -> None:
        inv = self.invite()
        self.attempt(wrong_password_naming(inv.code_password))
        other = self.invite()
        _, response, psk = self.attempt(inv.code_password)
        self.assertIsNone(psk)
        self.assertEqual(response.failure, BURNED)
        self.assertEqual(self.store.get(other.id).state, OPEN)

    def test_revoked_between_messages(self) -> None:
        inv = self.invite()
        init = PakeInitiator(inv.code_password)
        response = self.responder.respond("laptop-1", init.start())
        confirms = init.confirmations(response.messages)
        self.store.revoke(inv.id, self.clock.seconds())
        self.assertIsNone(response.finish(confirms))
        self.assertEqual(response.failure, REVOKED)

    def test_two_joiners_race(self) -> None:
        inv = self.invite()
        first, second = PakeInitiator(inv.code_password), PakeInitiator(inv.code_password)
        r1 = self.responder.respond("laptop-1", first.start())
        r2 = self.responder.respond("laptop-2", second.start())
        self.assertIsNotNone(r1.finish(first.confirmations(r1.messages)))
        self.assertIsNone(r2.finish(second.confirmations(r2.messages)))
        self.assertEqual(r2.failure, USED)
        self.assertEqual(self.store.get(inv.id).used_by, "laptop-1")

    def test_finish_only_once(self) -> None:
        inv = self.invite()
        init = PakeInitiator(inv.code_password)
        response = self.responder.respond("laptop-1", init.start())
        confirms = init.confirmations(response.messages)
        self.assertIsNotNone(response.finish(confirms))
        self.assertIsNone(response.finish(confirms))

    def test_no_code_invites(self) -> None:
        self.assertIsNone(self.responder.respond("laptop-1", PakeInitiator(b"abcd").start()))
        self.store.create("desk-1", "fe80::1", 9847, DAY, T0)  # IPv6: no code
        self.assertIsNone(self.responder.respond("laptop-1", PakeInitiator(b"abcd").start()))

    def test_malformed_joiner_message(self) -> None:
        inv = self.invite()
        sel = bytes([2, inv.selector])
        for msg in (b"", b"B" + bytes(32), b"x" * 5000, b"\x02", sel, sel + b"A" + b"\xff" * 32):
            self.assertIsNone(self.responder.respond("laptop-1", msg), msg[:4])
        for msg in (b"A", b"A" + b"\xff" * 32):  # old style: refused at finish
            response = self.responder.respond("laptop-1", msg)
            self.assertIsNone(response.finish([]))
            self.assertEqual(response.failure, "outdated")
        self.assertEqual(self.store.get(inv.id).state, OPEN, "a malformed message is no guess")

    def test_malformed_listener_messages(self) -> None:
        for bad in ([], [b""], [b"B" + b"\xff" * 32], [b"junk", self._listener_msg()]):
            init = PakeInitiator(b"abcd")
            init.start()
            self.assertRaises(PakeError, init.confirmations, bad)
        # A message reflected back to us is unusable too.
        init = PakeInitiator(b"abcd")
        reflected = init.start()
        self.assertRaises(PakeError, init.confirmations, [reflected])

    def _listener_msg(self) -> bytes:
        from spake2 import SPAKE2_B

        return SPAKE2_B(b"whatever").start()

    def test_initiator_misuse(self) -> None:
        init = PakeInitiator(b"abcd")
        self.assertRaises(PakeError, init.confirmations, [b"x"])
        init.start()
        self.assertRaises(PakeError, init.start)
        self.assertRaises(ValueError, PakeInitiator, b"abc")

    def test_derivations_are_distinct(self) -> None:
        key, a, b = bytes(32), b"A1", b"B2"
        values = {
            joiner_confirmation(key, a, b),
            listener_confirmation(key, a, b),
            derive_psk(key, a, b),
            derive_psk(key, b, a),
        }
        self.assertEqual(len(values), 4)

    def test_pending_link_key_dropped_after_code_use(self) -> None:
        """Single use across formats: using the code kills the link too."""
        inv = self.invite()
        keys = KeyStore(self.home)
        self.assertEqual(keys.pending_key(), inv.link_psk)
        self.assertIsNotNone(self.attempt(inv.code_password)[2])
        self.assertIsNone(keys.pending_key())
        self.assertEqual(self.store.open_link_keys(self.clock.seconds()), [])


class WithHandshake(SynchronousTestCase):
    """The PAKE through the relay core's handshake machines (the contract)."""

    def setUp(self) -> None:
        from claudectl.relay import handshake

        self.hs = handshake

    def run_handshake(self, password: bytes, store: InviteStore, clock: Clock) -> Any:
        from claudectl.relay.codec import EnvelopeFactory

        stored: dict[str, bytes] = {}

        class Keys:
            def stored_key(self, peer_id: str) -> bytes | None:
                return stored.get(peer_id)

            def pending_candidates(self) -> list[tuple[str, bytes]]:
                return []

            def claim(self, peer_id: str, label: str, psk: bytes) -> bool:
                return False

            def store_new_key(self, peer_id: str, psk: bytes) -> bool:
                stored[peer_id] = psk
                return True

            def is_mutual(self, peer_id: str) -> bool:
                return False

            def is_tls(self, peer_id: str) -> bool:
                return False

            def closed_candidates(self) -> list[tuple[str, bytes]]:
                return []

        listener = self.hs.ListenerHandshake(
            EnvelopeFactory("desk-1", clock.seconds), Keys(), pake=PakeResponder(store, clock)
        )
        connector = self.hs.ConnectorHandshake(
            EnvelopeFactory("laptop-1", clock.seconds), self.hs.PakeAuth(PakeInitiator(password))
        )
        outbox = listener.start()
        side, other = connector, listener
        result: dict[str, Any] = {}
        for _ in range(10):
            if not outbox:
                break
            step = None
            for env in outbox:
                step = side.receive(env)
            assert step is not None
            if step.done is not None or step.failed is not None:
                result[side is listener and "listener" or "connector"] = step
            outbox = step.send
            side, other = other, side
        return result, stored

    def test_short_code_pairs_both_sides(self) -> None:
        clock = Clock()
        clock.advance(T0)
        store = InviteStore(temp_home(self))
        inv = store.create("desk-1", "192.168.1.50", 9900, DAY, T0)
        result, stored = self.run_handshake(inv.code_password, store, clock)
        self.assertIsNotNone(result["listener"].done)
        self.assertIsNotNone(result["connector"].done)
        self.assertEqual(result["listener"].done.psk, result["connector"].done.psk)
        self.assertEqual(stored["laptop-1"], result["listener"].done.psk)
        self.assertEqual(result["connector"].done.peer_id, "desk-1")
        self.assertEqual(store.get(inv.id).state, USED)

    def test_wrong_short_code_is_denied_and_burns(self) -> None:
        clock = Clock()
        clock.advance(T0)
        store = InviteStore(temp_home(self))
        inv = store.create("desk-1", "192.168.1.50", 9900, DAY, T0)
        result, stored = self.run_handshake(wrong_password_naming(inv.code_password), store, clock)
        self.assertIsNotNone(result["listener"].failed)
        self.assertEqual(stored, {})
        self.assertEqual(store.get(inv.id).state, BURNED)
