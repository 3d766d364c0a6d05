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


def decision(
    i: int,
    tool: str = "Bash",
    command: str | None = "cargo test",
    user: str = "accept",
    brain: str | None = "approve",
    **ctx: object,
) -> dict:
    """One decisions.jsonl record in claudectl 0.64's shape."""
    rec: dict = {
        "ts": str(1713960000 + i),
        "pid": 4242,
        "project": "myapp",
        "tool": tool,
        "command": command,
        "brain_action": brain,
        "brain_confidence": 0.8,
        "brain_reasoning": "r",
        "user_action": user,
        "decision_type": "session",
        "suggested_at": 1713960000 + i,
        "resolved_at": 1713960001 + i,
        "brain_decision_ms": 120,
        "override_reason": None,
        "rule_name": None,
        "cache_hit": False,
        "decision_id": f"dec_{1713960000 + i}_99_{i}",
        "decision_source": "llm",
        "few_shot_ids": [],
    }
    if ctx:
        base = {
            "cost_usd": 0.5,
            "context_pct": 40,
            "last_tool_error": False,
            "model": "m",
            "elapsed_secs": 10,
            "files_modified_count": 0,
            "total_tool_calls": 3,
            "has_file_conflict": False,
            "status": "running",
            "burn_rate_per_hr": 1.0,
            "recent_error_count": 0,
            "subagent_count": 0,
        }
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
        self.assertEqual(
            condition_label({"type": "hour_range", "start": 9, "end": 17}), "9:00-17:00"
        )


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
        self.assertEqual(
            by_type(self.distill(recs[:4], export_min_evidence=4))["pattern"][
                0
            ].content.sample_count,
            4,
        )

    def test_deny_patterns_are_confident(self) -> None:
        units = self.distill(
            [decision(i, command="rm -rf /", user="reject", brain="deny") for i in range(6)]
        )
        p = by_type(units)["pattern"][0]
        self.assertEqual((p.content.preferred_action, p.confidence), ("deny", 1.0))

    def test_neutral_actions_and_bad_records_ignored(self) -> None:
        units = self.distill(
            [decision(i, user="timeout") for i in range(20)] + [{"tool": 5}, {"x": 1}]
        )
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
        self.assertEqual(
            t.semantic_key, "universal/temporal:After 3+ errors: user usually denies (n="
        )

    def test_insights_error_loops_and_friction(self) -> None:
        loop = [
            decision(i, command="cargo build", user="accept", last_tool_error=True)
            for i in range(3)
        ]
        friction = [decision(10 + i, command="git push", user="reject") for i in range(4)]
        insights = {
            u.content.category: u for u in by_type(self.distill(loop + friction))["insight"]
        }
        self.assertEqual(
            insights["error_loop"].summary(),
            "[warning] error_loop: Repeated failures: Bash cargo build",
        )
        self.assertEqual(
            insights["friction"].summary(),
            "[warning] friction: Approvals overridden: Bash git push",
        )
        for u in insights.values():
            self.assertIsInstance(u.content, Insight)
            self.assertIn(u.content.severity, ("warning", "critical"))
        # a broken streak is not a loop
        broken = loop[:2] + [decision(5, command="cargo build", last_tool_error=False)] + loop[2:]
        self.assertNotIn("insight", by_type(self.distill(broken)))

    def test_preferences_json(self) -> None:
        prefs = {
            "patterns": [
                {
                    "tool": "Bash",
                    "command_pattern": "git push",
                    "preferred_action": "approve",
                    "sample_count": 8,
                    "accept_rate": 0.9,
                    "confidence": 0.8,
                    "conditions": [{"type": "cost_below", "value": 1.0}],
                },
                {
                    "tool": "Bash",
                    "command_pattern": "git push",
                    "preferred_action": "deny",
                    "sample_count": 5,
                    "accept_rate": 0.1,
                    "confidence": 0.8,
                    "conditions": [{"type": "cost_above", "value": 1.0}, {"type": "has_errors"}],
                },
            ],
            "tool_accuracy": [
                {"tool": "Read", "total": 12, "correct": 12, "confidence_threshold": 0.5}
            ],
            "temporal": [
                {"description": "Mornings: user approves", "sample_count": 9, "strength": 0.75},
                {"description": "weak", "sample_count": 9, "strength": 0.2},
            ],
            "total_decisions": 30,
            "overall_accuracy": 0.9,
        }
        units = by_type(Distiller("me").distill([], NOW, prefs))
        self.assertEqual(units["pattern"][0].content.conditions, ("cost>$1", "errors"))
        self.assertEqual(units["pattern"][0].category, "personal")
        self.assertEqual(units["tool_accuracy"][0].summary(), "[Read] accuracy 12/12 (100%)")
        self.assertEqual(
            [u.content.description for u in units["temporal"]], ["Mornings: user approves"]
        )
        self.assertEqual(units["temporal"][0].category, "personal")
        cluster = units["approach_cluster"][0]
        self.assertEqual(cluster.summary(), "cluster: Bash:git push (2 variants)")
        self.assertEqual(
            cluster.content.variants[0].approach_summary, "approve (90% accept over 8)"
        )
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
        self.assertEqual(
            (now_unit.id, now_unit.version, now_unit.originated_at),
            (unit.id, 2, unit.originated_at),
        )
        self.assertEqual(now_unit.evidence_count, 6)
        self.assertEqual(now_unit.injection_state, "canary")

    def test_key_held_by_peer_is_taken_over(self) -> None:
        peer = make_unit(
            id="ku_peer",
            source_peer="p",
            content=Pattern("Bash", "cargo test", "deny", 0.0, 99, ()),
            confidence=1.0,
            evidence_count=99,
        )
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
        self.assertIsNotNone(
            maybe_distill(home, HiveConfig(), NOW, local_id="me", force=True).report
        )

    def test_new_decisions_drift_peer_trust(self) -> None:
        home = temp_home(self)
        peer_unit = make_unit(
            id="ku_p",
            source_peer="peer-a",
            last_validated_at=NOW,
            content=Pattern("Bash", "git push", "approve", 0.9, 9, ()),
        )
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(peer_unit)
        write_log(home, [decision(0, command="ls")])
        maybe_distill(home, HiveConfig(default_trust=0.6), NOW, local_id="me")  # first run: backlog
        write_log(
            home,
            [
                decision(1, command="git push origin", user="reject"),
                decision(2, command="git push", user="accept"),
                decision(3, command="git push", user="reject"),
            ],
            "a",
        )
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


