"""
Remote delegation end to end, as a user runs it: two services on loopback
(two homes), the fake `claude` on the worker, and the CLI on the controller
-- delegate and follow, status, nudge, stop, and a task file mixing local and
remote tasks with a dependency between them.  The first story runs real
`claudectl relay serve` and `claudectl` processes; the others run the
services and the CLI in-process (faster, same commands).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.cli_harness import run_command, run_now
from tests.common import ServeProcess, run_cli, temp_home
from tests.test_services import RunningService

FAKE_CLAUDE = str(Path(__file__).resolve().parent / "fake_claude.py")


def ok(result: Any) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout  # type: ignore[no-any-return]


def write_config(home: Any, proj: Path) -> None:
    home.config_file.parent.mkdir(parents=True, exist_ok=True)
    home.config_file.write_text(
        "[delegation]\n"
        f"allowed_dirs = [{json.dumps(str(proj))}]\n"
        f"claude_command = {json.dumps(sys.executable)}\n"
        f"claude_args = [{json.dumps(FAKE_CLAUDE)}]\n"
        "stop_grace_secs = 2\n"
    )


class TwoServicesBase(SynchronousTestCase):
    """A worker and a controller service, paired and connected."""

    def setUp(self) -> None:
        self.worker, self.ctl = temp_home(self), temp_home(self)
        self.proj = Path(self.mktemp()).absolute()
        self.proj.mkdir()
        write_config(self.worker, self.proj)
        write_config(self.ctl, self.proj)
        code = ok(run_now(self.worker, "relay", "pair")).splitlines()[2].split(": ")[1]
        self.wid = ok(run_now(self.worker, "relay", "identity")).strip()
        ok(run_now(self.ctl, "relay", "accept", code, self.wid))
        self.w = ServeProcess.serve(self.worker, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.w.stop)
        self.c = ServeProcess.serve(self.ctl, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(self.c.stop)
        port = self.w.port()
        self.c.port()
        ok(run_cli(self.ctl, "relay", "connect", f"127.0.0.1:{port}"))

    def status(self, task: str | None = None) -> Any:
        args = ["relay", "status", "--json"] + ([task] if task else [])
        data = json.loads(ok(run_cli(self.ctl, *args)))
        return data if task else data["tasks"]

    def wait_state(self, task: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            rec = self.status(task)
            if rec.get("state") in states:
                return rec  # type: ignore[no-any-return]
            self.assertLess(time.monotonic(), deadline, f"task stuck: {rec}")
            time.sleep(0.3)


class DelegationEndToEndTests(TwoServicesBase):
    def test_delegate_follow_status(self) -> None:
        r = run_cli(
            self.ctl,
            "relay",
            "delegate",
            self.wid,
            "--cwd",
            str(self.proj),
            "--wait",
            "fake:succeed fake:edit write the file",
        )
        out = ok(r)
        self.assertIn("completed", out)
        [task] = self.status()
        self.assertEqual(task["state"], "completed")
        self.assertEqual(task["peer"], self.wid)
        self.assertTrue((self.proj / "fake-claude.txt").exists())
        text = ok(run_cli(self.ctl, "relay", "status"))
        self.assertIn(task["task_id"], text)
        self.assertIn("Delegated by this machine (outgoing):", text)
        self.assertNotIn("(incoming)", text)
        # Issue 12 item 8: the worker sees the task it ran for the controller.
        cid = ok(run_cli(self.ctl, "relay", "identity")).strip()
        text = ok(run_cli(self.worker, "relay", "status"))
        self.assertIn("Run here for peers (incoming):", text)
        self.assertNotIn("(outgoing)", text)
        self.assertIn(task["task_id"], text)
        self.assertIn(cid, text)
        data = json.loads(ok(run_cli(self.worker, "--json", "relay", "status")))
        self.assertEqual(data["tasks"], [])
        self.assertTrue(data["service_running"])
        [theirs] = data["incoming"]
        self.assertEqual(
            (theirs["task_id"], theirs["peer"], theirs["state"], theirs["direction"]),
            (task["task_id"], cid, "completed", "incoming"),
        )
        one = json.loads(ok(run_cli(self.worker, "--json", "relay", "status", task["task_id"])))
        self.assertEqual(one["direction"], "incoming")
        # Stopped services: both sides still show their stored tasks (issue 12 item 14).
        self.assertEqual(self.w.stop(), 0)
        text = ok(run_cli(self.worker, "relay", "status"))
        self.assertIn("The relay service is not running: stored tasks, as last saved.", text)
        self.assertIn("Run here for peers (incoming):", text)
        self.assertIn(task["task_id"], text)
        self.assertEqual(self.c.stop(), 0)
        data = json.loads(ok(run_cli(self.ctl, "--json", "relay", "status")))
        self.assertFalse(data["service_running"])
        self.assertIsNone(data["service"])
        self.assertEqual([t["task_id"] for t in data["tasks"]], [task["task_id"]])
        self.assertEqual(data["tasks"][0]["state"], "completed")


class InProcessServicesBase(TestCase):
    """
    The same worker and controller, their services and the CLI in this
    process (tests.cli_harness; the fake `claude` is a real child process).
    """

    timeout = 120

    async def setUp(self) -> None:
        self.worker, self.ctl = temp_home(self), temp_home(self)
        self.proj = Path(self.mktemp()).absolute()
        self.proj.mkdir()
        write_config(self.worker, self.proj)
        write_config(self.ctl, self.proj)
        code = ok(run_now(self.worker, "relay", "pair")).splitlines()[2].split(": ")[1]
        self.wid = ok(run_now(self.worker, "relay", "identity")).strip()
        ok(run_now(self.ctl, "relay", "accept", code, self.wid))
        self.w = RunningService(self.worker)
        self.w.start()
        self.addCleanup(self.w.stop)
        self.c = RunningService(self.ctl)
        self.c.start()
        self.addCleanup(self.c.stop)
        ok(await run_command(self.ctl, "relay", "connect", f"127.0.0.1:{self.w.port}"))

    async def status(self, task: str | None = None) -> Any:
        args = ["relay", "status", "--json"] + ([task] if task else [])
        data = json.loads(ok(await run_command(self.ctl, *args)))
        return data if task else data["tasks"]

    async def wait_state(self, task: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            rec = await self.status(task)
            if rec.get("state") in states:
                return rec  # type: ignore[no-any-return]
            self.assertLess(time.monotonic(), deadline, f"task stuck: {rec}")
            await deferLater(reactor, 0.2, lambda: None)


class DelegationInProcessTests(InProcessServicesBase):
    async def test_refused_outside_allowed_dirs(self) -> None:
        other = Path(self.mktemp()).absolute()
        other.mkdir()
        r = await run_command(
            self.ctl,
            "relay",
            "delegate",
            self.wid,
            "--cwd",
            str(other),
            "--wait",
            "fake:succeed hi",
        )
        self.assertNotEqual(r.returncode, 0)
        [task] = await self.status()
        self.assertEqual(task["state"], "failed")
        self.assertIn("allowed_dirs", json.dumps(task))

    async def test_nudge_and_stop(self) -> None:
        out = json.loads(
            ok(
                await run_command(
                    self.ctl,
                    "--json",
                    "relay",
                    "delegate",
                    self.wid,
                    "--cwd",
                    str(self.proj),
                    "fake:hang forever",
                )
            )
        )
        task = out["task_id"]
        await self.wait_state(task, {"running"})
        ok(
            await run_command(
                self.ctl, "relay", "interrupt", task, "nudge", "dependency", "resolved"
            )
        )
        ok(
            await run_command(
                self.ctl, "relay", "interrupt", task, "stop", "no", "longer", "needed"
            )
        )
        rec = await self.wait_state(task, {"failed", "stopped"})
        self.assertIn("stop", json.dumps(rec).lower())

    async def test_task_file_mixing_local_and_remote(self) -> None:
        tasks = {
            "tasks": [
                {"name": "local-first", "prompt": "fake:succeed prepare", "cwd": str(self.proj)},
                {
                    "name": "remote-second",
                    "prompt": "fake:succeed use {{local-first.stdout}}",
                    "cwd": str(self.proj),
                    "peer": self.wid,
                    "depends_on": ["local-first"],
                },
            ]
        }
        f = Path(self.mktemp()).absolute()
        f.write_text(json.dumps(tasks))
        r = await run_command(self.ctl, "run", str(f))
        out = ok(r)
        self.assertIn("remote-second", out)
        remote = [t for t in await self.status() if t["peer"] == self.wid]
        self.assertEqual([t["state"] for t in remote], ["completed"])

    async def test_task_file_errors_before_anything_starts(self) -> None:
        f = Path(self.mktemp()).absolute()
        f.write_text(
            json.dumps(
                {
                    "tasks": [
                        {"name": "a", "prompt": "x", "depends_on": ["b"]},
                        {"name": "b", "prompt": "y", "depends_on": ["a"]},
                    ]
                }
            )
        )
        r = await run_command(self.ctl, "run", str(f))
        self.assertEqual(r.returncode, 1)
        self.assertIn("cycle", r.stderr)
        self.assertEqual(await self.status(), [])


class LiveTailTests(InProcessServicesBase):
    """Issue 14: the live tail of a running task reaches the delegating side."""

    async def test_status_shows_the_live_tail_while_the_task_runs(self) -> None:
        out = json.loads(
            ok(
                await run_command(
                    self.ctl,
                    "--json",
                    "relay",
                    "delegate",
                    self.wid,
                    "--cwd",
                    str(self.proj),
                    "fake:busy then hang",
                )
            )
        )
        task = out["task_id"]
        want = ["session started", "Bash: pytest -q tests/", "Running the tests now"]
        want += ["Read: /srv/proj/a.py", "Working on it"]
        deadline = time.monotonic() + 30
        while True:
            rec = await self.status(task)
            texts = [line["text"] for line in rec.get("tail", [])]
            if texts == want:
                break
            self.assertLess(time.monotonic(), deadline, f"no tail: {rec}")
            await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(rec["state"], "running")
        self.assertTrue(all(isinstance(line["at"], float) for line in rec["tail"]))
        text = ok(await run_command(self.ctl, "relay", "status", task))
        self.assertIn("Recent activity:", text)
        self.assertIn("Bash: pytest -q tests/", text)
        self.assertIn("Running the tests now", text)
        self.assertNotIn("\x1b", text)
        # The worker shows its own tail of the task it runs.
        text = ok(await run_command(self.worker, "relay", "status", task))
        self.assertIn("Recent activity:", text)
        self.assertIn("Read: /srv/proj/a.py", text)
        ok(await run_command(self.ctl, "relay", "interrupt", task, "stop", "enough"))
        await self.wait_state(task, {"failed", "stopped"})
        # After the end the tail stays (memory of the running service).
        self.assertEqual([line["text"] for line in (await self.status(task))["tail"]][:5], want)
