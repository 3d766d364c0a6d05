"""
Units read from a knowledge frame's text (claudectl.hive.wireunits) against
the strict way: the JSON parser, KnowledgeUnit.from_json(hops=1), dumps_line.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config
from claudectl.hive import store as store_mod
from claudectl.hive.gossip import Gossip, validate_batch
from claudectl.hive.store import KNOWLEDGE, canonical_line, hive_file
from claudectl.hive.units import (
    CATEGORIES,
    INJECTION_STATES,
    U32_MAX,
    U64_MAX,
    ApproachOutcome,
    Command,
    InjectionStats,
    Insight,
    KnowledgeUnit,
    Pattern,
    PromotedRule,
    Requires,
    Scope,
    SharingConsent,
    Temporal,
    ToolAccuracy,
    dumps_line,
)
from claudectl.hive.wireunits import Prechecked, read_units_payload
from claudectl.relay import codec
from claudectl.relay.codec import Envelope, ProtocolError
from claudectl.relay.session import Dedup, FrameFilter, LinkCounters
from tests.common import FakeMesh, temp_home, vectors

NOW = 1_800_000_000

READERS = {
    codec.KNOWLEDGE_SYNC: read_units_payload,
    codec.KNOWLEDGE_SNAPSHOT: read_units_payload,
}

# Strings: plain ones (the fast path) and ones that need escapes (the strict one).
_plain = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: '"' not in s and "\\" not in s and not any(ord(c) < 32 for c in s)
)
_text = _plain | st.text(max_size=8)
_u32 = st.sampled_from([0, 1, 999_999_999, 1_000_000_000, U32_MAX]) | st.integers(0, U32_MAX)
_u64 = st.sampled_from([0, 10**18, 10**19 - 1, 10**19, U64_MAX]) | st.integers(0, U64_MAX)
_f64 = st.sampled_from([0.0, -0.0, 1.0, 0.9, 1e-7, 1e16, 1e22, 5e-324, 1.7e308]) | st.floats(
    allow_nan=False, allow_infinity=False
)
_strs = st.lists(_text, max_size=3).map(tuple)
_contents = st.one_of(
    st.builds(Pattern, _text, st.none() | _text, _text, _f64, _u32, _strs),
    st.builds(ToolAccuracy, _text, _u32, _u32, _f64),
    st.builds(Temporal, _text, _f64),
    st.builds(Insight, _text, _text, _text, st.none() | _text),
    st.builds(PromotedRule, _text, _text),
    st.builds(ApproachOutcome, _text, _f64, _u32, st.none() | _f64, st.none() | _u64, _strs),
    st.builds(Command, _text, _text, st.none() | _text, _text, st.just(Requires())),
)
_stats = st.just(InjectionStats()) | st.builds(InjectionStats, _u64, _u64, _u64, _u64, _u64)
_units = st.builds(
    KnowledgeUnit,
    id=_text,
    scope=st.sampled_from([Scope()])
    | st.builds(Scope, st.sampled_from(["language", "project"]), _text),
    content=_contents,
    evidence_count=_u32,
    confidence=_f64,
    source_peer=_text | st.just("peer-a"),
    originated_at=_u64,
    last_validated_at=_u64,
    propagation_count=_u32,
    version=_u32,
    category=st.sampled_from(CATEGORIES),
    revalidation_interval_secs=_u64,
    injection_state=st.sampled_from(INJECTION_STATES),
    injection_stats=_stats,
    sharing_consent=st.none() | st.just(SharingConsent()),
)


def frame(units: list[Any], msg_type: str = codec.KNOWLEDGE_SNAPSHOT, **members: int) -> bytes:
    payload = {"page": 1, "total_pages": 1} if msg_type == codec.KNOWLEDGE_SNAPSHOT else {}
    payload.update(members)
    payload["units"] = units
    return codec.encode(Envelope("msg_1_2", msg_type, "peer-a", 1_700_000_000_000, payload))


def plain_unit(i: int = 0, **changes: Any) -> KnowledgeUnit:
    unit = KnowledgeUnit(
        id=f"ku_{i}",
        scope=Scope(),
        content=Pattern("Bash", f"cargo test {i}", "approve", 0.9, 12, ("ci",)),
        evidence_count=12,
        confidence=0.9,
        source_peer="peer-a",
        originated_at=1_700_000_000,
        last_validated_at=1_700_000_000,
    )
    return unit.with_(**changes) if changes else unit


def outcome(line: bytes, readers: Any) -> Any:
    try:
        return codec.decode(line, readers)
    except ProtocolError as e:
        return ("error", str(e))


class Agrees:
    """Checks that the read way and the strict way agree on a frame."""

    def agree(self: Any, line: bytes) -> int:
        """Both ways of reading ``line`` give the same; how many units took the read way."""
        strict = outcome(line, None)
        read = outcome(line, READERS)
        if isinstance(strict, tuple) or isinstance(read, tuple):
            self.assertEqual(read, strict)
            return 0
        self.assertEqual(
            (read.id, read.msg_type, read.from_peer, read.timestamp, read.wire_bytes),
            (strict.id, strict.msg_type, strict.from_peer, strict.timestamp, strict.wire_bytes),
        )
        self.assertEqual(read.wire_nodes, strict.wire_nodes)
        if not isinstance(read.payload.get("units"), list):
            self.assertEqual(read.payload, strict.payload)
            return 0
        rest = {k: v for k, v in read.payload.items() if k != "units"}
        self.assertEqual(rest, {k: v for k, v in strict.payload.items() if k != "units"})
        fast = 0
        self.assertEqual(len(read.payload["units"]), len(strict.payload["units"]))
        for got, raw in zip(read.payload["units"], strict.payload["units"], strict=True):
            if type(got) is not Prechecked:
                self.assertEqual(got, raw)
                continue
            fast += 1
            unit = KnowledgeUnit.from_json(raw, hops=1)
            self.assertEqual(got.unit, unit)
            # The line shows every field's type too (1 and 1.0 are equal in Python).
            self.assertEqual(got.line, dumps_line(unit).encode("utf-8"))
            self.assertEqual(got.unit.wire_json, unit.wire_json)
            self.assertEqual(got.unit.semantic_key, unit.semantic_key)
        return fast


class PropertyTests(SynchronousTestCase, Agrees):
    @settings(max_examples=400)
    @given(st.lists(_units, min_size=1, max_size=4), st.sampled_from(sorted(READERS)))
    def test_units_read_as_the_strict_way_reads_them(
        self, units: list[KnowledgeUnit], msg_type: str
    ) -> None:
        self.agree(frame([u.wire_dict for u in units], msg_type))

    @settings(max_examples=600)
    @given(
        st.integers(0, 3),
        st.integers(0, 10**6),
        st.integers(0, 12),
        st.text(alphabet='{}[],:"\\0123456789.eE-+ nulrtfasx\u00e9\x00\x1f\t\u2028', max_size=6),
    )
    def test_damaged_frames_get_the_same_answer(
        self, which: int, at: int, cut: int, insert: str
    ) -> None:
        units = [plain_unit(0), plain_unit(1, content=Temporal("mornings", 0.5)), plain_unit(2)]
        line = frame([u.wire_dict for u in units][: which + 1])
        body = line[:-1].decode("utf-8")
        at %= len(body) + 1  # the head and the very end too
        damaged = (body[:at] + insert + body[at + cut :]).encode("utf-8") + b"\n"
        self.agree(damaged)


class ReadWayTests(SynchronousTestCase, Agrees):
    def test_plain_units_take_the_read_way(self) -> None:
        units = [
            plain_unit(0),
            plain_unit(1, content=ToolAccuracy("Edit", 10, 9, 0.8)),
            plain_unit(2, content=Temporal("mornings", 0.5), scope=Scope("language", "rust")),
            plain_unit(3, content=Insight("perf", "high", "slow tests", None)),
            plain_unit(4, content=PromotedRule("never force push", "incident")),
            plain_unit(5, content=ApproachOutcome("ref", 0.5, 3, 1.25, 900, ("x",))),
            plain_unit(6, injection_stats=InjectionStats(1, 2, 3, 4, 5), category="personal"),
        ]
        self.assertEqual(self.agree(frame([u.wire_dict for u in units])), len(units))
        self.assertEqual(
            self.agree(frame([u.wire_dict for u in units], codec.KNOWLEDGE_SYNC, sync_epoch=5)),
            len(units),
        )

    def test_claudectls_own_frame_takes_the_read_way(self) -> None:
        # The knowledge_sync frame of the interoperability vectors, byte for
        # byte as claudectl 0.64 writes it.
        line = vectors("hive", "COMPAT")["hive.frame.knowledge_sync"]["expected"]["line"]
        self.assertEqual(self.agree(line.encode("utf-8")), 1)

    def test_one_hop_more_and_the_stored_line(self) -> None:
        env = codec.decode(frame([plain_unit(0, propagation_count=4).wire_dict]), READERS)
        (got,) = env.payload["units"]
        self.assertEqual(got.unit.propagation_count, 5)
        self.assertIn(b'"propagation_count":5,', got.line)
        self.assertTrue(got.line.endswith(b"}\n"))

    def test_what_the_pattern_leaves_to_the_strict_way(self) -> None:
        # Each of these is an ordinary dict afterwards, checked as always.
        cases = [
            plain_unit(0, id='with "quote"'),
            plain_unit(1, id="tab\there"),
            plain_unit(2, version=1_000_000_000),  # more digits than the pattern takes
            plain_unit(3, originated_at=10**19),
            plain_unit(4, sharing_consent=SharingConsent()),
            plain_unit(5, content=Command("c", "d", None, "body", Requires())),
            plain_unit(6, confidence=1e-300),  # a three-digit exponent
        ]
        line = frame([u.wire_dict for u in cases])
        self.assertEqual(self.agree(line), 0)
        env = codec.decode(line, READERS)
        self.assertTrue(all(type(u) is dict for u in env.payload["units"]))

    def test_an_integer_confidence_is_a_float_either_way(self) -> None:
        raw = json.loads(plain_unit(0).wire_json)
        raw["confidence"] = 1
        line = frame([raw, plain_unit(1).wire_dict])
        self.assertEqual(self.agree(line), 0)  # the strict reader reads that frame
        neg = dict(raw, confidence=-0)  # JSON's -0 is the integer 0
        text = frame([neg]).replace(b'"confidence":0', b'"confidence":-0')
        self.agree(text)

    def test_the_names_the_strict_checks_know(self) -> None:
        # Exactly the categories, states and scope kinds units.py knows.
        cases = [plain_unit(i, category=c) for i, c in enumerate(CATEGORIES)]
        cases += [plain_unit(10 + i, injection_state=s) for i, s in enumerate(INJECTION_STATES)]
        cases += [plain_unit(20, scope=Scope("language", "go"))]
        cases += [plain_unit(21, scope=Scope("project", "x/y"))]
        self.assertEqual(self.agree(frame([u.wire_dict for u in cases])), len(cases))
        odd = [
            dict(plain_unit(30).wire_dict, category="best_practices"),
            dict(plain_unit(31).wire_dict, injection_state="retired"),
            dict(plain_unit(32).wire_dict, scope={"type": "team", "value": "x"}),
            dict(plain_unit(33).wire_dict, scope={"type": "universal", "value": None}),
        ]
        self.assertEqual(self.agree(frame(odd)), 0)

    def test_one_unit_in_another_form_leaves_the_frame_to_the_strict_way(self) -> None:
        # Whatever its place: the strict reader parses the whole frame once
        # (its units then share their keys' strings, and its depth limit is
        # the frame's).
        odd = [{"id": "x", "nested": json.loads("[" * 70 + "]" * 70)}, 7, None]
        for other in odd:
            for units in ([other, plain_unit(0).wire_dict], [plain_unit(0).wire_dict, other]):
                text = frame(units).decode("utf-8")
                pos = text.index('"payload":') + len('"payload":')
                self.assertIsNone(read_units_payload(text, pos))
                self.assertEqual(self.agree(text.encode("utf-8")), 0)

    def test_long_strings_take_the_strict_way(self) -> None:
        # A unit read this way holds its strings about three times over:
        # only short ones (the per-peer charge covers those).
        self.assertEqual(self.agree(frame([plain_unit(0, id="k" * 256).wire_dict])), 1)
        self.assertEqual(self.agree(frame([plain_unit(1, id="k" * 257).wire_dict])), 0)
        # Lists too: at most 16 strings.
        for n, read in ((16, 1), (17, 0)):
            content = Pattern("Bash", "x", "approve", 0.5, 1, tuple(f"c{i}" for i in range(n)))
            self.assertEqual(self.agree(frame([plain_unit(2, content=content).wire_dict])), read)

    def test_numbers_spelled_otherwise(self) -> None:
        # Another spelling of the same number: the stored line has Python's.
        line = frame([plain_unit(0).wire_dict])
        for spelling in (b"0.90", b"9e-1", b"0.9E0", b"90.0e-2", b"9.000000000000000e-1"):
            changed = line.replace(b'"accept_rate":0.9', b'"accept_rate":' + spelling)
            changed = changed.replace(b'"confidence":0.9', b'"confidence":' + spelling)
            self.assertEqual(self.agree(changed), 1, spelling)
            (got,) = codec.decode(changed, READERS).payload["units"]
            self.assertIn(b'"confidence":0.9,', got.line)

    def test_refused_frames_are_refused_alike(self) -> None:
        good = plain_unit(0).wire_json
        cases = {
            "duplicate member": '{"page":1,"page":2,"total_pages":1,"units":[' + good + "]}",
            "duplicate in a unit": '{"page":1,"total_pages":1,"units":['
            + good
            + ","
            + good.replace('{"category"', '{"id":"x","category"', 1)
            + "]}",
            "out of range": '{"page":1,"total_pages":1,"units":['
            + good.replace('"confidence":0.9', '"confidence":1e400')
            + "]}",
            "lone surrogate": '{"page":1,"total_pages":1,"units":[' + good + ',{"id":"\\ud800"}]}',
            "trailing comma": '{"page":1,"total_pages":1,"units":[' + good + ",]}",
            "units twice": '{"page":1,"units":[],"units":[' + good + "]}",
        }
        for name, payload in cases.items():
            line = (
                '{"id":"m_1","msg_type":"knowledge_snapshot","from_peer":"peer-a",'
                '"timestamp":1,"payload":' + payload + "}\n"
            ).encode("utf-8")
            with self.assertRaises(ProtocolError, msg=name):
                codec.decode(line)
            self.agree(line)
        # The envelope's own limits, where the read way looks first.
        unit = plain_unit(0).wire_json
        head = '{"id":"m_1","msg_type":"knowledge_sync","from_peer":"peer-a",'
        body = '"payload":{"units":[' + unit + "]}}"
        for name, text in {
            "timestamp past 2^64-1": head + '"timestamp":18446744073709551616,' + body,
            "timestamp with a leading zero": head + '"timestamp":01,' + body,
            "member with a leading zero": head
            + '"timestamp":1,"payload":{"sync_epoch":01,"units":['
            + unit
            + "]}}",
            "raw control character": head
            + '"timestamp":1,'
            + body.replace('"tool":"Bash"', '"tool":"Ba\x1fsh"'),
            "raw tab": head + '"timestamp":1,' + body.replace('"tool":"Bash"', '"tool":"Ba\tsh"'),
            "no closing brace": head + '"timestamp":1,' + body[:-1] + "x",
        }.items():
            line = text.encode("utf-8") + b"\n"
            with self.assertRaises(ProtocolError, msg=name):
                codec.decode(line)
            self.agree(line)
        # A frame of units one byte over the limit, and one at it.
        units_ = [plain_unit(i).wire_dict for i in range(1000)]
        short = len(frame(units_)) - 1
        while short < codec.MAX_LINE_BYTES - 900:
            unit_ = plain_unit(len(units_))
            units_.append(unit_.wire_dict)
            short += unit_.wire_size + 1
        self.assertEqual(len(frame(units_)) - 1, short)
        count = len(units_)
        for extra, ok in ((0, True), (1, False)):
            pad = codec.MAX_LINE_BYTES - short + extra
            assert 0 < pad < 1000
            # (in pieces of at most 256 characters: strings the reader takes)
            padded = [dict(u) for u in units_]
            for i in range(-(-pad // 200)):
                padded[i]["id"] += "k" * min(200, pad - 200 * i)
            line = frame(padded)
            self.assertEqual(len(line) - 1, codec.MAX_LINE_BYTES + extra)
            if ok:
                self.assertEqual(self.agree(line), count)
            else:
                with self.assertRaises(ProtocolError):
                    codec.decode(line, READERS)
        # Anything after the frame's last brace but whitespace.
        for tail in (b"x", b"}", b",{}"):
            line = frame([plain_unit(0).wire_dict])[:-1] + tail + b"\n"
            with self.assertRaises(ProtocolError):
                codec.decode(line)
            self.agree(line)

    def test_unusual_but_valid_frames_still_read(self) -> None:
        good = plain_unit(0).wire_json
        head = '{"id":"m_1","msg_type":"knowledge_sync","from_peer":"peer-a","timestamp":1,'
        for payload in (
            '{"units":[' + good + '],"sync_epoch":3}',  # members after the units
            '{"units":[]}',
            '{"extra":[1],"units":[' + good + "]}",  # a member the reader does not know
            '{"units": [' + good + "]}",  # whitespace
            '{"units":[' + good + "]}  ",
            '{"units":[7,"x",null,' + good + "]}",
        ):
            env = codec.decode((head + '"payload":' + payload + "}\n").encode("utf-8"), READERS)
            self.assertEqual(env.msg_type, codec.KNOWLEDGE_SYNC)
            self.agree((head + '"payload":' + payload + "}\n").encode("utf-8"))
        # Only the types a reader is given for are read by it.
        env = codec.decode(frame([plain_unit(0).wire_dict]), {})
        self.assertIs(type(env.payload["units"][0]), dict)


class UseTests(SynchronousTestCase):
    def test_frame_filter_reads_with_its_readers(self) -> None:
        line = frame([plain_unit(0).wire_dict])
        plain = FrameFilter(Dedup(), LinkCounters()).feed(line[:-1])
        read = FrameFilter(Dedup(), LinkCounters(), readers=READERS).feed(line[:-1])
        assert plain is not None and read is not None
        self.assertIs(type(plain.payload["units"][0]), dict)
        self.assertIs(type(read.payload["units"][0]), Prechecked)

    def test_validate_batch_checks_the_origin(self) -> None:
        line = frame([plain_unit(0).wire_dict, plain_unit(1, source_peer="_pending").wire_dict])
        units = codec.decode(line, READERS).payload["units"]
        good, bad, error = validate_batch(units)
        self.assertEqual((len(good), bad), (1, 1))
        self.assertIn("source_peer", error)
        self.assertIs(good[0], units[0].unit)

    def test_only_stored_units_leave_their_lines(self) -> None:
        home = temp_home(self)
        mesh = FakeMesh("me-1")
        gossip = Gossip(home, Config(), mesh, "me-1", lambda: NOW)
        gossip.register()
        mesh.connect("peer-a")
        units = [plain_unit(i, originated_at=NOW, last_validated_at=NOW) for i in range(2)]

        def deliver() -> list[Prechecked]:
            line = frame([u.wire_dict for u in units], codec.KNOWLEDGE_SYNC, sync_epoch=NOW)
            env = codec.decode(line, READERS)
            for handler in mesh.handlers[codec.KNOWLEDGE_SYNC]:
                handler("peer-a", env)
            return list(env.payload["units"])

        first = deliver()
        # Written as they came: the file holds the lines the units came with.
        data = hive_file(home, KNOWLEDGE).read_bytes()
        self.assertEqual(data, b"".join(p.line for p in first))
        self.assertTrue(all(canonical_line(p.unit) is p.line for p in first))
        # The same units again are copies: nothing of them is kept.
        again = deliver()
        self.assertEqual(gossip.counters["duplicate_units"], 2)
        for p in again:
            self.assertIsNot(store_mod._BYTES_OF.get(id(p.unit), (None,))[0], p.unit)
        self.assertEqual(hive_file(home, KNOWLEDGE).read_bytes(), data)
        # A copy beside a new unit, from another peer: the batch is merged;
        # only the new unit's line is kept (and written).
        mesh.connect("peer-b")
        units[:] = [units[0], plain_unit(5, originated_at=NOW, last_validated_at=NOW)]
        line = frame([u.wire_dict for u in units], codec.KNOWLEDGE_SYNC, sync_epoch=NOW)
        env = codec.decode(line, READERS)
        for handler in mesh.handlers[codec.KNOWLEDGE_SYNC]:
            handler("peer-b", env)
        copy, new = env.payload["units"]
        self.assertIsNot(store_mod._BYTES_OF.get(id(copy.unit), (None,))[0], copy.unit)
        self.assertIs(canonical_line(new.unit), new.line)
        self.assertEqual(hive_file(home, KNOWLEDGE).read_bytes(), data + new.line)
