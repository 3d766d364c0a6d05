"""Tests for claudectl.relay.codec: the NDJSON envelope (wire.md 1-2)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay import codec
from claudectl.relay.codec import (
    HEARTBEAT,
    MAX_LINE_BYTES,
    MAX_TIMESTAMP,
    Envelope,
    EnvelopeFactory,
    MessageIds,
    ProtocolError,
    decode,
    encode,
)
from tests.common import vector, vectors

FRAME_VECTORS = {n: v for n, v in vectors("wire", "COMPAT").items() if n.startswith("wire.frame.")}
PARSE_VECTORS = {n: v for n, v in vectors("wire", "COMPAT").items() if n.startswith("wire.parse.")}


def _env_from_input(inp: dict) -> Envelope:
    return Envelope(inp["id"], inp["msg_type"], inp["from_peer"], inp["timestamp"], inp["payload"])


class FrameVectorTests(SynchronousTestCase):
    """Every wire.frame.* vector: our encoder writes claudectl's exact bytes."""

    def test_vectors_present(self) -> None:
        self.assertGreaterEqual(len(FRAME_VECTORS), 8)

    def test_encode_byte_for_byte(self) -> None:
        for name, v in FRAME_VECTORS.items():
            with self.subTest(name):
                line = encode(_env_from_input(v["input"]))
                self.assertEqual(line, v["expected"]["line"].encode("utf-8"), name)

    def test_vector_frames_decode_back(self) -> None:
        for name, v in FRAME_VECTORS.items():
            with self.subTest(name):
                env = decode(v["expected"]["line"].encode("utf-8"))
                self.assertEqual(env, _env_from_input(v["input"]), name)

    def test_relay_message_roundtrip(self) -> None:
        v = vector("wire.frame.relay_message_roundtrip")
        self.assertTrue(v["expected"]["roundtrips"])
        env = _env_from_input(v["input"])
        self.assertEqual(decode(encode(env)), env)

    def test_session_heartbeat_payload_keys_sorted(self) -> None:
        v = vector("wire.frame.session_heartbeat")
        env = _env_from_input(v["input"])
        # The input dict lists worker_id first; the frame must sort the keys.
        self.assertEqual(list(env.payload)[0], "worker_id")
        line = encode(env).decode("utf-8")
        self.assertLess(line.index('"sessions"'), line.index('"timestamp":1714000030000,"w'))
        self.assertLess(line.index('"timestamp":1714000030000,"w'), line.index('"worker_id"'))

    def test_heartbeat_vectors_decode(self) -> None:
        """Both heartbeat shapes claudectl knows are valid frames for us."""
        for name in (
            "wire.heartbeat.stores_worker_state",
            "wire.heartbeat.empty_payload_liveness_only",
        ):
            payload = vector(name)["input"]["payload"]
            line = encode(Envelope("msg_1", codec.HEARTBEAT, "worker-01", 1, payload))
            env = decode(line)
            self.assertEqual(env.msg_type, "heartbeat")
            self.assertEqual(env.payload, payload)
        stored = vector("wire.heartbeat.stores_worker_state")
        payload = decode(
            encode(Envelope("m", "heartbeat", "w", 1, stored["input"]["payload"]))
        ).payload
        self.assertEqual(payload["worker_id"], stored["expected"]["worker_id"])
        self.assertEqual(len(payload["sessions"]), stored["expected"]["session_count"])
        self.assertNotIn(
            "sessions", vector("wire.heartbeat.empty_payload_liveness_only")["input"]["payload"]
        )


