"""What may be shared, with whom: filter, exposure, consent, hops, TTL."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import HiveConfig
from claudectl.hive.sharing import (
    ShareContext,
    SharingFilter,
    is_exposed,
    load_exposure,
    set_exposure,
    shareable,
)
from claudectl.hive.trust import TrustBook
from claudectl.hive.units import (
    DAY,
    ApproachCluster,
    ApproachOutcome,
    ApproachVariant,
    Command,
    HookConfig,
    Insight,
    Pattern,
    SharingConsent,
    Skill,
    Temporal,
    ToolAccuracy,
)
from tests.common import temp_home, vector
from tests.test_hive_units import make_unit

NOW = 1_800_000_000


class FilterTests(SynchronousTestCase):
    def test_personal_never_shared(self) -> None:
        self.assertEqual(SharingFilter().reason(make_unit(category="personal")), "personal")

    def test_share_categories_with_workflow_label(self) -> None:
        f = SharingFilter.from_config(HiveConfig(share_categories=("workflow",)))
        self.assertTrue(f.allows(make_unit(category="workflow_pattern")))
        self.assertFalse(f.allows(make_unit(category="best_practice")))
        self.assertTrue(SharingFilter().allows(make_unit(category="technique")))

    def test_excluded_tool_filtered_in_every_content_type(self) -> None:
        f = SharingFilter.from_config(HiveConfig(exclude_tools=("Write",)))
        leaking = [
            Pattern("Write", None, "approve", 1.0, 5, ()),
            ToolAccuracy("Write", 10, 9, 0.5),
            ApproachOutcome("pattern:Write:*.lock", 0.9, 5),
            ApproachCluster("Write:*", (ApproachVariant("approve", 3),)),
            Temporal("Write after errors: user denies", 0.8),
            Insight("error_loop", "warning", "Repeated failures: Write *.lock"),
        ]
        for content in leaking:
            self.assertFalse(f.allows(make_unit(content=content)), content)
        self.assertTrue(f.allows(make_unit(content=Temporal("Rewrite is fine", 0.8))))
        self.assertTrue(f.allows(make_unit(content=Pattern("Bash", None, "approve", 1.0, 5, ()))))

    def test_excluded_commands(self) -> None:
        f = SharingFilter.from_config(HiveConfig(exclude_commands=("secret",)))
        self.assertFalse(
            f.allows(make_unit(content=Pattern("Bash", "run secret-job", "deny", 0.0, 5, ())))
        )
        self.assertFalse(f.allows(make_unit(content=Command("secret", "d", None, "b"))))
        self.assertFalse(f.allows(make_unit(content=ApproachCluster("Bash:secret", ()))))
        self.assertTrue(f.allows(make_unit(content=Pattern("Bash", "ls", "approve", 1.0, 5, ()))))

    def test_excluded_content_types(self) -> None:
        f = SharingFilter.from_config(HiveConfig(exclude_content_types=("skill", "hook")))
        self.assertFalse(f.allows(make_unit(content=Skill("s", "d", "1", "b"))))
        self.assertFalse(f.allows(make_unit(content=HookConfig("e", "m", "d", "{}"))))
        self.assertTrue(f.allows(make_unit(content=Command("c", "d", None, "b"))))


class VerdictCacheTests(SynchronousTestCase):
    """Gossip asks the filter about every unit on every request: verdicts are remembered."""

    def test_one_filter_per_config_object(self) -> None:
        cfg = HiveConfig(exclude_tools=("Write",))
        self.assertIs(ShareContext("me", cfg).filter, ShareContext("me", cfg).filter)
        other = HiveConfig(exclude_tools=("Read",))
        self.assertIsNot(ShareContext("me", other).filter, ShareContext("me", cfg).filter)

    def test_verdicts_follow_the_unit_and_the_filter(self) -> None:
        write = make_unit(content=Pattern("Write", None, "approve", 1.0, 5, ()))
        bash = make_unit(content=Pattern("Bash", None, "approve", 1.0, 5, ()))
        no_write = ShareContext("me", HiveConfig(exclude_tools=("Write",))).filter
        no_bash = ShareContext("me", HiveConfig(exclude_tools=("Bash",))).filter
        for _ in range(2):  # the second round answers from the cache
            self.assertEqual(no_write.reason(write), "tool Write excluded")
            self.assertIsNone(no_write.reason(bash))
            self.assertIsNone(no_bash.reason(write))
            self.assertEqual(no_bash.reason(bash), "tool Bash excluded")
        # An equal unit that is another object is judged on its own.
        self.assertEqual(no_write.reason(write.with_(version=2)), "tool Write excluded")


class ExposureTests(SynchronousTestCase):
    def test_local_units_follow_exposure_then_share_mode(self) -> None:
        mine, theirs = make_unit(1, source_peer="me"), make_unit(2, source_peer="p")
        self.assertTrue(is_exposed(mine, "me", {}, "auto"))
        self.assertFalse(is_exposed(mine, "me", {}, "manual"))
        self.assertTrue(is_exposed(mine, "me", {mine.id: "expose"}, "manual"))
        self.assertFalse(is_exposed(mine, "me", {mine.id: "hide"}, "auto"))
        self.assertTrue(is_exposed(theirs, "me", {theirs.id: "hide"}, "manual"))

    def test_exposure_file(self) -> None:
        home = temp_home(self)
        set_exposure(home, "ku_1", "hide")
        set_exposure(home, "ku_2", "expose")
        set_exposure(home, "ku_2", None)
        self.assertEqual(load_exposure(home), {"ku_1": "hide"})


class ShareContextTests(SynchronousTestCase):
    def ctx(self, **cfg: object) -> ShareContext:
        book = TrustBook()
        book.set_level("low", 0.3, NOW)
        book.set_level("bad", 0.9, NOW)
        book.records["bad"].frozen = True
        return ShareContext("me", HiveConfig(**cfg), book)  # type: ignore[arg-type]

    def test_max_hops_vector(self) -> None:
        v = vector("hive.gossip.max_hops")["input"]
        ctx = self.ctx(max_propagation=v["max_propagation"])
        unit = make_unit(propagation_count=v["propagation_count"], last_validated_at=NOW)
        self.assertEqual(ctx.refusal(unit, "peer-x", NOW), "hop limit reached")
        self.assertTrue(ctx.shareable(unit.with_(propagation_count=2), "peer-x", NOW))

    def test_outbound_rules(self) -> None:
        ctx = self.ctx()
        unit = make_unit(source_peer="me", last_validated_at=NOW)
        self.assertTrue(ctx.shareable(unit, "peer-x", NOW))
        self.assertEqual(
            ctx.refusal(unit.with_(source_peer="peer-x"), "peer-x", NOW), "originated at that peer"
        )
        self.assertEqual(
            ctx.refusal(unit.with_(last_validated_at=NOW - 31 * DAY), "p", NOW), "expired"
        )
        # A frozen peer (sybil checks) is kept out of prompts, not out of the mesh,
        # but its own units are not passed on (H19).
        self.assertIsNone(ctx.refusal(unit, "bad", NOW))
        # A collision freeze does not stop its units; a flooding freeze does.
        self.assertIsNone(ctx.refusal(unit.with_(source_peer="bad"), "peer-x", NOW))
        ctx.trust.records["bad"].freeze_reason = "rate cap exceeded: 1200 units in 24h"
        self.assertEqual(
            ctx.refusal(unit.with_(source_peer="bad"), "peer-x", NOW),
            "source peer is frozen (rate cap)",
        )
        gated = unit.with_(sharing_consent=SharingConsent(min_trust_tier="suggested"))
        self.assertFalse(ctx.shareable(gated, "low", NOW))
        self.assertTrue(ctx.shareable(gated, "no-record-peer", NOW))  # default 0.5: Suggested
        self.assertEqual(self.ctx(share_mode="manual").refusal(unit, "p", NOW), "hidden")

    def test_function_form_reads_home(self) -> None:
        home = temp_home(self)
        unit = make_unit(source_peer="me", last_validated_at=NOW)
        self.assertTrue(
            shareable(unit, "p", home=home, local_id="me", config=HiveConfig(), now=NOW)
        )
        set_exposure(home, unit.id, "hide")
        self.assertFalse(
            shareable(unit, "p", home=home, local_id="me", config=HiveConfig(), now=NOW)
        )


class ShareableUnitsTests(SynchronousTestCase):
    """The bulk filter gossip uses decides exactly as ``shareable`` does, unit by unit."""

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["me", "peer-x", "low", "bad", "other"]),  # source
                st.integers(0, 6),  # hops
                st.sampled_from([NOW, NOW - 31 * DAY, NOW - 5 * DAY]),  # validated
                st.sampled_from(["best_practice", "personal", "technique"]),
                st.sampled_from([None, "expose", "hide"]),  # exposure of its id
                st.sampled_from(
                    [None, SharingConsent(min_trust_tier="suggested"), SharingConsent(NOW - 1)]
                ),
                st.sampled_from(["Bash", "Write"]),
            ),
            max_size=12,
        ),
        st.sampled_from(["peer-x", "low", "bad"]),
        st.sampled_from(["auto", "manual"]),
        st.booleans(),
    )
    def test_same_verdicts_as_shareable(
        self, specs: list[Any], peer: str, mode: str, flooding: bool
    ) -> None:
        book = TrustBook()
        book.set_level("low", 0.3, NOW)
        book.set_level("bad", 0.9, NOW)
        book.records["bad"].frozen = True
        if flooding:
            book.records["bad"].freeze_reason = "rate cap exceeded"
        cfg = HiveConfig(share_mode=mode, exclude_tools=("Write",))
        units, exposure = [], {}
        for i, (source, hops, validated, category, exposed, consent, tool) in enumerate(specs):
            unit = make_unit(
                i,
                source_peer=source,
                propagation_count=hops,
                last_validated_at=validated,
                category=category,
                sharing_consent=consent,
                content=Pattern(tool, f"cmd{i}", "approve", 0.9, 3, ()),
            )
            units.append(unit)
            if exposed is not None:
                exposure[unit.id] = exposed
        ctx = ShareContext("me", cfg, book, exposure)
        self.assertEqual(
            ctx.shareable_units(units, peer, NOW), [u for u in units if ctx.shareable(u, peer, NOW)]
        )


class PrecomputeTests(SynchronousTestCase):
    """The writer thread works out verdicts for new units only -- for all of
    them again once the filter's cache was cleared."""

    def test_fresh_only_unless_the_cache_was_cleared(self) -> None:
        from claudectl.hive import sharing

        config = HiveConfig()
        units = [make_unit(i) for i in range(5)]
        others = [make_unit(10 + i) for i in range(6)]
        verdicts = sharing._filter_for(config)._verdicts
        sharing.precompute_verdicts(config, others)  # the cache holds enough
        sharing.precompute_verdicts(config, units, fresh=units[4:])
        self.assertEqual([id(u) in verdicts for u in units], [False] * 4 + [True])
        verdicts.clear()  # a busy node's cache ran full
        sharing.precompute_verdicts(config, units, fresh=[])
        self.assertEqual([id(u) in verdicts for u in units], [True] * 5)
