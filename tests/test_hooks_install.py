"""
``claudectl hooks install / uninstall / status`` on a temporary home: merged
with existing hooks, idempotent, backed up, undone exactly; a malformed
settings file is refused.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.hooks.entry import EVENTS
from claudectl.hooks.settings import BACKUP_SUFFIX, is_ours, settings_path
from tests.common import run_cli, temp_home

EXISTING: dict[str, Any] = {
    "model": "opus",
    "permissions": {"allow": ["Bash(ls:*)"]},
    "hooks": {
        "PostToolUse": [
            {
                "matcher": "Write|Edit",
                "hooks": [{"type": "command", "command": "prettier --write", "timeout": 30}],
            }
        ],
        "Notification": [{"hooks": [{"type": "command", "command": "notify-send hi"}]}],
    },
}


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


class InstallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.path = settings_path(self.home.root)

    def write(self, value: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = value if isinstance(value, str) else json.dumps(value, indent=4)
        self.path.write_text(text)

    def read(self) -> Any:
        return json.loads(self.path.read_text())

    def test_merge_idempotent_backup_and_uninstall(self) -> None:
        self.write(EXISTING)
        before = self.path.read_bytes()
        out = json.loads(ok(run_cli(self.home, "hooks", "install", "--json")))
        self.assertEqual(out["scope"], "user")
        self.assertEqual(out["path"], str(self.path))
        self.assertTrue(out["changed"])
        self.assertEqual(out["events"], list(EVENTS))
        # The backup holds the file as it was.
        self.assertEqual(Path(out["backup"]).read_bytes(), before)
        self.assertEqual(out["backup"], str(self.path) + BACKUP_SUFFIX)
        s = self.read()
        self.assertEqual(s["model"], "opus")
        self.assertEqual(s["permissions"], EXISTING["permissions"])
        self.assertEqual(s["hooks"]["Notification"], EXISTING["hooks"]["Notification"])
        # Theirs first, ours appended.
        post = s["hooks"]["PostToolUse"]
        self.assertEqual(post[0], EXISTING["hooks"]["PostToolUse"][0])
        self.assertEqual(post[1]["matcher"], "*")
        for event in EVENTS:
            ours = [h for g in s["hooks"][event] for h in g["hooks"] if is_ours(h)]
            self.assertEqual(len(ours), 1, event)
            self.assertEqual(ours[0]["type"], "command")
            self.assertEqual(ours[0]["timeout"], 10)
            # The command names the event; the home is the user's own (HOME): no --home.
            self.assertTrue(ours[0]["command"].endswith(f"claudectl/hooks/run.py {event}"))
            self.assertIn(" -S ", ours[0]["command"])
        self.assertNotIn("matcher", s["hooks"]["SessionStart"][0])

        # Twice: nothing changes, not even the backup.
        installed = self.path.read_bytes()
        backup = Path(out["backup"]).read_bytes()
        out2 = json.loads(ok(run_cli(self.home, "hooks", "install", "--json")))
        self.assertFalse(out2["changed"])
        self.assertIsNone(out2["backup"])
        self.assertEqual(self.path.read_bytes(), installed)
        self.assertEqual(Path(out["backup"]).read_bytes(), backup)
        self.assertIn("already installed", ok(run_cli(self.home, "hooks", "install")))

        # Uninstall: everything else exactly as it was.
        out3 = json.loads(ok(run_cli(self.home, "hooks", "uninstall", "--json")))
        self.assertTrue(out3["changed"])
        self.assertEqual(self.read(), EXISTING)
        self.assertIn("nothing changed", ok(run_cli(self.home, "hooks", "uninstall")))

    def test_fresh_home_creates_the_file_and_uninstall_leaves_it_empty(self) -> None:
        text = ok(run_cli(self.home, "hooks", "install"))
        self.assertIn(f"in {self.path} (user scope)", text)
        self.assertNotIn("previous settings", text)
        self.assertEqual(sorted(self.read()["hooks"]), sorted(EVENTS))
        ok(run_cli(self.home, "hooks", "uninstall"))
        self.assertEqual(self.read(), {})

    def test_a_stale_command_is_replaced_in_place(self) -> None:
        stale = {
            "hooks": {
                "Stop": [
                    {
                        "hooks": [
                            {
                                "type": "command",
                                "command": "/old/python -S /old/claudectl/hooks/run.py Stop",
                            },
                            {"type": "command", "command": "say done"},
                        ]
                    }
                ]
            }
        }
        self.write(stale)
        ok(run_cli(self.home, "hooks", "install"))
        stop = self.read()["hooks"]["Stop"]
        self.assertEqual(stop[0], {"hooks": [{"type": "command", "command": "say done"}]})
        self.assertTrue(stop[1]["hooks"][0]["command"].endswith("claudectl/hooks/run.py Stop"))
        self.assertEqual(len(stop), 2)

    def test_another_home_is_passed_to_the_hook(self) -> None:
        from tests.common import subprocess_env

        elsewhere = temp_home(self)
        env = subprocess_env(self.home, HOME=str(elsewhere.root))
        ok(run_cli(self.home, "hooks", "install", env=env))
        self.assertFalse(settings_path(elsewhere.root).exists())  # never the real ~
        [group] = self.read()["hooks"]["SessionStart"]
        self.assertTrue(
            group["hooks"][0]["command"].endswith(f"run.py SessionStart --home {self.home.root}")
        )
        st = json.loads(ok(run_cli(self.home, "hooks", "status", "--json", env=env)))
        self.assertTrue(st["scopes"][0]["current"])

    def test_malformed_settings_are_refused(self) -> None:
        for bad in ("{not json", "[1, 2]", '{"hooks": []}', '{"hooks": {"Stop": {"x": 1}}}'):
            self.write(bad)
            for cmd in ("install", "uninstall"):
                r = run_cli(self.home, "hooks", cmd)
                self.assertEqual(r.returncode, 1, bad)
                self.assertEqual(r.stdout, "")
                [line] = r.stderr.splitlines()
                self.assertTrue(line.startswith("Error: "), line)
                self.assertIn(str(self.path), line)
                self.assertIn("not touching it", line)
                self.assertEqual(self.path.read_text(), bad)  # untouched
                self.assertFalse(self.path.with_name("settings.json" + BACKUP_SUFFIX).exists())
            r = run_cli(self.home, "hooks", "install", "--json")
            self.assertEqual(json.loads(r.stdout)["exit_code"], 1)
            status = json.loads(ok(run_cli(self.home, "hooks", "status", "--json")))
            self.assertIn("not touching it", status["scopes"][0]["error"])

    def test_project_scope_and_status(self) -> None:
        project = self.home.root / "proj"
        project.mkdir()
        out = json.loads(
            ok(run_cli(self.home, "hooks", "install", "--project", str(project), "--json"))
        )
        self.assertEqual(out["scope"], "project")
        self.assertEqual(out["path"], str(project / ".claude" / "settings.json"))
        self.assertFalse(self.path.exists())  # the user scope untouched
        st = json.loads(
            ok(run_cli(self.home, "hooks", "status", "--project", str(project), "--json"))
        )
        user, proj = st["scopes"]
        self.assertEqual((user["scope"], user["events"], user["exists"]), ("user", {}, False))
        self.assertEqual(proj["scope"], "project")
        self.assertEqual(sorted(proj["events"]), sorted(EVENTS))
        self.assertEqual(proj["missing"], [])
        self.assertTrue(proj["current"])
        self.assertEqual(st["gate"], "off")
        text = ok(run_cli(self.home, "hooks", "status", "--project", str(project)))
        self.assertIn("User scope: ", text)
        self.assertIn("not installed (no file)", text)
        self.assertIn("installed: PermissionDenied, PermissionRequest", text)
        self.assertIn("Gate: off", text)
        r = run_cli(self.home, "hooks", "install", "--project", str(project / "nope"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("does not exist", r.stderr)

    def test_status_sees_a_partial_or_foreign_install(self) -> None:
        self.write(
            {
                "hooks": {
                    "SessionStart": [
                        {
                            "hooks": [
                                {
                                    "type": "command",
                                    "command": "/other/python -m claudectl.hooks SessionStart",
                                }
                            ]
                        }
                    ],
                    "Stop": [{"hooks": [{"type": "command", "command": "say bye"}]}],
                }
            }
        )
        row = json.loads(ok(run_cli(self.home, "hooks", "status", "--json")))["scopes"][0]
        self.assertEqual(list(row["events"]), ["SessionStart"])
        self.assertFalse(row["current"])
        self.assertEqual(row["other_hooks"], 1)
        text = ok(run_cli(self.home, "hooks", "status"))
        self.assertIn("partly installed: SessionStart", text)
        self.assertIn("another Python", text)
        self.assertIn("1 other hook(s)", text)
