"""
The issue's "done when": on a fresh home, ``hooks install``; a session's
permission decisions (fed to the installed hook commands as Claude Code's
payloads) become decisions.jsonl lines; ``hive distill`` makes units; they
reach a peer by gossip (two real ``relay serve`` processes); the peer's
``SessionStart`` hook prints them with the right trust label.  And, if the
Claude Code CLI is installed, it runs the installed ``SessionStart`` hook.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.home import Home
from claudectl.hooks.settings import is_ours, settings_path
from claudectl.relay.keystore import KeyStore
from tests.common import ServeProcess, run_cli, subprocess_env, temp_home
from tests.test_hooks_events import FIXTURES, peer_unit

CLAUDE = shutil.which("claude")


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def installed_command(home: Home, event: str) -> str:
    settings = json.loads(settings_path(home.root).read_text())
    [command] = [h["command"] for g in settings["hooks"][event] for h in g["hooks"] if is_ours(h)]
    return command


def fire(home: Home, event: str, payload: dict[str, Any]) -> str:
    """Run the installed hook command for ``event`` as Claude Code does (sh -c, JSON on stdin)."""
    env = subprocess_env(home)
    env.pop("PYTHONPATH")
    r = subprocess.run(
        ["/bin/sh", "-c", installed_command(home, event)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(home.root),
    )
    assert (r.returncode, r.stderr) == (0, ""), (r.returncode, r.stderr)
    return r.stdout


def session(home: Home, session_id: str, command: str, allow: bool) -> None:
    """One permission request for ``command`` and the user's answer."""

    def p(event: str, **changes: Any) -> dict[str, Any]:
        d = dict(FIXTURES[event])
        d.update(session_id=session_id, cwd=str(home.root / "demo"), **changes)
        return d

    tool_input = {"command": command, "description": "x"}
    assert fire(home, "PermissionRequest", p("PermissionRequest", tool_input=tool_input)) == ""
    if allow:
        fire(home, "PostToolUse", p("PostToolUse", tool_input=tool_input))
    else:  # denied in the dialog: the turn ends, the tool never ran
        fire(home, "Stop", p("Stop"))


class DoneWhenTests(SynchronousTestCase):
    def test_decisions_to_units_to_a_peer_session(self) -> None:
        ha, hb = temp_home(self), temp_home(self)
        ida = ok(run_cli(ha, "relay", "identity")).strip()
        idb = ok(run_cli(hb, "relay", "identity")).strip()
        for home in (ha, hb):
            ok(run_cli(home, "hooks", "install"))
        # Paired (one shared key), connected.
        key = os.urandom(32)
        KeyStore(ha).save_key(idb, key)
        KeyStore(hb).save_key(ida, key)
        a = ServeProcess.serve(ha, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(a.stop)
        b = ServeProcess.serve(hb, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(b.stop)
        port = a.port()
        b.port()
        ok(run_cli(hb, "relay", "connect", f"127.0.0.1:{port}"))

        # A session on A: the user allows `cargo test` six times, denies `rm -rf` five.
        for i in range(6):
            session(ha, f"s{i}", f"cargo test --test t{i}", allow=True)
        for i in range(5):
            session(ha, f"d{i}", "rm -rf target", allow=False)
        lines = [json.loads(x) for x in (ha.brain / "decisions.jsonl").read_text().splitlines()]
        self.assertEqual([x["user_action"] for x in lines], ["accept"] * 6 + ["reject"] * 5)
        self.assertEqual({x["project"] for x in lines}, {"demo"})
        out = ok(run_cli(ha, "hive", "distill"))
        # The running service may have distilled some of them first (its own
        # timer): between the two, the eleven decisions make two units.
        made = re.search(
            r"Distilled (\d+) decision\(s\): (\d+) new, (\d+) updated, (\d+) unchanged", out
        )
        self.assertIsNotNone(made, out)
        assert made is not None
        self.assertEqual(sum(int(made[i]) for i in (2, 3, 4)), 2, out)

        # B's next session starts with them, labelled by B's trust in A.
        start = dict(FIXTURES["SessionStart"], cwd=str(hb.root / "demo"))
        expected = [
            f"- [hive, suggested] [Bash, cargo test] approve (100%) \u2014 6 decisions from {ida}",
            f"- [hive, suggested] [Bash, rm] deny (0%) \u2014 5 decisions from {ida}",
        ]
        deadline = time.monotonic() + 30
        while True:
            out = fire(hb, "SessionStart", start)
            if out and all(e in out for e in expected):
                break
            self.assertLess(time.monotonic(), deadline, out)
            time.sleep(0.2)
        doc = json.loads(out)
        self.assertEqual(doc["hookSpecificOutput"]["hookEventName"], "SessionStart")
        text = doc["hookSpecificOutput"]["additionalContext"]
        self.assertTrue(text.startswith("## Hive Knowledge (1 peers, 2 units)"), text)
        # Trusting A more on B changes the label.
        ok(run_cli(hb, "hive", "trust", ida, "0.9"))
        self.assertIn("- [hive] [Bash, cargo test]", fire(hb, "SessionStart", start))
        # A's own session is not told its own knowledge.
        self.assertEqual(fire(ha, "SessionStart", dict(start, cwd=str(ha.root))), "")


class RealClaudeCodeTests(SynchronousTestCase):
    if CLAUDE is None:
        skip = "the Claude Code CLI (`claude`, npm @anthropic-ai/claude-code) is not on PATH"

    def test_claude_runs_the_installed_session_start_hook(self) -> None:
        assert CLAUDE is not None
        home = temp_home(self)
        ok(run_cli(home, "hooks", "install"))
        # Some knowledge from a peer, so that the hook has something to say.
        from claudectl.hive.store import store_transaction

        now = int(time.time())
        with store_transaction(home, local_id="me-00000001", now=now) as store:
            store.insert(peer_unit(1, originated_at=now, last_validated_at=now))
        project = home.root / "demo"
        project.mkdir()
        env = subprocess_env(home)
        env["PATH"] = os.pathsep.join([os.path.dirname(CLAUDE), env["PATH"]])
        for name in ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"):
            env.pop(name, None)
        r = subprocess.run(
            [CLAUDE, "-p", "hello", "--output-format", "stream-json", "--verbose"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=str(project),
            stdin=subprocess.DEVNULL,
        )
        events = []
        for line in r.stdout.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        started = [e for e in events if e.get("subtype") == "hook_started"]
        responses = [e for e in events if e.get("subtype") == "hook_response"]
        self.assertTrue(any("SessionStart" in json.dumps(e) for e in started), r.stdout + r.stderr)
        ours = [e for e in responses if "Hive Knowledge" in json.dumps(e)]
        self.assertTrue(ours, r.stdout + r.stderr)
        self.assertIn("[Bash, cargo test] approve (100%)", json.dumps(ours[0], ensure_ascii=False))
