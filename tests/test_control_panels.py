"""
The dashboard's panels as the service builds them (claudectl.control.panels):
the hive panel from the store and its logs, the tasks panel from stored
records (no service), and their bounds.
"""

from __future__ import annotations

import json
import time

from twisted.trial.unittest import SynchronousTestCase

from claudectl.control import panels as P
from claudectl.delegation.store import INCOMING, OUTGOING, TaskStore
from claudectl.hive.store import CONFLICTS, RESOLUTIONS, hive_file, store_transaction
from claudectl.hive.trust import trust_transaction
from tests.common import temp_home
from tests.test_hive_units import make_unit

NOW = int(time.time())


class HivePanelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)

    def write_log(self, name: str, lines: list[str]) -> None:
        path = hive_file(self.home, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))

    def test_units_by_origin_sync_and_recent_records(self) -> None:
        with store_transaction(self.home, local_id="me-1", now=NOW) as store:
            for i, source in enumerate(["me-1", "me-1", "peer-a", "peer-b"]):
                store.insert(
                    make_unit(i, source_peer=source, originated_at=NOW, last_validated_at=NOW)
                )
        with trust_transaction(self.home) as book:
            book.ensure("peer-a", NOW).last_sync = NOW - 60
        self.write_log(
            CONFLICTS,
            [
                json.dumps(
                    {
                        "ts": 10,
                        "semantic_key": "k" * 500,
                        "incoming_peer": "peer-a",
                        "local_peer": "me-1",
                    }
                ),
                "not json",
                json.dumps(["not", "a", "record"]),
            ],
        )
        self.write_log(
            RESOLUTIONS,
            [
                json.dumps(
                    {
                        "ts": 20,
                        "semantic_key": "k2",
                        "winner_peer": "peer-b",
                        "loser_peer": "me-1",
                        "result": "merged",
                    }
                )
            ],
        )
        panel = P.hive_panel(self.home, "me-1", trust_of=lambda peer: 0.9)
        self.assertEqual((panel["units"], panel["local_units"]), (4, 2))
        self.assertEqual(
            [(r["origin"], r["local"], r["units"]) for r in panel["rows"]],
            [("me-1", True, 2), ("peer-a", False, 1), ("peer-b", False, 1)],
        )
        self.assertEqual({r.get("trust") for r in panel["rows"][1:]}, {0.9})
        self.assertEqual(panel["last_sync"], [{"peer": "peer-a", "last_sync": NOW - 60}])
        # Newest first; cut texts; records that are not objects skipped.
        self.assertEqual([r["kind"] for r in panel["recent"]], ["merge", "conflict"])
        self.assertEqual(panel["recent"][0]["result"], "merged")
        self.assertEqual(len(panel["recent"][1]["key"]), 80)
        self.assertTrue(panel["recent"][1]["key"].endswith("…"))

    def test_empty_home(self) -> None:
        panel = P.hive_panel(self.home, "me-1")
        self.assertEqual(
            panel,
            {
                "identity": "me-1",
                "units": 0,
                "local_units": 0,
                "rows": [],
                "last_sync": [],
                "recent": [],
            },
        )


class LocalTasksPanelTests(SynchronousTestCase):
    def test_stored_records_both_directions(self) -> None:
        home = temp_home(self)
        TaskStore(home.tasks, OUTGOING).save(
            "task_1",
            {
                "task_id": "task_1",
                "peer": "worker-1",
                "state": "completed",
                "created_at": 100,
                "ended_at": 160,
                "stats": {"tokens_used": 5, "cost_usd": 0.5},
                "summary": "done",
                "prompt": "p" * 3000,
                "version": 4,
            },
        )
        TaskStore(home.tasks, OUTGOING).save(
            "task_2",
            {"task_id": "task_2", "peer": "w", "state": "running", "created_at": "x", "stats": []},
        )
        TaskStore(home.tasks, INCOMING).save(
            "ctl-1_task_9",
            {
                "task_id": "task_9",
                "peer": "ctl-1",
                "state": "failed",
                "accepted_at": 50,
                "ended_at": 55,
                "stats": {"last_activity": "Bash: ls"},
                "handoff": {"summary": "not used: activity first"},
            },
        )
        panel = P.local_tasks_panel(home, NOW)
        self.assertEqual((panel["total"], panel["available"]), (3, True))
        by_id = {r["task_id"]: r for r in panel["rows"]}
        # Running first, then newest first.
        self.assertEqual(panel["rows"][0]["task_id"], "task_2")
        one = by_id["task_1"]
        self.assertEqual(
            (
                one["dir"],
                one["elapsed"],
                one["tokens"],
                one["cost"],
                one["summary"],
                one["version"],
            ),
            ("out", 60, 5, 0.5, "done", 4),
        )
        self.assertEqual(len(one["prompt"]), 2000)
        self.assertEqual((by_id["task_2"]["elapsed"], by_id["task_2"]["tokens"]), (0, 0))
        nine = by_id["task_9"]
        self.assertEqual(
            (nine["dir"], nine["key"], nine["elapsed"], nine["summary"]),
            ("in", "ctl-1_task_9", 5, "Bash: ls"),
        )


class BoundsTests(SynchronousTestCase):
    def test_bounded_drops_rows_from_the_end(self) -> None:
        rows = [{"text": "x" * 1000, "n": i} for i in range(P.MAX_ROWS + 50)]
        text = P.bounded({"rows": rows, "total": len(rows)})
        self.assertLessEqual(len(text.encode("utf-8")), P.MAX_PANEL_BYTES)
        data = json.loads(text)
        kept = [r["n"] for r in data["rows"]]
        self.assertEqual(kept, list(range(len(kept))))
        self.assertGreater(len(kept), 0)
        self.assertEqual(data["total"], P.MAX_ROWS + 50)

    def test_bounded_detail_cuts_long_texts_and_the_tail(self) -> None:
        detail = {
            "task_id": "t",
            "prompt": "p" * 20_000,
            "summary": None,
            "files": ["f" * 1000],
            "tail": [{"at": 1.0, "text": "line " * 100}] * 500 + ["not a line"],
        }
        data = json.loads(P.bounded_detail(detail))
        self.assertEqual(len(data["prompt"]), 8_000)
        self.assertEqual(len(data["files"][0]), 300)
        self.assertLessEqual(len(data["tail"]), P.MAX_ROWS)
        self.assertTrue(all(len(line["text"]) <= 300 for line in data["tail"]))
        self.assertIsNone(data["summary"])
