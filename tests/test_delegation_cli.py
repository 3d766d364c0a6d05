"""The delegation commands as a user runs them (subprocesses, temp homes)."""

import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.common import subprocess_env, temp_home

FAKE_CLAUDE = str(Path(__file__).with_name("fake_claude.py"))


class CliTests(TestCase):
    timeout = 60

    def setUp(self):
        self.home = temp_home(self)
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text(
            "[delegation]\n"
            f"claude_command = {json.dumps(sys.executable)}\n"
            f"claude_args = [{json.dumps(FAKE_CLAUDE)}]\n")
        self.work = self.home.root / "work"
        self.work.mkdir()

    def claudectl(self, *args):
        return subprocess.run([sys.executable, "-m", "claudectl", *args], cwd=self.work,
                              env=subprocess_env(self.home), capture_output=True, text=True,
                              timeout=50)

    def write(self, name, data):
        path = self.work / name
        path.write_text(json.dumps(data) if name.endswith(".json") else data)
        return str(path)

    def test_run_local_tasks_with_a_dependency(self):
        f = self.write("tasks.json", {"tasks": [
            {"name": "analyze", "prompt": "list issues"},
            {"name": "fix", "prompt": "Fix: {{analyze.stdout}}", "depends_on": ["analyze"]}]})
        r = self.claudectl("--json", "run", f)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["status"], "completed")
        fix = out["tasks"][1]
        self.assertEqual(fix["message"], "Done: Fix: Done: list issues")
        self.assertAlmostEqual(fix["cost_usd"], 0.0123)

    def test_run_failure_sets_the_exit_status_and_skips_dependents(self):
        f = self.write("tasks.yaml", "tasks:\n  - name: a\n    prompt: 'fake:fail'\n"
                                     "  - name: b\n    prompt: x\n    depends_on: [a]\n")
        r = self.claudectl("run", f)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[a] failed", r.stdout)
        self.assertIn("Not logged in", r.stdout)
        self.assertIn("[b] skipped: dependency failed: a", r.stdout)

    def test_validation_before_anything_starts(self):
        f = self.write("tasks.json", {"tasks": [
            {"name": "a", "prompt": "fake:edit", "peer": "nobody-1"}]})
        r = self.claudectl("run", f)
        self.assertEqual(r.returncode, 1)
        self.assertIn("Error: Task 'a': peer 'nobody-1' is not paired", r.stderr)
        self.assertFalse((self.work / "fake-claude.txt").exists())

    def test_relay_commands_need_the_service(self):
        for args in (["relay", "status"], ["relay", "delegate", "p-1", "hi"],
                     ["relay", "interrupt", "task_1", "stop"]):
            r = self.claudectl(*args)
            self.assertEqual(r.returncode, 1, args)
            self.assertIn("Error: the relay service is not running", r.stderr)
