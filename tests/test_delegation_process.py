"""Spawning Claude Code: the ProcessProtocol by hand, then real fake-claude runs."""

import json
import os
import signal
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.delegation import claude_process as CP
from claudectl.delegation.taskrun import TaskRun
from claudectl.process import setsid_exec, sweep

FAKE_CLAUDE = str(Path(__file__).with_name("fake_claude.py"))


def live_group_members(pgid):
    """Pids in process group ``pgid`` that are not zombies (Linux /proc)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


def tagged(proc, timeout=3.0):
    """Live processes carrying ``proc``'s run tag (waits a little for them to die)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        pids = sweep.pids_with_env(proc.tags)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def kill_leftovers(tags):
    """Test cleanup: never leave a stray process behind, whatever happened."""
    sweep.kill_tagged(tags)


class FakeTransport:
    def __init__(self, pid=4242):
        self.pid = pid
        self.written = []
        self.stdin_closed = False
        self.lost = False

    def writeToChild(self, fd, data):
        assert fd == 0
        self.written.append(data)

    def closeStdin(self):
        self.stdin_closed = True

    def loseConnection(self):
        self.lost = True


class FakeSpawner:
    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail
        self.transport = FakeTransport()

    def __call__(self, proto, executable, args, env=None, path=None):
        if self.fail:
            raise self.fail
        self.calls.append((proto, executable, args, env, path))
        proto.makeConnection(self.transport)
        return self.transport


class ArgvEnvTests(SynchronousTestCase):
    def test_argv_never_carries_the_prompt(self):
        self.assertEqual(
            CP.claude_argv("claude", ["--model", "x"]),
            [
                "claude",
                "--model",
                "x",
                "-p",
                "--output-format",
                "stream-json",
                "--verbose",
                "--input-format",
                "stream-json",
            ],
        )
        self.assertEqual(CP.claude_argv("claude", resume="abc")[-2:], ["--resume", "abc"])

    def test_child_env_is_explicit(self):
        env = CP.child_env(
            {
                "PATH": "/bin",
                "HOME": "/h",
                "ANTHROPIC_API_KEY": "k",
                "CLAUDE_CONFIG_DIR": "/c",
                "AWS_REGION": "r",
                "SECRET_TOKEN": "s",
                "PYTHONPATH": "/evil",
            },
            {"CLAUDECTL_TASK_ID": "t"},
        )
        self.assertEqual(
            env,
            {
                "PATH": "/bin",
                "HOME": "/h",
                "ANTHROPIC_API_KEY": "k",
                "CLAUDE_CONFIG_DIR": "/c",
                "AWS_REGION": "r",
                "CLAUDECTL_TASK_ID": "t",
            },
        )
        self.assertEqual(CP.child_env({})["PATH"], CP.DEFAULT_PATH)

    def test_user_message(self):
        event = json.loads(CP.user_message("-rf --help"))
        self.assertEqual(event["type"], "user")
        self.assertEqual(event["message"]["content"][0]["text"], "-rf --help")


class ByHandTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.run = TaskRun("t1", self.clock.seconds)
        self.spawner = FakeSpawner()
        self.kills = []
        self.changes = []
        self.sweeps = []
        self.proc = CP.ClaudeProcess(
            self.run,
            CP.claude_argv(sys.executable),
            "/tmp",
            {"PATH": os.environ["PATH"]},
            self.spawner,
            self.clock,
            stop_grace_secs=5,
            on_change=lambda: self.changes.append(1),
            kill=self.kill,
            run_id="run-1",
            sweep=self.sweep,
            drain_secs=2,
        )

    def sweep(self, tags):
        self.sweeps.append(dict(tags))
        return []

    def kill(self, pid, sig):
        self.kills.append((pid, sig))

    def test_spawn_through_trampoline_and_prompt_on_stdin(self):
        self.proc.start("-v do the thing")
        proto, executable, args, env, path = self.spawner.calls[0]
        self.assertEqual(executable, sys.executable)
        self.assertEqual(args[:4], [sys.executable, "-I", CP.SETSID_EXEC, "--"])
        self.assertEqual(args[4:], CP.claude_argv(sys.executable))
        self.assertEqual(path, "/tmp")
        self.assertEqual(env, {"PATH": os.environ["PATH"], "CLAUDECTL_RUN_ID": "run-1"})
        self.assertEqual(self.spawner.transport.written, [CP.user_message("-v do the thing")])
        self.assertEqual(self.run.state, "running")
        self.assertEqual(self.proc.pid, 4242)

    def test_lines_split_anywhere_and_result_closes_stdin(self):
        self.proc.start("p")
        pp = self.proc.protocol
        pp.childDataReceived(1, b'{"type":"system","subtype":"in')
        pp.childDataReceived(1, b'it","session_id":"s9"}\n{"type":"res')
        self.assertEqual(self.run.progress.session_id, "s9")
        self.assertFalse(self.spawner.transport.stdin_closed)
        self.assertTrue(self.proc.send_user_message("nudge"))
        pp.childDataReceived(1, b'ult","is_error":false,"result":"ok"}\n')
        self.assertTrue(self.spawner.transport.stdin_closed)
        self.assertFalse(self.proc.send_user_message("too late"))
        pp.childDataReceived(2, b"some stderr")
        pp.processExited(Failure(ProcessDone(0)))
        pp.processEnded(Failure(ProcessDone(0)))
        o = self.successResultOf(self.run.result)
        self.assertEqual((o.state, o.summary, o.session_id), ("completed", "ok", "s9"))

    def test_overlong_lines_are_skipped(self):
        self.proc.start("p")
        pp = self.proc.protocol
        pp.max_line = 20
        pp.childDataReceived(1, b"x" * 30)
        pp.childDataReceived(1, b"yyy\n" + b'{"type":"result"}\n')
        self.assertEqual(pp.overlong_lines, 1)
        self.assertTrue(self.run.progress.has_result)

    def test_last_line_without_newline_counts(self):
        self.proc.start("p")
        self.proc.protocol.childDataReceived(1, b'{"type":"result","is_error":false}')
        self.proc.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(self.run.result).state, "completed")

    def end(self, reason):
        """The child exits, then its pipes close (what Twisted reports, in order)."""
        self.proc.protocol.processExited(Failure(reason))
        self.proc.protocol.processEnded(Failure(reason))

    def test_stop_sigterm_then_sigkill_then_cancelled(self):
        self.proc.start("p")
        d = self.proc.stop("enough")
        self.assertEqual(self.kills, [(4242, signal.SIGTERM)])
        self.clock.advance(4.9)
        self.assertEqual(len(self.kills), 1)
        self.clock.advance(0.2)
        self.assertEqual(self.kills[-1], (4242, signal.SIGKILL))
        self.end(ProcessTerminated(signal=9))
        self.assertEqual(self.successResultOf(d).summary, "Stopped by controller: enough")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_kill_timer_cancelled_when_it_ends_in_time(self):
        self.proc.start("p")
        self.proc.stop()
        self.end(ProcessTerminated(signal=15))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # SIGTERM on stop, then the leftovers of the group get SIGKILL at once.
        self.assertEqual(self.kills, [(4242, signal.SIGTERM), (4242, signal.SIGKILL)])

    def test_vanished_group_is_tolerated(self):
        def gone(pid, sig):
            raise ProcessLookupError()

        self.proc._kill = gone
        self.proc.start("p")
        self.proc.stop()
        self.clock.advance(10)

    def test_direct_child_exit_kills_its_group_at_once(self):
        # A grandchild that ignores SIGTERM and closed its stdio would survive a
        # SIGTERM (processEnded comes at once and used to cancel the SIGKILL).
        self.proc.start("p")
        self.proc.protocol.processExited(Failure(ProcessDone(0)))
        self.assertEqual(self.kills, [(4242, signal.SIGKILL)])
        self.proc.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Processes that left the group (setsid) are found by their run tag.
        self.assertEqual(self.sweeps, [{"CLAUDECTL_RUN_ID": "run-1"}])
        self.assertEqual(self.kills, [(4242, signal.SIGKILL)])

    def test_pipes_held_after_exit_are_closed_so_the_run_ends(self):
        # A setsid'd grandchild keeps stdout open: processEnded would never come.
        self.proc.start("p")
        self.proc.protocol.childDataReceived(1, b'{"type":"result","is_error":false}\n')
        self.proc.protocol.processExited(Failure(ProcessDone(0)))
        self.clock.advance(1.9)
        self.assertFalse(self.spawner.transport.lost)
        self.assertEqual(self.sweeps, [])
        self.clock.advance(0.1)
        self.assertTrue(self.spawner.transport.lost)
        self.assertEqual(self.sweeps, [{"CLAUDECTL_RUN_ID": "run-1"}])
        # Closing our ends makes Twisted report the end.
        self.proc.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(self.run.result).state, "completed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_after_the_child_exited_does_not_signal_again(self):
        self.proc.start("p")
        self.proc.protocol.processExited(Failure(ProcessDone(0)))
        self.proc.stop("late")
        self.assertEqual(self.kills, [(4242, signal.SIGKILL)])
        self.clock.advance(2)
        self.assertTrue(self.spawner.transport.lost)

    def test_a_finished_run_is_never_started(self):
        self.run.abort("the worker shut down while the task was being prepared")
        d = self.proc.start("p")
        self.assertEqual(self.spawner.calls, [])
        self.assertIn("shut down", self.successResultOf(d).summary)
        self.assertIsNone(self.proc.pid)

    def test_every_run_gets_its_own_tag(self):
        other = CP.ClaudeProcess(
            TaskRun("t2", self.clock.seconds), ["x"], "/tmp", {}, self.spawner, self.clock
        )
        third = CP.ClaudeProcess(
            TaskRun("t3", self.clock.seconds), ["x"], "/tmp", {}, self.spawner, self.clock
        )
        self.assertNotEqual(other.run_id, third.run_id)
        self.assertEqual(other.env, {"CLAUDECTL_RUN_ID": other.run_id})
        self.assertEqual(len(other.run_id), 24)

    def test_missing_program(self):
        proc = CP.ClaudeProcess(
            self.run,
            ["no-such-claude-xyz", "-p"],
            "/tmp",
            {"PATH": "/nope"},
            self.spawner,
            self.clock,
        )
        o = self.successResultOf(proc.start("p"))
        self.assertEqual(o.state, "failed")
        self.assertIn("'no-such-claude-xyz' was not found", o.summary)
        self.assertEqual(self.spawner.calls, [])

    def test_spawn_raises(self):
        self.spawner.fail = OSError(2, "No such file or directory")
        o = self.successResultOf(self.proc.start("p"))
        self.assertIn("could not start Claude Code", o.summary)


