"""
The hook command itself: never in the way (nothing printed, exit 0, errors
in a bounded log), no Twisted imported, run as Claude Code runs it.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hooks import entry
from claudectl.hooks.runtime import Deadline
from claudectl.hooks.settings import hook_command
from claudectl.lazylog import LazyLogger
from tests.common import subprocess_env, temp_home
from tests.test_hooks_events import (
    FIXTURES,
    NOW,
    PEER,
    call,
    decisions,
    payload,
    peer_unit,
    set_identity,
    store_units,
)


def store_units_at(home, now: int, *units) -> None:
    from claudectl.hive.store import store_transaction

    with store_transaction(home, local_id="me-00000001", now=now) as store:
        for u in units:
            store.insert(u)


def run_hook(home, event: str, stdin: bytes, env_extra: dict | None = None):
    """The installed command, through a shell, as Claude Code runs it."""
    command = hook_command(event, home.root)
    env = subprocess_env(home, **(env_extra or {}))
    env.pop("PYTHONPATH", None)  # the runner finds its package by itself
    return subprocess.run(
        ["/bin/sh", "-c", command],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=env,
        cwd=str(home.root),
    )


class NeverInTheWayTests(SynchronousTestCase):
    def log(self, home) -> str:
        path = home.data / "hooks" / "hooks.log"
        return path.read_text() if path.exists() else ""

    def test_bad_input_prints_nothing_and_logs(self) -> None:
        home = temp_home(self)
        for data in (b"not json", b"[1, 2]", b"{" * 100_000, b"\xff\xfe"):
            out = io.StringIO()
            self.assertEqual(
                entry.run(
                    ["SessionStart"], io.BytesIO(data), out, {"CLAUDECTL_HOME": str(home.root)}
                ),
                0,
            )
            self.assertEqual(out.getvalue(), "")
        self.assertEqual(len(self.log(home).splitlines()), 4)

    def test_oversized_input_is_refused(self) -> None:
        home = temp_home(self)
        data = b'{"x": "' + b"a" * (entry.MAX_INPUT_BYTES + 10) + b'"}'
        out = io.StringIO()
        entry.run(["SessionStart", "--home", str(home.root)], io.BytesIO(data), out, {})
        self.assertEqual(out.getvalue(), "")
        self.assertIn("over", self.log(home))

    def test_unknown_event_and_empty_input_do_nothing(self) -> None:
        home = temp_home(self)
        for argv, data in ((["Notification"], b"{}"), (["SessionStart"], b""), ([], b"{}")):
            out = io.StringIO()
            entry.run([*argv, "--home", str(home.root)], io.BytesIO(data), out, {})
            self.assertEqual(out.getvalue(), "")
        self.assertEqual(self.log(home), "")

    def test_broken_store_prints_nothing(self) -> None:
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        (home.hive / "knowledge.jsonl").mkdir()  # unreadable as a file
        self.assertEqual(call(home, "SessionStart", payload("SessionStart")), "")
        self.assertIn("SessionStart: ", self.log(home))

    def test_log_is_bounded(self) -> None:
        home = temp_home(self)
        for _ in range(entry.MAX_LOG_BYTES // 1000 + 50):
            entry.log_error(home, "X", "e" * 1000)
        path = home.data / "hooks" / "hooks.log"
        self.assertLessEqual(path.stat().st_size, entry.MAX_LOG_BYTES)
        self.assertTrue(path.with_name("hooks.log.1").exists())

    def test_deadline(self) -> None:
        home = temp_home(self)

        def slow(*a: object) -> None:
            raise Deadline()

        self.patch(entry, "handle", slow)
        out = io.StringIO()
        entry.run(["SessionStart", "--home", str(home.root)], io.BytesIO(b"{}"), out, {})
        self.assertEqual(out.getvalue(), "")
        self.assertIn(f"gave up after {entry.DEADLINE_SECS}s", self.log(home))


class RealProcessTests(SynchronousTestCase):
    def test_installed_command_prints_context_without_twisted(self) -> None:
        home = temp_home(self)
        set_identity(home)
        store_units(home, peer_unit(1, originated_at=NOW, last_validated_at=NOW))
        r = run_hook(home, "SessionStart", json.dumps(FIXTURES["SessionStart"]).encode())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, b"")
        doc = json.loads(r.stdout)
        self.assertIn("[Bash, cargo test]", doc["hookSpecificOutput"]["additionalContext"])

    def test_new_units_are_shown_after_a_background_refresh(self) -> None:
        import time

        home = temp_home(self)
        set_identity(home)
        now = int(time.time())
        store_units_at(home, now, peer_unit(1, originated_at=now, last_validated_at=now))
        start = json.dumps(dict(FIXTURES["SessionStart"])).encode()
        first = run_hook(home, "SessionStart", start)
        self.assertIn(b"[Bash, cargo test]", first.stdout)
        # New units arrive (gossip): the next session gets the cached text at
        # once, and a detached child rebuilds it for the one after.
        store_units_at(
            home, now, peer_unit(2, command="make", originated_at=now, last_validated_at=now)
        )
        second = run_hook(home, "SessionStart", start)
        self.assertEqual((second.returncode, second.stderr), (0, b""))
        self.assertEqual(second.stdout, first.stdout)
        deadline = time.monotonic() + 30
        while b"[Bash, make]" not in run_hook(home, "SessionStart", start).stdout:
            self.assertLess(time.monotonic(), deadline, "the context was never refreshed")
            time.sleep(0.1)
        # A trust change is never served stale: rebuilt before answering.
        from claudectl.hive.trust import trust_transaction

        with trust_transaction(home) as book:
            book.set_level(PEER, 0.9, now)
        self.assertIn(b"- [hive] [Bash, cargo test]", run_hook(home, "SessionStart", start).stdout)

    def test_no_twisted_on_any_event(self) -> None:
        home = temp_home(self)
        set_identity(home)
        store_units(home, peer_unit(1))
        home.config_file.parent.mkdir(parents=True, exist_ok=True)
        home.config_file.write_text('[hive]\ngate = "suggest"\n')
        runner = Path(entry.__file__).parent / "run.py"
        script = (
            "import io, json, sys, runpy\n"
            f"sys.argv = [{str(runner)!r}, sys.argv[1], '--home', {str(home.root)!r}]\n"
            "try:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "bad = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.'))\n"
            "sys.stderr.write('TWISTED:' + ','.join(bad))\n"
        )
        for event in entry.EVENTS:
            r = subprocess.run(
                [sys.executable, "-S", "-c", script, event],
                input=json.dumps(FIXTURES[event]).encode(),
                capture_output=True,
                timeout=60,
                env={"PATH": "/usr/bin:/bin", "HOME": str(home.root)},
            )
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(r.stderr.endswith(b"TWISTED:"), (event, r.stderr))
        self.assertEqual([d["user_action"] for d in decisions(home)], ["accept"])

    def test_closed_stdout_is_still_exit_0(self) -> None:
        home = temp_home(self)
        set_identity(home)
        store_units(home, peer_unit(1))
        command = hook_command("SessionStart", home.root) + " >&-"
        r = subprocess.run(
            ["/bin/sh", "-c", command],
            input=json.dumps(FIXTURES["SessionStart"]).encode(),
            capture_output=True,
            timeout=60,
        )
        self.assertEqual((r.returncode, r.stderr), (0, b""))


class LazyLoggerTests(SynchronousTestCase):
    def test_logs_like_a_logger(self) -> None:
        from twisted.logger import globalLogPublisher

        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        log = LazyLogger("claudectl.hive.example")
        log.info("hello {who}", who="x")
        [event] = [e for e in seen if e.get("log_namespace") == "claudectl.hive.example"]
        self.assertEqual(event["who"], "x")
        self.assertEqual(event["log_format"], "hello {who}")
