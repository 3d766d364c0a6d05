"""Merge rules (local always wins), their log records and order-independence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.hive.merge import (
    ACCEPTED,
    CLUSTER_UNIONED,
    DUPLICATE,
    REJECTED_LOCAL,
    REJECTED_PEER,
    UPDATED,
    merge_batch,
    merge_unit,
    write_merge_logs,
)
from claudectl.hive.store import KnowledgeStore
from claudectl.hive.units import (
    ApproachCluster,
    ApproachVariant,
    KnowledgeUnit,
    Pattern,
    dumps_record,
)
from tests.common import temp_home, vector
from tests.test_hive_units import make_unit

NOW = 1795544833


def unit_from(spec: dict, key_cmd: str = "test", tool: str = "Bash") -> KnowledgeUnit:
    if "score" in spec:
        conf, evidence = spec["score"] / 5, 5
    else:
        conf, evidence = spec["confidence"], spec["evidence_count"]
    return make_unit(
        id=spec["id"],
        source_peer=spec["source_peer"],
        confidence=conf,
        evidence_count=evidence,
        version=spec.get("version", 1),
        content=Pattern(tool, key_cmd, "approve", 0.9, 5, ()),
    )


class MergeVectorTests(SynchronousTestCase):
    def _case(self, name: str):
        inp, exp = vector(name)["input"], vector(name)["expected"]
        ex = unit_from(inp["existing"]) if inp["existing"] else None
        inc = unit_from(inp["incoming"])
        if ex is not None:
            self.assertEqual(ex.semantic_key, inp["existing"]["semantic_key"])
        out = merge_unit(ex, inc, inp["local_identity"], NOW)
        self.assertEqual(out.result, exp["result"], name)
        stored = out.store or ex
        if "stored_id" in exp:
            self.assertEqual(stored.id, exp["stored_id"], name)  # type: ignore[union-attr]
        if "stored_version" in exp:
            self.assertEqual(stored.version, exp["stored_version"], name)  # type: ignore[union-attr]
        return out

    def test_accept_new(self) -> None:
        self._case("hive.merge.accept_new")

    def test_local_wins(self) -> None:
        out = self._case("hive.merge.local_wins")
        self.assertIsNotNone(out.conflict)

    def test_peer_higher_score(self) -> None:
        self._case("hive.merge.peer_higher_score")

    def test_peer_lower_score(self) -> None:
        self._case("hive.merge.peer_lower_score")

    def test_duplicate(self) -> None:
        out = self._case("hive.merge.duplicate")
        self.assertIsNone(out.resolution)

    def test_same_id_newer_version(self) -> None:
        self._case("hive.merge.same_id_newer_version")

    def test_batch_stats(self) -> None:
        v = vector("hive.merge.batch_stats")
        inp = v["input"]
        store = KnowledgeStore(
            make_unit(
                id=f"ku_l{i}",
                content=Pattern(s["tool"], None, "approve", 0.9, 5, ()),
                confidence=s["confidence"],
                evidence_count=s["evidence_count"],
                source_peer=s["source_peer"],
            )
            for i, s in enumerate(inp["store"])
        )
        incoming = [
            make_unit(
                id=f"ku_p{i}",
                content=Pattern(s["tool"], None, "approve", 0.9, 5, ()),
                confidence=s["confidence"],
                evidence_count=s["evidence_count"],
                source_peer="peer-a",
            )
            for i, s in enumerate(inp["incoming_from_peer"])
        ]
        result = merge_batch(store, incoming, inp["local_identity"], NOW)
        self.assertEqual(result.stats(), v["expected"])
        self.assertEqual(len(result.stored), 2)
        self.assertEqual(store.get("universal/pattern:Bash:*").id, "ku_l0")  # type: ignore[union-attr]

    def test_cluster_union(self) -> None:
        v = vector("hive.merge.cluster_union")
        inp, exp = v["input"], v["expected"]

        def cluster(uid: str, peer: str, variants: list) -> KnowledgeUnit:
            return make_unit(
                id=uid,
                source_peer=peer,
                content=ApproachCluster(
                    "Bash:git push", tuple(ApproachVariant.from_json(x) for x in variants)
                ),
            )

        ex = cluster("ku_a", "peer-a", inp["existing_variants"])
        inc = cluster("ku_b", "peer-b", inp["incoming_variants"])
        out = merge_unit(ex, inc, "me", NOW)
        self.assertEqual(out.result, exp["result"])
        merged = out.store
        assert merged is not None and isinstance(merged.content, ApproachCluster)
        self.assertEqual(len(merged.content.variants), exp["variant_count"])
        approve = [x for x in merged.content.variants if x.approach_summary.startswith("approve")][
            0
        ]
        self.assertEqual(approve.evidence, exp["approve_evidence"])
        self.assertEqual(list(approve.contributing_peers), exp["approve_contributing_peers"])
        self.assertEqual(merged.id, "ku_a")
        self.assertEqual(merged.evidence_count, 17)
        self.assertEqual(merged.version, 2)
        self.assertEqual(merged.content.variants[0].evidence, 12)  # sorted by evidence
        self.assertEqual(
            out.resolution["rationale"],  # type: ignore[index]
            "cluster union: 1 + 2 \u2192 2 variants",
        )


class MergeLogVectorTests(SynchronousTestCase):
    def test_rejected_local_lines(self) -> None:
        v = vector("hive.merge.log_rejected_local")
        inp, exp = v["input"], v["expected"]
        cmd = inp["semantic_key"].rsplit(":", 1)[1]
        ex = unit_from(inp["existing"], cmd)
        inc = unit_from(inp["incoming"], cmd)
        self.assertEqual(ex.semantic_key, inp["semantic_key"])
        out = merge_unit(ex, inc, inp["local_identity"], inp["now"])
        self.assertEqual(out.result, REJECTED_LOCAL)
        self.assertEqual(dumps_record(out.conflict), exp["conflicts_jsonl_line"])  # type: ignore[arg-type]
        self.assertEqual(dumps_record(out.resolution), exp["resolutions_jsonl_line"])  # type: ignore[arg-type]

    def _peer_case(self, name: str) -> None:
        v = vector(name)
        inp, exp = v["input"], v["expected"]
        tool = inp["semantic_key"].split(":")[1]
        ex = make_unit(
            id=inp["existing"]["id"],
            source_peer=inp["existing"]["source_peer"],
            confidence=inp["existing"]["score"] / 5,
            evidence_count=5,
            version=inp["existing"].get("version", 1),
            content=Pattern(tool, None, "approve", 0.9, 5, ()),
        )
        inc = make_unit(
            id=inp["incoming"]["id"],
            source_peer=inp["incoming"]["source_peer"],
            confidence=inp["incoming"]["score"] / 5,
            evidence_count=5,
            version=inp["incoming"].get("version", 1),
            content=Pattern(tool, None, "approve", 0.9, 5, ()),
        )
        out = merge_unit(ex, inc, "me", inp["now"])
        self.assertEqual(out.result, exp["result"])
        self.assertEqual(dumps_record(out.resolution), exp["resolutions_jsonl_line"])  # type: ignore[arg-type]

    def test_tie_newer_version(self) -> None:
        self._peer_case("hive.merge.log_tie_newer_version")

    def test_rejected_peer(self) -> None:
        self._peer_case("hive.merge.log_rejected_peer")

    def test_logs_are_appended(self) -> None:
        home = temp_home(self)
        store = KnowledgeStore([make_unit(1, source_peer="me")])
        result = merge_batch(
            store, [make_unit(1, id="ku_x", source_peer="p", confidence=1.0)], "me", NOW
        )
        write_merge_logs(home, result)
        write_merge_logs(home, result)
        self.assertEqual(len((home.hive / "conflicts.jsonl").read_text().splitlines()), 2)
        self.assertEqual(len((home.hive / "resolutions.jsonl").read_text().splitlines()), 2)


class MergeRuleTests(SynchronousTestCase):
    def test_unit_claiming_local_identity_is_rejected_from_peers(self) -> None:
        inc = make_unit(source_peer="me")
        self.assertEqual(merge_unit(None, inc, "me", NOW).result, REJECTED_PEER)
        self.assertEqual(merge_unit(None, inc, "me", NOW, allow_local_origin=True).result, ACCEPTED)

    def test_own_unit_echo_is_duplicate(self) -> None:
        mine = make_unit(source_peer="me")
        self.assertEqual(merge_unit(mine, mine, "me", NOW).result, DUPLICATE)

    def test_newer_version_with_lower_score_is_rejected(self) -> None:
        ex = make_unit(source_peer="p", version=1, confidence=0.9)
        inc = make_unit(source_peer="p", version=2, confidence=0.5)
        self.assertEqual(merge_unit(ex, inc, "me", NOW).result, REJECTED_PEER)

    def test_same_score_same_version_is_decided_by_id(self) -> None:
        a = make_unit(id="ku_a", source_peer="p")
        b = make_unit(id="ku_b", source_peer="q")
        self.assertEqual(merge_unit(a, b, "me", NOW).result, UPDATED)
        self.assertEqual(merge_unit(b, a, "me", NOW).result, REJECTED_PEER)

    def test_local_cluster_is_unioned(self) -> None:
        var = ApproachVariant("approve", 3)
        ex = make_unit(source_peer="me", content=ApproachCluster("k", (var,)))
        inc = make_unit(
            id="ku_o", source_peer="p", content=ApproachCluster("k", (ApproachVariant("deny", 2),))
        )
        out = merge_unit(ex, inc, "me", NOW)
        self.assertEqual(out.result, CLUSTER_UNIONED)
        self.assertEqual(out.store.source_peer, "me")  # type: ignore[union-attr]


# --- properties -------------------------------------------------------------------------

_peers = st.sampled_from(["me", "peer-a", "peer-b", "peer-c"])
_incoming = st.builds(
    lambda i, k, peer, conf, ev, ver: make_unit(
        i,
        id=f"ku_{i % 7}",
        source_peer=peer,
        confidence=conf,
        evidence_count=ev,
        version=ver,
        content=Pattern("Bash", f"k{k}", "approve", 0.5, 1, ()),
    ),
    st.integers(0, 50),
    st.integers(0, 3),
    st.sampled_from(["peer-a", "peer-b", "peer-c"]),
    st.sampled_from([0.1, 0.5, 0.9, 1.0]),
    st.integers(0, 20),
    st.integers(1, 3),
)
_local = st.builds(
    lambda k, conf: make_unit(
        100 + k,
        id=f"ku_local{k}",
        source_peer="me",
        confidence=conf,
        content=Pattern("Bash", f"k{k}", "approve", 0.5, 1, ()),
    ),
    st.integers(0, 3),
    st.sampled_from([0.0, 0.3]),
)


class MergePropertyTests(SynchronousTestCase):
    @given(st.lists(_local, max_size=3), st.lists(_incoming, max_size=12), st.randoms())
    def test_arrival_order_does_not_matter(self, local, incoming, rnd) -> None:
        shuffled = list(incoming)
        rnd.shuffle(shuffled)
        a, b = KnowledgeStore(local), KnowledgeStore(local)
        merge_batch(a, incoming, "me", NOW)
        merge_batch(b, shuffled, "me", NOW)
        self.assertEqual(a.by_key(), b.by_key())

    @given(st.lists(_local, min_size=1, max_size=4), st.lists(_incoming, max_size=12))
    def test_local_always_wins(self, local, incoming) -> None:
        store = KnowledgeStore(local)
        before = store.by_key()
        merge_batch(store, incoming, "me", NOW)
        for key, unit in before.items():
            self.assertEqual(store.get(key), unit)

    @given(st.lists(_incoming, max_size=12))
    def test_merging_twice_changes_nothing(self, incoming) -> None:
        store = KnowledgeStore()
        merge_batch(store, incoming, "me", NOW)
        after = store.by_key()
        again = merge_batch(store, incoming, "me", NOW)
        self.assertEqual(store.by_key(), after)
        self.assertEqual(again.accepted, 0)