# --- the optimized distiller against a plain restatement of the rules -------------------

POSITIVE = {"accept", "auto", "user_approve", "rule_approve"}
NEGATIVE = {"reject", "deny_rule_override", "rule_deny", "conflict_deny"}


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _session(pid: Any) -> bool:
    """Whether ``pid`` can name a session (hashable and equal to itself)."""
    try:
        hash(pid)
    except TypeError:
        return False
    return pid == pid


def reference_units(
    records: Iterable[Mapping[str, Any]], cfg: HiveConfig
) -> list[tuple[Any, int, float, str]]:
    """
    hive.md 5.3 for decision logs, one unit family at a time, with no
    attention to speed: (content, evidence, confidence, category) per unit.
    """
    rows = []
    for d in records:
        tool = d.get("tool")
        if not isinstance(tool, str) or not tool:
            continue
        action = d.get("user_action")
        sign = 0
        if isinstance(action, str):
            sign = 1 if action in POSITIVE else -1 if action in NEGATIVE else 0
        ctx = d.get("context")
        rows.append(
            {
                "tool": tool,
                "key": (tool, command_pattern(tool, d.get("command"))),
                "sign": sign,
                "brain": d.get("brain_action"),
                "conf": d.get("brain_confidence"),
                "pid": d.get("pid"),
                "ctx": ctx if isinstance(ctx, Mapping) else None,
            }
        )
    signed = [r for r in rows if r["sign"]]
    found: list[tuple[Any, int, float, str]] = []

    for key in _unique(r["key"] for r in signed):
        signs = [r["sign"] for r in signed if r["key"] == key]
        n, pos = len(signs), signs.count(1)
        if n >= max(1, cfg.export_min_evidence):
            rate = pos / n
            action = "approve" if rate >= 0.5 else "deny"
            found.append(
                (
                    Pattern(key[0], key[1], action, rate, n, ()),
                    n,
                    rate if action == "approve" else 1 - rate,
                    "best_practice",
                )
            )

    judged = [r for r in signed if r["brain"] in ("approve", "deny")]
    for tool in _unique(r["tool"] for r in judged):
        mine = [r for r in judged if r["tool"] == tool]
        correct = sum((r["brain"] == "approve") == (r["sign"] > 0) for r in mine)
        conf_sum = 0.0
        for r in mine:
            if _number(r["conf"]):
                try:
                    total = conf_sum + r["conf"]
                except OverflowError:
                    continue
                if math.isfinite(total):
                    conf_sum = total
        if len(mine) >= max(1, cfg.export_min_tool_decisions):
            found.append(
                (
                    ToolAccuracy(tool, len(mine), correct, round(conf_sum / len(mine), 2)),
                    len(mine),
                    correct / len(mine),
                    "best_practice",
                )
            )

    def at_least(field: str, bound: float, types: tuple[type, ...]) -> Any:
        return lambda c: isinstance(c.get(field), types) and c.get(field) >= bound

    for label, test in (
        ("After 3+ errors", at_least("recent_error_count", 3, (int,))),
        ("Above 80% context", at_least("context_pct", 80, (int,))),
        ("Above $5 spent", at_least("cost_usd", 5.0, (int, float))),
    ):
        signs = [r["sign"] for r in signed if r["ctx"] is not None and test(r["ctx"])]
        n, pos, neg = len(signs), signs.count(1), signs.count(-1)
        if n < max(1, cfg.export_min_evidence) or max(pos, neg) / n < 0.7:
            continue
        desc = f"{label}: user usually {'approves' if pos >= neg else 'denies'} (n={n})"
        found.append(
            (Temporal(desc, max(pos, neg) / n), n, max(pos, neg) / n, _temporal_category(desc))
        )

    runs: dict[Any, tuple[Any, int]] = {}
    loops: dict[Any, list[int]] = {}
    for r in rows:
        if r["ctx"] is None or not _session(r["pid"]):
            continue
        if r["ctx"].get("last_tool_error") is not True:
            runs.pop(r["pid"], None)
            continue
        prev_key, run = runs.get(r["pid"], (None, 0))
        run = run + 1 if prev_key == r["key"] else 1
        runs[r["pid"]] = (r["key"], run)
        if run == 3:
            loops.setdefault(r["key"], [0, 0])[0] += 1
            loops[r["key"]][1] += 3
        elif run > 3:
            loops[r["key"]][1] += 1
    for (tool, cp), (n_loops, failures) in loops.items():
        what = f"{tool} {cp}" if cp else tool
        found.append(
            (
                Insight(
                    "error_loop",
                    "critical" if n_loops >= 3 else "warning",
                    f"Repeated failures: {what}",
                    f"{n_loops} streak(s) of 3+ failures; change approach instead of retrying",
                ),
                failures,
                min(1.0, 0.5 + 0.1 * n_loops),
                "technique",
            )
        )

    approved = [r for r in signed if r["brain"] == "approve"]
    for key in _unique(r["key"] for r in approved):
        mine = [r for r in approved if r["key"] == key]
        overridden = sum(r["sign"] < 0 for r in mine)
        if overridden >= 3 and overridden / len(mine) >= 0.5:
            rate = overridden / len(mine)
            what = f"{key[0]} {key[1]}" if key[1] else key[0]
            found.append(
                (
                    Insight(
                        "friction",
                        "warning",
                        f"Approvals overridden: {what}",
                        f"user rejected {overridden} of {len(mine)} approvals "
                        f"({format(rate * 100, '.0f')}%); do not auto-approve",
                    ),
                    len(mine),
                    rate,
                    "best_practice",
                )
            )

    by_key: dict[str, tuple[Any, int, float, str]] = {}
    for content, evidence, conf, category in found:
        unit = KnowledgeUnit(
            id="ku_0_0",
            scope=Scope(),
            content=content,
            evidence_count=min(evidence, U32_MAX),
            confidence=conf,
            source_peer="me",
            originated_at=NOW,
            last_validated_at=NOW,
            category=category,
        )
        by_key[unit.semantic_key] = (content, min(evidence, U32_MAX), conf, category)
    return list(by_key.values())


