"""The real Claude Code CLI (if installed): without a login, a failed handoff with its message."""

import shutil

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from claudectl.config import DelegationConfig
from claudectl.delegation import payloads as P
from claudectl.delegation.store import INCOMING, TaskStore
from claudectl.delegation.worker import DelegationWorker
from tests.common import FakeMesh, temp_home

CLAUDE = shutil.which("claude")


class RealClaudeTests(TestCase):
    timeout = 120
    if CLAUDE is None:
        skip = "the Claude Code CLI (`claude`, npm @anthropic-ai/claude-code) is not on PATH"

    async def test_not_logged_in_is_a_failed_handoff_with_its_message(self):
        home = temp_home(self)
        project = home.root / "proj"
        project.mkdir()
        mesh = FakeMesh("worker-1", peers=["ctl-1"])
        worker = DelegationWorker(
            identity="worker-1",
            config=DelegationConfig(allowed_dirs=(str(project),), claude_command=CLAUDE),
            mesh=mesh,
            store=TaskStore(home.tasks, INCOMING),
            trust_of=lambda p: 0.5,
            clock=reactor,
            spawner=reactor.spawnProcess,
            home_root=home.root,
            environ={
                "PATH": "/usr/local/bin:/usr/bin:/bin:" + CLAUDE.rsplit("/", 1)[0],
                "HOME": str(home.root),
            },
        )
        mesh.add_handler("delegate_task", worker.on_delegate)
        worker.start()
        self.addCleanup(worker.stop)
        mesh.deliver("ctl-1", "delegate_task", P.build_delegate_task("t1", "Say hi", str(project)))
        for _ in range(1000):
            handoffs = [p for _, t, p in mesh.sent if t == "task_handoff"]
            if handoffs:
                break
            await deferLater(reactor, 0.1, lambda: None)
        (h,) = handoffs
        self.assertEqual(h["state"], "failed")
        self.assertIn("Not logged in", h["summary"])
        self.assertNotIn("git_ref", h)
