"""Distillation from claudectl's decision log, re-distillation and the trigger."""

from __future__ import annotations

import json
import math
import os
import random
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import HiveConfig
from claudectl.hive import distill as distill_mod
from claudectl.hive.distill import (
    STATE,
    Distiller,
    LogSegment,
    StateError,
    Tallies,
    _temporal_category,
    command_pattern,
    condition_label,
    distill_home,
    log_tallies,
    maybe_distill,
    parse_decisions,
    redistill,
)
from claudectl.hive.store import KnowledgeStore, load_store, store_transaction
from claudectl.hive.trust import load_trust
from claudectl.hive.units import (
    U32_MAX,
    Insight,
    KnowledgeUnit,
    Pattern,
    Scope,
    Temporal,
    ToolAccuracy,
    UnitIds,
)
from tests.common import temp_home
from tests.test_hive_units import make_unit

NOW = 1_800_000_000


def decision(i: int, tool: str = "Bash", command: str | None = "cargo test",
             user: str = "accept", brain: str | None = "approve", **ctx: object) -> dict:
    """One decisions.jsonl record in claudectl 0.64's shape."""
    rec: dict = {"ts": str(1713960000 + i), "pid": 4242, "project": "myapp", "tool": tool,
                 "command": command, "brain_action": brain, "brain_confidence": 0.8,
                 "brain_reasoning": "r", "user_action": user, "decision_type": "session",
                 "suggested_at": 1713960000 + i, "resolved_at": 1713960001 + i,
                 "brain_decision_ms": 120, "override_reason": None, "rule_name": None,
                 "cache_hit": False, "decision_id": f"dec_{1713960000 + i}_99_{i}",
                 "decision_source": "llm", "few_shot_ids": []}
    if ctx:
        base = {"cost_usd": 0.5, "context_pct": 40, "last_tool_error": False, "model": "m",
                "elapsed_secs": 10, "files_modified_count": 0, "total_tool_calls": 3,
                "has_file_conflict": False, "status": "running", "burn_rate_per_hr": 1.0,
                "recent_error_count": 0, "subagent_count": 0}
        base.update(ctx)
        rec["context"] = base
    return rec


def write_log(home, records: list[dict], mode: str = "w") -> None:
    home.brain.mkdir(parents=True, exist_ok=True)
    with open(home.brain / "decisions.jsonl", mode) as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def by_type(units):
    out: dict = {}
    for u in units:
        out.setdefault(u.type, []).append(u)
    return out


class PatternTests(SynchronousTestCase):
    def test_command_patterns(self) -> None:
        self.assertEqual(command_pattern("Bash", "cargo test --all"), "cargo test")
        self.assertEqual(command_pattern("Bash", "rm -rf build"), "rm")
        self.assertEqual(command_pattern("Write", "/src/Cargo.lock"), "*.lock")
        self.assertIsNone(command_pattern("Write", "/src/Makefile"))
        self.assertIsNone(command_pattern("Bash", None))

    def test_condition_labels(self) -> None:
        self.assertEqual(condition_label({"type": "cost_below", "value": 1.0}), "cost<$1")
        self.assertEqual(condition_label({"type": "context_above", "value": 80}), "ctx>80%")
        self.assertEqual(condition_label({"type": "has_errors"}), "errors")
        self.assertEqual(condition_label({"type": "hour_range", "start": 9, "end": 17}),
                         "9:00-17:00")