class ParseVectorTests(SynchronousTestCase):
    """Every wire.parse.* vector: accepted lines decode, rejected ones raise ProtocolError."""

    def test_vectors_present(self) -> None:
        self.assertGreaterEqual(len(PARSE_VECTORS), 15)

    def test_parse_vectors(self) -> None:
        for name, v in PARSE_VECTORS.items():
            line = v["input"]["line"].encode("utf-8")
            with self.subTest(name):
                if v["expected"]["claudectl_accepts"]:
                    env = decode(line)
                    self.assertEqual(
                        (env.id, env.msg_type, env.from_peer, env.timestamp),
                        ("m", "ack", "p", 1),
                        name,
                    )
                else:
                    self.assertRaises(ProtocolError, decode, line)

    def test_payload_null_is_none(self) -> None:
        env = decode(vector("wire.parse.payload_null")["input"]["line"].encode())
        self.assertIsNone(env.payload)

    def test_extra_member_ignored(self) -> None:
        env = decode(vector("wire.parse.extra_member")["input"]["line"].encode())
        self.assertEqual(env.payload, {})

    def test_with_trailing_newline_and_crlf(self) -> None:
        line = vector("wire.parse.ok")["input"]["line"].encode()
        self.assertEqual(decode(line + b"\n"), decode(line))
        self.assertEqual(decode(line + b"\r\n"), decode(line))


class EncodeTests(SynchronousTestCase):
    def test_member_order_and_compact(self) -> None:
        line = encode(Envelope("i", "ack", "p", 7, {"b": 1, "a": {"d": 2, "c": [3]}}))
        self.assertEqual(
            line,
            b'{"id":"i","msg_type":"ack","from_peer":"p","timestamp":7,'
            b'"payload":{"a":{"c":[3],"d":2},"b":1}}\n',
        )

    def test_escaping_like_serde(self) -> None:
        """Only quote, backslash and controls are escaped; non-ASCII, '/', DEL raw."""
        env = Envelope("i", "ack", "p", 0, {"s": 'q"b\\/\x7f\u2028é\U0001f600\n\t\x01'})
        line = encode(env)
        self.assertIn('"s":"q\\"b\\\\/\x7f\u2028é\U0001f600\\n\\t\\u0001"'.encode("utf-8"), line)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"}\n"))

    def test_float_zero_keeps_point(self) -> None:
        self.assertIn(b'"x":0.0', encode(Envelope("i", "ack", "p", 0, {"x": 0.0})))
        self.assertIn(b'"y":1.0', encode(Envelope("i", "ack", "p", 0, {"y": 1.0})))

    def test_refuses_unknown_type(self) -> None:
        self.assertRaises(ValueError, encode, Envelope("i", "HandshakeAck", "p", 0, {}))

    def test_refuses_bad_timestamps(self) -> None:
        for ts in (-1, MAX_TIMESTAMP + 1, 1.0, True, "1"):
            with self.subTest(ts):
                self.assertRaises(ValueError, encode, Envelope("i", "ack", "p", ts, {}))

    def test_max_timestamp_ok(self) -> None:
        env = Envelope("i", "ack", "p", MAX_TIMESTAMP, {})
        self.assertEqual(decode(encode(env)), env)

    def test_refuses_nan(self) -> None:
        self.assertRaises(ValueError, encode, Envelope("i", "ack", "p", 0, {"x": float("nan")}))