def observed(units: list[KnowledgeUnit]) -> list[tuple[Any, int, float, str]]:
    return [(u.content, u.evidence_count, u.confidence, u.category) for u in units]


NAN = float("nan")
TOOLS = ["Bash", "Bash", "Bash", "Write", "Read", "", None, 5, ["Bash"]]
COMMANDS = [
    "cargo test",
    "cargo test --all",
    "cargo build",
    "git push origin",
    "rm -rf x",
    "/a/b.lock",
    "/a/Makefile",
    "*",
    "",
    "  ",
    None,
    7,
    ["ls"],
    {"c": 1},
]
USER_ACTIONS = [
    *sorted(POSITIVE),
    *sorted(NEGATIVE),
    "reject",
    "accept",
    "timeout",
    None,
    ["accept"],
    1,
]
BRAIN_ACTIONS = ["approve", "approve", "deny", None, "send", ["approve"]]
CONFIDENCES = [0.1, 0.55, 0.9, 1, True, None, "0.5", NAN, float("inf"), 10**400, 1e308]
PIDS = [1, 1, 2, 3, 1.0, True, "s", None, [1], NAN]
ERRORS = [0, 2, 3, 4, True, "5", None]
PCTS = [10, 79, 80, 95, 85.5, True, None]
COSTS = [0.5, 4.99, 5, 7.5, "9", True, NAN, None]
LAST_ERRORS = [True, True, True, False, 1, None]


