"""Cold-storage archive and the curriculum."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hive.archive import (
    archive_stats,
    cold_distill,
    parse_age,
    prune_archive,
    read_curriculum,
    write_curriculum,
)
from claudectl.hive.store import archive_units, store_transaction
from claudectl.hive.units import DAY, Pattern, ToolAccuracy, dumps_line
from tests.common import temp_home
from tests.test_hive_units import make_unit

NOW = 1_800_000_000


def pat(
    i: int,
    cmd: str | None,
    action: str = "approve",
    rate: float = 0.9,
    conf: float = 0.9,
    ev: int = 10,
    **kw,
):
    return make_unit(
        i,
        content=Pattern("Bash", cmd, action, rate, ev, ()),
        confidence=conf,
        evidence_count=ev,
        **kw,
    )


class AgeTests(SynchronousTestCase):
    def test_parse_age(self) -> None:
        self.assertEqual(
            [parse_age(x) for x in ("30d", "12h", "90m", "45s", "7")],
            [30 * DAY, 12 * 3600, 90 * 60, 45, 7 * DAY],
        )
        for bad in ("", "d", "-1d", "3w", "1.5d"):
            self.assertRaises(ValueError, parse_age, bad)


class ArchiveTests(SynchronousTestCase):
    def test_stats_and_prune(self) -> None:
        home = temp_home(self)
        archive_units(
            home,
            [
                pat(1, "a", last_validated_at=NOW - 100 * DAY),
                pat(2, "b", last_validated_at=NOW - 10 * DAY, source_peer="q"),
            ],
        )
        with open(home.hive / "archive.jsonl", "a") as f:
            f.write("garbage\n")
        stats = archive_stats(home)
        self.assertEqual((stats.units, stats.unreadable), (2, 1))
        self.assertEqual(stats.by_peer, {"peer-a": 1, "q": 1})
        self.assertEqual(stats.oldest, NOW - 100 * DAY)
        self.assertEqual(prune_archive(home, 90 * DAY, NOW), (1, 1))
        self.flushLoggedErrors()
        lines = (home.hive / "archive.jsonl").read_text().splitlines()
        self.assertEqual([json.loads(x)["id"] for x in lines], ["ku_1_2"])
        quarantined = json.loads((home.hive / "quarantine.jsonl").read_text())
        self.assertEqual((quarantined["line"], quarantined["source"]), ("garbage", "archive.jsonl"))
        self.assertEqual(prune_archive(home, 90 * DAY, NOW), (0, 1))

    def test_prune_without_archive(self) -> None:
        self.assertEqual(prune_archive(temp_home(self), DAY, NOW), (0, 0))


class CurriculumTests(SynchronousTestCase):
    def test_best_per_key_condense_and_thresholds(self) -> None:
        units = [
            pat(1, "cargo test", conf=0.8, ev=5),
            pat(2, "cargo test", conf=0.9, ev=50),
            pat(3, "cargo build"),
            pat(4, "cargo fmt"),
            pat(5, "rm", action="deny", rate=0.05, conf=0.95),
            pat(6, "dd", action="deny", rate=0.25, conf=0.75),
            pat(7, "ls", conf=0.5),
            make_unit(8, content=ToolAccuracy("Bash", 10, 9, 0.5), confidence=0.9),
        ]
        cur = cold_distill(units, "me", NOW)
        summaries = [u.summary() for u in cur]
        self.assertEqual(summaries[0], "[Bash, rm] deny (5%)")  # deny first
        self.assertNotIn("[Bash, dd] deny (25%)", summaries)  # deny needs 0.8
        self.assertNotIn("[Bash, ls] approve (90%)", summaries)  # below 0.7
        condensed = [
            u for u in cur if isinstance(u.content, Pattern) and u.content.command_pattern is None
        ]
        self.assertEqual(len(condensed), 1)
        self.assertEqual(condensed[0].content.sample_count, 80)  # test, build, fmt, ls
        self.assertEqual(condensed[0].source_peer, "me")
        self.assertFalse(
            any(getattr(u.content, "command_pattern", None) == "cargo test" for u in cur)
        )
        self.assertEqual({u.version for u in cur}, {2})

    def test_cap_of_100(self) -> None:
        units = [pat(i, f"c{i}", action="deny", rate=0.0, conf=0.9) for i in range(150)]
        self.assertEqual(len(cold_distill(units, "me", NOW)), 100)

    def test_files(self) -> None:
        home = temp_home(self)
        archive_units(home, [pat(1, "rm", action="deny", rate=0.0, conf=1.0)])
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(pat(2, "cargo test", source_peer="me"))
        res = write_curriculum(home, "me", NOW)
        self.assertEqual(
            res.meta, {"version": 1, "timestamp": NOW, "unit_count": 2, "source_archive_units": 1}
        )
        text = (home.hive / "curriculum.json").read_text()
        self.assertTrue(text.startswith('[\n  {\n    "id": "ku_1_1",'))
        self.assertEqual(read_curriculum(home).units, res.units)
        self.assertEqual(write_curriculum(home, "me", NOW).meta["version"], 2)
        self.assertEqual(dumps_line(read_curriculum(home).units[0]), dumps_line(res.units[0]))
