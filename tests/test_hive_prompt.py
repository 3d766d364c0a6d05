"""The ``## Hive Knowledge`` prompt section."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import HiveConfig
from claudectl.hive.prompt import PromptItem, VariantLine, build_prompt, render, select
from claudectl.hive.store import store_transaction
from claudectl.hive.trust import TrustBook, save_trust
from claudectl.hive.units import DAY, ApproachCluster, ApproachVariant, Pattern, Scope, Skill
from tests.common import temp_home, vector
from tests.test_hive_units import make_unit

NOW = 1_800_000_000


def items_from(vec: dict) -> list[PromptItem]:
    out = []
    for it in vec["input"]["selected_units_rendered"]:
        out.append(
            PromptItem(
                it["tier_label"],
                it["summary"],
                it["evidence_count"],
                it["source_peer"],
                it["stale"],
                it["score"],
                tuple(
                    VariantLine(v["approach_summary"], v["evidence"], tuple(v["conditions"]))
                    for v in it.get("variants", ())
                ),
            )
        )
    return out


class RenderVectorTests(SynchronousTestCase):
    def test_example_unlimited(self) -> None:
        v = vector("hive.prompt.example_unlimited")
        text = render(items_from(v))
        expected = v["expected"]["text"].split("\n")
        got = text.split("\n")
        # Every line is claudectl's, except that the header counts the 4 units
        # shown, not the 8 lines written (defect H12).
        self.assertEqual(got[1:], expected[1:])
        self.assertEqual(expected[0], "## Hive Knowledge (4 peers, 8 units)")
        self.assertEqual(got[0], "## Hive Knowledge (4 peers, 4 units)")
        self.assertFalse(text.endswith("\n"))

    def test_example_max2(self) -> None:
        v = vector("hive.prompt.example_max2")
        items = items_from(v)
        self.assertEqual(
            render(items[: v["input"]["max_prompt_units"]], len(items)), v["expected"]["text"]
        )

    def test_empty(self) -> None:
        self.assertEqual(render([]), vector("hive.prompt.empty")["expected"]["text"])


def pattern(i: int, peer: str, cmd: str = "", conf: float = 0.9, ev: int = 10, **kw):
    return make_unit(
        i,
        source_peer=peer,
        confidence=conf,
        evidence_count=ev,
        last_validated_at=kw.pop("lvt", NOW),
        content=Pattern("Bash", cmd or f"c{i}", "approve", conf, ev, ()),
        **kw,
    )


class SelectTests(SynchronousTestCase):
    def select(self, units, book=None, **cfg):
        return select(
            units, trust=book or TrustBook(), config=HiveConfig(**cfg), local_id="me", now=NOW
        )

    def test_tiers_label_units_and_ignored_peers_never_show(self) -> None:
        book = TrustBook()
        for peer, level in (("conf", 0.9), ("sugg", 0.6), ("unv", 0.3), ("ign", 0.1)):
            book.set_level(peer, level, NOW)
        units = [pattern(i, p) for i, p in enumerate(("conf", "sugg", "unv", "ign", "nobody"))]
        items, total = self.select(units, book)
        self.assertEqual(
            [(i.source_peer, i.tier_label) for i in items],
            [
                ("conf", "hive"),
                ("sugg", "hive, suggested"),
                ("nobody", "hive, suggested"),
                ("unv", "hive, unverified"),
            ],
        )
        self.assertEqual(total, 4)
        items, _ = self.select(units, book, inject_unverified=False)
        self.assertNotIn("unv", [i.source_peer for i in items])

    def test_default_trust_sets_the_tier_of_unknown_peers(self) -> None:
        items, _ = select(
            [pattern(1, "new")],
            trust=TrustBook(default_trust=0.85),
            config=HiveConfig(),
            local_id="me",
            now=NOW,
        )
        self.assertEqual(items[0].tier_label, "hive")

    def test_local_knowledge_never_overridden(self) -> None:
        mine = pattern(1, "me", cmd="git push")
        theirs = pattern(2, "peer", cmd="git push", scope=Scope("project", "x"), conf=1.0, ev=99)
        other = pattern(3, "peer", cmd="ls")
        items, _ = self.select([mine, theirs, other])
        self.assertEqual([i.summary for i in items], ["[Bash, ls] approve (90%)"])

    def test_frozen_quarantined_decayed_and_artifacts(self) -> None:
        book = TrustBook()
        book.ensure("quar", NOW)  # new record: quarantined for 7 days
        book.set_level("frozen", 0.9, NOW)
        book.records["frozen"].frozen = True
        units = [
            pattern(1, "quar"),
            pattern(2, "frozen"),
            pattern(3, "old", conf=0.11, lvt=NOW - 400 * DAY),
            make_unit(4, source_peer="p", content=Skill("s", "d", "1", "b")),
        ]
        items, _ = self.select(units, book)
        self.assertEqual([i.source_peer for i in items], ["quar"])
        items, _ = self.select(units, book, inject_unverified=False)
        self.assertEqual(items, [])

    def test_trust_weighted_order_and_cap(self) -> None:
        book = TrustBook()
        book.set_level("a", 1.0, NOW)
        book.set_level("b", 0.5, NOW)
        units = [pattern(1, "b", ev=15), pattern(2, "a", ev=10), pattern(3, "a", ev=5)]
        items, total = self.select(units, book, max_prompt_units=2)
        self.assertEqual([i.evidence_count for i in items], [10, 15])
        self.assertEqual(total, 3)
        self.assertIn("(showing top 2 of 3)", render(items, total))

    def test_stale_and_clusters(self) -> None:
        cluster = make_unit(
            5,
            source_peer="p",
            last_validated_at=NOW,
            content=ApproachCluster(
                "Bash:git push",
                tuple(ApproachVariant(f"v{n}", n, ("cost<$1",)) for n in (1, 4, 3, 2)),
            ),
        )
        stale = pattern(6, "p", lvt=NOW - 31 * DAY)
        text = render(*self.select([cluster, stale]))
        self.assertIn("    (A) v4 \u2014 n=4 [when: cost<$1]", text)
        self.assertIn("    (\u2026 1 more variants)", text)
        self.assertTrue(text.endswith("[stale]"))
        self.assertTrue(text.startswith("## Hive Knowledge (1 peers, 2 units)"))

    def test_relevance_filters_and_rollout(self) -> None:
        units = [
            pattern(1, "p", cmd="cargo test"),
            pattern(2, "p", cmd="git push"),
            pattern(3, "p", scope=Scope("project", "other")),
            make_unit(
                4,
                source_peer="p",
                last_validated_at=NOW,
                content=Pattern("Write", None, "deny", 0.1, 10, ()),
            ),
        ]
        items, _ = select(
            units,
            trust=TrustBook(),
            config=HiveConfig(),
            local_id="me",
            now=NOW,
            tool="Bash",
            command="cargo test --all",
            project="mine",
        )
        self.assertEqual([i.summary for i in items], ["[Bash, cargo test] approve (90%)"])
        draft = pattern(7, "p", injection_state="draft")
        self.assertEqual(
            select([draft], trust=TrustBook(), config=HiveConfig(), local_id="me", now=NOW, pid=42)[
                0
            ],
            [],
        )


class BuildPromptTests(SynchronousTestCase):
    def test_from_home(self) -> None:
        home = temp_home(self)
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(pattern(1, "laptop-a3f2", cmd="cargo test", conf=0.95, ev=20))
        book = TrustBook()
        book.set_level("laptop-a3f2", 0.9, NOW)
        save_trust(home, book)
        self.assertEqual(
            build_prompt(home, HiveConfig(), "me", NOW),
            "## Hive Knowledge (1 peers, 1 units)\n- [hive] [Bash, cargo test] "
            "approve (95%) \u2014 20 decisions from laptop-a3f2",
        )
        home.brain.mkdir(parents=True)
        (home.brain / "preferences.json").write_text(
            '{"patterns":[{"tool":"Bash","command_pattern":"cargo test"}]}'
        )
        self.assertEqual(build_prompt(home, HiveConfig(), "me", NOW), "")