def random_record(rnd: random.Random) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "tool": rnd.choice(TOOLS),
        "command": rnd.choice(COMMANDS),
        "user_action": rnd.choice(USER_ACTIONS),
        "brain_action": rnd.choice(BRAIN_ACTIONS),
        "brain_confidence": rnd.choice(CONFIDENCES),
        "pid": rnd.choice(PIDS),
    }
    for k in [k for k in rec if rnd.random() < 0.05]:
        del rec[k]
    roll = rnd.random()
    if roll < 0.8:
        rec["context"] = {
            "recent_error_count": rnd.choice(ERRORS),
            "context_pct": rnd.choice(PCTS),
            "cost_usd": rnd.choice(COSTS),
            "last_tool_error": rnd.choice(LAST_ERRORS),
        }
        if rec["context"]["recent_error_count"] in (3, 4) and rnd.random() < 0.85:
            rec["user_action"] = "reject"  # skewed, so that temporal units appear
    elif roll < 0.9:
        rec["context"] = rnd.choice([None, "ctx", [1]])
    return rec


def random_config(rnd: random.Random) -> HiveConfig:
    return HiveConfig(
        export_min_evidence=rnd.choice([0, 1, 3, 5]),
        export_min_tool_decisions=rnd.choice([0, 1, 4, 10]),
    )


class ReferenceTests(SynchronousTestCase):
    """The fast distiller gives exactly what the plain restatement gives."""

    def test_seeded_random_logs(self) -> None:
        for seed in range(12):
            rnd = random.Random(seed)
            records = [random_record(rnd) for _ in range(rnd.choice([0, 5, 60, 1500]))]
            cfg = random_config(rnd)
            want = reference_units(records, cfg)
            got = observed(Distiller("me", cfg).distill(records, NOW))
            self.assertEqual(got, want, f"seed {seed}")
            if len(records) > 1000:
                self.assertGreater(len(want), 10)  # the generator hits every unit family
                self.assertEqual(
                    {type(c).__name__ for c, *_ in want},
                    {"Pattern", "ToolAccuracy", "Temporal", "Insight"},
                )

    @given(st.integers(0, 2**32), st.integers(0, 120))
    def test_hypothesis_logs(self, seed: int, n: int) -> None:
        rnd = random.Random(seed)
        records = [random_record(rnd) for _ in range(n)]
        cfg = random_config(rnd)
        self.assertEqual(
            observed(Distiller("me", cfg).distill(records, NOW)), reference_units(records, cfg)
        )

    @given(st.integers(0, 2**32), st.lists(st.integers(0, 200), max_size=6))
    def test_pieces_and_round_trips_change_nothing(self, seed: int, cuts: list[int]) -> None:
        rnd = random.Random(seed)
        records = [random_record(rnd) for _ in range(200)]
        whole = Tallies()
        self.assertEqual(whole.feed(records), 200)
        pieces = Tallies()
        bounds = [0, *sorted(cuts), 200]
        for a, b in zip(bounds, bounds[1:], strict=False):
            pieces.feed(records[a:b])
            # what maybe_distill() saves and loads between calls
            pieces = Tallies.from_json(json.loads(json.dumps(pieces.to_json())))
        self.assertEqual(pieces.to_json(), whole.to_json())
        cfg = random_config(rnd)
        d = Distiller("me", cfg)
        self.assertEqual(observed(d.units(pieces, NOW)), observed(d.units(whole, NOW)))

    def test_malformed_fields_are_ignored_not_fatal(self) -> None:
        records = [
            {
                "tool": "Bash",
                "command": ["ls"],
                "user_action": "accept",
                "pid": [1],
                "brain_action": "approve",
                "brain_confidence": 10**400,
                "context": {"last_tool_error": True},
            }
            for _ in range(5)
        ]
        units = by_type(
            Distiller("me", HiveConfig(export_min_tool_decisions=5)).distill(records, NOW)
        )
        self.assertEqual(units["pattern"][0].summary(), "[Bash, *] approve (100%)")
        self.assertEqual(units["tool_accuracy"][0].content.confidence_threshold, 0.0)
        self.assertNotIn("insight", units)  # no session, no loop

    def test_the_pattern_cache_is_bounded(self) -> None:
        self.patch(distill_mod, "_PATTERN_CACHE_MAX", 3)
        records = [decision(i, command=f"make t{i % 5}") for i in range(50)]
        tallies = Tallies()
        tallies.feed(records)
        self.assertLessEqual(len(tallies._keys), 3)
        self.assertEqual(sorted(v[0] for v in tallies.patterns.values()), [10] * 5)