class DecodeTests(SynchronousTestCase):
    ok = b'{"id":"m","msg_type":"ack","from_peer":"p","timestamp":1,"payload":%s}'

    def test_msg_types_vector(self) -> None:
        self.assertEqual(list(codec.MSG_TYPES), vector("wire.msg_types")["expected"]["msg_types"])
        self.assertEqual(len(set(codec.MSG_TYPES)), 12)

    def test_every_type_accepted(self) -> None:
        for t in codec.MSG_TYPES:
            env = Envelope("m", t, "p", 1, {})
            self.assertEqual(decode(encode(env)), env)

    def test_rejections(self) -> None:
        bad = [
            b"",
            b"   ",
            b"\n",
            b"[1,2]",
            b'"x"',
            b"null",
            b"{",
            b"\xff\xfe",
            b'["m","ack","p",1,{}]',  # claudectl oddity; we never rely on it
            b'{"id":"m","msg_type":"ack","from_peer":"p","timestamp":true,"payload":{}}',
            b'{"id":"m","msg_type":null,"from_peer":"p","timestamp":1,"payload":{}}',
            b'{"msg_type":"ack","from_peer":"p","timestamp":1,"payload":{}}',
            b'{"id":"m","msg_type":"ack","timestamp":1,"payload":{}}',
            self.ok % b"NaN",
            self.ok % b"Infinity",
            self.ok % b"-Infinity",
            self.ok % b'{"a":1,"a":2}',  # duplicate member at depth
            self.ok % b"{}\n{}",
        ]
        for line in bad:
            with self.subTest(line):
                self.assertRaises(ProtocolError, decode, line)

    def test_non_finite_numbers_rejected(self) -> None:
        """serde_json refuses 1e400; a frame we accept must re-encode."""
        self.assertRaises(ProtocolError, decode, self.ok % b'{"x":1e400}')
        self.assertRaises(ProtocolError, decode, self.ok % b'{"x":-1e400}')
        self.assertEqual(decode(self.ok % b'{"x":1e300}').payload, {"x": 1e300})

    def test_lone_surrogate_rejected(self) -> None:
        """serde_json refuses lone surrogate escapes; they could not be re-encoded."""
        self.assertRaises(ProtocolError, decode, self.ok % b'{"x":"\\ud800"}')
        self.assertRaises(ProtocolError, decode, self.ok % b'["\\udc00"]')
        self.assertRaises(
            ProtocolError,
            decode,
            b'{"id":"\\ud83d","msg_type":"ack","from_peer":"p","timestamp":1,"payload":{}}',
        )
        self.assertRaises(ProtocolError, decode, self.ok % b'{"\\udfff":1}')
        # A proper pair is fine, and so is an escaped backslash before "ud800".
        self.assertEqual(decode(self.ok % b'{"x":"\\ud83d\\ude00"}').payload, {"x": "\U0001f600"})
        self.assertEqual(decode(self.ok % b'{"x":"\\\\ud800"}').payload, {"x": "\\ud800"})

    def test_big_int_and_deep_nesting(self) -> None:
        self.assertRaises(ProtocolError, decode, self.ok % (b"[" * 100000 + b"]" * 100000))
        self.assertRaises(ProtocolError, decode, self.ok % (b"9" * 5000))

    def test_line_length_limit(self) -> None:
        head = b'{"id":"m","msg_type":"ack","from_peer":"p","timestamp":1,"payload":{"x":"'
        tail = b'"}}'
        pad = MAX_LINE_BYTES - len(head) - len(tail)
        exact = head + b"a" * pad + tail
        self.assertEqual(len(exact), MAX_LINE_BYTES)
        self.assertEqual(len(decode(exact + b"\n").payload["x"]), pad)
        longer = head + b"a" * (pad + 1) + tail
        with self.assertRaises(ProtocolError) as cm:
            decode(longer)
        self.assertIn("too long", str(cm.exception))
        # A \r counts towards the limit (wire.md 1).
        self.assertRaises(ProtocolError, decode, exact + b"\r\n")

    def test_duplicate_members_refused_anywhere_in_a_big_page(self) -> None:
        # The check is one dict() and a length compare per object: every
        # object of a snapshot-sized payload is still checked, and the error
        # names the member.
        unit = {"id": "ku_1", "content": {"type": "pattern", "conditions": []}, "version": 1}
        units = [dict(unit, id=f"ku_{i}") for i in range(2000)]
        page = json.dumps({"page": 1, "total_pages": 1, "units": units}, separators=(",", ":"))
        line = self.ok % page.encode()
        env = decode(line)
        self.assertEqual(len(env.payload["units"]), 2000)
        self.assertEqual(env.wire_bytes, len(line))
        head, _, tail = line.rpartition(b'"version":1}]')
        last_version_twice = head + b'"version":1,"version":2}]' + tail
        head, _, tail = line.rpartition(b'"conditions":[]}')
        deep_type_twice = head + b'"conditions":[],"type":"x"}' + tail
        for bad in (last_version_twice, deep_type_twice):
            with self.assertRaises(ProtocolError) as cm:
                decode(bad)
            self.assertIn("duplicate member", str(cm.exception))
        # The same value twice is a duplicate too; a key repeated in sibling
        # objects is not.
        self.assertRaises(ProtocolError, decode, self.ok % b'{"a":1,"b":2,"a":1}')
        self.assertEqual(decode(self.ok % b'[{"a":1},{"a":1}]').payload, [{"a": 1}, {"a": 1}])

    def test_error_messages_name_the_problem(self) -> None:
        with self.assertRaises(ProtocolError) as cm:
            decode(vector("wire.parse.duplicate_member")["input"]["line"].encode())
        self.assertIn("duplicate", str(cm.exception))
        with self.assertRaises(ProtocolError) as cm:
            decode(vector("wire.parse.unknown_type")["input"]["line"].encode())
        self.assertIn("pair_request", str(cm.exception))
        with self.assertRaises(ProtocolError) as cm:
            decode(vector("wire.parse.missing_payload")["input"]["line"].encode())
        self.assertIn("payload", str(cm.exception))


