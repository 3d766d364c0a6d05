"""
Tests for claudectl.relay.handshake: the sans-IO listener and connector
machines (wire.md 3), one-way claudectl mode and our mutual mode.

Frames cross between the machines as bytes (encode, then decode), as they
would on a socket.  The listener's keys come from a real KeyStore in a
temporary home.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl import COMPAT_VERSION
from claudectl.relay import codec
from claudectl.relay.codec import Envelope, EnvelopeFactory, MessageIds, decode, encode
from claudectl.relay.crypto import proof, psk_from_code
from claudectl.relay.handshake import (
    CAP_MUTUAL,
    CAP_PAKE,
    MUTUAL,
    ONEWAY,
    Authenticated,
    ConnectorHandshake,
    ConnectorState,
    KeyAuth,
    KeyByIdentity,
    ListenerHandshake,
    ListenerState,
    PakeAuth,
    Policy,
    Step,
    listener_proof,
)
from claudectl.relay.keystore import PENDING, KeyStore
from tests.common import temp_home, vector

PSK = psk_from_code("0123-4567-89ab-cdef")
OTHER_PSK = psk_from_code("a3f2-9b1c-d4e5-f678")
LISTENER_ID = "desk-9f8e7d6c"
CONNECTOR_ID = "laptop-1a2b3c4d"
VECTOR_NONCE = vector("wire.proof.0123_seqnonce")["input"]["nonce"]


def vector_line(name: str) -> bytes:
    return vector(name)["expected"]["line"].encode("utf-8")


def seq_random(n: int) -> bytes:
    """Yields the vector nonce bytes 00 01 .. 1f."""
    return bytes(range(n))


def counter_random():
    state = {"n": 0}

    def rnd(n: int) -> bytes:
        state["n"] += 1
        return bytes([state["n"] % 256]) * n

    return rnd


class StoreKeys:
    """The listener's KeyLookup over a real KeyStore (like node.ListenerKeys)."""

    def __init__(self, ks: KeyStore) -> None:
        self.ks = ks
        self.claims: list[tuple[str, str]] = []
        self.new_keys: list[tuple[str, bytes]] = []
        self.store_ok = True

    def stored_key(self, peer_id: str) -> bytes | None:
        return self.ks.key(peer_id)

    def pending_candidates(self) -> Sequence[tuple[str, bytes]]:
        pending = self.ks.pending_key()
        return [(PENDING, pending)] if pending is not None else []

    def claim(self, peer_id: str, label: str, psk: bytes) -> bool:
        self.claims.append((peer_id, label))
        return label == PENDING and self.ks.claim_pending(peer_id, psk)

    def store_new_key(self, peer_id: str, psk: bytes) -> bool:
        self.new_keys.append((peer_id, psk))
        if self.store_ok:
            self.ks.save_key(peer_id, psk)
        return self.store_ok

    def is_mutual(self, peer_id: str) -> bool:
        return self.ks.is_mutual(peer_id)

    def is_tls(self, peer_id: str) -> bool:
        return self.ks.is_tls(peer_id)

    def closed_candidates(self) -> Sequence[tuple[str, bytes]]:
        return []


class Wire:
    """Mutable wall clock plus envelope factories for both sides."""

    def __init__(self) -> None:
        self.t = 1714000000.0

    def clock(self) -> float:
        return self.t

    def factory(self, identity: str, start: int = 0) -> EnvelopeFactory:
        return EnvelopeFactory(
            identity, clock=self.clock, ids=MessageIds(clock=self.clock, start=start)
        )


def over_the_wire(env: Envelope) -> Envelope:
    return decode(encode(env))


class HandshakeTestBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.ks = KeyStore(self.home)
        self.keys = StoreKeys(self.ks)
        self.wire = Wire()

    def listener(self, random=seq_random, pake=None) -> ListenerHandshake:
        return ListenerHandshake(
            self.wire.factory(LISTENER_ID), self.keys, random=random, pake=pake
        )

    def connector(
        self, auth, is_mutual=lambda _p: False, identity: str = CONNECTOR_ID, random=None
    ) -> ConnectorHandshake:
        return ConnectorHandshake(
            self.wire.factory(identity),
            auth,
            is_mutual=is_mutual,
            random=random or counter_random(),
        )

    def claudectl_handshake(
        self, nonce: str, psk: bytes = PSK, peer: str = CONNECTOR_ID, proof_text: str | None = None
    ) -> Envelope:
        """A handshake exactly as claudectl 0.64 writes it (no cnonce, no caps)."""
        body = {
            "proof": proof(psk, nonce) if proof_text is None else proof_text,
            "version": "0.64.0",
        }
        return over_the_wire(
            Envelope("msg_1714000000050_0", codec.HANDSHAKE, peer, 1714000000050, body)
        )

    def run_pair(
        self, listener: ListenerHandshake, connector: ConnectorHandshake
    ) -> tuple[Step, Step]:
        """Drive both machines to the end; returns (listener step, connector step)."""
        [challenge] = listener.start()
        c_step = connector.receive(over_the_wire(challenge))
        self.assertIsNone(c_step.failed)
        [handshake] = c_step.send
        l_step = listener.receive(over_the_wire(handshake))
        self.assertTrue(l_step.finished)
        [ack] = l_step.send
        return l_step, connector.receive(over_the_wire(ack))

    def assert_denied(self, step: Step, reason_part: str) -> None:
        self.assertIsNone(step.done)
        self.assertIsNotNone(step.failed)
        self.assertIn(reason_part, step.failed)
        [ack] = step.send
        self.assertEqual(ack.msg_type, codec.HANDSHAKE_ACK)
        self.assertEqual(ack.payload["status"], "denied")
        # Only a short reason word may accompany it (claudectl ignores it).
        self.assertLessEqual(set(ack.payload), {"status", "reason"})
        self.assertEqual(ack.from_peer, LISTENER_ID)