class DistillerTests(SynchronousTestCase):
    def distill(self, records, **cfg):
        return Distiller("me", HiveConfig(**cfg)).distill(records, NOW)

    def test_patterns_need_min_evidence(self) -> None:
        recs = [decision(i) for i in range(4)] + [decision(9, user="reject")]
        units = self.distill(recs)
        pats = by_type(units)["pattern"]
        self.assertEqual(len(pats), 1)
        p = pats[0]
        self.assertEqual(p.summary(), "[Bash, cargo test] approve (80%)")
        self.assertEqual((p.evidence_count, p.confidence, p.source_peer), (5, 0.8, "me"))
        self.assertEqual(p.originated_at, NOW)
        self.assertEqual(self.distill(recs[:4]), [])
        self.assertEqual(by_type(self.distill(recs[:4], export_min_evidence=4))["pattern"][0]
                         .content.sample_count, 4)

    def test_deny_patterns_are_confident(self) -> None:
        units = self.distill([decision(i, command="rm -rf /", user="reject", brain="deny")
                              for i in range(6)])
        p = by_type(units)["pattern"][0]
        self.assertEqual((p.content.preferred_action, p.confidence), ("deny", 1.0))

    def test_neutral_actions_and_bad_records_ignored(self) -> None:
        units = self.distill([decision(i, user="timeout") for i in range(20)]
                             + [{"tool": 5}, {"x": 1}])
        self.assertEqual(units, [])

    def test_tool_accuracy(self) -> None:
        recs = [decision(i) for i in range(8)] + [decision(10 + i, user="reject") for i in range(2)]
        acc = by_type(self.distill(recs))["tool_accuracy"][0]
        self.assertIsInstance(acc.content, ToolAccuracy)
        self.assertEqual(acc.summary(), "[Bash] accuracy 8/10 (80%)")
        self.assertNotIn("tool_accuracy", by_type(self.distill(recs[:9])))

    def test_temporal_error_streak(self) -> None:
        recs = [decision(i, user="reject", recent_error_count=4) for i in range(4)]
        recs.append(decision(5, user="accept", recent_error_count=3))
        t = by_type(self.distill(recs))["temporal"][0]
        self.assertIsInstance(t.content, Temporal)
        self.assertEqual(t.content.description, "After 3+ errors: user usually denies (n=5)")
        self.assertEqual((t.confidence, t.category), (0.8, "technique"))
        self.assertEqual(t.semantic_key, "universal/temporal:After 3+ errors: user usually denies (n=")

    def test_insights_error_loops_and_friction(self) -> None:
        loop = [decision(i, command="cargo build", user="accept", last_tool_error=True)
                for i in range(3)]
        friction = [decision(10 + i, command="git push", user="reject") for i in range(4)]
        insights = {u.content.category: u for u in by_type(self.distill(loop + friction))["insight"]}
        self.assertEqual(insights["error_loop"].summary(),
                         "[warning] error_loop: Repeated failures: Bash cargo build")
        self.assertEqual(insights["friction"].summary(),
                         "[warning] friction: Approvals overridden: Bash git push")
        for u in insights.values():
            self.assertIsInstance(u.content, Insight)
            self.assertIn(u.content.severity, ("warning", "critical"))
        # a broken streak is not a loop
        broken = loop[:2] + [decision(5, command="cargo build", last_tool_error=False)] + loop[2:]
        self.assertNotIn("insight", by_type(self.distill(broken)))

    def test_preferences_json(self) -> None:
        prefs = {"patterns": [
            {"tool": "Bash", "command_pattern": "git push", "preferred_action": "approve",
             "sample_count": 8, "accept_rate": 0.9, "confidence": 0.8,
             "conditions": [{"type": "cost_below", "value": 1.0}]},
            {"tool": "Bash", "command_pattern": "git push", "preferred_action": "deny",
             "sample_count": 5, "accept_rate": 0.1, "confidence": 0.8,
             "conditions": [{"type": "cost_above", "value": 1.0}, {"type": "has_errors"}]}],
            "tool_accuracy": [{"tool": "Read", "total": 12, "correct": 12,
                               "confidence_threshold": 0.5}],
            "temporal": [{"description": "Mornings: user approves", "sample_count": 9,
                          "strength": 0.75}, {"description": "weak", "sample_count": 9,
                                              "strength": 0.2}],
            "total_decisions": 30, "overall_accuracy": 0.9}
        units = by_type(Distiller("me").distill([], NOW, prefs))
        self.assertEqual(units["pattern"][0].content.conditions, ("cost>$1", "errors"))
        self.assertEqual(units["pattern"][0].category, "personal")
        self.assertEqual(units["tool_accuracy"][0].summary(), "[Read] accuracy 12/12 (100%)")
        self.assertEqual([u.content.description for u in units["temporal"]],
                         ["Mornings: user approves"])
        self.assertEqual(units["temporal"][0].category, "personal")
        cluster = units["approach_cluster"][0]
        self.assertEqual(cluster.summary(), "cluster: Bash:git push (2 variants)")
        self.assertEqual(cluster.content.variants[0].approach_summary,
                         "approve (90% accept over 8)")
        self.assertEqual(cluster.evidence_count, 13)


