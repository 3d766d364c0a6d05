"""The knowledge store file: claudectl's format, quarantine, bounds, concurrent writers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import HiveConfig
from claudectl.hive.store import (
    KnowledgeStore,
    compact,
    forget_held,
    hive_active,
    load_store,
    parse_units,
    store_transaction,
)
from claudectl.hive.trust import TrustBook, save_trust
from claudectl.hive.units import DAY, KnowledgeUnit, Pattern, dumps_line
from claudectl.relay.keystore import KeyStore, PeerMeta
from tests.common import subprocess_env, temp_home, vectors
from tests.test_hive_units import make_unit

NOW = 1_800_000_000
LINES = [
    v["input"]["jsonl_line"]
    for n, v in vectors("hive", "COMPAT").items()
    if n.startswith("hive.unit.")
    and "jsonl_line" in v["input"]
    and n != "hive.unit.legacy_defaults"
]


class FileFormatTests(SynchronousTestCase):
    def test_claudectl_file_round_trips_byte_for_byte(self) -> None:
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        data = "".join(LINES).encode()
        (home.hive / "knowledge.jsonl").write_bytes(data)
        loaded = load_store(home)
        self.assertEqual(loaded.bad, [])
        self.assertEqual(len(loaded.store), len(LINES))
        self.assertEqual(loaded.store.to_bytes(), data)
        with store_transaction(home, local_id="laptop-a3f29b1c", now=1713960000) as store:
            store.insert(store.units()[0].with_(version=9))
        first = (home.hive / "knowledge.jsonl").read_bytes().split(b"\n")[0]
        self.assertIn(b'"version":9', first)

    def test_empty_store_is_one_newline(self) -> None:
        home = temp_home(self)
        self.assertEqual(KnowledgeStore().to_bytes(), b"\n")
        with store_transaction(home, local_id="me", now=NOW):
            pass
        self.assertEqual((home.hive / "knowledge.jsonl").read_bytes(), b"\n")
        self.assertEqual(len(load_store(home).store), 0)

    def test_insert_replaces_by_semantic_key(self) -> None:
        store = KnowledgeStore()
        a = make_unit(1, id="ku_a")
        b = make_unit(1, id="ku_b")
        self.assertIsNone(store.insert(a))
        self.assertEqual(store.insert(b), a)
        self.assertEqual(store.units(), [b])

    def test_shared_ids_with_different_keys_both_survive(self) -> None:
        # claudectl's per-process counter gives two machines the same ids (H16)
        store = KnowledgeStore([make_unit(1, id="ku_1_0"), make_unit(2, id="ku_1_0")])
        self.assertEqual(len(store), 2)
        self.assertEqual(len(store.remove_id("ku_1_0")), 2)

    def test_duplicate_key_lines_are_archived_not_lost(self) -> None:
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        a = make_unit(1, id="ku_a", last_validated_at=NOW)
        b = make_unit(1, id="ku_b", last_validated_at=NOW)
        (home.hive / "knowledge.jsonl").write_text(dumps_line(a) + dumps_line(b))
        with store_transaction(home, local_id="me", now=NOW) as store:
            self.assertEqual(store.units(), [b])
        self.assertEqual((home.hive / "archive.jsonl").read_text(), dumps_line(a))


class QuarantineTests(SynchronousTestCase):
    def test_corrupt_line_survives_in_quarantine(self) -> None:
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        good = dumps_line(make_unit(1, source_peer="me"))
        bad = '{"id":"ku_bad","scope":"language:rust"}'
        (home.hive / "knowledge.jsonl").write_bytes(
            (good + bad + "\n").encode() + b"\xff\xfe\n" + good.replace("cmd1", "cmd2").encode()
        )
        loaded = load_store(home)
        self.assertEqual([b.lineno for b in loaded.bad], [2, 3])
        self.assertEqual(len(loaded.store), 2)
        # a read-only load changes nothing
        self.assertIn(b"ku_bad", (home.hive / "knowledge.jsonl").read_bytes())
        with store_transaction(home, local_id="me", now=NOW):
            pass
        self.flushLoggedErrors()
        records = [json.loads(x) for x in (home.hive / "quarantine.jsonl").read_text().splitlines()]
        self.assertEqual(records[0]["line"], bad)
        self.assertEqual(records[0]["reason"], "scope must be a JSON object")
        self.assertEqual(records[0]["source"], "knowledge.jsonl")
        self.assertEqual(records[1]["reason"], "not UTF-8")
        self.assertEqual(len(load_store(home).store), 2)
        self.assertEqual(load_store(home).bad, [])

    def test_failed_block_writes_nothing(self) -> None:
        home = temp_home(self)
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(make_unit(1))
        before = (home.hive / "knowledge.jsonl").read_bytes()
        with self.assertRaises(RuntimeError):
            with store_transaction(home, local_id="me", now=NOW) as store:
                store.insert(make_unit(2))
                raise RuntimeError("boom")
        self.assertEqual((home.hive / "knowledge.jsonl").read_bytes(), before)


class BoundsTests(SynchronousTestCase):
    def test_ttl_expires_only_peer_units(self) -> None:
        old = NOW - 31 * DAY
        units = [
            make_unit(1, source_peer="me", last_validated_at=old),
            make_unit(2, source_peer="p", last_validated_at=old),
            make_unit(3, source_peer="p", last_validated_at=NOW - DAY),
        ]
        kept, ev = compact(units, local_id="me", config=HiveConfig(), last_contact={}, now=NOW)
        self.assertEqual([u.id for u in kept], ["ku_1_1", "ku_1_3"])
        self.assertEqual([(e.unit.id, e.reason) for e in ev], [("ku_1_2", "ttl")])

    def test_stale_peers_by_last_contact(self) -> None:
        units = [
            make_unit(1, source_peer="gone", last_validated_at=NOW),
            make_unit(2, source_peer="here", last_validated_at=NOW),
            make_unit(3, source_peer="unknown", last_validated_at=NOW),
        ]
        contact = {"gone": NOW - 91 * DAY, "here": NOW - 89 * DAY}
        kept, ev = compact(units, local_id="me", config=HiveConfig(), last_contact=contact, now=NOW)
        self.assertEqual([e.reason for e in ev], ["stale_peer"])
        self.assertEqual({u.source_peer for u in kept}, {"here", "unknown"})

    def test_max_units_evicts_lowest_weight_peer_units_never_local(self) -> None:
        cfg = HiveConfig(max_units=3)
        units = [
            make_unit(i, source_peer="me", confidence=0.01, last_validated_at=NOW) for i in range(2)
        ]
        units += [
            make_unit(10 + i, source_peer="p", confidence=0.1 * (i + 1), last_validated_at=NOW)
            for i in range(4)
        ]
        kept, ev = compact(units, local_id="me", config=cfg, last_contact={}, now=NOW)
        self.assertEqual(len(kept), 3)
        self.assertEqual(sum(u.source_peer == "me" for u in kept), 2)
        self.assertEqual([u.id for u in kept if u.source_peer == "p"], ["ku_1_13"])
        # all local: the cap cannot evict them
        kept, _ = compact(
            units[:2], local_id="me", config=HiveConfig(max_units=1), last_contact={}, now=NOW
        )
        self.assertEqual(len(kept), 2)

    def test_transaction_applies_bounds_and_archives(self) -> None:
        home = temp_home(self)
        book = TrustBook()
        book.ensure("gone", NOW - 100 * DAY)
        save_trust(home, book)
        ks = KeyStore(home)
        ks.save_key("seen", b"k" * 32)
        ks.save_meta("seen", PeerMeta("1.2.3.4:9847", (NOW - DAY) * 1000))
        with store_transaction(home, local_id="me", now=NOW) as store:
            store.insert(make_unit(1, source_peer="gone", last_validated_at=NOW))
            store.insert(make_unit(2, source_peer="seen", last_validated_at=NOW))
        ids = [u.id for u in load_store(home).store]
        self.assertEqual(ids, ["ku_1_2"])
        archived = (home.hive / "archive.jsonl").read_text().splitlines()
        self.assertEqual([json.loads(x)["id"] for x in archived], ["ku_1_1"])


class ConcurrencyTests(SynchronousTestCase):
    def test_threads_lose_nothing(self) -> None:
        home = temp_home(self)

        def writer(w: int) -> None:
            for i in range(15):
                with store_transaction(home, local_id="me", now=NOW) as store:
                    store.insert(make_unit(w * 100 + i, source_peer="me"))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(load_store(home).store), 60)

    def test_processes_lose_nothing(self) -> None:
        home = temp_home(self)
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from claudectl.home import Home\n"
            "from claudectl.hive.store import store_transaction\n"
            "from tests.test_hive_units import make_unit\n"
            "home, w = Home(Path(sys.argv[1])), int(sys.argv[2])\n"
            "for i in range(20):\n"
            "    with store_transaction(home, local_id='me', now=1800000000) as s:\n"
            "        s.insert(make_unit(w * 100 + i, source_peer='me'))\n"
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(home.root), str(w)], env=subprocess_env(home)
            )
            for w in range(3)
        ]
        self.assertEqual([p.wait(60) for p in procs], [0, 0, 0])
        self.assertEqual(len(load_store(home).store), 60)


class ActivationTests(SynchronousTestCase):
    def test_mode_file_overrides_config(self) -> None:
        home = temp_home(self)
        self.assertTrue(hive_active(home, HiveConfig(enabled=True)))
        home.hive.mkdir(parents=True)
        (home.hive / "mode").write_text(" OFF\n")
        self.assertFalse(hive_active(home, HiveConfig(enabled=True)))
        (home.hive / "mode").write_text("on")
        self.assertTrue(hive_active(home, HiveConfig(enabled=False)))


class ParseTests(SynchronousTestCase):
    def test_blank_lines_ignored(self) -> None:
        res = parse_units(b"\n\n" + dumps_line(make_unit(1)).encode() + b"\n   \n")
        self.assertEqual((len(res.store), res.bad), (1, []))
        unit = make_unit(1, content=Pattern("Bash", "x", "approve", 0.5, 1, ()))
        self.assertEqual(unit.semantic_key, "universal/pattern:Bash:x")


class LineCacheTests(SynchronousTestCase):
    # Units validated long ago: no bounds, or the TTL would evict them.
    def test_a_written_line_reads_back_as_the_same_unit(self) -> None:
        home = temp_home(self)
        unit = make_unit(77, content=Pattern("Bash", "written-once", "approve", 0.5, 1, ()))
        with store_transaction(home, local_id="me", apply_bounds=False) as store:
            store.insert(unit)
        [read] = load_store(home).store.units()
        # No second parse: the reader finds the line the writer produced.
        self.assertIs(read, unit)
        self.assertEqual(dumps_line(read), dumps_line(unit))

    def test_a_changed_line_is_parsed_again(self) -> None:
        home = temp_home(self)
        unit = make_unit(78)
        with store_transaction(home, local_id="me", apply_bounds=False) as store:
            store.insert(unit)
        path = home.hive / "knowledge.jsonl"
        path.write_text(dumps_line(unit).replace('"evidence_count":10', '"evidence_count":11'))
        [read] = load_store(home).store.units()
        self.assertEqual(read.evidence_count, 11)


class AppendTests(SynchronousTestCase):
    """A transaction that only adds units at new keys appends their lines."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.path = self.home.hive / "knowledge.jsonl"
        self.addCleanup(forget_held)

    def add(self, *units: KnowledgeUnit) -> None:
        with store_transaction(self.home, local_id="me", now=NOW, append=True) as store:
            for u in units:
                store.insert(u)

    def unit(self, i: int, **kw: object) -> KnowledgeUnit:
        return make_unit(i, source_peer="me", last_validated_at=NOW, **kw)

    def test_new_units_are_appended(self) -> None:
        self.add(self.unit(1), self.unit(2))
        before = self.path.read_bytes()
        ino = self.path.stat().st_ino
        self.add(self.unit(3), self.unit(4))
        after = self.path.read_bytes()
        # The same file, grown by the new lines: nothing before them rewritten.
        self.assertEqual(self.path.stat().st_ino, ino)
        self.assertEqual(
            after, before + dumps_line(self.unit(3)).encode() + dumps_line(self.unit(4)).encode()
        )
        # Byte for byte what a rewrite gives.
        self.assertEqual(after, load_store(self.home).store.to_bytes())

    def test_without_append_the_file_is_replaced_whole(self) -> None:
        # All or nothing (hive import): a new file renamed over the old one.
        self.add(self.unit(1))
        ino = self.path.stat().st_ino
        with store_transaction(self.home, local_id="me", now=NOW) as store:
            store.insert(self.unit(2))
        self.assertNotEqual(self.path.stat().st_ino, ino)
        self.assertEqual(self.path.read_bytes(), load_store(self.home).store.to_bytes())

    def test_a_changed_unit_rewrites_the_file(self) -> None:
        self.add(self.unit(1), self.unit(2))
        ino = self.path.stat().st_ino
        self.add(self.unit(1, version=2), self.unit(3))
        self.assertNotEqual(self.path.stat().st_ino, ino)  # replaced (temp + rename)
        store = load_store(self.home).store
        self.assertEqual(
            [(u.id, u.version) for u in store], [("ku_1_1", 2), ("ku_1_2", 1), ("ku_1_3", 1)]
        )
        self.assertEqual(self.path.read_bytes(), store.to_bytes())

    def test_the_empty_store_file_is_rewritten(self) -> None:
        with store_transaction(self.home, local_id="me", now=NOW):
            pass
        self.assertEqual(self.path.read_bytes(), b"\n")
        self.add(self.unit(1))
        self.assertEqual(self.path.read_bytes(), dumps_line(self.unit(1)).encode())

    def test_a_torn_last_line_is_quarantined_not_appended_to(self) -> None:
        # A crash in the middle of an append leaves part of a line behind.
        self.add(self.unit(1))
        torn = dumps_line(self.unit(2))[:40]
        with self.path.open("ab") as f:
            f.write(torn.encode())
        self.add(self.unit(3))
        self.flushLoggedErrors()
        loaded = load_store(self.home)
        self.assertEqual(loaded.bad, [])
        self.assertEqual([u.id for u in loaded.store], ["ku_1_1", "ku_1_3"])
        [record] = [
            json.loads(x) for x in (self.home.hive / "quarantine.jsonl").read_text().splitlines()
        ]
        self.assertEqual(record["line"], torn)

    def test_a_change_by_another_writer_is_read(self) -> None:
        self.add(self.unit(1))
        # Another process replaces the file (as claudectl or the CLI does).
        other = self.unit(7)
        (self.home.hive / "new.tmp").write_text(dumps_line(self.unit(1)) + dumps_line(other))
        (self.home.hive / "new.tmp").replace(self.path)
        self.add(self.unit(2))
        self.assertEqual(
            [u.id for u in load_store(self.home).store], ["ku_1_1", "ku_1_7", "ku_1_2"]
        )

    def test_a_same_size_edit_in_place_is_read(self) -> None:
        self.add(self.unit(1), self.unit(2))
        data = self.path.read_bytes()
        edited = data.replace(b"cmd1", b"cmd9")
        self.assertEqual(len(edited), len(data))
        with self.path.open("r+b") as f:  # same inode, same size
            f.write(edited)
        self.add(self.unit(3))
        self.assertEqual(
            [u.content.command_pattern for u in load_store(self.home).store],  # type: ignore[attr-defined]
            ["cmd9", "cmd2", "cmd3"],
        )

    def test_a_failed_block_leaves_the_held_store_alone(self) -> None:
        self.add(self.unit(1))
        with self.assertRaises(RuntimeError):
            with store_transaction(self.home, local_id="me", now=NOW) as store:
                store.insert(self.unit(2))
                store.remove(self.unit(1).semantic_key)
                raise RuntimeError("boom")
        self.add(self.unit(3))
        self.assertEqual([u.id for u in load_store(self.home).store], ["ku_1_1", "ku_1_3"])

    def test_evictions_rewrite(self) -> None:
        self.add(make_unit(1, source_peer="p", last_validated_at=NOW))
        self.add(make_unit(2, source_peer="p", last_validated_at=NOW - 31 * DAY), self.unit(3))
        self.assertEqual([u.id for u in load_store(self.home).store], ["ku_1_1", "ku_1_3"])
        self.assertEqual(self.path.read_bytes(), load_store(self.home).store.to_bytes())
