"""
A wire fuzzer over the real relay protocol objects (issue 11): arbitrary
bytes and arbitrary frames before and after the handshake, fed to a
listener whose node carries the real hive gossip and delegation layers.

Whatever arrives: no exception escapes ``dataReceived``, what the protocol
buffers stays bounded, and the node keeps serving -- a fresh peer still
authenticates afterwards.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from claudectl.control.server import ControlRegistry
from claudectl.relay import codec
from claudectl.relay.crypto import proof
from claudectl.relay.node import RelayFactory
from claudectl.service.compose import compose_layers
from tests.common import make_node

PEER = "fuzz-peer-01"
PSK = b"f" * 32

MSG_TYPES = [
    codec.CHALLENGE,
    codec.HANDSHAKE,
    codec.HANDSHAKE_ACK,
    codec.HEARTBEAT,
    codec.ACK,
    codec.DELEGATE_TASK,
    codec.TASK_STATUS,
    codec.TASK_HANDOFF,
    codec.TASK_INTERRUPT,
    codec.KNOWLEDGE_SYNC,
    codec.KNOWLEDGE_REQUEST,
    codec.KNOWLEDGE_SNAPSHOT,
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)

payload_keys = st.sampled_from(
    [
        "units",
        "unit",
        "nonce",
        "proof",
        "cnonce",
        "caps",
        "starttls",
        "pake",
        "task_id",
        "prompt",
        "cwd",
        "state",
        "summary",
        "page",
        "total_pages",
        "since_epoch",
        "sync_epoch",
        "ack_id",
        "knowledge",
        "status",
        "kind",
        "message",
        "sessions",
        "worker_id",
    ]
)

payloads = st.dictionaries(payload_keys, json_values, max_size=6) | json_values


@st.composite
def frames(draw: Any) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:  # raw bytes, newline-terminated or not
        return draw(st.binary(max_size=300))
    if kind == 1:  # JSON that is not an envelope
        return json.dumps(draw(json_values)).encode() + b"\n"
    env = {
        "id": draw(st.text(max_size=20) | st.just("msg_1_1")),
        "msg_type": draw(st.sampled_from(MSG_TYPES) | st.text(max_size=10)),
        "from_peer": draw(st.sampled_from([PEER, "", "other-peer"]) | st.text(max_size=10)),
        "timestamp": draw(st.integers(-1, 2**64) | st.just(1)),
        "payload": draw(payloads),
    }
    if kind == 3:  # drop or scramble a member
        env.pop(draw(st.sampled_from(sorted(env))), None)
    return json.dumps(env, ensure_ascii=draw(st.booleans())).encode() + b"\n"


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


class WireFuzzTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.node = make_node(self, "fuzz-listener", self.reactor)
        self.node.keystore.save_key(PEER, PSK)
        self.parent = MultiService()
        compose_layers(self.node, ControlRegistry(), self.parent)
        self.ports = 40000

    def connect(self) -> tuple[Any, StringTransport]:
        self.ports += 1
        proto = RelayFactory(self.node).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", self.ports))
        proto.makeConnection(transport)
        return proto, transport

    def authenticate(self) -> tuple[Any, StringTransport]:
        proto, transport = self.connect()
        challenge = json.loads(transport.value().split(b"\n")[0])
        transport.clear()
        proto.dataReceived(
            codec.encode(
                codec.Envelope(
                    "msg_1_0",
                    codec.HANDSHAKE,
                    PEER,
                    1,
                    {"proof": proof(PSK, challenge["payload"]["nonce"]), "version": "0.64.0"},
                )
            )
        )
        ack = json.loads(transport.value().split(b"\n")[0])
        self.assertEqual(ack["payload"]["status"], "ok")
        return proto, transport

    def assert_still_serving(self) -> None:
        self.reactor.advance(2)  # past the quiet period, timers run
        proto, _transport = self.authenticate()
        self.assertEqual(self.node.mesh.links[PEER].protocol, proto)
        proto.connectionLost()

    def feed(self, proto: Any, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if proto.is_closed or proto.transport.disconnecting:
                break
            proto.dataReceived(chunk)  # must never raise
            self.assertLessEqual(proto._lines.pending, proto.MAX_LENGTH)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.lists(frames(), max_size=12), st.lists(st.integers(0, 10_000), max_size=6))
    def test_before_the_handshake(self, items: list[bytes], cuts: list[int]) -> None:
        proto, transport = self.connect()
        self.feed(proto, chunked(b"".join(items), cuts))
        proto.connectionLost()
        self.assertEqual(self.node.admission.inflight, 0)
        # The fuzzing address may now be cooling down; a fresh one is not.
        self.node.admission = type(self.node.admission)(
            self.reactor.seconds, self.node.config.relay.max_peers
        )
        self.assert_still_serving()

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.lists(frames(), max_size=25), st.lists(st.integers(0, 10_000), max_size=6))
    def test_after_the_handshake(self, items: list[bytes], cuts: list[int]) -> None:
        proto, transport = self.authenticate()
        self.reactor.advance(2)
        self.feed(proto, chunked(b"".join(items), cuts))
        self.reactor.advance(1)
        proto.connectionLost()
        self.assertNotIn(PEER, self.node.mesh.links)
        self.assert_still_serving()
