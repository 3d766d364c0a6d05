"""
The hook events, fed the documented payloads (tests/data/claude_code_hooks.json,
written from Claude Code's hooks reference): the output has the documented
shape, and permission decisions land in decisions.jsonl in claudectl's
format, which ``hive distill`` turns into units.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import HiveConfig
from claudectl.hive.distill import distill_home
from claudectl.hive.store import load_store, store_transaction
from claudectl.hive.trust import trust_transaction
from claudectl.hive.units import KnowledgeUnit, Pattern, Scope
from claudectl.home import Home
from claudectl.hooks import entry, pending
from claudectl.hooks.events import tool_command
from claudectl.hooks.files import HookHome
from tests.common import temp_home

FIXTURES = json.loads(
    (Path(__file__).parent / "data" / "claude_code_hooks.json").read_text(encoding="utf-8")
)
NOW = 1_800_000_000
ME = "me-00000001"
PEER = "peer-0000000a"


def payload(event: str, **changes: Any) -> dict[str, Any]:
    p = copy.deepcopy(FIXTURES[event])
    p.update(changes)
    return p


def call(home: Home, event: str, p: dict[str, Any], now: int = NOW) -> str:
    """One hook call in-process, as Claude Code makes it; returns stdout."""
    out = io.StringIO()
    code = entry.run(
        [event, "--home", str(home.root)],
        io.BytesIO(json.dumps(p).encode()),
        out,
        {},
        now=now,
    )
    assert code == 0
    return out.getvalue()


def hook_home(home: Home) -> HookHome:
    return HookHome(str(home.root))


def pending_file(home: Home) -> Path:
    return Path(pending.pending_path(hook_home(home)))


def waiting(home: Home) -> list[dict[str, Any]]:
    return pending.read_pending(hook_home(home))


def decisions(home: Home) -> list[dict[str, Any]]:
    path = home.brain / "decisions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def set_identity(home: Home, ident: str = ME) -> None:
    home.identity_file.parent.mkdir(parents=True, exist_ok=True)
    home.identity_file.write_text(ident + "\n")


def peer_unit(i: int, command: str = "cargo test", action: str = "approve", **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        id=f"ku_{NOW}_{i}",
        scope=Scope(),
        content=Pattern("Bash", command, action, 1.0 if action == "approve" else 0.0, 12, ()),
        evidence_count=12,
        confidence=1.0,
        source_peer=PEER,
        originated_at=NOW,
        last_validated_at=NOW,
    )
    base.update(kw)
    return KnowledgeUnit(**base)


def store_units(home: Home, *units: Any) -> None:
    with store_transaction(home, local_id=ME, now=NOW) as store:
        for u in units:
            store.insert(u)


class SessionStartTests(SynchronousTestCase):
    def test_prints_the_hive_prompt_as_additional_context(self) -> None:
        home = temp_home(self)
        set_identity(home)
        store_units(home, peer_unit(1))
        with trust_transaction(home) as book:
            book.set_level(PEER, 0.9, NOW)
        out = call(home, "SessionStart", payload("SessionStart"))
        doc = json.loads(out)
        self.assertEqual(set(doc), {"hookSpecificOutput"})
        self.assertEqual(set(doc["hookSpecificOutput"]), {"hookEventName", "additionalContext"})
        self.assertEqual(doc["hookSpecificOutput"]["hookEventName"], "SessionStart")
        text = doc["hookSpecificOutput"]["additionalContext"]
        self.assertTrue(text.startswith("## Hive Knowledge (1 peers, 1 units)"), text)
        self.assertIn(
            f"- [hive] [Bash, cargo test] approve (100%) \u2014 12 decisions from {PEER}", text
        )

    def test_same_text_as_hive_prompt_and_capped_and_cleaned(self) -> None:
        from claudectl.hive.prompt import build_prompt

        home = temp_home(self)
        set_identity(home)
        store_units(
            home,
            *[peer_unit(i, command=f"make t{i}") for i in range(30)],
            peer_unit(99, command="evil\x1b[2J\nnew line"),
        )
        text = json.loads(call(home, "SessionStart", payload("SessionStart")))[
            "hookSpecificOutput"
        ]["additionalContext"]
        self.assertEqual(text, build_prompt(home, HiveConfig(), ME, NOW, project="demo"))
        self.assertIn("(showing top 20 of 31)", text)
        self.assertNotIn("\x1b", text)
        self.assertEqual(len(text.splitlines()), 21)

    def test_local_knowledge_is_not_repeated_and_project_scope_applies(self) -> None:
        home = temp_home(self)
        set_identity(home)
        store_units(
            home,
            peer_unit(1, scope=Scope("project", "other-project")),
            peer_unit(2, command="make"),
            peer_unit(3, command="make", source_peer=ME, id="ku_local_3"),
        )
        # The only peer unit left: scoped to another project; the other is covered locally.
        self.assertEqual(call(home, "SessionStart", payload("SessionStart")), "")
        out = call(home, "SessionStart", payload("SessionStart", cwd="/x/other-project"))
        self.assertIn("[Bash, cargo test]", out)

    def test_nothing_to_say_prints_nothing(self) -> None:
        home = temp_home(self)
        self.assertEqual(call(home, "SessionStart", payload("SessionStart")), "")
        store_units(home, peer_unit(1))
        (home.hive / "mode").write_text("off\n")
        self.assertEqual(call(home, "SessionStart", payload("SessionStart")), "")


class ContextCacheTests(SynchronousTestCase):
    def test_reused_until_an_input_changes_or_it_expires(self) -> None:
        from claudectl.hooks import events

        home = temp_home(self)
        set_identity(home)
        store_units(home, peer_unit(1))
        built: list[str] = []
        real = events.build_context

        def counting(*a: Any) -> str:
            built.append("x")
            return real(*a)

        self.patch(events, "build_context", counting)
        with trust_transaction(home) as book:
            book.ensure(PEER, NOW)
        first = call(home, "SessionStart", payload("SessionStart"))
        self.assertIn("[Bash, cargo test]", first)
        self.assertEqual(call(home, "SessionStart", payload("SessionStart"), NOW + 5), first)
        self.assertEqual(len(built), 1)
        # The service rewrites trust.json on every batch (sync time, counts): no rebuild.
        with trust_transaction(home) as book:
            book.ensure(PEER, NOW).last_sync = NOW + 5
            book.ensure(PEER, NOW).knowledge_accepted += 3
        self.assertEqual(call(home, "SessionStart", payload("SessionStart"), NOW + 5), first)
        self.assertEqual(len(built), 1)
        # Another project is built on its own.
        call(home, "SessionStart", payload("SessionStart", cwd="/x/other"), NOW + 5)
        self.assertEqual(len(built), 2)
        # New knowledge: built again.
        store_units(home, peer_unit(2, command="make"))
        self.assertIn("[Bash, make]", call(home, "SessionStart", payload("SessionStart"), NOW + 6))
        self.assertEqual(len(built), 3)
        # Trust changed: built again, with the new label.
        with trust_transaction(home) as book:
            book.set_level(PEER, 0.9, NOW)
        self.assertIn("- [hive] ", call(home, "SessionStart", payload("SessionStart"), NOW + 7))
        self.assertEqual(len(built), 4)
        # Expired.
        later = NOW + 7 + events.CONTEXT_CACHE_SECS
        call(home, "SessionStart", payload("SessionStart"), later)
        self.assertEqual(len(built), 5)
        # A broken cache file is rebuilt, not an error.
        Path(events._cache_path(hook_home(home))).write_text("{broken")
        self.assertIn("[Bash, make]", call(home, "SessionStart", payload("SessionStart"), later))
        self.assertEqual(len(built), 6)


class DecisionTests(SynchronousTestCase):
    def test_allowed_request_becomes_an_accept_line(self) -> None:
        home = temp_home(self)
        self.assertEqual(call(home, "PermissionRequest", payload("PermissionRequest")), "")
        self.assertEqual(decisions(home), [])
        self.assertTrue(pending_file(home).exists())
        self.assertEqual(call(home, "PostToolUse", payload("PostToolUse"), NOW + 3), "")
        [line] = decisions(home)
        # hive.md 5.1, an observation: exactly these fields.
        self.assertEqual(
            set(line),
            {
                "ts",
                "pid",
                "project",
                "tool",
                "command",
                "brain_action",
                "brain_confidence",
                "brain_reasoning",
                "user_action",
                "decision_id",
            },
        )
        self.assertEqual(line["ts"], str(NOW + 3))
        self.assertIsInstance(line["pid"], int)
        self.assertEqual(line["project"], "demo")
        self.assertEqual(line["tool"], "Bash")
        self.assertEqual(line["command"], "cargo test --all")
        self.assertIsNone(line["brain_action"])
        self.assertEqual(line["user_action"], "accept")
        self.assertRegex(line["decision_id"], r"^dec_\d+_\d+_0$")
        self.assertFalse(pending_file(home).exists())
        # The line is compact JSON, one per line, as claudectl writes it.
        raw = (home.brain / "decisions.jsonl").read_text()
        self.assertNotIn(": ", raw)
        self.assertEqual(raw.count("\n"), 1)

    def test_failed_tool_still_an_accept(self) -> None:
        home = temp_home(self)
        call(home, "PermissionRequest", payload("PermissionRequest"))
        call(home, "PostToolUseFailure", payload("PostToolUseFailure"))
        self.assertEqual([d["user_action"] for d in decisions(home)], ["accept"])

    def test_denied_request_becomes_a_reject_line(self) -> None:
        home = temp_home(self)
        req = payload("PermissionRequest", tool_input=FIXTURES["PermissionDenied"]["tool_input"])
        call(home, "PermissionRequest", req)
        call(home, "PermissionDenied", payload("PermissionDenied"))
        [line] = decisions(home)
        self.assertEqual((line["command"], line["user_action"]), ("rm -rf build", "reject"))

    def test_dialog_denial_is_resolved_at_the_end_of_the_turn(self) -> None:
        for ender in ("UserPromptSubmit", "Stop", "SessionEnd"):
            home = temp_home(self)
            call(home, "PermissionRequest", payload("PermissionRequest"))
            other = payload("PermissionRequest", session_id="another")
            call(home, "PermissionRequest", other)
            self.assertEqual(call(home, ender, payload(ender)), "")
            self.assertEqual([d["user_action"] for d in decisions(home)], ["reject"], ender)
            # The other session's request still waits.
            [left] = waiting(home)
            self.assertEqual(left["session"], "another")

    def test_outcomes_without_a_request_record_nothing(self) -> None:
        home = temp_home(self)
        for event in ("PostToolUse", "PostToolUseFailure", "PermissionDenied", "Stop"):
            self.assertEqual(call(home, event, payload(event)), "")
        self.assertEqual(decisions(home), [])
        # Another session's, or another call's, outcome does not answer a request.
        call(home, "PermissionRequest", payload("PermissionRequest"))
        call(home, "PostToolUse", payload("PostToolUse", session_id="zzz"))
        other = payload("PostToolUse", tool_input={"command": "ls"})
        call(home, "PostToolUse", other)
        self.assertEqual(decisions(home), [])

    def test_pending_is_bounded_and_expires(self) -> None:
        home = temp_home(self)
        for i in range(pending.MAX_PENDING + 20):
            call(
                home,
                "PermissionRequest",
                payload("PermissionRequest", tool_input={"command": f"echo {i}"}),
            )
        self.assertEqual(len(waiting(home)), pending.MAX_PENDING)
        # The oldest went first.
        self.assertEqual(waiting(home)[0]["command"], "echo 20")
        call(home, "PostToolUse", payload("PostToolUse"), now=NOW + pending.PENDING_TTL + 1)
        self.assertFalse(pending_file(home).exists())
        self.assertEqual(decisions(home), [])

    def test_secrets_are_not_recorded(self) -> None:
        home = temp_home(self)
        cmd = "GITHUB_TOKEN=ghp_abcdefghijklmnop1234 deploy --password hunter2 https://u:pw@h/x"
        req = payload("PermissionRequest", tool_input={"command": cmd})
        call(home, "PermissionRequest", req)
        self.assertNotIn("hunter2", pending_file(home).read_text())
        call(home, "PostToolUse", payload("PostToolUse", tool_input={"command": cmd}))
        [line] = decisions(home)
        self.assertEqual(line["command"], "GITHUB_TOKEN=*** deploy --password *** https://***@h/x")
        raw = (home.brain / "decisions.jsonl").read_text()
        for secret in ("ghp_", "hunter2", "u:pw"):
            self.assertNotIn(secret, raw)

    def test_file_tools_record_the_path(self) -> None:
        self.assertEqual(
            tool_command({"file_path": "/src/Cargo.lock", "content": "x"}), "/src/Cargo.lock"
        )
        self.assertEqual(tool_command({"url": "https://example.com"}), "https://example.com")
        self.assertIsNone(tool_command({"other": 1}))
        self.assertIsNone(tool_command("not a mapping"))

    def test_hive_distill_turns_hook_decisions_into_units(self) -> None:
        home = temp_home(self)
        set_identity(home)
        for i in range(6):
            call(home, "PermissionRequest", payload("PermissionRequest"), NOW + i)
            post = payload("PostToolUse", tool_use_id=f"toolu_{i}")
            call(home, "PostToolUse", post, NOW + i)
        rm = {"command": "rm -rf target"}
        for i in range(5):
            call(home, "PermissionRequest", payload("PermissionRequest", tool_input=rm), NOW + i)
            call(home, "UserPromptSubmit", payload("UserPromptSubmit"), NOW + i)
        self.assertEqual(len(decisions(home)), 11)
        report = distill_home(home, HiveConfig(), ME, now=NOW + 10)
        self.assertEqual(report.decisions, 11)
        summaries = sorted(u.summary() for u in load_store(home).store.units())
        self.assertEqual(summaries, ["[Bash, cargo test] approve (100%)", "[Bash, rm] deny (0%)"])
        for u in load_store(home).store.units():
            self.assertEqual(u.source_peer, ME)
            self.assertEqual(u.evidence_count, 6 if "cargo" in u.summary() else 5)
