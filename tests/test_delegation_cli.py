"""
The delegation commands as a user runs them, in temp homes: in-process
(tests.cli_harness, real child processes of the fake Claude Code) for what
they print and exit with, and real ``claudectl`` processes for Ctrl-C and
SIGTERM.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.process import sweep
from tests.cli_harness import run_command
from tests.common import FakeMesh, subprocess_env, temp_home

FAKE_CLAUDE = str(Path(__file__).with_name("fake_claude.py"))


class CliTests(TestCase):
    timeout = 60

    def setUp(self):
        self.home = temp_home(self)
        self.home.config_file.parent.mkdir(parents=True)
        self.home.config_file.write_text(
            "[delegation]\n"
            f"claude_command = {json.dumps(sys.executable)}\n"
            f"claude_args = [{json.dumps(FAKE_CLAUDE)}]\n"
        )
        self.work = self.home.root / "work"
        self.work.mkdir()

    def claudectl(self, *args):
        return run_command(self.home, *args, cwd=self.work)

    def write(self, name, data):
        path = self.work / name
        path.write_text(json.dumps(data) if name.endswith(".json") else data)
        return str(path)

    async def test_run_local_tasks_with_a_dependency(self):
        f = self.write(
            "tasks.json",
            {
                "tasks": [
                    {"name": "analyze", "prompt": "list issues"},
                    {"name": "fix", "prompt": "Fix: {{analyze.stdout}}", "depends_on": ["analyze"]},
                ]
            },
        )
        r = await self.claudectl("--json", "run", f)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["status"], "completed")
        fix = out["tasks"][1]
        self.assertEqual(fix["message"], "Done: Fix: Done: list issues")
        self.assertAlmostEqual(fix["cost_usd"], 0.0123)

    async def test_run_failure_sets_the_exit_status_and_skips_dependents(self):
        f = self.write(
            "tasks.yaml",
            "tasks:\n  - name: a\n    prompt: 'fake:fail'\n"
            "  - name: b\n    prompt: x\n    depends_on: [a]\n",
        )
        r = await self.claudectl("run", f)
        self.assertEqual(r.returncode, 1)
        self.assertIn("[a] failed", r.stdout)
        self.assertIn("Not logged in", r.stdout)
        self.assertIn("[b] skipped: dependency failed: a", r.stdout)

    async def test_local_tasks_that_cannot_start(self):
        """Issue 12 item 1: two local tasks, `claude` not found: both fail
        cleanly, no AlreadyCalledError, no bogus second line for t1."""
        self.home.config_file.write_text(
            '[delegation]\nclaude_command = "claude-not-installed-here"\n'
        )
        f = self.write(
            "tasks.json", {"tasks": [{"name": "t1", "prompt": "a"}, {"name": "t2", "prompt": "b"}]}
        )
        r = await self.claudectl("run", f)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertNotIn("Traceback", r.stdout + r.stderr)
        self.assertNotIn("AlreadyCalled", r.stdout + r.stderr)
        self.assertEqual(r.stdout.count("[t1] failed"), 1, r.stdout)
        self.assertIn("[t2] failed", r.stdout)
        self.assertIn("could not start Claude Code", r.stdout)
        self.assertIn("Error: 2 of 2 task(s) did not complete", r.stderr)

    async def test_validation_before_anything_starts(self):
        f = self.write(
            "tasks.json", {"tasks": [{"name": "a", "prompt": "fake:edit", "peer": "nobody-1"}]}
        )
        r = await self.claudectl("run", f)
        self.assertEqual(r.returncode, 1)
        self.assertIn("Error: Task 'a': peer 'nobody-1' is not paired", r.stderr)
        self.assertFalse((self.work / "fake-claude.txt").exists())

    async def test_relay_commands_need_the_service(self):
        r = await self.claudectl("relay", "status")  # shows the stored tasks instead
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("The relay service is not running", r.stdout)
        self.assertIn("No delegated tasks", r.stdout)
        for args in (["relay", "delegate", "p-1", "hi"], ["relay", "interrupt", "task_1", "stop"]):
            r = await self.claudectl(*args)
            self.assertEqual(r.returncode, 1, args)
            self.assertIn("Error: the relay service is not running", r.stderr)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class InterruptedRunTests(SynchronousTestCase):
    """S4: Ctrl-C or SIGTERM during `claudectl run` leaves no Claude Code behind."""

    def go(self, sig, prompt):
        home = temp_home(self)
        home.config_file.parent.mkdir(parents=True)
        home.config_file.write_text(
            "[delegation]\n"
            f"claude_command = {json.dumps(sys.executable)}\n"
            f"claude_args = [{json.dumps(FAKE_CLAUDE)}]\n"
            "stop_grace_secs = 1\n"
        )
        work = home.root / "work"
        work.mkdir()
        (work / "tasks.json").write_text(
            json.dumps({"tasks": [{"name": "local", "prompt": prompt}]})
        )
        marker = {"CLAUDE_FAKE_LOG": str(home.root / "fake.log")}  # reaches the fake's tree
        self.addCleanup(sweep.kill_tagged, marker)
        # A suite started with SIGINT ignored (a background job, `trap '' INT`)
        # passes that on, and a process that starts with SIGINT ignored keeps
        # ignoring it: give the child the default disposition, as a terminal would.
        p = subprocess.Popen(
            [sys.executable, "-m", "claudectl", "run", "tasks.json"],
            cwd=work,
            env=subprocess_env(home, **marker),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_sigint,
        )
        self.addCleanup(lambda: p.poll() is None and p.kill())
        expected = 1 + prompt.count("+") + 1  # the fake, its extras, the hang grandchild
        deadline = time.monotonic() + 20
        while len(sweep.pids_with_env(marker)) < expected:
            self.assertLess(time.monotonic(), deadline, "the fake claude did not start")
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
        deadline = time.monotonic() + 3
        while sweep.pids_with_env(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(sweep.pids_with_env(marker), [])
        self.assertEqual(p.returncode, 130, err)
        self.assertIn("Error: interrupted; local Claude Code sessions were stopped", err)
        self.assertNotIn("Traceback", err + out)
        self.assertNotIn("Unhandled error", err + out)

    def test_ctrl_c(self):
        self.go(signal.SIGINT, "fake:hang-hard +escape +daemon")

    def test_sigterm(self):
        self.go(signal.SIGTERM, "fake:hang")


class WaitInterruptedTests(TestCase):
    """R3: Ctrl-C during `relay delegate --wait`: a clear message, no traceback."""

    timeout = 30

    async def test_ctrl_c_while_waiting(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import UNIXServerEndpoint
        from twisted.internet.protocol import Factory
        from twisted.protocols import amp

        from claudectl.control.paths import control_socket_path, remove_fallback_dir
        from claudectl.delegation.controller import DelegationController
        from claudectl.delegation.locator import DelegationLocator
        from claudectl.delegation.store import OUTGOING, TaskStore

        home = temp_home(self)
        mesh = FakeMesh("laptop-1", peers=["ci-1"])
        controller = DelegationController(
            mesh=mesh,
            store=TaskStore(home.tasks, OUTGOING),
            clock=reactor,
            is_paired=lambda p: True,
        )
        self.addCleanup(controller.stop)
        sock = control_socket_path(home)
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.addCleanup(remove_fallback_dir, home)
        port = await UNIXServerEndpoint(reactor, str(sock)).listen(
            Factory.forProtocol(lambda: amp.AMP(locator=DelegationLocator(controller)))
        )
        self.addCleanup(port.stopListening)
        proto = Collect()
        transport = reactor.spawnProcess(
            proto,
            sys.executable,
            [
                sys.executable,
                "-m",
                "claudectl",
                "relay",
                "delegate",
                "ci-1",
                "--wait",
                "fake:hang x",
            ],
            env=subprocess_env(home),
            path=str(home.root),
        )
        while not controller._waiters:  # it follows the task now
            await deferLater(reactor, 0.05, lambda: None)
        transport.signalProcess("INT")
        status = await proto.ended
        [task_id] = controller.records
        self.assertEqual(status.exitCode, 130, proto.err)
        err = proto.err.decode()
        self.assertIn(f"Error: interrupted; task {task_id} keeps running on ci-1", err)
        self.assertIn(f"claudectl relay interrupt {task_id} stop", err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("Unhandled error", err)
        self.assertIn(f"Task {task_id} delegated to peer ci-1", proto.out.decode())


class Collect(ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.err = b""
        self.ended = Deferred()

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)
