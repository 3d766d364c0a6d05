"""``claudectl hive ...`` through the real entry point."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from claudectl.cli import main
from claudectl.hive.store import load_store, store_transaction
from claudectl.hive.trust import load_trust
from claudectl.home import Home
from claudectl.relay.keystore import KeyStore
from tests.common import subprocess_env, temp_home
from tests.test_hive_distill import decision, write_log
from tests.test_hive_units import make_unit


def run(home: Home, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(["--home", str(home.root), *args])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


class HiveCliTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.me = KeyStore(self.home).ensure_identity()

    def ok(self, *args: str) -> str:
        code, out, err = run(self.home, *args)
        self.assertEqual(code, 0, err)
        return out

    def test_on_and_off_write_the_bare_word(self) -> None:
        mode = self.home.hive / "mode"
        self.assertIn("Hive off", self.ok("hive", "off"))
        self.assertEqual(mode.read_bytes(), b"off")  # claudectl's file: no newline
        self.assertFalse(json.loads(self.ok("hive", "status", "--json"))["active"])
        data = json.loads(self.ok("hive", "on", "--json"))
        self.assertEqual((data["mode"], data["active"]), ("on", True))
        self.assertEqual(mode.read_bytes(), b"on")
        self.assertTrue(json.loads(self.ok("hive", "status", "--json"))["active"])

    def test_a_damaged_trust_file_is_a_warning_the_user_sees(self) -> None:
        """Review 14: every peer dropped to the default trust without a word."""
        KeyStore(self.home).save_key("peer-a", b"k" * 32)
        self.ok("hive", "trust", "peer-a", "0.9")
        (self.home.hive / "trust.json").write_text("{bad")
        code, out, err = run(self.home, "hive", "trust", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)[0]["trust_level"], 0.5)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("Warning: "), err)
        self.assertIn("trust.json is damaged", err)
        code, out, err = run(self.home, "hive", "trust", "peer-a", "0.8")
        self.assertEqual(code, 0, err)
        self.assertIn("moved aside to trust.json.corrupt-", err)
        self.assertEqual(len(list(self.home.hive.glob("trust.json.corrupt-*"))), 1)
        code, out, err = run(self.home, "hive", "trust")
        self.assertEqual(err, "")

    def test_distill_then_list_filter_and_status(self) -> None:
        write_log(
            self.home,
            [decision(i) for i in range(10)]
            + [decision(20 + i, tool="Read", command="/x/a.rs") for i in range(5)],
        )
        self.assertIn("Distilled 15 decision(s): 3 new", self.ok("hive", "distill"))
        table = self.ok("hive", "knowledge")
        # The table says what the percentage is (issue 12 item 14: not `deny (0%)`).
        self.assertIn("[Bash, cargo test] approve (100% accepted over 10)", table)
        self.assertIn("3 unit(s)", table)
        units = json.loads(self.ok("hive", "knowledge", "--json"))
        self.assertEqual(len(units), 3)
        self.assertEqual(list(units[0])[:4], ["id", "scope", "category", "content"])
        self.assertEqual(json.loads(self.ok("--json", "hive", "knowledge", "--from", "nobody")), [])
        self.assertEqual(
            len(json.loads(self.ok("hive", "knowledge", "--json", "--from", self.me[:4]))), 3
        )
        self.assertEqual(
            json.loads(self.ok("hive", "knowledge", "--json", "--scope", "project:x")), []
        )
        status = json.loads(self.ok("hive", "status", "--json"))
        self.assertEqual(
            (status["units"], status["local_units"], status["identity"]), (3, 3, self.me)
        )
        self.assertIn("Knowledge:   3 units", self.ok("hive", "status"))
        self.assertIn("Curriculum v2", self.ok("hive", "distill"))
        self.assertIn("LESSON", self.ok("hive", "curriculum"))

    def test_export_yaml_import_elsewhere_trust_and_prompt(self) -> None:
        write_log(self.home, [decision(i) for i in range(10)])
        self.ok("hive", "distill")
        exported = self.tmp("kb.yaml")
        with open(exported, "w") as f:
            f.write(self.ok("hive", "export", "--format", "yaml"))
        other = temp_home(self)
        code, out, err = run(other, "hive", "import", exported)
        self.assertEqual(code, 0, err)
        self.assertIn("Imported 2 new knowledge units.", out)
        prompt = run(other, "hive", "prompt")[1]
        self.assertTrue(prompt.startswith("## Hive Knowledge (1 peers, 2 units)"))
        self.assertIn(
            f"- [hive, suggested] [Bash, cargo test] approve (100%) \u2014 10 "
            f"decisions from {self.me}",
            prompt,
        )
        self.assertIn("set to 0.90 (Confirmed)", run(other, "hive", "trust", self.me, "0.9")[1])
        self.assertIn("- [hive] [Bash, cargo test]", run(other, "hive", "prompt")[1])
        self.assertIn("(Ignored)", run(other, "hive", "trust", self.me, "0.1")[1])
        code, out, err = run(other, "hive", "prompt")
        self.assertEqual((code, out), (0, ""))
        self.assertIn("No hive knowledge", err)
        listing = run(other, "--json", "hive", "trust")[1]
        self.assertEqual(json.loads(listing)[0]["trust_level"], 0.1)
        code, out, _ = run(other, "hive", "trust", self.me, "7")
        self.assertIn("set to 1.00 (Confirmed) (clamped from 7)", out)
        self.assertEqual(load_trust(other).level(self.me), 1.0)

    def tmp(self, name: str) -> str:
        return str(self.home.root / name)

    def test_bad_import_changes_nothing(self) -> None:
        with store_transaction(self.home, local_id=self.me) as store:
            store.insert(make_unit(1, source_peer=self.me))
        before = (self.home.hive / "knowledge.jsonl").read_bytes()
        bad = self.tmp("bad.json")
        good = make_unit(2, source_peer="p").to_json()
        with open(bad, "w") as f:
            json.dump([good, {"id": "ku_broken", "scope": {"type": "galaxy"}}], f)
        code, out, err = run(self.home, "hive", "import", bad)
        self.assertEqual(code, 1)
        self.assertIn("record 2 (id ku_broken): scope.type 'galaxy'", err)
        self.assertIn("nothing was imported", err)
        self.assertEqual((self.home.hive / "knowledge.jsonl").read_bytes(), before)
        self.assertIn("cannot read", run(self.home, "hive", "import", self.tmp("missing"))[2])

    def test_forget(self) -> None:
        with store_transaction(self.home, local_id=self.me) as store:
            store.insert(make_unit(1, id="ku_1745539200_3", source_peer=self.me))
        self.assertIn("Removed ku_1745539200_3", self.ok("hive", "forget", "ku_1745539200_3"))
        self.assertEqual(len(load_store(self.home).store), 0)
        code, _, err = run(self.home, "hive", "forget", "ku_1745539200_3")
        self.assertEqual((code, err), (1, "Error: no knowledge unit with id ku_1745539200_3\n"))

    def test_trust_errors_and_unfreeze(self) -> None:
        self.assertEqual(run(self.home, "hive", "trust", "p", "high")[0], 1)
        self.assertEqual(run(self.home, "hive", "trust", "bad id!")[0], 1)
        self.assertIn("No peers yet", self.ok("hive", "trust"))
        KeyStore(self.home).save_key("p", b"k" * 32)  # paired: known, no trust record
        self.assertIn("no record yet", self.ok("hive", "trust", "p"))
        self.ok("hive", "trust", "p", "0.6")
        from claudectl.hive.trust import trust_transaction

        with trust_transaction(self.home) as book:
            book.records["p"].freeze("test", 1)
        self.assertIn("frozen: test", self.ok("hive", "trust", "p"))
        self.assertIn("p unfrozen.", self.ok("hive", "trust", "p", "--unfreeze"))
        self.assertFalse(load_trust(self.home).is_frozen("p"))

    def test_trust_refuses_unknown_peers_and_resolves_prefixes(self) -> None:
        """Issue 12 item 5: a typo does not create a trust record."""
        code, _, err = run(self.home, "hive", "trust", "laptop-a3f2", "0.9")
        self.assertEqual(code, 1)
        self.assertIn("Error: unknown peer 'laptop-a3f2'; no peers yet", err)
        ks = KeyStore(self.home)
        ks.save_key("laptop-a3f29b1c", b"k" * 32)
        ks.save_key("laptop-b0000000", b"k" * 32)
        ks.save_key("ci-runner-1", b"k" * 32)
        code, _, err = run(self.home, "hive", "trust", "laptpo-a3f29b1c", "0.9")
        self.assertEqual(code, 1)
        self.assertIn("unknown peer 'laptpo-a3f29b1c'; did you mean laptop-a3f29b1c?", err)
        code, _, err = run(self.home, "hive", "trust", "laptop", "0.9")
        self.assertEqual(code, 1)
        self.assertIn("'laptop' matches several peers: laptop-a3f29b1c, laptop-b0000000", err)
        self.assertFalse(load_trust(self.home).records)
        out = self.ok("hive", "trust", "laptop-a", "0.9")
        self.assertIn("Trust for laptop-a3f29b1c set to 0.90 (Confirmed)", out)
        self.assertEqual(sorted(load_trust(self.home).records), ["laptop-a3f29b1c"])
        self.assertIn("laptop-a3f29b1c: trust 0.90", self.ok("hive", "trust", "laptop-a"))
        self.assertEqual(run(self.home, "hive", "trust", "nobody", "--unfreeze")[0], 1)

    def test_fresh_home_explains_and_record_feeds_distill(self) -> None:
        """Issue 12 item 16: where decisions come from, and a way to make some."""
        out = self.ok("hive", "distill")
        self.assertIn("Distilled 0 decision(s)", out)
        self.assertIn(f"No decision log yet ({self.home.brain / 'decisions.jsonl'})", out)
        self.assertIn('claudectl hive record --tool Bash --command "cargo test" --count 10', out)
        out = self.ok(
            "hive", "record", "--tool", "Bash", "--command", "cargo test", "--count", "10"
        )
        self.assertIn("Recorded 10 decision(s)", out)
        self.ok(
            "hive",
            "record",
            "--tool",
            "Bash",
            "--command",
            "rm -rf build",
            "--user",
            "reject",
            "--count",
            "6",
        )
        path = self.home.brain / "decisions.jsonl"
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        records = [json.loads(ln) for ln in path.read_text().splitlines()]
        self.assertEqual(len(records), 16)
        # claudectl 0.64's shape (hive.md 5.1).
        first = records[0]
        self.assertIsInstance(first["ts"], str)
        self.assertRegex(first["decision_id"], r"^dec_\d+_\d+_0$")
        for key in (
            "pid",
            "project",
            "tool",
            "command",
            "brain_action",
            "brain_confidence",
            "brain_reasoning",
            "user_action",
            "decision_type",
            "suggested_at",
            "resolved_at",
            "decision_id",
        ):
            self.assertIn(key, first)
        self.assertEqual(
            (records[-1]["user_action"], records[-1]["brain_action"]), ("reject", "deny")
        )
        out = self.ok("hive", "distill")
        self.assertIn("Distilled 16 decision(s): 3 new", out)
        self.assertNotIn("No decision log yet", out)
        table = self.ok("hive", "knowledge")
        self.assertIn("[Bash, cargo test] approve (100% accepted over 10)", table)
        self.assertIn("[Bash, rm] deny (0% accepted over 6)", table)

    def test_archive_command(self) -> None:
        self.assertIn("Archive: 0 unit(s)", self.ok("hive", "archive"))
        out = json.loads(self.ok("hive", "archive", "--prune", "30d", "--json"))
        self.assertEqual(out["pruned"], {"removed": 0, "kept": 0})
        self.assertEqual(run(self.home, "hive", "archive", "--prune", "soon")[0], 1)

    def test_curriculum_before_distill(self) -> None:
        self.assertIn("No curriculum yet", self.ok("hive", "curriculum"))
        self.assertEqual(json.loads(self.ok("hive", "curriculum", "--json")), [])

    def test_help_lists_commands(self) -> None:
        out = self.ok("hive", "--help")
        for cmd in (
            "status",
            "knowledge",
            "export",
            "import",
            "forget",
            "trust",
            "archive",
            "distill",
            "curriculum",
            "prompt",
        ):
            self.assertIn(cmd, out)


class SubprocessTests(SynchronousTestCase):
    def test_real_process(self) -> None:
        home = temp_home(self)
        write_log(home, [decision(i) for i in range(10)])
        env = subprocess_env(home)
        subprocess.run(
            [sys.executable, "-m", "claudectl", "hive", "distill"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        )
        out = subprocess.run(
            [sys.executable, "-m", "claudectl", "--json", "hive", "export"],
            env=env,
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        self.assertEqual(len(json.loads(out)), 2)
