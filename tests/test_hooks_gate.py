"""
The permission gate: ``suggest`` shows knowledge, ``auto`` allows only on
local knowledge with nothing saying deny; peer knowledge never allows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hive.trust import TrustBook
from claudectl.hive.units import Pattern
from claudectl.home import Home
from claudectl.hooks.events import gate_log_path
from claudectl.hooks.gate import AUTO_MIN_ACCEPT_RATE, evaluate
from tests.common import temp_home
from tests.test_hooks_events import (
    ME,
    NOW,
    PEER,
    call,
    decisions,
    hook_home,
    payload,
    peer_unit,
    set_identity,
    store_units,
)


def local_unit(i: int, command: str = "cargo test", action: str = "approve", **kw: Any) -> Any:
    return peer_unit(i, command, action, source_peer=ME, **kw)


def judge(units: list[Any], command: str = "cargo test --all", mode: str = "auto", **kw: Any):
    book = TrustBook()
    book.set_level(PEER, 1.0, NOW)  # the most trusted peer there is
    return evaluate(
        units,
        mode=mode,
        tool="Bash",
        command=command,
        local_id=ME,
        trust=book,
        min_evidence=kw.pop("min_evidence", 5),
        **kw,
    )


class EvaluateTests(SynchronousTestCase):
    def test_peer_knowledge_never_allows_on_its_own(self) -> None:
        # Confirmed, many peers, lots of evidence: still not an allow.
        units = [peer_unit(i, evidence_count=10_000) for i in range(5)]
        view = judge(units)
        self.assertFalse(view.allow)
        self.assertEqual(len(view.findings), 5)
        self.assertEqual({f.label for f in view.findings}, {"hive"})

    def test_local_approval_allows(self) -> None:
        view = judge([local_unit(1)])
        self.assertTrue(view.allow)
        self.assertEqual(view.allowed_by, [f"ku_{NOW}_1"])
        self.assertIn("Hive gate: allowed by local knowledge.", view.message())
        self.assertIn("- [local] [Bash, cargo test] approve (100%)", view.message())

    def test_any_deny_wins(self) -> None:
        for denier in (
            peer_unit(2, action="deny"),  # a peer, trusted or not
            local_unit(2, command="cargo", action="deny"),
        ):
            view = judge([local_unit(1), denier])
            self.assertFalse(view.allow, denier)
            self.assertEqual(view.reason, "some knowledge says deny")
        # An ignored peer (trust 0) still counts for deny.
        book = TrustBook()
        book.set_level(PEER, 0.0, NOW)
        view = evaluate(
            [local_unit(1), peer_unit(2, action="deny")],
            mode="auto",
            tool="Bash",
            command="cargo test",
            local_id=ME,
            trust=book,
            min_evidence=5,
        )
        self.assertFalse(view.allow)
        self.assertIn("hive, ignored", view.message())
        # claudectl's brain's own preference to deny counts too.
        prefs = {
            "patterns": [{"tool": "Bash", "command_pattern": "cargo", "preferred_action": "deny"}]
        }
        self.assertFalse(judge([local_unit(1)], preferences=prefs).allow)

    def test_evidence_rate_and_pattern_required(self) -> None:
        self.assertFalse(judge([local_unit(1, evidence_count=4)]).allow)
        self.assertTrue(judge([local_unit(1, evidence_count=4)], min_evidence=4).allow)
        weak = local_unit(1, content=Pattern("Bash", "cargo test", "approve", 0.7, 12, ()))
        self.assertLess(0.7, AUTO_MIN_ACCEPT_RATE)
        self.assertFalse(judge([weak]).allow)
        anything = local_unit(1, content=Pattern("Bash", None, "approve", 1.0, 12, ()))
        self.assertFalse(judge([anything]).allow)

    def test_shell_operators_never_allowed(self) -> None:
        for cmd in (
            "cargo test; rm -rf ~",
            "cargo test && curl x | sh",
            "cargo test $(id)",
            "cargo test > /etc/x",
            "cargo test `id`",
            "cargo test\nrm -rf ~",
        ):
            view = judge([local_unit(1)], command=cmd)
            self.assertFalse(view.allow, cmd)

    def test_other_tools_and_commands_are_not_relevant(self) -> None:
        view = judge([local_unit(1)], command="make all")
        self.assertEqual((view.allow, view.findings), (False, []))
        self.assertEqual(view.message(), "")

    def test_suggest_and_off(self) -> None:
        view = judge([local_unit(1), peer_unit(2, action="deny")], mode="suggest")
        self.assertFalse(view.allow)
        lines = view.message().splitlines()
        self.assertEqual(lines[0], "Hive knowledge:")
        self.assertTrue(lines[1].startswith("- [local] "), lines)  # local first
        self.assertIn(f"deny (0%) \u2014 12 decisions from {PEER}", lines[2])
        self.assertEqual(judge([local_unit(1)], mode="off").findings, [])


def write_gate(home: Home, mode: str) -> None:
    home.config_file.parent.mkdir(parents=True, exist_ok=True)
    home.config_file.write_text(f'[hive]\ngate = "{mode}"\n')


class GateHookTests(SynchronousTestCase):
    def test_auto_allows_logs_and_does_not_record_a_decision(self) -> None:
        home = temp_home(self)
        set_identity(home)
        write_gate(home, "auto")
        store_units(home, local_unit(1))
        out = json.loads(call(home, "PermissionRequest", payload("PermissionRequest")))
        self.assertEqual(
            out["hookSpecificOutput"],
            {"hookEventName": "PermissionRequest", "decision": {"behavior": "allow"}},
        )
        self.assertIn("[local] [Bash, cargo test]", out["systemMessage"])
        [logged] = [
            json.loads(x) for x in Path(gate_log_path(hook_home(home))).read_text().splitlines()
        ]
        self.assertEqual(logged["decision"], "allow")
        self.assertEqual(logged["command"], "cargo test --all")
        self.assertEqual(logged["units"], [f"ku_{NOW}_1"])
        # The tool then runs: not the user's decision, nothing recorded.
        call(home, "PostToolUse", payload("PostToolUse"))
        self.assertEqual(decisions(home), [])

    def test_auto_on_peer_knowledge_only_asks_the_user(self) -> None:
        home = temp_home(self)
        set_identity(home)
        write_gate(home, "auto")
        store_units(home, peer_unit(1))
        out = json.loads(call(home, "PermissionRequest", payload("PermissionRequest")))
        self.assertNotIn("hookSpecificOutput", out)  # no decision: the dialog is shown
        self.assertIn(f"from {PEER}", out["systemMessage"])
        self.assertFalse(Path(gate_log_path(hook_home(home))).exists())
        call(home, "PostToolUse", payload("PostToolUse"))
        self.assertEqual([d["user_action"] for d in decisions(home)], ["accept"])

    def test_suggest_shows_knowledge_and_off_shows_nothing(self) -> None:
        home = temp_home(self)
        set_identity(home)
        store_units(home, local_unit(1))
        self.assertEqual(call(home, "PermissionRequest", payload("PermissionRequest")), "")
        write_gate(home, "suggest")
        out = json.loads(call(home, "PermissionRequest", payload("PermissionRequest")))
        self.assertEqual(set(out), {"systemMessage"})
        self.assertTrue(out["systemMessage"].startswith("Hive knowledge:\n- [local] "))

    def test_bad_config_means_no_gate(self) -> None:
        home = temp_home(self)
        set_identity(home)
        write_gate(home, "yes please")
        store_units(home, local_unit(1))
        self.assertEqual(call(home, "PermissionRequest", payload("PermissionRequest")), "")
        self.assertIn("(the gate is off)", (home.data / "hooks" / "hooks.log").read_text())
        # The user's decision is still recorded.
        call(home, "PostToolUse", payload("PostToolUse"))
        self.assertEqual([d["user_action"] for d in decisions(home)], ["accept"])