class IdTests(SynchronousTestCase):
    def test_message_ids_shape_and_sequence(self) -> None:
        ids = MessageIds(clock=lambda: 1714000000.0, start=0)
        self.assertEqual(
            [ids.next(), ids.next(), ids.next("task")],
            ["msg_1714000000000_0", "msg_1714000000000_1", "task_1714000000000_2"],
        )

    def test_two_processes_do_not_collide(self) -> None:
        """Defect W9: claudectl starts every process at 0; we start at random."""
        a = MessageIds(clock=lambda: 1.0)
        b = MessageIds(clock=lambda: 1.0)
        self.assertNotEqual(a.next(), b.next())

    def test_factory(self) -> None:
        f = EnvelopeFactory(
            "desk-9f8e7d6c",
            clock=lambda: 1714000000.06,
            ids=MessageIds(clock=lambda: 1714000000.06, start=1),
        )
        env = f.make(codec.HANDSHAKE_ACK, {"status": "ok"})
        self.assertEqual(
            encode(env), vector("wire.frame.handshake_ack_ok")["expected"]["line"].encode()
        )
        self.assertEqual(f.make(codec.CHALLENGE, {}, from_peer="").from_peer, "")

    def test_now_ms_truncates(self) -> None:
        self.assertEqual(codec.now_ms(lambda: 1.9999), 1999)


# --- property tests -----------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
envelopes = st.builds(
    Envelope,
    id=st.text(),
    msg_type=st.sampled_from(codec.MSG_TYPES),
    from_peer=st.text(),
    timestamp=st.integers(0, MAX_TIMESTAMP),
    payload=json_values,
)


