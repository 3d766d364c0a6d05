"""
The relay link protocol driven byte by byte: StringTransport + Clock for the
edge cases, iosim for two real protocol stacks talking to each other.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from claudectl.control.server import RelayLocator
from claudectl.relay import codec
from claudectl.relay.admission import FIRST_FRAME_TIMEOUT_SECS
from claudectl.relay.crypto import proof, psk_from_code
from claudectl.relay.handshake import MUTUAL, ONEWAY, KeyAuth, listener_proof
from claudectl.relay.node import RelayFactory
from claudectl.relay.protocol import CONNECTOR, LISTENER, ONEWAY_QUIET_SECS, RelayProtocol
from tests.common import make_node, pair_nodes, vector


def frames(transport: StringTransport) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in transport.value().split(b"\n") if line]
    transport.clear()
    return out


def line(
    msg_type: str, payload: Any, from_peer: str = "claude-rs-01", msg_id: str = "msg_1_0"
) -> bytes:
    return codec.encode(codec.Envelope(msg_id, msg_type, from_peer, 1, payload))


class _PakeWaiting:
    """A PAKE responder whose exchange never finishes (for deadlines)."""

    messages = [b"m" * 33]

    def respond(self, joiner_id: str, joiner_msg: bytes) -> _PakeWaiting:
        return self

    def finish(self, confirms: list[bytes]) -> bytes | None:
        return None


class ListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.node = make_node(self, "desk-9f8e7d6c", self.reactor)
        self.psk = psk_from_code("0123-4567-89ab-cdef")
        self.node.keystore.save_key("claude-rs-01", self.psk)
        self.received: list[tuple[str, codec.Envelope]] = []
        self.node.mesh.add_handler(
            codec.KNOWLEDGE_REQUEST, lambda peer, env: self.received.append((peer, env))
        )

    def connect(self, ip: str = "127.0.0.1") -> tuple[RelayProtocol, StringTransport]:
        proto = RelayFactory(self.node).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def authenticate_oneway(
        self,
        proto: RelayProtocol,
        transport: StringTransport,
        peer: str = "claude-rs-01",
        psk: bytes | None = None,
    ) -> dict:
        challenge = frames(transport)[0]
        nonce = challenge["payload"]["nonce"]
        # Exactly what a claudectl 0.64 connector sends: no cnonce, no caps.
        proto.dataReceived(
            line(
                codec.HANDSHAKE,
                {"proof": proof(psk or self.psk, nonce), "version": "0.64.0"},
                from_peer=peer,
            )
        )
        return frames(transport)[0]

    def test_challenge_on_connect(self) -> None:
        _proto, transport = self.connect()
        [challenge] = frames(transport)
        self.assertEqual(challenge["msg_type"], "challenge")
        self.assertEqual(challenge["from_peer"], "")
        self.assertRegex(challenge["payload"]["nonce"], r"^[0-9a-f]{64}$")
        self.assertIn("mutual-v1", challenge["payload"]["caps"])

    def test_claudectl_connector_oneway(self) -> None:
        proto, transport = self.connect()
        ack = self.authenticate_oneway(proto, transport)
        self.assertEqual(ack["msg_type"], "handshake_ack")
        self.assertEqual(ack["payload"], {"status": "ok"})
        self.assertEqual(ack["from_peer"], "desk-9f8e7d6c")
        self.assertEqual(self.node.mesh.connected_peers(), ["claude-rs-01"])
        self.assertEqual(self.node.mesh.peer_mode("claude-rs-01"), ONEWAY)

    def test_wrong_proof_denied_and_closed(self) -> None:
        proto, transport = self.connect()
        ack = self.authenticate_oneway(proto, transport, psk=b"x" * 32)
        self.assertEqual(ack["payload"], {"status": "denied"})
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.node.mesh.connected_peers(), [])

    def test_pending_key_claimed_once(self) -> None:
        pending = psk_from_code("a3f2-9b1c-d4e5-f678")
        self.node.keystore.save_pending_key(pending)
        proto, transport = self.connect()
        ack = self.authenticate_oneway(proto, transport, peer="laptop-1", psk=pending)
        self.assertEqual(ack["payload"]["status"], "ok")
        self.assertEqual(self.node.keystore.key("laptop-1"), pending)
        self.assertIsNone(self.node.keystore.pending_key())
        proto2, transport2 = self.connect()
        ack2 = self.authenticate_oneway(proto2, transport2, peer="laptop-2", psk=pending)
        self.assertEqual(ack2["payload"]["status"], "denied")
        self.assertIsNone(self.node.keystore.key("laptop-2"))

    def test_mutual_proof(self) -> None:
        proto, transport = self.connect()
        nonce = frames(transport)[0]["payload"]["nonce"]
        cnonce = "ab" * 32
        proto.dataReceived(
            line(
                codec.HANDSHAKE, {"proof": proof(self.psk, nonce), "cnonce": cnonce, "version": "x"}
            )
        )
        ack = frames(transport)[0]
        self.assertEqual(ack["payload"]["status"], "ok")
        self.assertEqual(ack["payload"]["sproof"], listener_proof(self.psk, cnonce, nonce))
        self.assertEqual(self.node.mesh.peer_mode("claude-rs-01"), MUTUAL)
        self.assertTrue(self.node.keystore.is_mutual("claude-rs-01"))

    def test_downgrade_refused(self) -> None:
        self.node.keystore.mark_mutual("claude-rs-01")
        proto, transport = self.connect()
        ack = self.authenticate_oneway(proto, transport)
        self.assertEqual(ack["payload"]["status"], "denied")
        self.assertTrue(transport.disconnecting)

    def test_handshake_timeout(self) -> None:
        # A socket that sends nothing has FIRST_FRAME_TIMEOUT_SECS (5 s), not 30.
        _proto, transport = self.connect()
        self.reactor.advance(FIRST_FRAME_TIMEOUT_SECS - 0.1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_whole_handshake_keeps_its_own_deadline(self) -> None:
        self.node = make_node(self, "desk-9f8e7d6c", self.reactor, handshake_timeout_secs=3)
        _proto, transport = self.connect()
        self.reactor.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_wrong_right_wrong_still_blocked(self) -> None:
        """Issue 11 item 4: a success between wrong proofs does not clear the count."""
        ip = "192.0.2.77"
        for _round in range(2):
            for _ in range(4 if _round == 0 else 1):
                proto, transport = self.connect(ip)
                self.assertEqual(
                    self.authenticate_oneway(proto, transport, psk=b"y" * 32)["payload"]["status"],
                    "denied",
                )
                proto.connectionLost()
            if _round == 0:
                proto, transport = self.connect(ip)
                self.assertEqual(
                    self.authenticate_oneway(proto, transport)["payload"]["status"], "ok"
                )
        # The fifth wrong guess within 60 s: the address is refused, the good link stays.
        _p, t = self.connect(ip)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.node.admission.rejections.get("rate_limited"), 1)

    def test_a_flood_of_refused_connections_logs_ten_lines_a_minute(self) -> None:
        """Each refusal is counted; only ten a minute per address get their
        (debug) line: a plain `twistd --logfile` keeps debug lines."""
        from twisted.logger import capturedLogs

        for _ in range(5):
            proto, transport = self.connect("127.0.0.9")
            self.authenticate_oneway(proto, transport, psk=b"y" * 32)
            proto.connectionLost()
        with capturedLogs() as events:
            for _ in range(50):
                _p, t = self.connect("127.0.0.9")
                self.assertEqual(t.value(), b"")  # dropped before any byte
        self.assertEqual(self.node.admission.rejections.get("rate_limited"), 50)
        texts = [e.get("log_format", "") for e in events]
        self.assertEqual(sum("dropped connection" in x for x in texts), 10)
        self.assertEqual(sum("counting, not logging" in x for x in texts), 1)

    def test_garbage_before_handshake_closes_without_ack(self) -> None:
        proto, transport = self.connect()
        frames(transport)
        proto.dataReceived(b"not json\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_rate_limit_after_five_failures(self) -> None:
        for _ in range(5):
            proto, transport = self.connect("127.0.0.9")
            self.authenticate_oneway(proto, transport, psk=b"y" * 32)
            proto.connectionLost()
        proto, transport = self.connect("127.0.0.9")
        self.assertEqual(transport.value(), b"")  # dropped before any byte
        self.assertEqual(self.node.admission.rejections.get("rate_limited"), 1)
        # Another address is not affected.
        _p, t2 = self.connect("127.0.0.10")
        self.assertEqual(frames(t2)[0]["msg_type"], "challenge")
        # After the 60 s cooldown the address may try again.
        self.reactor.advance(61)
        _p, t3 = self.connect("127.0.0.9")
        self.assertEqual(frames(t3)[0]["msg_type"], "challenge")

    def test_max_peers(self) -> None:
        self.node.mesh.max_peers = 1
        self.node.admission.max_peers = 1
        self.node.keystore.save_key("other-peer", self.psk)
        proto, transport = self.connect()
        self.authenticate_oneway(proto, transport)
        # Full: another peer may handshake but is refused after authentication...
        p2, t2 = self.connect()
        self.authenticate_oneway(p2, t2, peer="other-peer")
        self.assertTrue(t2.disconnecting)
        self.assertEqual(self.node.mesh.connected_peers(), ["claude-rs-01"])
        # ... while the connected peer may replace its own link.
        p3, t3 = self.connect()
        self.assertEqual(self.authenticate_oneway(p3, t3)["payload"]["status"], "ok")
        self.assertFalse(t3.disconnecting)
        self.assertTrue(transport.disconnecting)
        # More than two handshakes at once while full: refused at accept.
        held = [self.connect() for _ in range(2)]
        _p4, t4 = self.connect()
        self.assertEqual(t4.value(), b"")
        self.assertEqual(self.node.admission.rejections.get("max_peers"), 1)
        del held

    def test_link_log_lines_say_how_the_link_was_and_how_long(self) -> None:
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            proto, transport = self.connect()
            self.authenticate_oneway(proto, transport)
            self.reactor.advance(2.5)
            proto.close("heartbeat timeout")
            proto.connectionLost()
        [down] = [e for e in events if e["log_format"].startswith("{peer_id} disconnected")]
        self.assertEqual(
            (down["direction"], down["mode"], down["transport"], down["reason"]),
            ("inbound", "oneway", "plaintext", "heartbeat timeout"),
        )
        self.assertGreaterEqual(down["secs"], 0.0)

    def test_max_inflight_handshakes(self) -> None:
        # 16 sockets that are busy handshaking (each just made progress):
        # nothing is sheddable, so a newcomer waits (issue 16's accept
        # pacing): no challenge, its reads paused, nobody shed or refused.
        conns = [self.connect() for _ in range(16)]
        for proto, _t in conns:
            self.node.admission.progress(proto._preauth)
        _p, t = self.connect()
        self.assertEqual(t.value(), b"")
        self.assertFalse(t.disconnecting)
        self.assertEqual(t.producerState, "paused")
        self.assertEqual(self.node.admission.rejections, {})
        self.assertEqual(self.node.admission.inflight, 16)
        # A slot frees: the waiting socket gets its challenge.
        conns[0][0].connectionLost()
        self.reactor.advance(0)
        self.assertEqual(frames(t)[0]["msg_type"], "challenge")
        self.assertEqual(t.producerState, "producing")
        self.assertEqual(self.node.admission.inflight, 16)

    def test_waiting_sockets_take_turns_by_address(self) -> None:
        conns = [self.connect() for _ in range(16)]
        for proto, _t in conns:
            self.node.admission.progress(proto._preauth)
        a = [self.connect("10.0.0.1") for _ in range(3)]
        b = self.connect("10.0.0.2")
        order = []
        for proto, _t in conns[:4]:
            proto.connectionLost()
            self.reactor.advance(0)
            order += [i for i, (_p, t) in enumerate([*a, b]) if t.value() and i not in order]
        # 10.0.0.1, then 10.0.0.2 (its turn), then the rest of 10.0.0.1.
        self.assertEqual(order, [0, 3, 1, 2])

    def test_a_waiting_socket_that_closes_leaves_the_room(self) -> None:
        conns = [self.connect() for _ in range(16)]
        for proto, _t in conns:
            self.node.admission.progress(proto._preauth)
        gone, _t = self.connect("10.0.0.1")
        nxt, t = self.connect("10.0.0.2")
        gone.connectionLost()
        conns[0][0].connectionLost()
        self.reactor.advance(0)
        self.assertEqual(frames(t)[0]["msg_type"], "challenge")
        self.assertEqual(self.node.admission.pacing(self.reactor).waiting, 0)

    def test_a_full_waiting_room_pauses_the_listening_socket(self) -> None:
        from claudectl.relay import admission

        self.patch(admission, "MAX_WAITING", 4)

        class Port:
            reading = True
            connected = True

            def stopReading(self) -> None:
                self.reading = False

            def startReading(self) -> None:
                self.reading = True

        port = Port()
        conns = [self.connect() for _ in range(16)]
        for proto, _t in conns:
            self.node.admission.progress(proto._preauth)
        waiting = []
        for i in range(4):
            proto = RelayFactory(self.node).buildProtocol(None)
            t = StringTransport(peerAddress=IPv4Address("TCP", f"10.0.2.{i}", 40000))
            t.server = port  # type: ignore[attr-defined]  # what tcp.Server has
            proto.makeConnection(t)
            waiting.append(t)
        self.assertFalse(port.reading)
        # Three slots free: three wait no more; below half of the room, accepting resumes.
        for proto, _t in conns[:3]:
            proto.connectionLost()
        self.reactor.advance(0)
        self.assertEqual(sum(1 for t in waiting if t.value()), 3)
        self.assertTrue(port.reading)

    def test_a_socket_waits_at_most_max_wait_secs(self) -> None:
        from claudectl.relay.admission import MAX_WAIT_SECS, WAIT_TICK_SECS

        conns = [self.connect() for _ in range(16)]
        for proto, _t in conns:
            self.node.admission.progress(proto._preauth)
        _p, t = self.connect("10.0.0.1")
        for _ in range(int(MAX_WAIT_SECS / WAIT_TICK_SECS) + 2):
            # The slot holders stay busy (progress) but never finish.
            for proto, _t in conns:
                self.node.admission.progress(proto._preauth)
            self.reactor.advance(WAIT_TICK_SECS)
        self.assertTrue(t.disconnecting or t.disconnected)
        self.assertEqual(t.value(), b"")
        self.assertEqual(self.node.admission.rejections.get("waited_too_long"), 1)

    def test_an_idle_slot_holder_past_the_grace_is_shed_for_a_waiting_socket(self) -> None:
        from claudectl.relay.admission import IDLE_GRACE_SECS

        idle = [self.connect(f"10.0.1.{i}") for i in range(16)]
        _p, t = self.connect("10.0.0.6")
        # Fresh idle sockets (a storm of real peers about to answer) are not shed...
        self.assertEqual(t.value(), b"")
        self.assertFalse(any(i[1].disconnecting for i in idle))
        # ... but once idle past the grace period, they are (slowloris).
        self.reactor.advance(IDLE_GRACE_SECS + 0.1)
        self.assertEqual(frames(t)[0]["msg_type"], "challenge")
        self.assertEqual(sum(1 for i in idle if i[1].disconnecting), 1)
        self.assertEqual(self.node.admission.rejections, {"idle_shed": 1})

    def test_idle_sockets_are_shed_for_a_newcomer(self) -> None:
        """Issue 11 item 3: 16 idle sockets no longer lock every handshake out."""
        idle = [self.connect("127.0.0.5") for _ in range(15)]
        self.reactor.advance(0.5)
        mine = self.connect("127.0.0.1")
        self.reactor.advance(0.5)
        # Full.  A newcomer sheds the oldest idle socket of the most-represented address.
        proto, transport = self.connect("127.0.0.1")
        self.assertIn(b'"msg_type":"challenge"', transport.value())
        self.assertTrue(idle[0][1].disconnected)
        self.assertFalse(mine[1].disconnected)
        self.assertEqual(self.node.admission.rejections, {"idle_shed": 1})
        # The newcomer authenticates; the shed socket's hang-up is no failure.
        self.assertEqual(self.authenticate_oneway(proto, transport)["payload"]["status"], "ok")
        idle[0][0].connectionLost()
        self.assertFalse(self.node.admission.blocked("127.0.0.5"))
        self.assertEqual(self.node.admission.inflight, 15)

    def test_stalled_sockets_are_shed_after_idle_ones(self) -> None:
        conns = [self.connect(f"192.0.2.{i // 4 + 1}") for i in range(16)]
        for proto, _t in conns:
            self.node.admission.progress(proto._preauth)
        self.reactor.advance(1.0)
        _p, t = self.connect("192.0.2.50")
        self.assertEqual(t.value(), b"")  # everyone made progress a second ago
        self.reactor.advance(1.5)  # now all are stalled (STALLED_SECS = 2)
        _p, t = self.connect("192.0.2.50")
        self.assertEqual(frames(t)[0]["msg_type"], "challenge")
        self.assertEqual(sum(1 for _p, tr in conns if tr.disconnected), 1)
        self.assertEqual(self.node.admission.rejections.get("stalled_shed"), 1)

    def test_per_address_cap_sheds_own_idle_socket(self) -> None:
        conns = [self.connect("192.0.2.9") for _ in range(4)]
        _p, t = self.connect("192.0.2.9")
        self.assertEqual(frames(t)[0]["msg_type"], "challenge")
        self.assertTrue(conns[0][1].disconnected)
        self.assertEqual(self.node.admission.preauth_counts(), {"192.0.2.9": 4})

    def authenticated(self) -> tuple[RelayProtocol, StringTransport]:
        proto, transport = self.connect()
        self.authenticate_oneway(proto, transport)
        self.reactor.advance(ONEWAY_QUIET_SECS)
        transport.clear()
        return proto, transport

    def test_bad_lines_skipped_link_survives(self) -> None:
        proto, transport = self.authenticated()
        unknown = (
            b'{"id":"u","msg_type":"pair_request","from_peer":"p","timestamp":1,"payload":{}}\n'
        )
        proto.dataReceived(
            b"{not json}\n"
            + unknown
            + b"\n\n  \n"
            + line(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}, msg_id="m1")
        )
        self.assertEqual(len(self.received), 1)
        self.assertFalse(transport.disconnecting)
        st = self.node.mesh.states["claude-rs-01"]
        self.assertEqual(st.counters.bad_frames, 2)

    def test_repeat_offender_disconnected(self) -> None:
        proto, transport = self.authenticated()
        proto.dataReceived(b"garbage\n" * 20)
        self.assertTrue(transport.disconnecting)
        self.assertIn(
            "bad frames",
            self.node.mesh.states["claude-rs-01"].last_error or proto._closing_reason or "",
        )

    def test_one_valid_frame_every_nineteen_bad_lines_closes_the_link(self) -> None:
        """Issue 11 item 2: a high bad-frame ratio closes the link (and is counted)."""
        proto, transport = self.authenticated()
        for n in range(10):
            if transport.disconnecting:
                break
            proto.dataReceived(
                b"garbage\n" * 19
                + line(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}, msg_id=f"m{n}")
            )
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(n, 4)  # closed within the 64-line window
        self.assertIn("of the last 64 frames were bad", proto._closing_reason or "")
        status = json.loads(RelayLocator(self.node).status()["status_json"])
        self.assertEqual(status["rejections"].get("bad_frame_ratio"), 1)

    def test_bad_frame_log_lines_are_rate_limited(self) -> None:
        """Issue 11 item 2: 835 KB of bad lines no longer become megabytes of log."""
        from twisted.logger import capturedLogs

        proto, transport = self.authenticated()
        bad = b"x" * 400 + b"\n"
        with capturedLogs() as events:
            for n in range(1000):  # ~ 400 KB of bad lines, kept under the ratio limit
                proto.dataReceived(
                    bad + line(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}, msg_id=f"a{n}")
                )
            self.assertFalse(transport.disconnecting)
            proto.connectionLost()
        texts = [e.get("log_format", "") for e in events]
        self.assertEqual(sum(1 for t in texts if t.startswith("bad frame from")), 5)
        summaries = [e for e in events if "were not logged" in e.get("log_format", "")]
        self.assertEqual([e["count"] for e in summaries], [995])
        self.assertLess(sum(len(str(e.get("reason", ""))) for e in events), 5_000)
        status = json.loads(RelayLocator(self.node).status()["status_json"])
        self.assertEqual(status["rejections"].get("log_lines_suppressed"), 995)

    def test_overlong_line_skipped_following_frame_kept(self) -> None:
        proto, transport = self.authenticated()
        big = b"x" * (codec.MAX_LINE_BYTES + 10)
        follow = line(codec.KNOWLEDGE_REQUEST, {"since_epoch": 5}, msg_id="after")
        # The long line split over several chunks, the next frame in the last one.
        proto.dataReceived(big[:600_000])
        proto.dataReceived(big[600_000:] + b"\n" + follow)
        self.reactor.advance(0)
        self.assertEqual([e.id for _, e in self.received], ["after"])
        self.assertFalse(transport.disconnecting)
        # A complete long line followed by a frame in the same chunk.
        follow2 = line(codec.KNOWLEDGE_REQUEST, {"since_epoch": 6}, msg_id="after2")
        proto.dataReceived(big + b"\n" + follow2)
        self.reactor.advance(0)
        self.assertEqual([e.id for _, e in self.received], ["after", "after2"])
        self.assertEqual(self.node.mesh.states["claude-rs-01"].counters.bad_frames, 2)

    def test_dedup(self) -> None:
        proto, _t = self.authenticated()
        frame = line(codec.KNOWLEDGE_REQUEST, {"since_epoch": 0}, msg_id="dup")
        proto.dataReceived(frame + frame)
        self.assertEqual(len(self.received), 1)

    def test_heartbeats_and_death_after_90s(self) -> None:
        proto, transport = self.authenticated()
        self.reactor.advance(30)
        hb = frames(transport)
        self.assertEqual([f["msg_type"] for f in hb], ["heartbeat"])
        self.assertEqual(hb[0]["payload"], {})
        self.assertEqual(hb[0]["from_peer"], "desk-9f8e7d6c")
        # Inbound traffic at t=60 keeps it alive until t=150.
        self.reactor.advance(29)
        proto.dataReceived(line(codec.HEARTBEAT, {}, msg_id="hb1"))
        self.reactor.advance(89)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(3)
        self.assertTrue(transport.disconnecting)

    def test_held_reading_pauses_the_transport_and_not_the_liveness(self) -> None:
        """While the layers above hold a link's reading, the peer's silence is
        ours: the link is not declared dead; the deadline starts again at the release."""
        proto, transport = self.authenticated()
        self.node.mesh.hold_reading("claude-rs-01", True)
        self.assertEqual(transport.producerState, "paused")
        self.node.mesh.hold_reading("claude-rs-01", True)  # idempotent
        self.reactor.advance(300)
        self.assertFalse(transport.disconnecting)
        self.node.mesh.hold_reading("claude-rs-01", False)
        self.assertEqual(transport.producerState, "producing")
        self.reactor.advance(89)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(3)  # now the peer's silence counts again
        self.assertTrue(transport.disconnecting)

    def test_a_held_link_that_closes_is_still_aborted(self) -> None:
        """A held link replaced by a newer one (closed, never released) whose
        peer stops reading: the liveness deadline still aborts it."""
        proto, transport = self.authenticated()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        proto.hold_reading(True)
        proto.close("replaced by a newer link")
        for _ in range(97):  # a second at a time, as a reactor's clock moves
            self.reactor.advance(1)
        self.assertEqual(aborted, [True])

    def test_a_peer_that_does_not_read_is_cut_off(self) -> None:
        """What waits unsent toward a peer is bounded: past MAX_UNSENT_BYTES its
        link is aborted, logged and counted once (review 15: a refusal per
        delegate_task piled up without limit toward a peer that never read)."""
        from twisted.logger import capturedLogs

        from claudectl.relay import protocol as protocol_mod

        self.patch(protocol_mod, "UNSENT_CHECK_BYTES", 1)  # looked at every frame
        proto, transport = self.authenticated()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        transport.dataBuffer = b"x" * (protocol_mod.MAX_UNSENT_BYTES - 100)  # type: ignore[attr-defined]
        env = codec.Envelope("h1", codec.HEARTBEAT, "desk-9f8e7d6c", 1, {})
        with capturedLogs() as events:
            proto.send(env)  # still under the bound with this frame
            self.assertEqual(aborted, [])
            transport.dataBuffer += b"x" * 200  # type: ignore[attr-defined]
            proto.send(env)
            proto.send(env)
        self.assertEqual(aborted, [True, True])
        lines = [e for e in events if "does not read" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        self.assertIn("does not read", proto._closing_reason or "")
        status = json.loads(RelayLocator(self.node).status()["status_json"])
        self.assertEqual(status["rejections"].get("unread_output"), 1)

    def test_the_unsent_bytes_are_looked_at_every_64_kib(self) -> None:
        from claudectl.relay import protocol as protocol_mod

        proto, transport = self.authenticated()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        transport.dataBuffer = b"x" * (protocol_mod.MAX_UNSENT_BYTES + 1)  # type: ignore[attr-defined]
        env = codec.Envelope("h1", codec.HEARTBEAT, "desk-9f8e7d6c", 1, {})
        size = len(codec.encode(env))
        for _ in range(protocol_mod.UNSENT_CHECK_BYTES // size - 1):
            proto.send(env)
        self.assertEqual(aborted, [])
        proto.send(env)
        proto.send(env)
        self.assertEqual(aborted, [True])

    def test_a_closing_link_is_not_held(self) -> None:
        proto, transport = self.authenticated()
        proto.close("replaced by a newer link")
        proto.hold_reading(True)
        self.assertEqual(transport.producerState, "producing")

    def test_heartbeat_each_interval_while_the_peer_talks(self) -> None:
        proto, transport = self.authenticated()
        for k in range(6):
            self.reactor.advance(30)
            self.assertEqual([f["msg_type"] for f in frames(transport)], ["heartbeat"], k)
            proto.dataReceived(line(codec.HEARTBEAT, {}, msg_id=f"hb{k}"))
        self.assertFalse(transport.disconnecting)
        # Late (the reactor was busy for 100 s): one heartbeat, not a burst,
        # and the next on the 30 s grid.
        proto.dataReceived(line(codec.HEARTBEAT, {}, msg_id="late"))
        self.reactor.advance(85)
        self.assertEqual([f["msg_type"] for f in frames(transport)], ["heartbeat"])
        proto.dataReceived(line(codec.HEARTBEAT, {}, msg_id="late2"))
        self.reactor.advance(5)
        self.assertEqual([f["msg_type"] for f in frames(transport)], ["heartbeat"])

    def test_a_close_the_peer_never_lets_finish_is_aborted(self) -> None:
        """A closed link whose peer stops reading: aborted after the liveness deadline."""
        proto, transport = self.authenticated()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        proto.close("replaced by a newer link")
        self.assertTrue(transport.disconnecting)  # ... but connectionLost never comes
        for _ in range(90):  # a second at a time, as a reactor's clock moves
            self.reactor.advance(1)
        self.assertEqual(aborted, [])
        for _ in range(7):
            self.reactor.advance(1)
        self.assertEqual(aborted, [True])

    def test_one_timer_per_link(self) -> None:
        """A handshake runs one timer (both deadlines), a link one (heartbeat, liveness)."""

        def timers(proto: RelayProtocol) -> int:
            return sum(
                1
                for c in self.reactor.getDelayedCalls()
                if getattr(c.func, "__self__", None) is proto
            )

        proto, transport = self.connect()
        self.assertEqual(timers(proto), 1)
        self.authenticate_oneway(proto, transport)
        self.reactor.advance(ONEWAY_QUIET_SECS)
        self.assertEqual(timers(proto), 1)
        proto.connectionLost()
        self.assertEqual(timers(proto), 0)

    def test_first_frame_then_the_whole_deadline(self) -> None:
        """Once the first frame came, the handshake's own deadline (30 s) still holds."""
        # A PAKE start: the handshake waits for the joiner's confirmation.
        self.node.pake = _PakeWaiting()
        proto, transport = self.connect()
        frames(transport)
        proto.dataReceived(
            line(
                codec.HANDSHAKE, {"pake": {"msg": "ab" * 32}, "version": "x"}, from_peer="joiner-1"
            )
        )
        self.assertEqual(frames(transport)[0]["payload"]["status"], "pake")
        self.reactor.advance(FIRST_FRAME_TIMEOUT_SECS + 1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(30 - FIRST_FRAME_TIMEOUT_SECS - 1.1)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_oneway_quiet_period(self) -> None:
        proto, transport = self.connect()
        self.authenticate_oneway(proto, transport)
        self.assertTrue(
            self.node.mesh.send("claude-rs-01", codec.KNOWLEDGE_REQUEST, {"since_epoch": 0})
        )
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(ONEWAY_QUIET_SECS)
        self.assertEqual(frames(transport)[0]["msg_type"], "knowledge_request")

    def test_what_the_quiet_period_holds_back_counts_as_unsent(self) -> None:
        """Review 17: the first second's queue escaped the unread-output bound
        and the paced re-sends that look at it."""
        from claudectl.relay import protocol as protocol_mod

        self.patch(protocol_mod, "MAX_UNSENT_BYTES", 10_000)
        proto, transport = self.connect()
        self.authenticate_oneway(proto, transport)
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        payload = {"since_epoch": 0, "pad": "x" * 3000}
        for _ in range(3):
            self.node.mesh.send("claude-rs-01", codec.KNOWLEDGE_REQUEST, payload)
        self.assertGreater(self.node.mesh.unsent_bytes("claude-rs-01"), 9_000)
        self.assertEqual(aborted, [])
        self.node.mesh.send("claude-rs-01", codec.KNOWLEDGE_REQUEST, payload)
        self.assertEqual(aborted, [True])

    def test_newer_link_replaces_old(self) -> None:
        p1, t1 = self.authenticated()
        p1.dataReceived(line(codec.KNOWLEDGE_REQUEST, {}, msg_id="seen-once"))
        p2, t2 = self.authenticated()
        self.assertTrue(t1.disconnecting)
        p1.connectionLost()
        self.assertEqual(self.node.mesh.connected_peers(), ["claude-rs-01"])
        # Dedup state survived the replacement.
        p2.dataReceived(line(codec.KNOWLEDGE_REQUEST, {}, msg_id="seen-once"))
        self.assertEqual(len(self.received), 1)
        self.assertEqual(self.node.mesh.states["claude-rs-01"].links_replaced, 1)

    def test_vector_handshake_frame_accepted(self) -> None:
        """claudectl's exact handshake frame, against its exact nonce."""
        v = vector("wire.frame.handshake")["expected"]["line"].encode()
        nonce = bytes.fromhex(vector("wire.frame.challenge")["input"]["payload"]["nonce"])
        self.node.random = lambda n: nonce[:n]
        self.node.keystore.save_key("laptop-1a2b3c4d", psk_from_code("0123-4567-89ab-cdef"))
        proto, transport = self.connect()
        frames(transport)
        proto.dataReceived(v)
        ack = frames(transport)[0]
        self.assertEqual(ack["payload"], {"status": "ok"})
        self.assertIn("laptop-1a2b3c4d", self.node.mesh.connected_peers())


class TwoNodesTests(SynchronousTestCase):
    """Two protocol stacks connected in memory."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.a = make_node(self, "alpha-1", self.reactor)
        self.b = make_node(self, "beta-2", self.reactor)
        self.psk = pair_nodes(self.a, self.b)

    def link(self, auth: KeyAuth) -> tuple[RelayProtocol, RelayProtocol, iosim.IOPump]:
        server = RelayProtocol(self.a, LISTENER)
        client = RelayProtocol(self.b, CONNECTOR, auth)
        client.dial_address = "127.0.0.1:9847"  # type: ignore[attr-defined]
        s_t = iosim.FakeTransport(
            server, isServer=True, peerAddress=IPv4Address("TCP", "127.0.0.1", 5000)
        )
        c_t = iosim.FakeTransport(
            client, isServer=False, peerAddress=IPv4Address("TCP", "127.0.0.1", 9847)
        )
        pump = iosim.connect(server, s_t, client, c_t)
        return server, client, pump

    def test_mutual_link_both_ways(self) -> None:
        _s, client, pump = self.link(KeyAuth(self.psk, "alpha-1"))
        pump.flush()
        self.assertEqual(self.successResultOf(client.authenticated), client)
        self.assertEqual(self.a.mesh.peer_mode("beta-2"), MUTUAL)
        self.assertEqual(self.b.mesh.peer_mode("alpha-1"), MUTUAL)
        meta = self.b.keystore.meta("alpha-1")
        assert meta is not None
        self.assertEqual(meta.addr, "127.0.0.1:9847")
        got: list[str] = []
        self.a.mesh.add_handler(codec.KNOWLEDGE_SYNC, lambda p, e: got.append(p))
        self.b.mesh.send("alpha-1", codec.KNOWLEDGE_SYNC, {"units": [], "sync_epoch": 1})
        pump.flush()
        self.assertEqual(got, ["beta-2"])

    def test_link_down_saves_last_seen_without_fsync(self) -> None:
        """The dialer's link-down updates last_seen atomically but without an fsync."""
        _s, client, pump = self.link(KeyAuth(self.psk, "alpha-1"))
        pump.flush()
        before = self.b.keystore.meta("alpha-1")
        assert before is not None
        fsyncs: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            fsyncs.append(fd)
            real_fsync(fd)

        self.patch(os, "fsync", counting_fsync)
        self.reactor.advance(3)
        client.close("test")
        pump.flush()
        self.assertTrue(client.is_closed)
        after = self.b.keystore.meta("alpha-1")
        assert after is not None
        self.assertEqual(after.addr, before.addr)
        self.assertEqual(after.last_seen, before.last_seen + 3000)
        self.assertEqual(fsyncs, [])

    def test_impostor_listener_refused(self) -> None:
        # The listener holds a different key: it cannot produce the sproof...
        self.a.keystore.save_key("beta-2", b"z" * 32)
        _s, client, pump = self.link(KeyAuth(self.psk, "alpha-1"))
        pump.flush()
        self.failureResultOf(client.authenticated)
        self.assertEqual(self.b.mesh.connected_peers(), [])

    def test_identity_mismatch(self) -> None:
        _s, client, pump = self.link(KeyAuth(self.psk, "someone-else"))
        pump.flush()
        f = self.failureResultOf(client.authenticated)
        self.assertIn("remote identity mismatch", str(f.value))


class BothDialTests(SynchronousTestCase):
    """When two peers dial each other at once, both keep the same link."""

    def test_both_sides_keep_the_link_dialed_by_the_smaller_identity(self) -> None:
        reactor = MemoryReactorClock()
        a = make_node(self, "aaa-1", reactor)
        b = make_node(self, "bbb-2", reactor)
        psk = pair_nodes(a, b)

        def link(listener_node: Any, connector_node: Any, expect: str) -> Any:
            server = RelayProtocol(listener_node, LISTENER)
            client = RelayProtocol(connector_node, CONNECTOR, KeyAuth(psk, expect))
            client.dial_address = "127.0.0.1:1"  # type: ignore[attr-defined]
            s_t = iosim.FakeTransport(
                server, isServer=True, peerAddress=IPv4Address("TCP", "127.0.0.1", 5000)
            )
            c_t = iosim.FakeTransport(
                client, isServer=False, peerAddress=IPv4Address("TCP", "127.0.0.1", 1)
            )
            return server, client, iosim.connect(server, s_t, client, c_t)

        # B's dial (B -> A) completes first, then A's (A -> B).
        s1, c1, p1 = link(a, b, "aaa-1")
        p1.flush()
        s2, c2, p2 = link(b, a, "bbb-2")
        p2.flush()
        p1.flush()
        # Both sides kept the link A dialed ("aaa-1" < "bbb-2").
        self.assertIs(a.mesh.links["bbb-2"].protocol, c2)
        self.assertIs(b.mesh.links["aaa-1"].protocol, s2)
        self.assertTrue(c1.is_closed or c1.transport.disconnecting)