class RedistillTests(SynchronousTestCase):
    def test_same_key_keeps_id_and_bumps_version(self) -> None:
        d = Distiller("me", ids=UnitIds(lambda: NOW))
        store = KnowledgeStore()
        first = d.distill([decision(i) for i in range(5)], NOW)
        rep = redistill(store, first, "me", NOW)
        self.assertEqual((rep.new, store.units()[0].injection_state), (1, "canary"))
        unit = store.units()[0]
        again = d.distill([decision(i) for i in range(5)], NOW + 60)
        self.assertEqual(redistill(store, again, "me", NOW + 60).unchanged, 1)
        changed = d.distill([decision(i) for i in range(6)], NOW + 120)
        self.assertEqual(redistill(store, changed, "me", NOW + 120).updated, 1)
        now_unit = store.units()[0]
        self.assertEqual((now_unit.id, now_unit.version, now_unit.originated_at),
                         (unit.id, 2, unit.originated_at))
        self.assertEqual(now_unit.evidence_count, 6)
        self.assertEqual(now_unit.injection_state, "canary")

    def test_key_held_by_peer_is_taken_over(self) -> None:
        peer = make_unit(id="ku_peer", source_peer="p",
                         content=Pattern("Bash", "cargo test", "deny", 0.0, 99, ()),
                         confidence=1.0, evidence_count=99)
        store = KnowledgeStore([peer])
        fresh = Distiller("me").distill([decision(i) for i in range(5)], NOW)
        self.assertEqual(redistill(store, fresh, "me", NOW).replaced_peer, 1)
        unit = store.units()[0]
        self.assertEqual((unit.source_peer, unit.injection_state), ("me", "live"))


class TriggerTests(SynchronousTestCase):
    def test_every_ten_decisions(self) -> None:
        home = temp_home(self)
        cfg = HiveConfig()
        write_log(home, [decision(i) for i in range(9)])
        r = maybe_distill(home, cfg, NOW, local_id="me")
        self.assertIsNone(r.report)
        self.assertEqual(r.new_decisions, 9)
        self.assertEqual(len(load_store(home).store), 0)
        write_log(home, [decision(9)], "a")
        r = maybe_distill(home, cfg, NOW, local_id="me")
        self.assertEqual(r.new_decisions, 1)
        self.assertIsNotNone(r.report)
        self.assertEqual(r.report.decisions, 10)  # type: ignore[union-attr]
        self.assertEqual(len(load_store(home).store), 2)  # pattern + accuracy
        r = maybe_distill(home, cfg, NOW, local_id="me")
        self.assertEqual((r.new_decisions, r.report), (0, None))

    def test_partial_last_line_waits(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(0)])
        with open(home.brain / "decisions.jsonl", "a") as f:
            f.write('{"ts":"1","pid":1')
        self.assertEqual(maybe_distill(home, HiveConfig(), NOW, local_id="me").new_decisions, 1)
        with open(home.brain / "decisions.jsonl", "a") as f:
            f.write(',"project":"p","user_action":"accept","tool":"Bash"}\n')
        self.assertEqual(maybe_distill(home, HiveConfig(), NOW, local_id="me").new_decisions, 1)

    def test_hive_off_does_not_distill_unless_forced(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(20)])
        home.hive.mkdir(parents=True)
        (home.hive / "mode").write_text("off")
        self.assertIsNone(maybe_distill(home, HiveConfig(), NOW, local_id="me").report)
        self.assertIsNotNone(maybe_distill(home, HiveConfig(), NOW, local_id="me",
                                           force=True).report)

    def test_new_decisions_drift_peer_trust(self) -> None:
        home = temp_home(self)
        peer_unit = make_unit(id="ku_p", source_peer="peer-a", last_validated_at=NOW,
                              content=Pattern("Bash", "git push", "approve", 0.9, 9, ()))
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(peer_unit)
        write_log(home, [decision(0, command="ls")])
        maybe_distill(home, HiveConfig(default_trust=0.6), NOW, local_id="me")  # first run: backlog
        write_log(home, [decision(1, command="git push origin", user="reject"),
                         decision(2, command="git push", user="accept"),
                         decision(3, command="git push", user="reject")], "a")
        r = maybe_distill(home, HiveConfig(default_trust=0.6), NOW, local_id="me")
        self.assertEqual(r.drift, 3)
        rec = load_trust(home).get("peer-a")
        assert rec is not None
        self.assertAlmostEqual(rec.trust_level, 0.58)
        self.assertEqual((rec.knowledge_accepted, rec.knowledge_conflicted), (1, 2))
        write_log(home, [decision(4, command="git push", user="reject")], "a")
        r = maybe_distill(home, HiveConfig(auto_trust_drift=False), NOW, local_id="me")
        self.assertEqual(r.drift, 0)

    def test_distill_home_reads_the_log(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(12)])
        report = distill_home(home, HiveConfig(), "me", NOW)
        self.assertEqual((report.decisions, report.new), (12, 2))