class TalliesStateTests(SynchronousTestCase):
    def test_rejects_malformed_documents(self) -> None:
        good = Tallies()
        good.feed([decision(i, last_tool_error=True) for i in range(4)])
        doc = good.to_json()
        self.assertEqual(Tallies.from_json(doc), good)
        bad = [
            {**doc, "version": 2},
            {**doc, "records": -1},
            {**doc, "temporal": [0] * 5},
            {**doc, "patterns": [["Bash", 3, 1, 1]]},
            {**doc, "patterns": [["Bash", None, 1]]},
            {**doc, "accuracy": [["Bash", 1, 1, NAN]]},
            {**doc, "runs": [[[1], "Bash", None, 1]]},
            {**doc, "loops": [["Bash", None, True, 1]]},
            {k: v for k, v in doc.items() if k != "friction"},
            [],
            None,
        ]
        for b in bad:
            self.assertRaises(StateError, Tallies.from_json, b)


# --- reading the log ----------------------------------------------------------------------

LINES = [
    json.dumps(decision(1), separators=(",", ":")).encode(),
    json.dumps({"tool": "Bash", "command": "caf\u00e9 x", "user_action": "accept"}).encode(),
    b'{"tool":"Bash","command":"caf\xc3\xa9"}',  # UTF-8
    b'{"tool":"B\xe9sh"}',  # not UTF-8: replaced, still a record
    b'  {"tool":"Read"}  \r',
    b'{"tool":"Read"} x',
    b'{"tool":"Read"}{}',
    b"[1, 2]",
    b"3",
    b"",
    b"   ",
    b"not json",
    b'\xef\xbb\xbf{"tool":"Edit"}',
    b"{" * 50_000,
    b'{"a":',
    b"}",
    b'{"tool":"Write","command":"/x/' + b"y" * 300 + b'.lock"}',
]