class PropertyTests(SynchronousTestCase):
    @given(envelopes)
    def test_roundtrip(self, env: Envelope) -> None:
        line = encode(env)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(decode(line), env)

    @given(envelopes)
    def test_encode_is_what_the_spec_says(self, env: Envelope) -> None:
        """wire.md 2.3's Python equivalent, member by member."""

        def d(v, sort=False):
            return json.dumps(v, separators=(",", ":"), ensure_ascii=False, sort_keys=sort)

        expected = (
            '{"id":'
            + d(env.id)
            + ',"msg_type":'
            + d(env.msg_type)
            + ',"from_peer":'
            + d(env.from_peer)
            + ',"timestamp":'
            + d(env.timestamp)
            + ',"payload":'
            + d(env.payload, True)
            + "}\n"
        )
        self.assertEqual(encode(env), expected.encode("utf-8"))

    @given(st.binary(max_size=300))
    def test_arbitrary_bytes_only_protocol_error(self, data: bytes) -> None:
        try:
            env = decode(data)
        except ProtocolError:
            return
        self.assertIsInstance(env, Envelope)

    @given(st.text(max_size=200))
    def test_arbitrary_text_only_protocol_error(self, text: str) -> None:
        try:
            decode(text.encode("utf-8", "surrogatepass"))
        except ProtocolError:
            pass

    @given(envelopes, st.data())
    def test_mutated_frames_only_protocol_error(self, env: Envelope, data: st.DataObject) -> None:
        """Corrupting one byte of a valid frame never raises anything else,
        and whatever still decodes can be encoded again."""
        line = bytearray(encode(env))
        i = data.draw(st.integers(0, len(line) - 1))
        line[i] = data.draw(st.integers(0, 255))
        try:
            got = decode(bytes(line))
        except ProtocolError:
            return
        encode(got)


def _full_decode(line: bytes) -> codec.Envelope:
    """The general path alone (what decode does without the heartbeat shortcut)."""
    saved = codec._EMPTY_HEARTBEAT
    codec._EMPTY_HEARTBEAT = lambda _line: None  # type: ignore[assignment]
    try:
        return codec.decode(line)
    finally:
        codec._EMPTY_HEARTBEAT = saved


class HeartbeatFastPathTests(SynchronousTestCase):
    """The empty-heartbeat shortcut gives what the JSON path gives, or defers to it."""

    LINE = (
        b'{"id":"msg_1_2","msg_type":"heartbeat","from_peer":"host-1a2b",'
        b'"timestamp":1700000000000,"payload":{}}'
    )

    def test_shortcut_is_taken_and_agrees(self) -> None:
        self.assertIsNotNone(codec._EMPTY_HEARTBEAT(self.LINE))
        self.assertIsNotNone(codec._EMPTY_HEARTBEAT(self.LINE + b"\n"))
        self.assertEqual(codec.decode(self.LINE), _full_decode(self.LINE))
        env = codec.decode(self.LINE + b"\r\n")
        self.assertEqual(env, Envelope("msg_1_2", HEARTBEAT, "host-1a2b", 1700000000000, {}))

    def test_each_payload_is_a_new_dict(self) -> None:
        a, b = codec.decode(self.LINE), codec.decode(self.LINE)
        self.assertIsNot(a.payload, b.payload)

    def test_defects_still_refused(self) -> None:
        for bad in (
            self.LINE.replace(b"1700000000000", b"18446744073709551616"),  # > 2^64-1
            self.LINE.replace(b'"payload":{}', b'"payload":{},"payload":{}'),
            self.LINE.replace(b'"id":"msg_1_2"', b'"id":"msg_1_2","id":"x"'),
            self.LINE.replace(b"heartbeat", b"heartbeats"),
        ):
            self.assertRaises(ProtocolError, codec.decode, bad)

    @given(
        st.text('abc_-.:\\"é1', max_size=12),
        st.text('abc_-.:\\"é1', max_size=12),
        st.integers(0, 2**66),
        st.sampled_from([b"", b"\n", b"\r\n", b" ", b"\t\n"]),
    )
    def test_agrees_with_the_json_path(self, msg_id: str, peer: str, ts: int, end: bytes) -> None:
        line = (
            b'{"id":'
            + json.dumps(msg_id).encode()
            + b',"msg_type":"heartbeat","from_peer":'
            + json.dumps(peer).encode()
            + b',"timestamp":'
            + str(ts).encode()
            + b',"payload":{}}'
            + end
        )
        try:
            want: codec.Envelope | str = _full_decode(line)
        except ProtocolError:
            want = "refused"
        try:
            got: codec.Envelope | str = codec.decode(line)
        except ProtocolError:
            got = "refused"
        self.assertEqual(got, want)
