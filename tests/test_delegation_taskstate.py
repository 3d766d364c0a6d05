"""One task-state vocabulary: claudectl's strings, defined once (delegation/taskstate.py)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import payloads, taskstate
from claudectl.delegation.taskrun import TaskRun
from tests.common import vector

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "claudectl"
STATES = {
    taskstate.DELEGATED,
    taskstate.QUEUED,
    taskstate.RUNNING,
    taskstate.COMPLETED,
    taskstate.FAILED,
    taskstate.STOPPED,
    taskstate.PENDING,
    taskstate.RETRYING,
    taskstate.SKIPPED,
}


class VocabularyTests(SynchronousTestCase):
    def test_wire_strings_are_claudectls(self) -> None:
        status = json.loads(vector("delegation.frame.task_status_initial")["expected"]["line"])
        self.assertEqual(status["payload"]["state"], taskstate.RUNNING)
        for name, state in (
            ("handoff_completed", taskstate.COMPLETED),
            ("handoff_failed", taskstate.FAILED),
            ("handoff_stopped", taskstate.FAILED),
        ):
            payload = json.loads(vector(f"delegation.payload.{name}")["expected"]["payload_json"])
            self.assertEqual(payload["state"], state, name)

    def test_stopped_is_failed_on_the_wire(self) -> None:
        self.assertEqual(taskstate.wire_handoff_state(taskstate.STOPPED), "failed")
        self.assertEqual(taskstate.wire_handoff_state(taskstate.COMPLETED), "completed")
        self.assertEqual(taskstate.status_state(taskstate.QUEUED), "queued")
        self.assertEqual(taskstate.status_state(taskstate.RUNNING), "running")
        run = TaskRun("task_1", now=lambda: 0.0)
        self.assertEqual(run.state, taskstate.QUEUED)
        outcome = run.cancel("stop")
        assert outcome is not None
        self.assertEqual((run.state, outcome.wire_state), (taskstate.STOPPED, "failed"))
        stopped = payloads.TaskHandoff("t", taskstate.FAILED, payloads.SUMMARY_STOPPED)
        from claudectl.delegation.controller import handoff_state

        self.assertEqual(handoff_state(stopped), taskstate.STOPPED)

    def test_no_other_module_names_a_state(self) -> None:
        """No module but taskstate.py binds a name to a task-state string."""
        offenders = []
        for path in sorted(PACKAGE_DIR.rglob("*.py")):
            if path.name == "taskstate.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                if (
                    isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Constant)
                    and node.value.value in STATES
                ):
                    offenders.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}")
        self.assertEqual(offenders, [])