class ClaudectlConnectorTests(HandshakeTestBase):
    """Our listener facing a claudectl 0.64 connector (one-way mode)."""

    def test_vector_exchange_byte_for_byte(self) -> None:
        """The wire.md 3.1 frames: the vector's handshake gets the vector's ack."""
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        [challenge] = lis.start()
        self.assertEqual(lis.nonce, VECTOR_NONCE)
        # Our challenge is claudectl's plus a "caps" member claudectl ignores.
        expected = decode(vector_line("wire.frame.challenge"))
        self.assertEqual(challenge.id, expected.id)
        self.assertEqual(challenge.from_peer, "")
        self.assertEqual(challenge.payload["nonce"], expected.payload["nonce"])
        self.assertEqual(challenge.payload["caps"], [CAP_MUTUAL, CAP_PAKE])
        self.wire.t = 1714000000.060
        step = lis.receive(decode(vector_line("wire.frame.handshake")))
        self.assertEqual(step.done, Authenticated(CONNECTOR_ID, PSK, ONEWAY, "stored"))
        [ack] = step.send
        # One-way: the ack has no sproof and is claudectl's frame exactly.
        self.assertEqual(encode(ack), vector_line("wire.frame.handshake_ack_ok"))
        self.assertEqual(lis.state, ListenerState.DONE)
        self.assertEqual(lis.claimed_id, CONNECTOR_ID)

    def test_denied_ack_byte_for_byte(self) -> None:
        self.ks.save_key(CONNECTOR_ID, OTHER_PSK)
        wire = Wire()
        lis = ListenerHandshake(wire.factory(LISTENER_ID, start=2), self.keys, random=seq_random)
        wire.t = 1714000000.060
        # No start(): the id sequence goes straight to 2 for the ack.
        step = lis.receive(decode(vector_line("wire.frame.handshake")))
        self.assertEqual(step.failed, "wrong proof")
        self.assertEqual(
            [encode(e) for e in step.send], [vector_line("wire.frame.handshake_ack_denied")]
        )

    def test_handshake_without_version_id_or_timestamp_content(self) -> None:
        """The listener reads neither version, id nor timestamp."""
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        lis.start()
        env = Envelope("", codec.HANDSHAKE, CONNECTOR_ID, 0, {"proof": proof(PSK, VECTOR_NONCE)})
        self.assertEqual(lis.receive(over_the_wire(env)).done.mode, ONEWAY)

    def test_wrong_proof(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        lis.start()
        self.assert_denied(
            lis.receive(self.claudectl_handshake(lis.nonce, OTHER_PSK)), "wrong proof"
        )
        self.assertEqual(lis.state, ListenerState.DONE)

    def test_uppercase_proof(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        lis.start()
        upper = proof(PSK, lis.nonce).upper()
        self.assert_denied(
            lis.receive(self.claudectl_handshake(lis.nonce, proof_text=upper)), "wrong proof"
        )

    def test_no_key(self) -> None:
        lis = self.listener()
        lis.start()
        self.assert_denied(lis.receive(self.claudectl_handshake(lis.nonce)), "no key for this peer")

    def test_invalid_and_pending_ids(self) -> None:
        self.ks.save_pending_key(PSK)
        for peer in (PENDING, "../peer", "peer/key", "", "a" * 129, "peer\n"):
            with self.subTest(peer):
                lis = self.listener()
                lis.start()
                self.assert_denied(
                    lis.receive(self.claudectl_handshake(lis.nonce, peer=peer)), "invalid peer id"
                )
        # The pending key is untouched.
        self.assertEqual(self.ks.pending_key(), PSK)
        self.assertEqual(self.keys.claims, [])

    def test_proof_missing_or_not_a_string(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        for payload in (
            {},
            {"proof": None},
            {"proof": 5},
            {"proof": [proof(PSK, VECTOR_NONCE)]},
            None,
            [],
            "proof",
        ):
            with self.subTest(payload):
                lis = self.listener()
                lis.start()
                env = Envelope("m", codec.HANDSHAKE, CONNECTOR_ID, 0, payload)
                self.assert_denied(lis.receive(over_the_wire(env)), "proof missing")

    def test_wrong_type(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        lis.start()
        env = Envelope("m", codec.HEARTBEAT, CONNECTOR_ID, 0, {"proof": proof(PSK, lis.nonce)})
        self.assert_denied(lis.receive(env), "expected handshake, got heartbeat")

    def test_after_done(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        lis.start()
        lis.receive(self.claudectl_handshake(lis.nonce))
        again = lis.receive(self.claudectl_handshake(lis.nonce))
        self.assertEqual(again.send, [])
        self.assertEqual(again.failed, "handshake already finished")

    def test_stored_key_only(self) -> None:
        """An id with a stored key cannot use the pending key (re-pairing needs forget)."""
        self.ks.save_key(CONNECTOR_ID, OTHER_PSK)
        self.ks.save_pending_key(PSK)
        lis = self.listener()
        lis.start()
        self.assert_denied(lis.receive(self.claudectl_handshake(lis.nonce, PSK)), "wrong proof")
        self.assertEqual(self.ks.pending_key(), PSK)
        self.assertEqual(self.ks.key(CONNECTOR_ID), OTHER_PSK)

    def test_malformed_stored_key_counts_as_absent(self) -> None:
        self.home.peers.mkdir(parents=True)
        (self.home.peers / f"{CONNECTOR_ID}.key").write_text("not a key")
        self.ks.save_pending_key(PSK)
        lis = self.listener()
        lis.start()
        step = lis.receive(self.claudectl_handshake(lis.nonce))
        self.assertEqual(step.done.via, PENDING)
        self.assertEqual(self.ks.key(CONNECTOR_ID), PSK)

    def test_pending_key_claimed_once(self) -> None:
        self.ks.save_pending_key(PSK)
        (self.home.peers / "_pending.meta").write_text("{}")
        first = self.listener(random=counter_random())
        first.start()
        second = self.listener(random=lambda n: b"\xee" * n)
        second.start()
        step = first.receive(self.claudectl_handshake(first.nonce, peer="laptop-1"))
        self.assertEqual(step.done, Authenticated("laptop-1", PSK, ONEWAY, PENDING))
        self.assertEqual(step.send[0].payload, {"status": "ok"})
        self.assertEqual(self.ks.key("laptop-1"), PSK)
        self.assertIsNone(self.ks.pending_key())
        self.assertFalse((self.home.peers / "_pending.meta").exists())
        # A second claimer with another id is denied: no key any more.
        self.assert_denied(
            second.receive(self.claudectl_handshake(second.nonce, peer="laptop-2")),
            "no key for this peer",
        )
        self.assertIsNone(self.ks.key("laptop-2"))

    def test_pending_claim_race_lost(self) -> None:
        """Both verified against the pending key; only the first claim() wins."""
        self.ks.save_pending_key(PSK)
        a, b = self.listener(random=counter_random()), self.listener(random=lambda n: b"\x07" * n)
        a.start()
        b.start()
        # b has already looked the candidates up when a's claim lands.
        snapshot = list(self.keys.pending_candidates())
        self.keys.pending_candidates = lambda: snapshot  # type: ignore[method-assign]
        self.assertIsNotNone(a.receive(self.claudectl_handshake(a.nonce, peer="laptop-1")).done)
        self.assert_denied(
            b.receive(self.claudectl_handshake(b.nonce, peer="laptop-2")),
            "pending key already claimed",
        )
        self.assertIsNone(self.ks.key("laptop-2"))

    def test_downgrade_refused_by_listener(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        self.ks.mark_mutual(CONNECTOR_ID)
        lis = self.listener()
        lis.start()
        self.assert_denied(
            lis.receive(self.claudectl_handshake(lis.nonce)),
            "downgrade to one-way authentication refused",
        )

    def test_malformed_cnonce_is_one_way(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        for cnonce in ("ABCD" * 16, "ab" * 31, 5, None, "g" * 64):
            with self.subTest(cnonce):
                lis = self.listener()
                lis.start()
                env = Envelope(
                    "m",
                    codec.HANDSHAKE,
                    CONNECTOR_ID,
                    0,
                    {"proof": proof(PSK, lis.nonce), "cnonce": cnonce},
                )
                step = lis.receive(over_the_wire(env))
                self.assertEqual(step.done.mode, ONEWAY)
                self.assertNotIn("sproof", step.send[0].payload)


class ClaudectlListenerTests(HandshakeTestBase):
    """Our connector facing a claudectl 0.64 listener (one-way mode)."""

    def test_vector_exchange(self) -> None:
        con = self.connector(KeyAuth(PSK, expected_peer=LISTENER_ID))
        self.assertEqual(con.state, ConnectorState.AWAIT_CHALLENGE)
        step = con.receive(decode(vector_line("wire.frame.challenge")))
        [hs] = step.send
        self.assertEqual(hs.msg_type, codec.HANDSHAKE)
        self.assertEqual(hs.from_peer, CONNECTOR_ID)
        self.assertEqual(
            hs.payload["proof"], vector("wire.frame.handshake")["input"]["payload"]["proof"]
        )
        self.assertEqual(hs.payload["version"], COMPAT_VERSION)
        self.assertEqual(hs.payload["cnonce"], con.cnonce)
        self.assertEqual(len(con.cnonce), 64)
        self.assertEqual(con.remote_caps, [])
        done = con.receive(decode(vector_line("wire.frame.handshake_ack_ok")))
        self.assertEqual(done.done, Authenticated(LISTENER_ID, PSK, ONEWAY, "stored"))
        self.assertEqual(done.send, [])
        self.assertEqual(con.state, ConnectorState.DONE)

    def test_first_contact_takes_ack_identity(self) -> None:
        con = self.connector(KeyAuth(PSK))
        con.receive(decode(vector_line("wire.frame.challenge")))
        self.assertEqual(
            con.receive(decode(vector_line("wire.frame.handshake_ack_ok"))).done.peer_id,
            LISTENER_ID,
        )

    def test_denied(self) -> None:
        con = self.connector(KeyAuth(PSK))
        con.receive(decode(vector_line("wire.frame.challenge")))
        step = con.receive(decode(vector_line("wire.frame.handshake_ack_denied")))
        self.assertEqual(step.failed, "handshake denied: denied")
        self.assertIsNone(step.done)
        self.assertEqual(con.state, ConnectorState.DONE)

    def test_status_missing_or_odd(self) -> None:
        for payload, reason in (
            ({}, "handshake denied: unknown"),
            (None, "handshake denied: unknown"),
            ({"status": 1}, "handshake denied: unknown"),
            ({"status": "OK"}, "handshake denied: OK"),
            ({"status": "pake"}, "handshake denied: pake"),
        ):
            with self.subTest(payload):
                con = self.connector(KeyAuth(PSK))
                con.receive(decode(vector_line("wire.frame.challenge")))
                ack = Envelope("m", codec.HANDSHAKE_ACK, LISTENER_ID, 0, payload)
                self.assertEqual(con.receive(over_the_wire(ack)).failed, reason)

    def test_expected_ack_got_other(self) -> None:
        con = self.connector(KeyAuth(PSK))
        con.receive(decode(vector_line("wire.frame.challenge")))
        step = con.receive(decode(vector_line("wire.frame.heartbeat")))
        self.assertEqual(step.failed, "expected handshake_ack, got heartbeat")

    def test_challenge_missing_nonce(self) -> None:
        for payload in ({}, None, {"nonce": 5}, {"nonce": None}, [VECTOR_NONCE]):
            with self.subTest(payload):
                con = self.connector(KeyAuth(PSK))
                step = con.receive(over_the_wire(Envelope("m", codec.CHALLENGE, "", 0, payload)))
                self.assertEqual(step.failed, "challenge missing nonce")
                self.assertEqual(step.send, [])

    def test_challenge_type_not_checked(self) -> None:
        """Like claudectl, only payload.nonce matters in the first frame."""
        con = self.connector(KeyAuth(PSK))
        step = con.receive(Envelope("m", codec.HEARTBEAT, "", 0, {"nonce": "x"}))
        self.assertEqual(step.send[0].payload["proof"], proof(PSK, "x"))

    def test_identity_mismatch(self) -> None:
        con = self.connector(KeyAuth(PSK, expected_peer="desk-00000000"))
        con.receive(decode(vector_line("wire.frame.challenge")))
        step = con.receive(decode(vector_line("wire.frame.handshake_ack_ok")))
        self.assertIsNone(step.done)
        self.assertEqual(
            step.failed, f"remote identity mismatch: expected desk-00000000, got {LISTENER_ID}"
        )

    def test_invalid_listener_identity(self) -> None:
        for remote in ("", PENDING, "../x"):
            with self.subTest(remote):
                con = self.connector(KeyAuth(PSK))
                con.receive(decode(vector_line("wire.frame.challenge")))
                ack = Envelope("m", codec.HANDSHAKE_ACK, remote, 0, {"status": "ok"})
                self.assertIn("invalid identity", con.receive(over_the_wire(ack)).failed)

    def test_downgrade_refused_by_connector(self) -> None:
        con = self.connector(
            KeyAuth(PSK, expected_peer=LISTENER_ID), is_mutual=lambda p: p == LISTENER_ID
        )
        con.receive(decode(vector_line("wire.frame.challenge")))
        step = con.receive(decode(vector_line("wire.frame.handshake_ack_ok")))
        self.assertIsNone(step.done)
        self.assertEqual(
            step.failed, f"downgrade refused: {LISTENER_ID} has authenticated mutually before"
        )

    def test_after_done(self) -> None:
        con = self.connector(KeyAuth(PSK))
        con.receive(decode(vector_line("wire.frame.challenge")))
        con.receive(decode(vector_line("wire.frame.handshake_ack_ok")))
        self.assertEqual(
            con.receive(decode(vector_line("wire.frame.handshake_ack_ok"))).failed,
            "handshake already finished",
        )


class MutualTests(HandshakeTestBase):
    """Both sides of this project: the listener proves the key too."""

    def test_mutual_stored_key(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis = self.listener()
        con = self.connector(KeyAuth(PSK, expected_peer=LISTENER_ID))
        l_step, c_step = self.run_pair(lis, con)
        self.assertEqual(l_step.done, Authenticated(CONNECTOR_ID, PSK, MUTUAL, "stored"))
        self.assertEqual(c_step.done, Authenticated(LISTENER_ID, PSK, MUTUAL, "stored"))
        ack = l_step.send[0]
        self.assertEqual(ack.payload["status"], "ok")
        self.assertEqual(ack.payload["sproof"], listener_proof(PSK, con.cnonce, lis.nonce))
        self.assertEqual(ack.payload["caps"], [CAP_MUTUAL, CAP_PAKE])
        self.assertEqual(con.remote_caps, [CAP_MUTUAL, CAP_PAKE])

    def test_listener_proof_differs_from_connector_proof(self) -> None:
        """The reverse proof cannot be replayed from the forward one."""
        n = "ab" * 32
        self.assertNotEqual(listener_proof(PSK, n, n), proof(PSK, n))
        self.assertNotEqual(
            listener_proof(PSK, "a" * 64, "b" * 64), listener_proof(PSK, "b" * 64, "a" * 64)
        )

    def test_mutual_peer_stays_mutual(self) -> None:
        """A peer marked mutual passes again in mutual mode (no false downgrade)."""
        self.ks.save_key(CONNECTOR_ID, PSK)
        self.ks.mark_mutual(CONNECTOR_ID)
        l_step, c_step = self.run_pair(
            self.listener(), self.connector(KeyAuth(PSK), is_mutual=lambda _p: True)
        )
        self.assertEqual((l_step.done.mode, c_step.done.mode), (MUTUAL, MUTUAL))

    def test_mutual_pending_claim(self) -> None:
        self.ks.save_pending_key(PSK)
        l_step, c_step = self.run_pair(self.listener(), self.connector(KeyAuth(PSK)))
        self.assertEqual(l_step.done, Authenticated(CONNECTOR_ID, PSK, MUTUAL, PENDING))
        self.assertEqual(c_step.done.mode, MUTUAL)
        self.assertEqual(self.ks.key(CONNECTOR_ID), PSK)

    def test_connector_rejects_bad_sproof(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        lis, con = self.listener(), self.connector(KeyAuth(PSK))
        [challenge] = lis.start()
        [hs] = con.receive(over_the_wire(challenge)).send
        good = lis.receive(over_the_wire(hs)).send[0]
        sproof = good.payload["sproof"]
        for bad in (
            sproof.upper(),
            sproof[:-1] + ("0" if sproof[-1] != "0" else "1"),
            "",
            listener_proof(OTHER_PSK, con.cnonce, lis.nonce),
            proof(PSK, lis.nonce),
            "é" * 64,
        ):
            with self.subTest(bad):
                c2 = self.connector(KeyAuth(PSK), random=lambda n: bytes.fromhex(con.cnonce))
                c2.receive(over_the_wire(challenge))
                ack = Envelope(
                    good.id,
                    good.msg_type,
                    good.from_peer,
                    good.timestamp,
                    {**good.payload, "sproof": bad},
                )
                step = c2.receive(over_the_wire(ack))
                self.assertIsNone(step.done)
                self.assertEqual(step.failed, "the listener could not prove it holds the key")

    def test_impostor_listener_cannot_claim_mutual(self) -> None:
        """A listener without the key can only ack one-way, which a mutual peer refuses."""
        con = self.connector(KeyAuth(PSK, expected_peer=LISTENER_ID), is_mutual=lambda _p: True)
        con.receive(over_the_wire(Envelope("m", codec.CHALLENGE, "", 0, {"nonce": "0" * 64})))
        step = con.receive(
            over_the_wire(Envelope("m", codec.HANDSHAKE_ACK, LISTENER_ID, 0, {"status": "ok"}))
        )
        self.assertIsNone(step.done)


# --- PAKE paths, with stand-ins for claudectl.pairing.pake -------------------------


@dataclass
class FakeResponse:
    messages: list[bytes]
    psk: bytes
    finished: list[list[bytes]]

    def finish(self, confirms: list[bytes]) -> bytes | None:
        self.finished.append(confirms)
        return self.psk if confirms == [b"C" + m for m in self.messages] else None


class FakeResponder:
    def __init__(self, psk: bytes | None) -> None:
        self.psk = psk
        self.responded: list[tuple[str, bytes]] = []
        self.finished: list[list[bytes]] = []

    def respond(self, joiner_id: str, joiner_msg: bytes) -> FakeResponse | None:
        self.responded.append((joiner_id, joiner_msg))
        if self.psk is None:
            return None
        return FakeResponse([b"B1", b"B2"], self.psk, self.finished)


class FakeInitiator:
    def __init__(self, psks: list[bytes], corrupt: bool = False) -> None:
        self.psks = psks
        self.corrupt = corrupt

    def start(self) -> bytes:
        return b"A"

    def confirmations(self, listener_messages: list[bytes]) -> list[bytes]:
        if self.corrupt:
            return [b"X" for _ in listener_messages]
        return [b"C" + m for m in listener_messages]

    def candidate_psks(self) -> list[bytes]:
        return self.psks


class PakeTests(HandshakeTestBase):
    def exchange(self, lis: ListenerHandshake, con: ConnectorHandshake) -> tuple[Step, Step]:
        [challenge] = lis.start()
        [hs1] = con.receive(over_the_wire(challenge)).send
        self.assertEqual(hs1.payload["pake"], {"msg": b"A".hex()})
        l1 = lis.receive(over_the_wire(hs1))
        if l1.finished:
            return l1, Step()
        self.assertEqual(lis.state, ListenerState.AWAIT_PAKE_CONFIRM)
        [reply] = l1.send
        self.assertEqual(
            reply.payload, {"status": "pake", "pake": {"msgs": [b"B1".hex(), b"B2".hex()]}}
        )
        [hs2] = con.receive(over_the_wire(reply)).send
        l2 = lis.receive(over_the_wire(hs2))
        [ack] = l2.send
        return l2, con.receive(over_the_wire(ack))

    def test_pake_success(self) -> None:
        new = b"n" * 32
        responder = FakeResponder(new)
        l_step, c_step = self.exchange(
            self.listener(pake=responder), self.connector(PakeAuth(FakeInitiator([OTHER_PSK, new])))
        )
        self.assertEqual(l_step.done, Authenticated(CONNECTOR_ID, new, MUTUAL, "pake"))
        self.assertEqual(c_step.done, Authenticated(LISTENER_ID, new, MUTUAL, "pake"))
        self.assertEqual(responder.responded, [(CONNECTOR_ID, b"A")])
        self.assertEqual(self.ks.key(CONNECTOR_ID), new)

    def test_wrong_code(self) -> None:
        l_step, c_step = self.exchange(
            self.listener(pake=FakeResponder(b"n" * 32)),
            self.connector(PakeAuth(FakeInitiator([b"n" * 32], corrupt=True))),
        )
        self.assert_denied(l_step, "wrong_code")
        self.assertEqual(c_step.failed, "handshake denied: denied (wrong_code)")
        self.assertIsNone(self.ks.key(CONNECTOR_ID))

    def test_no_open_invite(self) -> None:
        l_step, _ = self.exchange(
            self.listener(pake=FakeResponder(None)), self.connector(PakeAuth(FakeInitiator([])))
        )
        self.assert_denied(l_step, "no open invite")

    def test_listener_without_pake(self) -> None:
        l_step, _ = self.exchange(
            self.listener(pake=None), self.connector(PakeAuth(FakeInitiator([])))
        )
        self.assert_denied(l_step, "short-code pairing is not available")

    def test_already_paired_id(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        responder = FakeResponder(b"n" * 32)
        l_step, _ = self.exchange(
            self.listener(pake=responder), self.connector(PakeAuth(FakeInitiator([])))
        )
        self.assert_denied(l_step, "already paired")
        self.assertEqual(responder.responded, [])
        self.assertEqual(self.ks.key(CONNECTOR_ID), PSK)

    def test_connector_refuses_claudectl_listener(self) -> None:
        con = self.connector(PakeAuth(FakeInitiator([])))
        step = con.receive(decode(vector_line("wire.frame.challenge")))
        self.assertEqual(step.send, [])
        self.assertIn("does not support short codes", step.failed)

    def test_malformed_pake_message(self) -> None:
        for msg in ("zz", "", 5, None, "00" * 1025):
            with self.subTest(msg):
                lis = self.listener(pake=FakeResponder(b"n" * 32))
                lis.start()
                env = Envelope("m", codec.HANDSHAKE, CONNECTOR_ID, 0, {"pake": {"msg": msg}})
                self.assert_denied(lis.receive(over_the_wire(env)), "malformed pake message")

    def test_confirm_from_other_id(self) -> None:
        lis = self.listener(pake=FakeResponder(b"n" * 32))
        lis.start()
        lis.receive(Envelope("m", codec.HANDSHAKE, CONNECTOR_ID, 0, {"pake": {"msg": "41"}}))
        step = lis.receive(
            Envelope(
                "m",
                codec.HANDSHAKE,
                "someone-else",
                0,
                {"pake": {"confirm": []}, "cnonce": "0" * 64},
            )
        )
        self.assert_denied(step, "peer id changed")

    def test_confirm_without_cnonce_stores_nothing(self) -> None:
        """A failed pairing leaves no key behind (and does not consume the invite)."""
        responder = FakeResponder(b"n" * 32)
        lis = self.listener(pake=responder)
        lis.start()
        lis.receive(Envelope("m", codec.HANDSHAKE, CONNECTOR_ID, 0, {"pake": {"msg": "41"}}))
        step = lis.receive(
            Envelope(
                "m",
                codec.HANDSHAKE,
                CONNECTOR_ID,
                0,
                {"pake": {"confirm": [b"CB1".hex(), b"CB2".hex()]}},
            )
        )
        self.assert_denied(step, "without cnonce")
        self.assertIsNone(self.ks.key(CONNECTOR_ID))
        self.assertEqual(self.keys.new_keys, [])
        self.assertEqual(responder.finished, [])

    def test_store_failure_denies(self) -> None:
        self.keys.store_ok = False
        l_step, c_step = self.exchange(
            self.listener(pake=FakeResponder(b"n" * 32)),
            self.connector(PakeAuth(FakeInitiator([b"n" * 32]))),
        )
        self.assert_denied(l_step, "could not store")
        self.assertIsNotNone(c_step.failed)

    def test_malformed_pake_reply(self) -> None:
        for pake in (
            None,
            {},
            {"msgs": []},
            {"msgs": ["zz"]},
            {"msgs": [5]},
            {"msgs": ["00"] * 65},
        ):
            with self.subTest(pake):
                con = self.connector(PakeAuth(FakeInitiator([])))
                con.receive(
                    Envelope("m", codec.CHALLENGE, "", 0, {"nonce": "0" * 64, "caps": [CAP_PAKE]})
                )
                step = con.receive(
                    Envelope(
                        "m", codec.HANDSHAKE_ACK, LISTENER_ID, 0, {"status": "pake", "pake": pake}
                    )
                )
                self.assertEqual(step.failed, "malformed pake reply")

    def test_initiator_error_is_a_failure(self) -> None:
        class Boom(FakeInitiator):
            def confirmations(self, listener_messages: list[bytes]) -> list[bytes]:
                raise ValueError("bad point")

        con = self.connector(PakeAuth(Boom([])))
        con.receive(Envelope("m", codec.CHALLENGE, "", 0, {"nonce": "0" * 64, "caps": [CAP_PAKE]}))
        step = con.receive(
            Envelope(
                "m",
                codec.HANDSHAKE_ACK,
                LISTENER_ID,
                0,
                {"status": "pake", "pake": {"msgs": ["00"]}},
            )
        )
        self.assertEqual(step.failed, "pake failed: bad point")

    def test_ok_without_sproof_refused(self) -> None:
        con = self.connector(PakeAuth(FakeInitiator([b"n" * 32])))
        con.receive(Envelope("m", codec.CHALLENGE, "", 0, {"nonce": "0" * 64, "caps": [CAP_PAKE]}))
        step = con.receive(Envelope("m", codec.HANDSHAKE_ACK, LISTENER_ID, 0, {"status": "ok"}))
        self.assertEqual(step.failed, "the listener did not confirm the pairing")


# --- robustness -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
handshake_payloads = (
    st.dictionaries(
        st.sampled_from(["proof", "cnonce", "caps", "version", "pake", "x"]),
        json_values
        | st.fixed_dictionaries({}, optional={"msg": json_values, "confirm": json_values}),
        max_size=5,
    )
    | json_values
)


class KeyByIdentityTests(HandshakeTestBase):
    """
    The connector picks one key by the identity a TLS listener announces in
    its challenge; toward a listener that announces none it uses the node's
    fallback rule.  Never a search through the keys.
    """

    EXPORTER = b"\x42" * 32

    def tls_listener(self) -> ListenerHandshake:
        return ListenerHandshake(
            self.wire.factory(LISTENER_ID), self.keys, random=seq_random, policy=Policy(tls=True)
        )

    def tls_connector(self, auth: object) -> ConnectorHandshake:
        return ConnectorHandshake(
            self.wire.factory(CONNECTOR_ID),
            auth,  # type: ignore[arg-type]
            random=counter_random(),
            policy=Policy(tls=True),
        )

    def by_identity(
        self, keys: dict[str, bytes], fallback: object = "no fallback here"
    ) -> tuple[KeyByIdentity, list]:
        looked_up: list[str] = []
        chosen: list[tuple[str, str]] = []

        def key_for(peer: str) -> bytes | None:
            looked_up.append(peer)
            return keys.get(peer)

        auth = KeyByIdentity(
            key_for,
            lambda: fallback,  # type: ignore[arg-type,return-value]
            lambda peer, how: chosen.append((peer, how)),
        )
        return auth, [looked_up, chosen]

    def run_tls(
        self, listener: ListenerHandshake, connector: ConnectorHandshake
    ) -> tuple[Step, Step]:
        [challenge] = listener.start()
        self.assertEqual(challenge.payload["identity"], LISTENER_ID)
        c1 = connector.receive(over_the_wire(challenge))
        self.assertIsNone(c1.failed)
        # The connector switches right behind its starttls frame; no answer.
        self.assertTrue(c1.start_tls)
        [starttls] = c1.send
        l1 = listener.receive(over_the_wire(starttls))
        self.assertTrue(l1.start_tls)
        self.assertEqual(l1.send, [])
        listener.tls_established(self.EXPORTER)
        c3 = connector.tls_established(self.EXPORTER)
        [handshake] = c3.send
        l2 = listener.receive(over_the_wire(handshake))
        [ok] = l2.send
        return l2, connector.receive(over_the_wire(ok))

    def test_key_of_the_announced_identity(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        auth, (looked_up, chosen) = self.by_identity({LISTENER_ID: PSK, "other-1": OTHER_PSK})
        l_step, c_step = self.run_tls(self.tls_listener(), self.tls_connector(auth))
        self.assertEqual(l_step.done, Authenticated(CONNECTOR_ID, PSK, MUTUAL, "stored", "tls1.3"))
        assert c_step.done is not None
        self.assertEqual((c_step.done.peer_id, c_step.done.transport), (LISTENER_ID, "tls1.3"))
        # One lookup, of the announced identity; no other key was tried.
        self.assertEqual(looked_up, [LISTENER_ID])
        self.assertEqual(chosen, [(LISTENER_ID, "announced")])

    def test_no_key_for_the_announced_identity_sends_nothing(self) -> None:
        auth, (looked_up, _) = self.by_identity({"other-1": OTHER_PSK})
        listener = self.tls_listener()
        [challenge] = listener.start()
        step = self.tls_connector(auth).receive(over_the_wire(challenge))
        self.assertEqual(step.send, [])
        assert step.failed is not None
        self.assertIn(f"is {LISTENER_ID}, a peer this instance is not paired with", step.failed)
        self.assertEqual(looked_up, [LISTENER_ID])

    def test_invalid_announced_identity_refused(self) -> None:
        auth, (looked_up, _) = self.by_identity({})
        challenge = Envelope(
            "msg_1_0",
            codec.CHALLENGE,
            "",
            1,
            {"nonce": "ab" * 32, "caps": ["mutual-v1", "tls-v1"], "identity": "../../etc/passwd"},
        )
        step = self.tls_connector(auth).receive(over_the_wire(challenge))
        self.assertEqual(
            (step.send, step.failed), ([], "the listener announced an invalid identity")
        )
        self.assertEqual(looked_up, [])

    def test_listener_cannot_switch_identity_after_announcing(self) -> None:
        # The final ack must come from the identity the challenge announced
        # (and the proofs bind that identity too).
        auth, _ = self.by_identity({LISTENER_ID: PSK})
        connector = self.tls_connector(auth)
        challenge = Envelope(
            "msg_1_0",
            codec.CHALLENGE,
            "",
            1,
            {"nonce": "ab" * 32, "caps": ["mutual-v1", "tls-v1"], "identity": LISTENER_ID},
        )
        first = connector.receive(over_the_wire(challenge))
        self.assertIsNone(first.failed)
        self.assertTrue(first.start_tls)
        self.assertFalse(connector.tls_established(self.EXPORTER).failed)
        ack = Envelope(
            "msg_1_1", codec.HANDSHAKE_ACK, "someone-else", 1, {"status": "ok", "sproof": "00" * 32}
        )
        step = connector.receive(over_the_wire(ack))
        assert step.failed is not None
        self.assertIn("mismatch", step.failed)

    def test_claudectl_listener_gets_the_fallback_key(self) -> None:
        # A claudectl 0.64 listener: plaintext, no identity in the challenge.
        self.ks.save_key(CONNECTOR_ID, PSK)
        auth, (looked_up, chosen) = self.by_identity({}, fallback=(LISTENER_ID, PSK))
        l_step, c_step = self.run_pair(self.listener(), self.connector(auth))
        assert l_step.done is not None and c_step.done is not None
        self.assertEqual(c_step.done.peer_id, LISTENER_ID)
        self.assertEqual(looked_up, [])
        self.assertEqual(chosen, [(LISTENER_ID, "fallback")])

    def test_claudectl_listener_without_fallback_fails_clearly(self) -> None:
        auth, _ = self.by_identity({LISTENER_ID: PSK}, fallback="no paired peer was seen there")
        [challenge] = self.listener().start()
        step = self.connector(auth).receive(over_the_wire(challenge))
        self.assertEqual((step.send, step.failed), ([], "no paired peer was seen there"))

    def test_identity_ignored_without_tls(self) -> None:
        # Over plaintext the announcement picks no key: the fallback does.
        auth, (looked_up, chosen) = self.by_identity(
            {"liar-1": OTHER_PSK}, fallback=(LISTENER_ID, PSK)
        )
        challenge = Envelope(
            "msg_1_0",
            codec.CHALLENGE,
            "",
            1,
            {"nonce": "ab" * 32, "caps": ["mutual-v1"], "identity": "liar-1"},
        )
        step = self.connector(auth).receive(over_the_wire(challenge))
        self.assertIsNone(step.failed)
        self.assertEqual((looked_up, chosen), ([], [(LISTENER_ID, "fallback")]))

    def test_known_peer_at_a_wrong_address_fails_before_sending(self) -> None:
        # KeyAuth for X, but the listener there announces Y: nothing is sent.
        [challenge] = self.tls_listener().start()
        step = self.tls_connector(KeyAuth(PSK, "desk-x")).receive(over_the_wire(challenge))
        self.assertEqual(step.send, [])
        assert step.failed is not None
        self.assertIn(f"the listener at this address is {LISTENER_ID}, not desk-x", step.failed)


class RobustnessTests(HandshakeTestBase):
    @given(
        st.sampled_from(codec.MSG_TYPES),
        st.text(max_size=12),
        handshake_payloads,
        handshake_payloads,
    )
    def test_listener_never_raises(self, msg_type, peer, payload1, payload2) -> None:
        lis = self.listener(pake=FakeResponder(b"n" * 32))
        lis.start()
        for payload in (payload1, payload2):
            step = lis.receive(Envelope("m", msg_type, peer, 0, payload))
            self.assertIsInstance(step, Step)
            for env in step.send:
                encode(env)

    @given(
        handshake_payloads,
        st.sampled_from(codec.MSG_TYPES),
        st.text(max_size=12),
        handshake_payloads,
    )
    def test_connector_never_raises(self, challenge, msg_type, remote, ack) -> None:
        for auth in (KeyAuth(PSK), PakeAuth(FakeInitiator([PSK]))):
            con = self.connector(auth)
            step = con.receive(Envelope("m", codec.CHALLENGE, "", 0, challenge))
            for env in step.send:
                encode(env)
            step = con.receive(Envelope("m", msg_type, remote, 0, ack))
            self.assertIsInstance(step, Step)

    @given(
        st.dictionaries(
            st.sampled_from(["nonce", "caps", "identity", "x"]),
            json_values | st.just(["tls-v1"]) | st.just("ab" * 32) | st.just(LISTENER_ID),
            max_size=4,
        ),
        st.sampled_from(codec.MSG_TYPES),
        st.text(max_size=12),
        handshake_payloads,
    )
    def test_key_by_identity_never_raises(self, challenge, msg_type, remote, ack) -> None:
        auth = KeyByIdentity(
            lambda p: PSK if p == LISTENER_ID else None, lambda: (LISTENER_ID, PSK)
        )
        con = ConnectorHandshake(
            self.wire.factory(CONNECTOR_ID), auth, random=counter_random(), policy=Policy(tls=True)
        )
        step = con.receive(Envelope("m", codec.CHALLENGE, "", 0, challenge))
        for env in step.send:
            encode(env)
        step = con.receive(Envelope("m", msg_type, remote, 0, ack))
        self.assertIsInstance(step, Step)

    @given(st.integers(0, 63), st.sampled_from("0123456789abcdefABCDEF"))
    def test_any_changed_proof_char_denied(self, i: int, c: str) -> None:
        if self.ks.key(CONNECTOR_ID) is None:  # setUp runs once for all examples
            self.ks.save_key(CONNECTOR_ID, PSK)
        good = proof(PSK, VECTOR_NONCE)
        if good[i] == c:
            return
        lis = self.listener()
        lis.start()
        bad = good[:i] + c + good[i + 1 :]
        self.assert_denied(
            lis.receive(self.claudectl_handshake(lis.nonce, proof_text=bad)), "wrong proof"
        )


class EarlyTLSTests(HandshakeTestBase):
    """
    Toward a peer with a ``.tls`` marker the connector sends ``starttls`` (and
    its ClientHello) before the challenge comes; the challenge is still
    checked before any proof is made, and binds the proofs as always.
    """

    EXPORTER = b"\x42" * 32

    def tls_listener(self) -> ListenerHandshake:
        return ListenerHandshake(
            self.wire.factory(LISTENER_ID), self.keys, random=seq_random, policy=Policy(tls=True)
        )

    def early_connector(
        self, tls_peers: tuple[str, ...] = (LISTENER_ID,), own: tuple[str, ...] = ()
    ) -> ConnectorHandshake:
        return ConnectorHandshake(
            self.wire.factory(CONNECTOR_ID),
            KeyAuth(PSK, LISTENER_ID),
            random=counter_random(),
            is_tls=lambda peer: peer in tls_peers,
            policy=Policy(tls=True, is_own_nonce=lambda n: n in own),
        )

    def test_early_starttls_then_the_challenge_then_proofs(self) -> None:
        self.ks.save_key(CONNECTOR_ID, PSK)
        listener, connector = self.tls_listener(), self.early_connector()
        early = connector.early_tls()
        assert early is not None
        self.assertTrue(early.start_tls)
        [starttls] = early.send
        self.assertEqual(starttls.payload["starttls"], "tls-v1")
        # The listener's challenge went out at accept; the starttls frame
        # reaches a listener of any version in its usual state.
        [challenge] = listener.start()
        l1 = listener.receive(over_the_wire(starttls))
        self.assertTrue(l1.start_tls)
        c1 = connector.receive(over_the_wire(challenge))
        self.assertEqual((c1.send, c1.failed, c1.start_tls), ([], None, False))
        listener.tls_established(self.EXPORTER)
        [handshake] = connector.tls_established(self.EXPORTER).send
        l2 = listener.receive(over_the_wire(handshake))
        self.assertEqual(l2.done, Authenticated(CONNECTOR_ID, PSK, MUTUAL, "stored", "tls1.3"))
        [ack] = l2.send
        c2 = connector.receive(over_the_wire(ack))
        assert c2.done is not None
        self.assertEqual((c2.done.peer_id, c2.done.transport), (LISTENER_ID, "tls1.3"))

    def test_only_toward_a_known_tls_peer(self) -> None:
        self.assertIsNone(self.early_connector(tls_peers=()).early_tls())
        plain = ConnectorHandshake(
            self.wire.factory(CONNECTOR_ID),
            KeyAuth(PSK, LISTENER_ID),
            random=counter_random(),
            is_tls=lambda _p: True,
        )
        self.assertIsNone(plain.early_tls())  # this node does not speak TLS
        first_contact = ConnectorHandshake(
            self.wire.factory(CONNECTOR_ID),
            KeyAuth(PSK, None),
            random=counter_random(),
            is_tls=lambda _p: True,
            policy=Policy(tls=True),
        )
        self.assertIsNone(first_contact.early_tls())

    def early_then(self, challenge: Envelope, **kw: Any) -> Step:
        connector = self.early_connector(**kw)
        self.assertIsNotNone(connector.early_tls())
        return connector.receive(over_the_wire(challenge))

    def test_reflected_challenge_is_refused(self) -> None:
        [challenge] = self.tls_listener().start()
        step = self.early_then(challenge, own=(challenge.payload["nonce"],))
        self.assertTrue(step.reflected)
        self.assertIn("reflection attempt", step.failed or "")

    def test_listener_without_tls_is_a_downgrade(self) -> None:
        [challenge] = self.listener().start()
        step = self.early_then(challenge)
        self.assertIn("downgrade refused", step.failed or "")

    def test_another_identity_at_the_address_is_refused(self) -> None:
        other = ListenerHandshake(
            self.wire.factory("other-1234"), self.keys, random=seq_random, policy=Policy(tls=True)
        )
        [challenge] = other.start()
        step = self.early_then(challenge)
        self.assertIn("the listener at this address is other-1234, not", step.failed or "")

    def test_tls_before_the_challenge_fails(self) -> None:
        connector = self.early_connector()
        self.assertIsNotNone(connector.early_tls())
        step = connector.tls_established(self.EXPORTER)
        self.assertEqual(step.send, [])
        self.assertIn("before the listener's challenge", step.failed or "")
