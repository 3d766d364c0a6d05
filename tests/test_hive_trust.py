"""Trust records, tiers, drift and the sybil checks."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hive.trust import (
    DAY,
    QUARANTINE_SECS,
    PeerTrust,
    Tier,
    TrustBook,
    load_trust,
    log_collisions,
    save_trust,
    tier_for,
    trust_level,
    trust_transaction,
)
from claudectl.hive.units import Pattern, ToolAccuracy
from tests.common import temp_home, vector
from tests.test_hive_units import make_unit

NOW = 1_800_000_000


class TierTests(SynchronousTestCase):
    def test_tiers_vector(self) -> None:
        v = vector("hive.trust.tiers")
        self.assertEqual(
            [tier_for(x).display for x in v["input"]["trust_level"]], v["expected"]["tier"]
        )

    def test_labels_and_ranks(self) -> None:
        self.assertEqual(
            [(t.label, t.rank) for t in Tier],
            [("hive", 4), ("hive, suggested", 3), ("hive, unverified", 2), ("hive, ignored", 1)],
        )


class RecordTests(SynchronousTestCase):
    def test_legacy_record(self) -> None:
        v = vector("hive.trust.legacy_record")
        rec = PeerTrust.from_json(json.loads(v["input"]["json"]))
        self.assertEqual(rec.is_quarantined(NOW), v["expected"]["quarantined"])
        self.assertEqual(rec.frozen, v["expected"]["frozen"])
        self.assertEqual(rec.daily_received, {})
        self.assertIsNone(rec.last_anomaly_at)

    def test_record_field_order(self) -> None:
        rec = PeerTrust.new("ci-runner-9d1e", 0.5, 1713900000)
        self.assertEqual(
            list(rec.to_json()),
            [
                "peer_id",
                "trust_level",
                "knowledge_accepted",
                "knowledge_conflicted",
                "first_seen",
                "last_sync",
                "quarantined_until",
                "frozen",
                "freeze_reason",
                "daily_received",
                "last_anomaly_at",
            ],
        )
        self.assertEqual(rec.quarantined_until, 1714504800)

    def test_bad_records_rejected(self) -> None:
        for bad in (
            {"peer_id": "a"},
            {"peer_id": "a", "trust_level": "high"},
            {
                "peer_id": 1,
                "trust_level": 0.5,
                "knowledge_accepted": 0,
                "knowledge_conflicted": 0,
                "first_seen": 0,
                "last_sync": 0,
            },
        ):
            self.assertRaises(ValueError, PeerTrust.from_json, bad)


class DriftTests(SynchronousTestCase):
    def _drift(self, name: str) -> PeerTrust:
        inp = vector(name)["input"]
        rec = PeerTrust("p", inp["start"], quarantined_until=NOW + 1 if inp["quarantined"] else 0)
        for step in inp["steps"]:
            (rec.drift_up if step == "up" else rec.drift_down)(NOW)
        return rec

    def test_drift_vector(self) -> None:
        exp = vector("hive.trust.drift")["expected"]
        rec = self._drift("hive.trust.drift")
        self.assertAlmostEqual(rec.trust_level, exp["trust_level"], delta=exp["tolerance"])
        self.assertEqual(rec.knowledge_accepted, exp["knowledge_accepted"])
        self.assertEqual(rec.knowledge_conflicted, exp["knowledge_conflicted"])

    def test_quarantine_caps_drift(self) -> None:
        rec = self._drift("hive.trust.quarantine_caps_drift")
        self.assertEqual(
            rec.trust_level, vector("hive.trust.quarantine_caps_drift")["expected"]["trust_level"]
        )

    def test_quarantine_never_lowers_a_higher_level(self) -> None:
        rec = PeerTrust("p", 0.7, quarantined_until=NOW + 1)
        rec.drift_up(NOW)
        self.assertEqual(rec.trust_level, 0.7)

    def test_frozen_does_not_drift_up_and_down_floors_at_zero(self) -> None:
        rec = PeerTrust("p", 0.005, frozen=True)
        rec.drift_up(NOW)
        self.assertEqual(rec.trust_level, 0.005)
        rec.drift_down(NOW)
        self.assertEqual(rec.trust_level, 0.0)

    def test_decisions_drift_matching_peers(self) -> None:
        book = TrustBook(default_trust=0.6)
        units = [
            make_unit(
                1, source_peer="a", content=Pattern("Bash", "cargo test", "approve", 0.9, 9, ())
            ),
            make_unit(2, source_peer="b", content=Pattern("Bash", None, "deny", 0.1, 9, ())),
            make_unit(3, source_peer="me", content=Pattern("Bash", None, "approve", 0.9, 9, ())),
            make_unit(4, source_peer="c", content=ToolAccuracy("Bash", 1, 1, 0.5)),
        ]
        votes = book.apply_decision("Bash", "cargo test --all", "accept", units, "me", NOW)
        self.assertEqual(votes, {"a": 1, "b": -1})
        self.assertAlmostEqual(book.level("a"), 0.6, places=9)  # capped: quarantined, >= 0.5
        self.assertAlmostEqual(book.level("b"), 0.59, places=9)
        self.assertNotIn("me", book.records)
        self.assertNotIn("c", book.records)
        self.assertEqual(book.apply_decision("Bash", "ls", "weird", units, "me", NOW), {})
        book.records["a"].quarantined_until = 0
        book.apply_decision("Bash", "cargo test", "user_approve", units, "me", NOW)
        self.assertAlmostEqual(book.level("a"), 0.61, places=9)


class BookTests(SynchronousTestCase):
    def test_new_peers_get_default_trust(self) -> None:
        book = TrustBook(default_trust=0.3)
        self.assertEqual(book.level("x"), 0.3)
        self.assertEqual(book.tier("x"), Tier.UNVERIFIED)
        rec = book.ensure("x", NOW)
        self.assertEqual(rec.trust_level, 0.3)
        self.assertEqual(rec.quarantined_until, NOW + QUARANTINE_SECS)

    def test_set_clamped(self) -> None:
        v = vector("hive.trust.set_clamped")
        book = TrustBook()
        got = [book.set_level("p", x, NOW).trust_level for x in v["input"]["set"]]
        self.assertEqual(got, v["expected"]["trust_level"])
        self.assertFalse(book.get("p").is_quarantined(NOW))  # type: ignore[union-attr]

    def test_rate_cap(self) -> None:
        v = vector("hive.trust.rate_cap")
        book = TrustBook()
        got = [book.record_batch("p", n, NOW) for n in v["input"]["pushes_same_day"]]
        self.assertEqual(got, v["expected"]["triggers"])
        rec = book.get("p")
        assert rec is not None
        self.assertTrue(rec.frozen)
        self.assertEqual(rec.freeze_reason, "rate cap exceeded: 1001 units in 24h")
        self.assertEqual(rec.last_anomaly_at, NOW)

    def test_rate_cap_keeps_30_days(self) -> None:
        book = TrustBook()
        book.record_batch("p", 1, NOW - 40 * DAY)
        book.record_batch("p", 1, NOW)
        self.assertEqual(list(book.records["p"].daily_received), [str(NOW // DAY)])
        self.assertEqual(book.records["p"].last_sync, NOW)

    def _collide(self, name: str) -> tuple[TrustBook, list]:
        inp = vector(name)["input"]
        ex = make_unit(
            1, source_peer=inp["existing"]["source_peer"], confidence=inp["existing"]["confidence"]
        )
        inc = make_unit(
            1,
            id="ku_2",
            source_peer=inp["incoming"]["source_peer"],
            confidence=inp["incoming"]["confidence"],
        )
        book = TrustBook()
        return book, book.check_collisions(
            {ex.semantic_key: ex}, [inc], inp["incoming"]["source_peer"], "me", NOW
        )

    def test_collision(self) -> None:
        book, cols = self._collide("hive.trust.collision")
        self.assertEqual(len(cols), 1)
        self.assertAlmostEqual(
            cols[0].confidence_delta, vector("hive.trust.collision")["expected"]["confidence_delta"]
        )
        # One unit is not enough evidence to freeze anyone (issue 11, item 5).
        self.assertFalse(book.is_frozen("peer-a") or book.is_frozen("peer-b"))
        self.assertEqual(book.records["peer-b"].collided_on, ["universal/pattern:Bash:cmd1"])
        self.assertEqual(book.records["peer-a"].contradicted_by, ["peer-b"])

    def test_collision_freeze_needs_evidence_from_more_than_one_unit(self) -> None:
        ex1 = make_unit(1, source_peer="victim", confidence=0.9)
        ex2 = make_unit(2, source_peer="victim", confidence=0.9)
        bad1 = make_unit(1, id="ku_x1", source_peer="liar", confidence=0.1)
        bad2 = make_unit(2, id="ku_x2", source_peer="liar", confidence=0.1)
        existing = {ex1.semantic_key: ex1, ex2.semantic_key: ex2}
        book = TrustBook()
        book.check_collisions(existing, [bad1], "liar", "me", NOW)
        # The same key again is no new evidence.
        book.check_collisions(existing, [bad1], "liar", "me", NOW)
        self.assertFalse(book.is_frozen("liar") or book.is_frozen("victim"))
        # A second key: the sender is frozen, its victim is not (one accuser).
        book.check_collisions(existing, [bad2], "liar", "me", NOW)
        self.assertTrue(book.is_frozen("liar"))
        self.assertIn(
            "collision on universal/pattern:Bash:cmd2", book.records["liar"].freeze_reason
        )
        self.assertFalse(book.is_frozen("victim"))
        # A second, independent peer contradicting it freezes the victim.
        bad3 = make_unit(1, id="ku_y1", source_peer="other", confidence=0.1)
        book.check_collisions(existing, [bad3], "other", "me", NOW)
        self.assertTrue(book.is_frozen("victim"))
        self.assertFalse(book.is_frozen("other"))
        # The evidence survives trust.json.
        again = TrustBook.from_json(json.loads(json.dumps(book.to_json())))
        self.assertEqual(again.records["victim"].contradicted_by, ["liar", "other"])

    def test_no_collision_within_threshold(self) -> None:
        book, cols = self._collide("hive.trust.no_collision_within_threshold")
        self.assertEqual(cols, [])
        self.assertEqual(book.records, {})

    def test_collision_never_freezes_local(self) -> None:
        ex = make_unit(1, source_peer="me", confidence=0.9)
        inc = make_unit(1, id="ku_2", source_peer="peer-b", confidence=0.1)
        book = TrustBook()
        book.check_collisions({ex.semantic_key: ex}, [inc], "peer-b", "me", NOW)
        ex2 = make_unit(2, source_peer="me", confidence=0.9)
        inc2 = make_unit(2, id="ku_3", source_peer="peer-b", confidence=0.1)
        book.check_collisions({ex2.semantic_key: ex2}, [inc2], "peer-b", "me", NOW)
        self.assertNotIn("me", book.records)
        self.assertTrue(book.is_frozen("peer-b"))
        self.assertTrue(book.unfreeze("peer-b"))
        self.assertFalse(book.unfreeze("peer-b"))


class FileTests(SynchronousTestCase):
    def test_save_and_load(self) -> None:
        home = temp_home(self)
        book = TrustBook(default_trust=0.5)
        book.set_level("b-peer", 0.9, NOW)
        book.ensure("a-peer", NOW)
        save_trust(home, book)
        text = (home.hive / "trust.json").read_text()
        data = json.loads(text)
        self.assertEqual(list(data), ["a-peer", "b-peer"])
        self.assertTrue(text.startswith('{\n  "a-peer": {\n    "peer_id": "a-peer",'))
        self.assertEqual(load_trust(home).to_json(), book.to_json())
        self.assertEqual(trust_level(home, "b-peer"), 0.9)
        self.assertEqual(trust_level(home, "nobody", 0.25), 0.25)

    def test_corrupt_file_is_kept_aside(self) -> None:
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        (home.hive / "trust.json").write_text("{broken")
        # A plain read leaves the file alone (a writer may be half-way).
        self.assertEqual(load_trust(home).records, {})
        self.assertEqual(list(home.hive.glob("trust.json.corrupt-*")), [])
        self.assertEqual((home.hive / "trust.json").read_text(), "{broken")
        # A transaction, about to write a new file, keeps the old one aside.
        with trust_transaction(home) as book:
            self.assertEqual(book.records, {})
            book.set_level("peer-a", 0.7, 1_800_000_000)
        aside = list(home.hive.glob("trust.json.corrupt-*"))
        self.assertEqual(len(aside), 1)
        self.assertEqual(aside[0].read_text(), "{broken")
        self.flushLoggedErrors()

    def test_transaction_saves_only_changes(self) -> None:
        home = temp_home(self)
        with trust_transaction(home) as book:
            pass
        self.assertFalse((home.hive / "trust.json").exists())
        with trust_transaction(home, 0.7) as book:
            book.ensure("p", NOW)
        self.assertEqual(trust_level(home, "p"), 0.7)

    def test_collision_log_line(self) -> None:
        home = temp_home(self)
        ex = make_unit(1, source_peer="peer-a", confidence=0.9, id="ku_a")
        inc = make_unit(1, source_peer="peer-b", confidence=0.5, id="ku_b")
        cols = TrustBook().check_collisions({ex.semantic_key: ex}, [inc], "peer-b", "me", 7)
        log_collisions(home, cols)
        self.assertEqual(
            (home.hive / "collisions.jsonl").read_text(),
            '{"confidence_delta":0.4,"existing_peer":"peer-a","existing_unit_id":"ku_a",'
            '"incoming_peer":"peer-b","incoming_unit_id":"ku_b",'
            '"semantic_key":"universal/pattern:Bash:cmd1","ts":7}\n',
        )