class TrampolineTests(SynchronousTestCase):
    def test_no_program(self):
        self.assertEqual(setsid_exec.main(["setsid_exec", "--"]), 127)


class SweepTests(SynchronousTestCase):
    def fake_proc(self, envs):
        root = Path(self.mktemp())
        for pid, env in envs.items():
            (root / str(pid)).mkdir(parents=True)
            (root / str(pid) / "environ").write_bytes(b"\0".join(env) + b"\0")
        (root / "self").mkdir()
        return root

    def test_finds_only_processes_with_every_tag(self):
        root = self.fake_proc(
            {
                10: [b"A=1", b"B=2"],
                11: [b"A=1"],
                12: [b"A=12", b"B=2"],
                os.getpid(): [b"A=1", b"B=2"],
            }
        )
        self.assertEqual(sweep.pids_with_env({"A": "1", "B": "2"}, root), [10])
        self.assertEqual(sweep.pids_with_env({"A": "1"}, root), [10, 11])
        self.assertEqual(sweep.pids_with_env({}, root), [])
        self.assertEqual(sweep.pids_with_env({"A": "1"}, Path(self.mktemp())), [])

    def test_kill_tagged_tolerates_vanished_processes(self):
        root = self.fake_proc({20: [b"T=x"], 21: [b"T=x"]})
        sent = []

        def kill(pid, sig):
            if pid == 20:
                raise ProcessLookupError()
            sent.append((pid, sig))

        self.assertEqual(sweep.kill_tagged({"T": "x"}, kill, root), [21])
        self.assertEqual(sent, [(21, signal.SIGKILL)])

    def test_kills_a_real_tagged_process(self):
        import subprocess

        tag = {"CLAUDECTL_RUN_ID": f"sweep-test-{os.getpid()}"}
        p = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ, **tag)
        )
        self.addCleanup(lambda: p.poll() is None and p.kill())
        for _ in range(100):
            if sweep.pids_with_env(tag):
                break
            import time

            time.sleep(0.02)
        self.assertEqual(sweep.kill_tagged(tag), [p.pid])
        self.assertEqual(p.wait(5), -signal.SIGKILL)


