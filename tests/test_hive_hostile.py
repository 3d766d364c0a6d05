"""
Hostile or unlucky input to the hive: a peer planting "local" knowledge,
cluster unions that must converge, out-of-range numbers, units too big for a
frame, unbounded snapshot pages.  (Regression tests from a code review.)
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config
from claudectl.hive.gossip import Gossip
from claudectl.hive.merge import merge_unit
from claudectl.hive.units import KnowledgeUnit, UnitError, parse_line
from claudectl.relay import codec
from claudectl.relay.codec import Envelope
from tests.common import FakeMesh, temp_home
from tests.test_gossip import NOW, put, stored, unit_json


def cluster(
    uid: str, src: str, variants: list[tuple[str, int]], version: int = 1, hops: int = 0
) -> dict[str, Any]:
    return {
        "id": uid,
        "scope": {"type": "universal"},
        "category": "technique",
        "content": {
            "type": "approach_cluster",
            "problem_key": "Bash:git push",
            "variants": [
                {
                    "approach_summary": s,
                    "conditions": [],
                    "evidence": e,
                    "contributing_peers": [src],
                    "outcome_ref": None,
                }
                for s, e in variants
            ],
        },
        "evidence_count": sum(e for _, e in variants),
        "confidence": 0.7,
        "source_peer": src,
        "originated_at": NOW - 100,
        "last_validated_at": NOW - 100,
        "propagation_count": hops,
        "version": version,
    }


class HostileHiveTests(SynchronousTestCase):
    def engine(self, ident: str, peers: tuple[str, ...] = ()) -> tuple[Any, FakeMesh, Gossip]:
        home = temp_home(self)
        mesh = FakeMesh(ident, list(peers))
        g = Gossip(home, Config(), mesh, ident, lambda: NOW)
        g.register()
        return home, mesh, g

    def test_peer_cannot_plant_a_local_unit(self) -> None:
        home, mesh, _ = self.engine("me-1", ("evil",))
        mesh.deliver(
            "evil",
            "knowledge_sync",
            {
                "sync_epoch": NOW,
                "units": [
                    unit_json("ku_a", "someone", cmd="rm -rf", confidence=0.5, evidence=1),
                    unit_json("ku_b", "me-1", cmd="rm -rf", confidence=1.0, evidence=100),
                ],
            },
        )
        self.assertNotIn("me-1", {u.source_peer for u in stored(home).values()})

    def test_cluster_union_converges(self) -> None:
        a = KnowledgeUnit.from_json(cluster("ku_a", "A", [("approve", 5), ("deny", 3)]))
        b = KnowledgeUnit.from_json(cluster("ku_b", "B", [("approve", 4), ("deny", 2)]))
        a1 = merge_unit(a, b, "A", NOW).store
        b1 = merge_unit(b, a, "B", NOW).store
        assert a1 is not None and b1 is not None
        self.assertEqual(a1.evidence_count, 14)
        # A fixpoint: exchanging the results again changes nothing (no echo storm).
        self.assertEqual(merge_unit(a1, b1, "A", NOW).result, "duplicate")
        self.assertEqual(merge_unit(b1, a1, "B", NOW).result, "duplicate")

    def test_same_cluster_newer_version_replaces(self) -> None:
        v1 = KnowledgeUnit.from_json(cluster("ku_a", "A", [("approve", 5), ("deny", 3)], hops=1))
        v2 = KnowledgeUnit.from_json(
            cluster("ku_a", "A", [("approve", 7), ("deny", 4)], version=2, hops=1)
        )
        out = merge_unit(v1, v2, "B", NOW).store
        assert out is not None
        self.assertEqual((out.version, out.evidence_count), (2, 11))

    def test_huge_integer_is_a_unit_error(self) -> None:
        line = json.dumps(unit_json("ku_x", "p")).replace(
            '"confidence": 0.9', '"confidence": 1' + "0" * 400
        )
        self.assertRaises(UnitError, parse_line, line)

    def test_bad_number_does_not_void_the_batch(self) -> None:
        home, mesh, _ = self.engine("me-1", ("p",))
        bad = unit_json("ku_bad", "p", cmd="x")
        bad["confidence"] = 10**400
        mesh.deliver(
            "p", "knowledge_sync", {"sync_epoch": NOW, "units": [bad, unit_json("ku_ok", "p")]}
        )
        self.assertEqual(sorted(stored(home)), ["ku_ok"])

    def test_never_send_a_frame_over_the_line_limit(self) -> None:
        home, mesh, g = self.engine("me-2")
        big = {
            "id": "ku_big",
            "scope": {"type": "universal"},
            "category": "technique",
            "content": {
                "type": "skill",
                "name": "big",
                "description": "d",
                "version": "1",
                "body": "x" * 1_100_000,
                "requires": {},
            },
            "evidence_count": 5,
            "confidence": 0.9,
            "source_peer": "me-2",
            "originated_at": NOW,
            "last_validated_at": NOW,
            "propagation_count": 0,
            "version": 1,
        }
        put(home, "me-2", big, unit_json("ku_small", "me-2"))
        mesh.connect("peer-x")
        mesh.deliver("peer-x", "knowledge_request", {"since_epoch": 0})
        sent_ids = set()
        for _, t, p in mesh.sent:
            line = codec.encode(
                Envelope("msg_1800000000000_281474976710655", t, "me-2", NOW * 1000, p)
            )
            self.assertLessEqual(len(line) - 1, codec.MAX_LINE_BYTES, t)
            sent_ids.update(u["id"] for u in p.get("units", []))
        self.assertEqual(sent_ids, {"ku_small"})
        self.assertEqual(g.counters["oversize_units"], 1)

    def test_snapshot_page_buffer_is_bounded(self) -> None:
        home, mesh, g = self.engine("me-1", ("p",))
        cap = Config().hive.max_units_per_peer_per_day
        for n in range(1, 30):
            units = [unit_json(f"ku_{n}_{i}", "p", cmd=f"c {n} {i}") for i in range(50)]
            mesh.deliver("p", "knowledge_snapshot", {"page": 1, "total_pages": 99, "units": units})
            # Flushed (merged, rate-capped) instead of piling up in memory.
            self.assertLess(len(g._pages.get("p", [])), cap)
        mesh.disconnect("p")  # the rest is merged: past the daily cap, dropped
        self.assertEqual(g.counters["dropped_rate_cap"], 29 * 50 - cap)
        self.assertEqual(len(stored(home)), Config().hive.max_units)

    def test_unfinished_snapshot_merged_on_link_down(self) -> None:
        home, mesh, _ = self.engine("me-1", ("p",))
        mesh.deliver(
            "p",
            "knowledge_snapshot",
            {"page": 1, "total_pages": 2, "units": [unit_json("ku_1", "p")]},
        )
        self.assertEqual(stored(home), {})
        mesh.disconnect("p")
        self.assertEqual(sorted(stored(home)), ["ku_1"])
