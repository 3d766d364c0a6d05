"""Export and import documents."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import HiveConfig
from claudectl.hive.exchange import (
    ImportProblem,
    export_json,
    export_yaml,
    import_units,
    parse_document,
)
from claudectl.hive.store import load_store, store_transaction
from claudectl.hive.units import KnowledgeUnit, parse_line
from tests.common import temp_home, vectors
from tests.test_hive_units import make_unit

NOW = 1_800_000_000
UNITS = [
    parse_line(v["input"]["jsonl_line"])
    for n, v in vectors("hive", "COMPAT").items()
    if n.startswith("hive.unit.") and "jsonl_line" in v["input"]
]


class DocumentTests(SynchronousTestCase):
    def test_json_export_is_claudectl_pretty(self) -> None:
        text = export_json(UNITS[:1])
        self.assertEqual(text, json.dumps([UNITS[0].to_json()], indent=2, ensure_ascii=False))
        self.assertEqual(parse_document(text.encode()), UNITS[:1])

    def test_yaml_round_trip_every_content_type(self) -> None:
        self.assertEqual(parse_document(export_yaml(UNITS).encode()), UNITS)

    def test_other_shapes(self) -> None:
        one = UNITS[0].to_json()
        self.assertEqual(parse_document(json.dumps({"units": [one]}).encode()), UNITS[:1])
        self.assertEqual(parse_document(json.dumps(one).encode()), UNITS[:1])

    def test_bad_documents_name_the_record(self) -> None:
        docs = [UNITS[0].to_json(), dict(UNITS[1].to_json(), evidence_count=5.5)]
        with self.assertRaises(ImportProblem) as cm:
            parse_document(json.dumps(docs).encode())
        self.assertEqual(
            str(cm.exception),
            "record 2 (id ku_1713960000_1): evidence_count must be an integer, not 5.5",
        )
        for bad in (b"\xff", b"{: :", b"42", b'"text"', b"[1]"):
            self.assertRaises(ImportProblem, parse_document, bad)

    def test_parse_errors_are_one_line_with_where(self) -> None:
        """A broken file gets one line naming the parser's complaint and its place
        (JSON's when the text looks like JSON, YAML's otherwise), not a multi-line dump."""
        cases = [
            (b'{"units": [1,2\n', "the file is not valid JSON: Expecting ',' delimiter: line 2"),
            (b"a: b: c\n", "the file is neither JSON nor YAML: mapping values are not allowed"),
            (b"units:\n  - a: [\n", "(line 3, column 1)"),
        ]
        for data, expected in cases:
            with self.assertRaises(ImportProblem) as cm:
                parse_document(data)
            message = str(cm.exception)
            self.assertIn(expected, message)
            self.assertNotIn("\n", message)


class ImportTests(SynchronousTestCase):
    def test_import_goes_through_merge(self) -> None:
        home = temp_home(self)
        mine = make_unit(1, source_peer="me", confidence=0.1, last_validated_at=NOW)
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(mine)
        theirs = make_unit(
            1,
            id="ku_theirs",
            source_peer="p",
            confidence=1.0,
            evidence_count=99,
            last_validated_at=NOW,
        )
        new = make_unit(2, source_peer="p", last_validated_at=NOW)
        res = import_units(home, [theirs, new], local_id="me", config=HiveConfig(), now=NOW)
        self.assertEqual(res.stats(), {"accepted": 1, "updated": 0, "rejected": 1, "duplicates": 0})
        stored = {u.id: u for u in load_store(home).store}
        self.assertEqual(stored[mine.id], mine)
        self.assertIn(new.id, stored)
        self.assertNotIn("ku_theirs", stored)
        conflict = json.loads((home.hive / "conflicts.jsonl").read_text())
        self.assertEqual((conflict["local_id"], conflict["incoming_id"]), (mine.id, "ku_theirs"))

    def test_reimport_is_duplicates(self) -> None:
        home = temp_home(self)
        units = [make_unit(i, source_peer="me", last_validated_at=NOW) for i in range(3)]
        import_units(home, units, local_id="me", config=HiveConfig(), now=NOW)
        res = import_units(home, units, local_id="me", config=HiveConfig(), now=NOW)
        self.assertEqual(res.duplicates, 3)
        self.assertIsInstance(load_store(home).store.units()[0], KnowledgeUnit)