class LogSegmentTests(SynchronousTestCase):
    def write(self, data: bytes):
        path = temp_home(self).root / "decisions.jsonl"
        path.write_bytes(data)
        return path

    @given(
        st.lists(st.sampled_from(LINES), max_size=25),
        st.sampled_from([b"", b"\n"]),
        st.integers(1, 70),
    )
    def test_same_records_as_parsing_the_whole_log(
        self, lines: list[bytes], end: bytes, chunk: int
    ) -> None:
        data = b"\n".join(lines) + end
        path = self.write(data)
        segment = LogSegment(path, chunk=chunk)
        got = list(segment)
        complete = data[: data.rfind(b"\n") + 1]
        self.assertEqual(got, list(parse_decisions(complete)))
        self.assertEqual((segment.end, segment.tail), (len(complete), data[len(complete) :]))
        whole = list(parse_decisions(data))
        last = segment.tail_record()
        self.assertEqual(got + ([last] if last is not None else []), whole)
        self.assertEqual(log_tallies(path), _fed(whole))

    @given(st.lists(st.sampled_from(LINES[:9]), min_size=1, max_size=12), st.data())
    def test_segments_between_line_ends(self, lines: list[bytes], data: Any) -> None:
        blob = b"".join(line + b"\n" for line in lines)
        path = self.write(blob)
        ends = [i + 1 for i, c in enumerate(blob) if c == ord("\n")]
        start = data.draw(st.sampled_from([0, *ends]))
        stop = data.draw(st.integers(start, len(blob) + 5))
        segment = LogSegment(path, start, stop, chunk=data.draw(st.integers(1, 50)))
        inside = blob[start : min(stop, len(blob))]
        complete = inside[: inside.rfind(b"\n") + 1]
        self.assertEqual(list(segment), list(parse_decisions(complete)))
        self.assertEqual(segment.end, start + len(complete))
        self.assertEqual(segment.tail, inside[len(complete) :])

    def test_missing_log_is_empty(self) -> None:
        segment = LogSegment(temp_home(self).root / "nope.jsonl")
        self.assertEqual((list(segment), segment.end, segment.tail_record()), ([], 0, None))
        self.assertEqual(log_tallies(temp_home(self).root / "nope.jsonl").records, 0)

    def test_deeply_nested_line_is_skipped(self) -> None:
        data = b"[" * 200_000 + b"\n" + b'{"tool":"Bash"}\n'
        self.assertEqual(list(LogSegment(self.write(data))), [{"tool": "Bash"}])
        self.assertEqual(list(parse_decisions(data)), [{"tool": "Bash"}])


def _fed(records: list[Mapping[str, Any]]) -> Tallies:
    t = Tallies()
    t.feed(records)
    return t


# --- the incremental trigger --------------------------------------------------------------


def store_view(home) -> list[tuple[str, Any, int, float, str]]:
    return sorted(
        (
            (u.semantic_key, u.content, u.evidence_count, u.confidence, u.category)
            for u in load_store(home).store
        ),
        key=lambda t: t[0],
    )


def random_log_lines(seed: int, n: int) -> list[dict]:
    rnd = random.Random(seed)
    return [
        decision(
            i,
            command=rnd.choice(["cargo test", "git push", "make", "ls -la"]),
            user=rnd.choice(["accept", "reject", "auto", "timeout"]),
            brain=rnd.choice(["approve", "deny"]),
            last_tool_error=rnd.random() < 0.5,
            recent_error_count=rnd.randrange(5),
        )
        for i in range(n)
    ]