class RealSpawnTests(TestCase):
    """Real children: sys.executable running tests/fake_claude.py."""

    timeout = 30

    def start(self, prompt, grace=5, env_extra=None, drain=CP.DRAIN_SECS):
        run = TaskRun("real", reactor.seconds)
        env = CP.child_env(extra=env_extra)
        proc = CP.ClaudeProcess(
            run,
            CP.claude_argv(sys.executable, [FAKE_CLAUDE]),
            self.mktemp_dir(),
            env,
            reactor.spawnProcess,
            reactor,
            stop_grace_secs=grace,
            drain_secs=drain,
        )
        self.addCleanup(kill_leftovers, proc.tags)
        return proc, proc.start(prompt)

    def mktemp_dir(self):
        d = Path(self.mktemp())
        d.mkdir(parents=True)
        return str(d)

    async def test_succeed_and_prompt_starting_with_dash(self):
        log = Path(self.mktemp()).absolute()
        proc, d = self.start("--help fake:edit", env_extra={"CLAUDE_FAKE_LOG": str(log)})
        o = await d
        self.assertEqual((o.state, o.summary), ("completed", "Done: --help fake:edit"), o.summary)
        self.assertEqual(o.cost_usd, 0.0123)
        self.assertEqual(o.tokens, 200)
        self.assertTrue(o.files_modified[0].endswith("fake-claude.txt"))
        self.assertTrue(Path(o.files_modified[0]).exists())
        seen = json.loads(log.read_text())
        self.assertEqual(seen["prompt"], "--help fake:edit")
        self.assertNotIn("--help fake:edit", seen["argv"])
        self.assertNotIn("PYTHONPATH", seen["env"])

    async def test_fail_is_error(self):
        proc, d = self.start("fake:fail")
        o = await d
        self.assertEqual((o.state, o.exit_code), ("failed", 0))
        self.assertEqual(o.summary, "Not logged in · Please run /login")

    async def test_crash(self):
        proc, d = self.start("fake:crash")
        o = await d
        self.assertEqual(
            o.summary, "Claude Code exited with status 3: fatal: the fake claude crashed"
        )

    async def test_nudge_reaches_the_session(self):
        proc, d = self.start("fake:nudge")
        while proc.run.progress.last_text != "Waiting for a nudge":
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(proc.send_user_message("dependency resolved"))
        o = await d
        self.assertEqual((o.state, o.summary), ("completed", "Nudged with: dependency resolved"))

    async def test_stop_kills_the_whole_group(self):
        proc, d = self.start("fake:hang-hard", grace=0.5)
        while proc.run.progress.last_text != "Working on it":
            await deferLater(reactor, 0.05, lambda: None)
        pgid = proc.pid
        self.assertEqual(os.getpgid(pgid), pgid)  # its own group, via setsid
        proc.stop("no longer needed")
        o = await d
        self.assertEqual(
            (o.state, o.summary), ("stopped", "Stopped by controller: no longer needed")
        )
        self.assertEqual(o.signal, signal.SIGKILL)
        # The grandchild (sleep 600) is gone too: nothing of the group is alive.
        # A killed process closes its pipes (which ends the run) a moment before
        # it is a zombie; under load (trial -j2) that moment is visible: wait.
        deadline = reactor.seconds() + 10
        while live_group_members(pgid) and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(live_group_members(pgid), [])

    async def test_exec_failure_is_reported_by_the_trampoline(self):
        run = TaskRun("x", reactor.seconds)
        target = Path(self.mktemp()).absolute()
        target.write_text("#!/nonexistent/interpreter\n")
        target.chmod(0o755)
        proc = CP.ClaudeProcess(
            run, [str(target)], self.mktemp_dir(), CP.child_env(), reactor.spawnProcess, reactor
        )
        o = await proc.start("p")
        self.assertEqual(o.state, "failed")
        self.assertTrue(o.summary.startswith(f"could not start Claude Code: {target}: "), o.summary)

    async def test_daemon_grandchild_dies_with_the_session(self):
        # It closed its stdio and ignores SIGTERM: only a SIGKILL to the group
        # right when Claude Code exits ends it.
        proc, d = self.start("fake:succeed +daemon")
        o = await d
        self.assertEqual(o.state, "completed", o.summary)
        self.assertEqual(tagged(proc), [])

    async def test_escaped_grandchild_holding_stdout_does_not_hang_the_run(self):
        # It left the group (setsid) but keeps stdout open: without the drain,
        # processEnded never comes and the run never ends.
        proc, d = self.start("fake:succeed +escape", drain=0.3)
        o = await d
        self.assertEqual(o.state, "completed", o.summary)
        self.assertEqual(tagged(proc), [])

    async def test_stop_with_an_escaped_grandchild(self):
        proc, d = self.start("fake:hang +escape +daemon", grace=0.5, drain=0.3)
        while proc.run.progress.last_text != "Working on it":
            await deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(len(sweep.pids_with_env(proc.tags)), 3)
        proc.stop("enough")
        o = await d
        self.assertEqual((o.state, o.summary), ("stopped", "Stopped by controller: enough"))
        self.assertEqual(tagged(proc), [])
