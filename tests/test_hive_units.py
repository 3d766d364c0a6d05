"""Knowledge units: claudectl 0.64's JSON, keys, summaries, decay, consent, rollout."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.hive import units as units_mod
from claudectl.hive.units import (
    CONTENT_TYPES,
    DEFAULT_INTERVALS,
    Command,
    Content,
    InjectionStats,
    KnowledgeUnit,
    Pattern,
    Requires,
    Scope,
    SharingConsent,
    UnitError,
    UnitIds,
    advance_state,
    command_matches,
    content_from_json,
    dumps_line,
    dumps_pretty,
    paginate,
    parse_line,
    rollout_admits,
    rollout_hash,
    unit_json_len,
    version_gte,
)
from claudectl.relay.codec import Envelope, encode
from tests.common import vector, vectors

HIVE = vectors("hive", "COMPAT")


def make_unit(i: int = 0, **kw: object) -> KnowledgeUnit:
    base: dict[str, object] = dict(
        id=f"ku_1_{i}",
        scope=Scope(),
        content=Pattern("Bash", f"cmd{i}", "approve", 0.9, 10, ()),
        evidence_count=10,
        confidence=0.9,
        source_peer="peer-a",
        originated_at=1,
        last_validated_at=1,
    )
    base.update(kw)
    return KnowledgeUnit(**base)  # type: ignore[arg-type]


class UnitLineVectorTests(SynchronousTestCase):
    def test_every_unit_line_round_trips(self) -> None:
        names = [n for n in HIVE if n.startswith("hive.unit.") and "jsonl_line" in HIVE[n]["input"]]
        self.assertGreaterEqual(len(names), 13)
        for name in names:
            v = HIVE[name]
            unit = parse_line(v["input"]["jsonl_line"])
            exp = v["expected"]
            self.assertTrue(exp["parses"], name)
            if "reserialized_line" in exp:
                self.assertEqual(dumps_line(unit), exp["reserialized_line"], name)
            if "semantic_key" in exp:
                self.assertEqual(unit.semantic_key, exp["semantic_key"], name)
            if "summary" in exp:
                self.assertEqual(unit.summary(), exp["summary"], name)

    def test_legacy_defaults(self) -> None:
        v = vector("hive.unit.legacy_defaults")
        unit = parse_line(v["input"]["jsonl_line"])
        exp = v["expected"]
        self.assertEqual(unit.category, exp["category"])
        self.assertEqual(unit.revalidation_interval_secs, exp["revalidation_interval_secs"])
        self.assertEqual(unit.injection_state, exp["injection_state"])
        self.assertEqual(unit.injection_stats.to_json(), exp["injection_stats"])
        self.assertIsNone(unit.sharing_consent)
        self.assertNotIn("sharing_consent", json.loads(dumps_line(unit)))

    def _base(self) -> dict:
        return json.loads(vector("hive.unit.pattern")["input"]["jsonl_line"])

    def test_reject_workflow_label(self) -> None:
        obj = self._base()
        obj["category"] = vector("hive.unit.reject_workflow_label")["input"]["category"]
        self.assertRaises(UnitError, KnowledgeUnit.from_json, obj)

    def test_reject_flat_scope(self) -> None:
        obj = self._base()
        obj["scope"] = vector("hive.unit.reject_flat_scope")["input"]["scope"]
        self.assertRaises(UnitError, KnowledgeUnit.from_json, obj)

    def test_integer_fields_reject_floats_and_bools(self) -> None:
        for key in ("evidence_count", "version", "originated_at", "propagation_count"):
            for bad in (5.0, True, -1, "5"):
                obj = self._base()
                obj[key] = bad
                with self.assertRaises(UnitError) as cm:
                    KnowledgeUnit.from_json(obj)
                self.assertIn(key, str(cm.exception))
        obj = self._base()
        obj["content"]["sample_count"] = 20.0
        self.assertRaises(UnitError, KnowledgeUnit.from_json, obj)
        obj = self._base()
        obj["evidence_count"] = 2**32
        self.assertRaises(UnitError, KnowledgeUnit.from_json, obj)

    def test_float_fields_accept_integers(self) -> None:
        obj = self._base()
        obj["confidence"] = 1
        unit = KnowledgeUnit.from_json(obj)
        self.assertIn('"confidence":1.0,', dumps_line(unit))

    def test_non_finite_and_bad_json_rejected(self) -> None:
        line = vector("hive.unit.pattern")["input"]["jsonl_line"].replace(
            '"confidence":0.05', '"confidence":NaN'
        )
        self.assertRaises(UnitError, parse_line, line)
        self.assertRaises(UnitError, parse_line, "{not json")
        self.assertRaises(UnitError, parse_line, "[1]")

    def test_unknown_keys_ignored_and_dropped(self) -> None:
        obj = self._base()
        obj["future"] = 1
        obj["content"]["future"] = {"x": 1}
        unit = KnowledgeUnit.from_json(obj)
        self.assertEqual(
            dumps_line(unit), vector("hive.unit.pattern")["expected"]["reserialized_line"]
        )

    def test_conditions_required_for_pattern(self) -> None:
        obj = self._base()
        del obj["content"]["conditions"]
        self.assertRaises(UnitError, KnowledgeUnit.from_json, obj)

    def test_unknown_content_type(self) -> None:
        self.assertRaises(UnitError, content_from_json, {"type": "telepathy"})


class KeyAndSummaryVectorTests(SynchronousTestCase):
    def test_semantic_keys(self) -> None:
        names = [n for n in HIVE if n.startswith("hive.semantic_key.")]
        self.assertEqual(len(names), 9)
        fills = {
            "pattern": {
                "preferred_action": "approve",
                "accept_rate": 1.0,
                "sample_count": 1,
                "conditions": [],
            },
            "tool_accuracy": {"total": 1, "correct": 1, "confidence_threshold": 0.5},
            "skill": {"description": "d", "version": "1", "body": "b"},
            "command": {"description": "d", "body": "b"},
            "hook_config": {"description": "d", "config_json": "{}"},
            "insight": {"severity": "warning"},
        }
        for name in names:
            inp = HIVE[name]["input"]
            content = dict(inp["content_fields"])
            for k, val in fills.get(content["type"], {}).items():
                content.setdefault(k, val)
            unit = make_unit(
                scope=Scope.from_json(inp["scope"]), content=content_from_json(content)
            )
            self.assertEqual(unit.semantic_key, HIVE[name]["expected"]["semantic_key"], name)

    def test_command_without_args_summary(self) -> None:
        v = vector("hive.summary.command_no_args")
        c = content_from_json(v["input"]["content"])
        self.assertIsInstance(c, Command)
        self.assertEqual(c.summary(), v["expected"]["summary"])

    def test_requires(self) -> None:
        v = vector("hive.requires.empty_omitted")
        r = Requires.from_json(v["input"]["requires"])
        self.assertEqual(json.dumps(r.to_json(), separators=(",", ":")), v["expected"]["json"])
        v = vector("hive.requires.absent_reads_empty")
        c = content_from_json(json.loads(v["input"]["content_json"]))
        self.assertEqual(c.requires.to_json(), v["expected"]["requires"])  # type: ignore[attr-defined]

    def test_scope_cli_text(self) -> None:
        self.assertEqual(Scope.parse("universal"), Scope())
        self.assertEqual(Scope.parse("language:rust"), Scope("language", "rust"))
        self.assertEqual(Scope.parse("project:myapp").display(), "project:myapp")
        self.assertEqual(Scope.parse("whatever:x"), Scope("project", "whatever:x"))

    def test_ids_are_unique_across_generators(self) -> None:
        clock = lambda: 1713960000.0  # noqa: E731
        a, b = UnitIds(clock), UnitIds(clock)
        ids = {a.new() for _ in range(100)} | {b.new() for _ in range(100)}
        self.assertEqual(len(ids), 200)
        self.assertTrue(all(i.startswith("ku_1713960000_") for i in ids))


class DecayVectorTests(SynchronousTestCase):
    def test_effective_confidence(self) -> None:
        names = [n for n in HIVE if n.startswith("hive.effective_confidence.")]
        self.assertEqual(len(names), 9)
        for name in names:
            inp, exp = HIVE[name]["input"], HIVE[name]["expected"]
            content = Pattern("Bash", None, "approve", 1.0, 1, ())
            unit = make_unit(
                content=content,
                confidence=inp["confidence"],
                last_validated_at=inp["last_validated_at"],
                revalidation_interval_secs=inp["revalidation_interval_secs"],
            )
            self.assertAlmostEqual(
                unit.effective_confidence(inp["now"]),
                exp["effective_confidence"],
                delta=exp["tolerance"],
                msg=name,
            )

    def test_default_intervals(self) -> None:
        self.assertEqual(DEFAULT_INTERVALS, vector("hive.default_interval")["expected"])

    def test_is_stale(self) -> None:
        v = vector("hive.is_stale")
        unit = make_unit(
            last_validated_at=v["input"]["last_validated_at"],
            revalidation_interval_secs=v["input"]["revalidation_interval_secs"],
        )
        self.assertEqual([unit.is_stale(t) for t in v["input"]["now"]], v["expected"]["stale"])


class ConsentVectorTests(SynchronousTestCase):
    def test_expires(self) -> None:
        v = vector("hive.consent.expires")
        c = SharingConsent(expires_at=v["input"]["expires_at"])
        self.assertEqual([c.allows("p", 4, t) for t in v["input"]["now"]], v["expected"]["allowed"])

    def test_allow_list(self) -> None:
        v = vector("hive.consent.allow_list")
        c = SharingConsent(allow_peers=tuple(v["input"]["allow_peers"]))
        self.assertEqual(c.allows(v["input"]["peer"], 4, 0), v["expected"]["allowed"])
        self.assertTrue(c.allows("a", 4, 0))
        self.assertFalse(SharingConsent(allow_peers=()).allows("a", 4, 0))

    def test_exclude_wins(self) -> None:
        v = vector("hive.consent.exclude_wins")
        c = SharingConsent(
            allow_peers=tuple(v["input"]["allow_peers"]),
            exclude_peers=tuple(v["input"]["exclude_peers"]),
        )
        self.assertEqual(c.allows(v["input"]["peer"], 4, 0), v["expected"]["allowed"])

    def test_min_tier(self) -> None:
        v = vector("hive.consent.min_tier")
        c = SharingConsent(min_trust_tier=v["input"]["min_trust_tier"])
        self.assertEqual(
            [c.allows("p", r, 0) for r in v["input"]["peer_rank"]], v["expected"]["allowed"]
        )

    def test_serialize_omits_none(self) -> None:
        v = vector("hive.consent.serialize_omits_none")
        c = SharingConsent.from_json(v["input"]["consent"])
        self.assertEqual(json.dumps(c.to_json(), separators=(",", ":")), v["expected"]["json"])

    def test_bad_tier_rejected(self) -> None:
        self.assertRaises(UnitError, SharingConsent.from_json, {"min_trust_tier": "gold"})


class RolloutVectorTests(SynchronousTestCase):
    def test_hashes(self) -> None:
        for name in (
            "hive.rollout.hash_42_ku_repro",
            "hive.rollout.hash_1234_ku_1713960000_42",
            "hive.rollout.hash_1_ku_x",
        ):
            inp, exp = HIVE[name]["input"], HIVE[name]["expected"]
            h = rollout_hash(inp["pid"], inp["unit_id"])
            self.assertEqual(h, exp["hash"], name)
            self.assertEqual(h % 10, exp["mod10"], name)

    def test_sampling(self) -> None:
        v = vector("hive.rollout.sampling_ku_x")
        uid = v["input"]["unit_id"]
        self.assertEqual(
            [p for p in range(40) if rollout_admits("canary", uid, p)],
            v["expected"]["canary_injects"],
        )
        self.assertEqual(
            [p for p in range(40) if rollout_admits("staged", uid, p)],
            v["expected"]["staged_injects"],
        )
        self.assertFalse(any(rollout_admits("draft", uid, p) for p in range(40)))
        self.assertTrue(all(rollout_admits("live", uid, p) for p in range(40)))
        self.assertTrue(rollout_admits("draft", uid, None))

    def test_advance(self) -> None:
        names = [n for n in HIVE if n.startswith("hive.rollout.advance_")]
        self.assertEqual(len(names), 7)
        for name in names:
            inp = HIVE[name]["input"]
            self.assertEqual(
                advance_state(inp["state"], inp["accepted_count"], inp["overridden_count"]),
                HIVE[name]["expected"]["state"],
                name,
            )

    def test_version_gte(self) -> None:
        v = vector("hive.version_gte")
        for a, b in v["input"]["pairs_true"]:
            self.assertTrue(version_gte(a, b), (a, b))
        for a, b in v["input"]["pairs_false"]:
            self.assertFalse(version_gte(a, b), (a, b))
        self.assertTrue(version_gte("x.y", "0"))


class PaginationAndFrameTests(SynchronousTestCase):
    def test_snapshot_pagination_vector(self) -> None:
        v = vector("hive.snapshot.pagination")
        n = v["input"]["units"]
        pad = "x" * (v["input"]["approx_unit_json_bytes"] - 330)
        units = [
            make_unit(i, content=Pattern("Bash", f"c{i}{pad}", "approve", 0.9, 10, ()))
            for i in range(n)
        ]
        pages = paginate(units, v["input"]["page_limit_bytes"])
        self.assertGreater(len(pages), v["expected"]["pages_more_than"])
        self.assertEqual(sum(len(p) for p in pages), v["expected"]["units_covered"])
        self.assertEqual([u for p in pages for u in p], units)
        for page in pages:
            self.assertLessEqual(
                sum(unit_json_len(u) for u in page), v["input"]["page_limit_bytes"]
            )

    def test_oversize_unit_gets_own_page(self) -> None:
        big = make_unit(1, content=Pattern("Bash", "y" * 2000, "approve", 0.9, 10, ()))
        pages = paginate([make_unit(0), big, make_unit(2)], limit=1000)
        self.assertEqual([len(p) for p in pages], [1, 1, 1])
        self.assertEqual(paginate([]), [])

    def test_knowledge_frames(self) -> None:
        for name in ("hive.frame.knowledge_sync", "hive.frame.knowledge_request"):
            inp = HIVE[name]["input"]
            payload = dict(inp["payload"])
            if "units" in payload:
                # the payload units go through our model and back
                payload["units"] = [KnowledgeUnit.from_json(u).to_json() for u in payload["units"]]
            env = Envelope(inp["id"], inp["msg_type"], inp["from_peer"], inp["timestamp"], payload)
            self.assertEqual(encode(env).decode("utf-8"), HIVE[name]["expected"]["line"], name)


class CommandMatchTests(SynchronousTestCase):
    def test_matching(self) -> None:
        self.assertTrue(command_matches(None, "anything"))
        self.assertTrue(command_matches("cargo test", "cargo test --all"))
        self.assertFalse(command_matches("cargo test", "cargo build"))
        self.assertTrue(command_matches("*.lock", "/src/Cargo.lock"))
        self.assertFalse(command_matches("*.lock", "/src/Cargo.toml"))
        self.assertFalse(command_matches("x", None))


_text = st.text(max_size=20)
_units = st.builds(
    make_unit,
    st.integers(0, 1000),
    scope=st.sampled_from([Scope(), Scope("language", "rust"), Scope("project", "p/q")]),
    content=st.builds(
        Pattern,
        _text,
        st.none() | _text,
        _text,
        st.floats(0, 1),
        st.integers(0, 2**32 - 1),
        st.lists(_text, max_size=3).map(tuple),
    ),
    evidence_count=st.integers(0, 2**32 - 1),
    confidence=st.floats(-1e6, 1e6, allow_nan=False),
    version=st.integers(0, 2**32 - 1),
    sharing_consent=st.none()
    | st.builds(
        SharingConsent,
        st.none() | st.integers(0, 2**64 - 1),
        st.none() | st.lists(_text, max_size=2).map(tuple),
    ),
)


class RoundTripPropertyTests(SynchronousTestCase):
    @given(_units)
    def test_line_round_trip(self, unit: KnowledgeUnit) -> None:
        line = dumps_line(unit)
        self.assertTrue(line.endswith("\n") and "\n" not in line[:-1])
        self.assertEqual(parse_line(line), unit)
        self.assertEqual(dumps_line(parse_line(line)), line)

    @given(st.binary(max_size=200))
    def test_garbage_raises_only_unit_error(self, data: bytes) -> None:
        try:
            parse_line(data)
        except UnitError:
            pass


class WireFormTests(SynchronousTestCase):
    """The cached forms a unit carries for frames and lines."""

    @given(_units)
    def test_wire_json_is_the_frame_encoding(self, unit: KnowledgeUnit) -> None:
        expected = json.dumps(
            unit.to_json(), separators=(",", ":"), ensure_ascii=False, sort_keys=True
        )
        self.assertEqual(unit.wire_json, expected)
        self.assertEqual(unit.wire_size, len(expected.encode("utf-8")))
        self.assertEqual(unit.wire_dict, unit.to_json())
        self.assertEqual(unit_json_len(unit), unit.wire_size)

    def test_cached_forms_follow_a_changed_copy(self) -> None:
        unit = make_unit(1)
        before = unit.wire_json
        moved = unit.with_(propagation_count=3)
        self.assertIn('"propagation_count":0', before)
        self.assertIn('"propagation_count":3', moved.wire_json)
        self.assertIn('"propagation_count":3', dumps_line(moved))
        self.assertEqual(unit.wire_json, before)

    def test_non_ascii_size_counts_bytes(self) -> None:
        unit = make_unit(1, content=Pattern("Bash", "caf\u00e9 \U0001f600", "approve", 0.9, 1, ()))
        self.assertEqual(unit.wire_size, len(unit.wire_json.encode("utf-8")))
        self.assertGreater(unit.wire_size, len(unit.wire_json))

    @given(_units, st.integers(min_value=0, max_value=5))
    def test_hops_added_on_reading(self, unit: KnowledgeUnit, hops: int) -> None:
        read = KnowledgeUnit.from_json(unit.to_json(), hops=hops)
        self.assertEqual(
            read, unit.with_(propagation_count=min(unit.propagation_count + hops, 2**32 - 1))
        )

    def test_hops_capped(self) -> None:
        top = make_unit(1, propagation_count=2**32 - 1).to_json()
        self.assertEqual(KnowledgeUnit.from_json(top, hops=1).propagation_count, 2**32 - 1)

    def test_errors_name_the_field(self) -> None:
        good = make_unit(1).to_json()
        cases = {
            "id": (None, "id must be a string"),
            "evidence_count": (-1, "evidence_count must be an integer 0..4294967295"),
            "confidence": ("high", "confidence must be a number"),
            "source_peer": (7, "source_peer must be a string"),
            "version": (True, "version must be an integer"),
            "revalidation_interval_secs": (1.5, "revalidation_interval_secs must be an integer"),
            "injection_stats": (None, "injection_stats must be a JSON object"),
        }
        for key, (value, message) in cases.items():
            with self.assertRaises(UnitError) as e:
                KnowledgeUnit.from_json(dict(good, **{key: value}))
            self.assertIn(message, str(e.exception), key)
        for key in ("id", "evidence_count", "propagation_count", "version", "content"):
            missing = {k: v for k, v in good.items() if k != key}
            with self.assertRaises(UnitError) as e:
                KnowledgeUnit.from_json(missing)
            self.assertIn(f"{key} is missing", str(e.exception))
        content = dict(good["content"], sample_count=2**32)
        with self.assertRaises(UnitError) as e:
            KnowledgeUnit.from_json(dict(good, content=content))
        self.assertIn("content.sample_count must be an integer 0..4294967295", str(e.exception))
        # Optional keys left out take their defaults.
        bare = {k: v for k, v in good.items() if k not in ("injection_stats", "category")}
        unit = KnowledgeUnit.from_json(bare)
        self.assertEqual((unit.category, unit.revalidation_interval_secs), ("best_practice", 0))
        self.assertEqual(unit.injection_stats.to_json()["injected_count"], 0)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=25,
)


class PrettyTests(SynchronousTestCase):
    @given(_json_values)
    def test_as_json_dumps_writes_it(self, value: object) -> None:
        want = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
        self.assertEqual(dumps_pretty(value), want)

    def test_the_bulk_shapes_as_json_dumps_writes_them(self) -> None:
        """Lists of strings and maps to whole numbers (sync_state.json's ids
        and versions) take a path of their own; their near misses do not."""
        for value in (
            {
                "units_sent": ["ku_b", "ku_a\u00e9", "\u2028"],
                "sent_versions": {"ku_a": 1, "ku_b": 2},
            },
            {"a": 1, "b": True},  # a bool among the numbers
            {"a": 10**30, "b": -1},
            ["a", 1, "b"],  # a number among the strings
            [1, "a"],
            ("x", "y"),
            {1: 2, 3: 4},  # keys json.dumps turns into strings
            {"a": 1, 2: 3},
            [["a"], ["b", "c"]],
        ):
            with self.subTest(value=value):
                want = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
                self.assertEqual(dumps_pretty(value), want)

    def test_unusual_values_are_left_to_json_dumps(self) -> None:
        for value in ({1: "a"}, [{"a": float("nan")}], {"x": OrderedDict(b=1)}):
            try:
                want: object = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
            except ValueError as e:
                want = type(e)
            try:
                got: object = dumps_pretty(value)
            except ValueError as e:
                got = type(e)
            self.assertEqual(got, want)


class UnitEncoderTests(SynchronousTestCase):
    @given(_units)
    def test_as_the_json_module_encodes_them(self, unit: KnowledgeUnit) -> None:
        d = unit.to_json()
        line = json.dumps(d, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        wire = json.dumps(
            d, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True
        )
        self.assertEqual(dumps_line(unit), line + "\n")
        self.assertEqual(unit.wire_json, wire)

    def test_every_kind_of_unit_line(self) -> None:
        units = [
            parse_line(v["input"]["jsonl_line"])
            for n, v in HIVE.items()
            if n.startswith("hive.unit.")
            and "jsonl_line" in v["input"]
            and v["expected"].get("parses")
        ]
        units += [
            make_unit(1, confidence=1, evidence_count=3),  # an int where a float goes
            make_unit(2, injection_stats=InjectionStats(3, 2, 1, 99, 100)),
            make_unit(3, scope=Scope("project", 'caf\u00e9 "x"\n'), id="ku_\u2603"),
            make_unit(4, sharing_consent=SharingConsent(5, ("peer-b",), None, "trusted")),
        ]
        for unit in units:
            with self.subTest(unit.id):
                want = json.dumps(unit.to_json(), separators=(",", ":"), ensure_ascii=False)
                self.assertEqual(dumps_line(unit), want + "\n")

    def test_not_a_number_is_refused_as_before(self) -> None:
        unit = make_unit(1, confidence=float("nan"))
        self.assertRaises(ValueError, dumps_line, unit)
        self.assertRaises(ValueError, lambda: unit.wire_json)


class ContentSpecTests(SynchronousTestCase):
    def test_spec_names_every_field(self) -> None:
        # Content is read by filling the instance from _SPEC directly (no
        # __init__): a field missing from _SPEC would be missing on the unit.
        shared = Content._from_obj.__func__  # type: ignore[attr-defined]
        for tag, cls in CONTENT_TYPES.items():
            if cls._from_obj.__func__ is not shared:  # type: ignore[attr-defined]
                continue  # reads itself (Insight: "summary" is summary_text)
            with self.subTest(tag):
                names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
                self.assertEqual(names, {s[0] for s in cls._SPEC})

    def test_read_content_equals_constructed(self) -> None:
        for name, v in HIVE.items():
            line = v["input"].get("jsonl_line") if name.startswith("hive.unit.") else None
            if not line or not v["expected"].get("parses"):
                continue
            with self.subTest(name):
                content = parse_line(line).content
                fields = {f.name: getattr(content, f.name) for f in dataclasses.fields(content)}  # type: ignore[arg-type]
                self.assertEqual(type(content)(**fields), content)
                self.assertEqual(hash(type(content)(**fields)), hash(content))


_field_values = (
    st.none()
    | st.booleans()
    | st.integers(-5, 2**64 + 5)
    | st.floats()
    | st.text(max_size=3)
    | st.lists(st.text(max_size=2) | st.integers(), max_size=2)
)


class FieldReaderTests(SynchronousTestCase):
    """The generated readers give what _read_field gives, errors included."""

    @given(st.data())
    def test_same_as_read_field(self, data: st.DataObject) -> None:
        for specs in [units_mod._UNIT_NUMBERS, *(c._SPEC for c in CONTENT_TYPES.values())]:
            names = [s[0] for s in specs]
            obj = data.draw(st.dictionaries(st.sampled_from(names), _field_values))
            try:
                want: object = {s[0]: units_mod._read_field(obj, s, "p") for s in specs}
            except UnitError as e:
                want = str(e)
            out: dict[str, object] = {}
            try:
                units_mod._field_reader(specs)(obj, "p", out)
                got: object = out
            except UnitError as e:
                got = str(e)
            self.assertEqual(got, want)