class IncrementalTests(SynchronousTestCase):
    def state(self, home) -> dict:
        return json.loads((home.hive / STATE).read_bytes())

    def test_triggers_match_a_full_distill(self) -> None:
        home, full = temp_home(self), temp_home(self)
        records = random_log_lines(7, 95)
        at = 0
        for step, n in enumerate([12, 3, 20, 0, 40, 20]):
            write_log(home, records[at : at + n], "a")
            at += n
            r = maybe_distill(home, HiveConfig(), NOW + step, local_id="me")
            self.assertEqual(r.new_decisions, n)
            self.assertEqual(self.state(home)["tallies"]["records"], at)
        self.assertEqual(at, 95)
        write_log(full, records)
        distill_home(full, HiveConfig(), "me", NOW + 5)
        # (units an earlier, smaller log supported stay in the store)
        self.assertGreater(len(store_view(full)), 3)
        self.assertEqual([u for u in store_view(full) if u not in store_view(home)], [])
        self.assertEqual(stat.S_IMODE(os.stat(home.hive / STATE).st_mode), 0o600)
        self.assertEqual(
            Tallies.from_json(self.state(home)["tallies"]),
            log_tallies(home.brain / "decisions.jsonl"),
        )

    def test_only_new_decisions_are_read(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(10)])
        maybe_distill(home, HiveConfig(), NOW, local_id="me")
        seen: list[tuple[int, int | None]] = []
        real = LogSegment.__init__

        def spy(segment, path, start=0, stop=None, **kw):
            seen.append((start, stop))
            real(segment, path, start, stop, **kw)

        self.patch(LogSegment, "__init__", spy)
        size = (home.brain / "decisions.jsonl").stat().st_size
        write_log(home, [decision(10 + i) for i in range(10)], "a")
        r = maybe_distill(home, HiveConfig(), NOW, local_id="me")
        self.assertEqual(seen, [(size, (home.brain / "decisions.jsonl").stat().st_size)])
        self.assertEqual(r.report.decisions, 20)  # type: ignore[union-attr]

    def test_unusable_state_is_rebuilt(self) -> None:
        home, full = temp_home(self), temp_home(self)
        records = random_log_lines(3, 30)
        write_log(home, records[:15])
        maybe_distill(home, HiveConfig(), NOW, local_id="me")
        (home.hive / STATE).write_text('{"offset": 1, "fingerprint": "x", "tallies": []}')
        write_log(home, records[15:], "a")
        r = maybe_distill(home, HiveConfig(), NOW, local_id="me")
        self.assertEqual((r.new_decisions, r.report.decisions), (15, 30))  # type: ignore[union-attr]
        write_log(full, records)
        distill_home(full, HiveConfig(), "me", NOW)
        self.assertEqual([u for u in store_view(full) if u not in store_view(home)], [])
        self.assertEqual(
            Tallies.from_json(self.state(home)["tallies"]),
            log_tallies(home.brain / "decisions.jsonl"),
        )

    def test_rewritten_log_is_counted_afresh(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(10)])
        maybe_distill(home, HiveConfig(), NOW, local_id="me")
        # The same size, other content: the cursor cannot tell, the state can.
        write_log(home, [decision(i, command="cargo tess") for i in range(10)])
        write_log(home, [decision(10, command="cargo tess")], "a")
        r = maybe_distill(home, HiveConfig(), NOW, local_id="me", force=True)
        self.assertEqual(r.new_decisions, 1)
        tallies = Tallies.from_json(self.state(home)["tallies"])
        self.assertEqual(list(tallies.patterns), [("Bash", "cargo tess")])
        self.assertEqual(tallies.patterns["Bash", "cargo tess"], [11, 0])

    def test_unreadable_lines_still_move_the_state(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(0)])
        maybe_distill(home, HiveConfig(), NOW, local_id="me")
        with open(home.brain / "decisions.jsonl", "a") as f:
            f.write("garbage\n")
        self.assertEqual(maybe_distill(home, HiveConfig(), NOW, local_id="me").new_decisions, 0)
        self.assertEqual(
            self.state(home)["offset"], (home.brain / "decisions.jsonl").stat().st_size
        )

    def test_unterminated_last_record_is_distilled_but_not_kept(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(4)])
        with open(home.brain / "decisions.jsonl", "a") as f:
            f.write(json.dumps(decision(4)))
        r = maybe_distill(home, HiveConfig(), NOW, local_id="me", force=True)
        self.assertEqual((r.new_decisions, r.report.decisions), (4, 5))  # type: ignore[union-attr]
        self.assertEqual(by_type(load_store(home).store.units())["pattern"][0].evidence_count, 5)
        self.assertEqual(self.state(home)["tallies"]["records"], 4)
        with open(home.brain / "decisions.jsonl", "a") as f:
            f.write("\n")
        r = maybe_distill(home, HiveConfig(), NOW, local_id="me", force=True)
        self.assertEqual((r.new_decisions, r.report.decisions), (1, 5))  # type: ignore[union-attr]

    def test_truncated_log_starts_over(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(10)])
        maybe_distill(home, HiveConfig(), NOW, local_id="me")
        write_log(home, [decision(i, user="reject") for i in range(5)])
        r = maybe_distill(home, HiveConfig(), NOW, local_id="me", force=True)
        self.assertEqual((r.new_decisions, r.report.decisions), (5, 5))  # type: ignore[union-attr]
        self.assertEqual(
            by_type(load_store(home).store)["pattern"][0].content.preferred_action, "deny"
        )

    def test_distill_home_takes_any_iterable(self) -> None:
        home = temp_home(self)
        report = distill_home(
            home, HiveConfig(), "me", NOW, decisions=(decision(i) for i in range(7))
        )
        self.assertEqual((report.decisions, report.new), (7, 1))
