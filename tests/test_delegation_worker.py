"""The worker: validation, queueing, live status, handoffs, interrupts, restarts."""

import dataclasses
import json
import signal
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.config import DelegationConfig
from claudectl.delegation import payloads as P
from claudectl.delegation.claude_process import user_message
from claudectl.delegation.store import INCOMING, TaskStore
from claudectl.delegation.worker import RESTARTED_SUMMARY, DelegationWorker
from tests.common import FakeMesh, temp_home
from tests.test_delegation_process import FAKE_CLAUDE, FakeTransport, kill_leftovers, tagged

INIT = b'{"type":"system","subtype":"init","session_id":"sess-1","model":"m"}\n'
EDIT = (
    b'{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","name":"Edit",'
    b'"input":{"file_path":"/x/a.py"}}],"usage":{"input_tokens":10,"output_tokens":5}}}\n'
)
RESULT = (
    b'{"type":"result","is_error":false,"result":"Fixed the tests","total_cost_usd":0.42,'
    b'"usage":{"input_tokens":100,"output_tokens":20}}\n'
)


class Spawner:
    def __init__(self):
        self.calls = []
        self.pid = 1000

    def __call__(self, proto, executable, args, env=None, path=None):
        self.pid += 1
        t = FakeTransport(self.pid)
        proto.makeConnection(t)
        self.calls.append({"proto": proto, "args": args, "env": env, "path": path, "t": t})
        return t


class WorkerTestsBase(SynchronousTestCase):
    def setUp(self):
        self.home = temp_home(self)
        self.project = self.home.root / "proj"
        (self.project / "sub").mkdir(parents=True)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.mesh = FakeMesh("worker-1", peers=["ctl-1", "other-2"])
        self.spawner = Spawner()
        self.kills = []
        self.sweeps = []
        self.leftovers = []  # pids the fake sweep "finds"
        self.trust = {"ctl-1": 0.5, "other-2": 0.9}
        self.config = DelegationConfig(
            allowed_dirs=(str(self.project),),
            max_concurrent=1,
            claude_command="/bin/sh",
            stop_grace_secs=5,
        )
        self.worker = self.make_worker()

    def make_worker(self, **config):
        cfg = dataclasses.replace(self.config, **config)
        w = DelegationWorker(
            identity="worker-1",
            config=cfg,
            mesh=self.mesh,
            store=TaskStore(self.home.tasks, INCOMING),
            trust_of=lambda p: self.trust.get(p, 0.0),
            clock=self.clock,
            spawner=self.spawner,
            home_root=self.home.root,
            kill=lambda pid, sig: self.kills.append((pid, sig)),
            sweep=self.sweep,
            run_git=self.git if getattr(self, "git", None) else None,
        )
        for t, h in (
            ("delegate_task", w.on_delegate),
            ("task_interrupt", w.on_interrupt),
            ("ack", w.on_ack),
        ):
            self.mesh.handlers[t] = [h]
        self.mesh.up = [w.on_link_up]  # the newest worker only (restarts)
        w.start()
        self.addCleanup(lambda: w._loop.running and w._loop.stop())
        return w

    def sweep(self, tags):
        self.sweeps.append(dict(tags))
        return list(self.leftovers)

    def delegate(self, task_id="task_1", prompt="Fix it", cwd=None, peer="ctl-1", **ctx):
        self.mesh.deliver(
            peer,
            "delegate_task",
            P.build_delegate_task(
                task_id, prompt, str(self.project) if cwd is None else cwd, P.TaskContext(**ctx)
            ),
        )

    def sent(self, msg_type=None, tail=False):
        """Frames sent (live-tail frames only with ``tail=True``: ``"only"`` for just them)."""
        out = []
        for peer, t, p in self.mesh.sent:
            is_tail = isinstance(p, dict) and "tail" in p
            if msg_type in (None, t) and (tail is True or (tail == "only") == is_tail):
                out.append((peer, t, p))
        return out

    def handoffs(self):
        return [p for _, _, p in self.sent("task_handoff")]

    def finish(self, i=0, data=INIT + EDIT + RESULT, reason=None):
        proto = self.spawner.calls[i]["proto"]
        proto.childDataReceived(1, data)
        proto.processEnded(Failure(reason or ProcessDone(0)))


class ValidationTests(WorkerTestsBase):
    def refusal(self):
        (h,) = self.handoffs()
        self.assertEqual(h["state"], "failed")
        self.assertNotIn("git_ref", h)
        self.assertEqual(self.spawner.calls, [])
        return h["summary"]

    def test_default_config_refuses_and_says_how_to_allow(self):
        self.worker = self.make_worker(allowed_dirs=())
        self.delegate()
        summary = self.refusal()
        self.assertIn("delegation is disabled on worker-1", summary)
        self.assertIn("allowed_dirs", summary)

    def test_low_trust(self):
        self.trust["ctl-1"] = 0.3
        self.delegate()
        self.assertIn("trust 0.30, below [delegation] min_trust 0.50", self.refusal())

    def test_plaintext_link_refused_by_default(self):
        self.mesh.transports["ctl-1"] = "plaintext"
        self.delegate()
        summary = self.refusal()
        self.assertIn("is not encrypted", summary)
        self.assertIn("allow_plaintext_tasks = true", summary)

    def test_plaintext_link_allowed_when_configured(self):
        self.mesh.transports["ctl-1"] = "plaintext"
        self.worker = self.make_worker(allow_plaintext_tasks=True)
        self.delegate()
        self.assertEqual(len(self.spawner.calls), 1)

    def test_cwd_outside_allowed_dirs(self):
        self.delegate(cwd=str(self.home.root))
        self.assertIn("is not under [delegation] allowed_dirs", self.refusal())

    def test_symlink_escape_is_outside(self):
        (self.project / "escape").symlink_to(self.home.root)
        self.delegate(cwd=str(self.project / "escape"))
        self.assertIn("is not under", self.refusal())

    def test_missing_and_relative_cwd(self):
        self.delegate(cwd=str(self.project / "nope"))
        self.assertIn("does not exist", self.refusal())
        self.mesh.sent.clear()
        self.delegate(task_id="task_2", cwd="proj")
        self.assertIn("not an absolute path", self.refusal())

    def test_prompt_too_big(self):
        self.worker = self.make_worker(max_prompt_bytes=10)
        self.delegate(prompt="x" * 11)
        self.assertIn("max_prompt_bytes", self.refusal())

    def test_relevant_files_too_big(self):
        payload = P.build_delegate_task("task_1", "p", str(self.project))
        payload["context"]["relevant_files"] = {"a": "x" * 51_201}
        self.mesh.deliver("ctl-1", "delegate_task", payload)
        self.assertEqual(
            self.refusal(),
            "refused by worker-1: relevant_files payload too large: 51201 bytes (max 51200)",
        )

    def test_bad_payload_with_task_id_is_told(self):
        self.mesh.deliver("ctl-1", "delegate_task", {"task_id": "t9"})
        self.assertIn("missing prompt", self.refusal())
        self.mesh.deliver("ctl-1", "delegate_task", {"prompt": "x"})
        self.assertEqual(len(self.handoffs()), 1)
        self.assertEqual(self.worker.counters["bad_payload"], 2)

    def test_null_cwd_uses_first_allowed_dir_and_subdirs_are_allowed(self):
        self.mesh.deliver("ctl-1", "delegate_task", P.build_delegate_task("t", "p", None))
        self.assertEqual(self.spawner.calls[0]["path"], str(self.project.resolve()))
        self.delegate(task_id="t2", cwd=str(self.project / "sub"))
        self.finish(0)
        self.assertEqual(self.spawner.calls[1]["path"], str((self.project / "sub").resolve()))

    def test_git_ref_starting_with_dash(self):
        self.worker.run_git = lambda args, cwd: None
        self.delegate(git_ref="--upload-pack=evil")
        self.assertIn("is not a valid git ref", self.refusal())


class RunTests(WorkerTestsBase):
    def test_full_run_status_and_handoff(self):
        self.delegate()
        call = self.spawner.calls[0]
        self.assertEqual(call["args"][4:7], ["/bin/sh", "-p", "--output-format"])
        self.assertEqual(call["t"].written, [user_message("Fix it")])
        self.assertEqual(call["env"]["CLAUDECTL_TASK_ID"], "task_1")
        (status,) = [p for _, _, p in self.sent("task_status")]
        self.assertEqual((status["state"], status["stats"]["elapsed_secs"]), ("running", 0))
        proto = call["proto"]
        proto.childDataReceived(1, INIT + EDIT)
        # A change: reported at most every 2 s, on the tick.
        self.clock.advance(1)
        self.assertEqual(len(self.sent("task_status")), 1)
        self.clock.advance(1)
        status = self.sent("task_status")[-1][2]
        self.assertEqual(status["stats"]["files_modified"], ["/x/a.py"])
        self.assertEqual(status["stats"]["tokens_used"], 15)
        self.assertEqual(status["stats"]["last_activity"], "Edit /x/a.py")
        # Periodic status without change every status_interval_secs (30).
        n = len(self.sent("task_status"))
        self.clock.advance(29)
        self.assertEqual(len(self.sent("task_status")), n)
        self.clock.advance(1)
        self.assertEqual(len(self.sent("task_status")), n + 1)
        proto.childDataReceived(1, RESULT)
        self.assertTrue(call["t"].stdin_closed)
        proto.processEnded(Failure(ProcessDone(0)))
        (h,) = self.handoffs()
        self.assertEqual(
            h,
            {
                "artifacts": ["/x/a.py"],
                "git_ref": None,
                "state": "completed",
                "summary": "Fixed the tests",
                "task_id": "task_1",
                "total_cost_usd": 0.42,
                "total_tokens": 120,
            },
        )
        rec = json.loads((self.home.tasks / "incoming" / "ctl-1--task_1.json").read_text())
        self.assertEqual((rec["state"], rec["handoff_acked"]), ("completed", False))
        self.mesh.deliver("ctl-1", "ack", {"ack_id": "task_1"})
        rec = json.loads((self.home.tasks / "incoming" / "ctl-1--task_1.json").read_text())
        self.assertTrue(rec["handoff_acked"])

    def test_exit_zero_with_is_error_fails(self):
        self.delegate()
        self.finish(data=b'{"type":"result","is_error":true,"result":"Not logged in"}\n')
        self.assertEqual(self.handoffs()[0]["summary"], "Not logged in")
        self.assertEqual(self.handoffs()[0]["state"], "failed")

    def test_queue_and_concurrency(self):
        self.delegate("a")
        self.delegate("b")
        self.assertEqual(len(self.spawner.calls), 1)
        st = [p for _, _, p in self.sent("task_status") if p["task_id"] == "b"]
        self.assertEqual(st[-1]["state"], "queued")
        self.assertIn("queued", st[-1]["stats"]["last_activity"])
        self.finish(0)
        self.assertEqual(len(self.spawner.calls), 2)
        st = [p for _, _, p in self.sent("task_status") if p["task_id"] == "b"]
        self.assertEqual(st[-1]["state"], "running")

    def test_duplicate_task_id_gets_current_state(self):
        self.delegate()
        self.delegate()
        self.assertEqual(len(self.spawner.calls), 1)
        self.assertEqual(len(self.sent("task_status")), 2)
        self.finish()
        self.delegate()
        self.assertEqual(len(self.handoffs()), 2)
        self.assertEqual(len(self.spawner.calls), 1)

    def test_same_task_id_from_two_peers_are_two_tasks(self):
        self.worker = self.make_worker(max_concurrent=2)
        self.delegate(peer="ctl-1")
        self.delegate(peer="other-2")
        self.assertEqual(len(self.spawner.calls), 2)

    def test_timeout(self):
        self.worker = self.make_worker(task_timeout_secs=60)
        self.delegate()
        self.clock.advance(61)
        self.assertEqual(self.kills[0], (1001, signal.SIGTERM))
        self.spawner.calls[0]["proto"].processEnded(Failure(ProcessTerminated(signal=15)))
        self.assertIn("timed out after 60 s", self.handoffs()[0]["summary"])


class InterruptTests(WorkerTestsBase):
    def interrupt(self, kind, reason="", peer="ctl-1", task_id="task_1"):
        self.mesh.deliver(peer, "task_interrupt", P.build_interrupt(task_id, kind, reason))

    def test_stop_running(self):
        self.delegate()
        self.interrupt("stop", "no longer needed")
        self.assertEqual(self.kills, [(1001, signal.SIGTERM)])
        self.clock.advance(5)
        self.assertEqual(self.kills[-1], (1001, signal.SIGKILL))
        self.spawner.calls[0]["proto"].processEnded(Failure(ProcessTerminated(signal=9)))
        (h,) = self.handoffs()
        self.assertEqual(
            (h["state"], h["summary"]), ("failed", "Stopped by controller: no longer needed")
        )

    def test_stop_queued(self):
        self.delegate("a")
        self.delegate("b")
        self.interrupt("stop", task_id="b")
        (h,) = self.handoffs()
        self.assertEqual((h["task_id"], h["summary"]), ("b", "Stopped by controller"))
        self.finish(0)
        self.assertEqual(len(self.spawner.calls), 1)

    def test_only_the_owner_may_interrupt(self):
        self.delegate()
        self.interrupt("stop", peer="other-2")
        self.interrupt("nudge", "hi", peer="other-2")
        self.assertEqual(self.kills, [])
        self.assertEqual(self.spawner.calls[0]["t"].written, [user_message("Fix it")])
        self.assertEqual(self.worker.counters["interrupts_refused"], 2)
        self.assertEqual([p for p, _, _ in self.mesh.sent], ["ctl-1"])

    def test_nudge_reaches_the_session(self):
        self.delegate()
        self.interrupt("nudge", "dependency resolved")
        t = self.spawner.calls[0]["t"]
        self.assertEqual(len(t.written), 2)
        self.assertIn(
            "dependency resolved", json.loads(t.written[1])["message"]["content"][0]["text"]
        )
        st = self.sent("task_status")[-1][2]
        self.assertEqual(st["stats"]["last_activity"], "nudge delivered: dependency resolved")

    def test_nudge_not_deliverable(self):
        self.delegate("a")
        self.delegate("b")
        self.interrupt("nudge", "hey", task_id="b")
        st = self.sent("task_status")[-1][2]
        self.assertIn("nudge not delivered", st["stats"]["last_activity"])

    def test_interrupt_after_the_end_does_not_flip_the_result(self):
        self.delegate()
        self.finish()
        kills = list(self.kills)
        self.interrupt("stop")
        hs = self.handoffs()
        self.assertEqual([h["state"] for h in hs], ["completed", "completed"])
        self.assertEqual(self.kills, kills)

    def test_unsupported_interrupt(self):
        self.delegate()
        self.interrupt("reroute")
        self.assertIn("not supported", self.sent("task_status")[-1][2]["stats"]["last_activity"])


class PersistenceTests(WorkerTestsBase):
    def test_undelivered_handoff_is_resent_on_link_up_until_acked(self):
        self.delegate()
        self.mesh.disconnect("ctl-1")
        self.finish()
        self.assertEqual(self.handoffs(), [])
        self.mesh.connect("ctl-1")
        self.assertEqual(len(self.handoffs()), 1)
        self.mesh.disconnect("ctl-1")
        self.mesh.connect("ctl-1")
        self.assertEqual(len(self.handoffs()), 2)
        self.mesh.deliver("ctl-1", "ack", {"ack_id": "task_1"})
        self.mesh.disconnect("ctl-1")
        self.mesh.connect("ctl-1")
        self.assertEqual(len(self.handoffs()), 2)

    def test_finished_records_per_peer_are_capped(self):
        """Review 15: a trusted peer's failing tasks piled up for 30 days."""
        from claudectl.delegation import worker as W

        self.patch(W, "MAX_FINISHED_PER_PEER", 3)
        for i in range(6):
            self.delegate(f"t{i}")
            self.finish(i)
            self.clock.advance(1)
            self.mesh.deliver("ctl-1", "ack", {"ack_id": f"t{i}"})
        kept = sorted(t.task_id for t in self.worker.tasks.values())
        self.assertEqual(kept, ["t3", "t4", "t5"])
        self.assertEqual(self.worker.counters["records_pruned"], 3)
        self.assertEqual(sorted(self.worker.store.load_all()), sorted(self.worker.tasks))
        # Another peer's records are its own -- and one that never acks its
        # handoffs does not keep them all either (oldest unacked go last).
        for i in range(5):
            self.delegate(f"o{i}", peer="other-2")
            self.finish(6 + i)
            self.clock.advance(1)
        mine = sorted(t.task_id for t in self.worker.tasks.values() if t.peer == "other-2")
        self.assertEqual(mine, ["o2", "o3", "o4"])
        # Acknowledged records go before unacknowledged ones, however old.
        self.mesh.deliver("other-2", "ack", {"ack_id": "o4"})
        self.delegate("o5", peer="other-2")
        self.finish(11)
        mine = sorted(t.task_id for t in self.worker.tasks.values() if t.peer == "other-2")
        self.assertEqual(mine, ["o2", "o3", "o5"])
        self.assertEqual(
            sorted(t.task_id for t in self.worker.tasks.values() if t.peer == "ctl-1"),
            ["t3", "t4", "t5"],
        )
        self.assertEqual(sorted(self.worker.store.load_all()), sorted(self.worker.tasks))

    def test_handoffs_resent_on_link_up_are_paced_by_the_backlog(self):
        """Many unacknowledged handoffs must not all go at once: past
        MAX_UNSENT_BYTES the link would be closed, again at every return."""
        from claudectl.delegation import worker as W

        self.worker = self.make_worker(max_concurrent=3)
        for i in range(3):
            self.delegate(f"t{i}")
        self.mesh.disconnect("ctl-1")  # they finish while the link is down
        for i in range(3):
            self.finish(i)
            self.clock.advance(1)
        sent_before = len(self.handoffs())
        self.mesh.unsent["ctl-1"] = W.RESEND_BACKLOG_BYTES + 1
        self.mesh.connect("ctl-1")
        self.assertEqual(len(self.handoffs()), sent_before)  # waiting: nothing yet
        self.mesh.unsent["ctl-1"] = 0
        self.clock.advance(W.RESEND_RETRY_SECS)
        resent = [h["task_id"] for h in self.handoffs()[sent_before:]]
        self.assertEqual(resent, ["t0", "t1", "t2"])  # oldest first
        # Each once per link, though the peer never acknowledges (review 17):
        self.clock.advance(60)
        self.assertEqual(len(self.handoffs()), sent_before + 3)
        # A busy link's pending try is void once the link comes back; the
        # new link sends each once again.
        self.mesh.unsent["ctl-1"] = W.RESEND_BACKLOG_BYTES + 1
        self.mesh.disconnect("ctl-1")
        self.mesh.connect("ctl-1")
        self.mesh.unsent["ctl-1"] = 0
        self.mesh.disconnect("ctl-1")
        self.mesh.connect("ctl-1")
        self.clock.advance(60)
        again = [h["task_id"] for h in self.handoffs()[sent_before + 3 :]]
        self.assertEqual(again, ["t0", "t1", "t2"])
        # Stopping the worker cancels a pending try.
        self.mesh.unsent["ctl-1"] = W.RESEND_BACKLOG_BYTES + 1
        self.mesh.disconnect("ctl-1")
        self.mesh.connect("ctl-1")
        self.assertTrue(self.clock.getDelayedCalls())
        self.worker.stop()
        self.assertFalse([c for c in self.clock.getDelayedCalls() if "_resend" in repr(c.func)])

    def test_claudectl_peers_never_ack_so_a_send_is_enough(self):
        self.mesh.peers["ctl-1"] = "oneway"
        self.delegate()
        self.finish()
        self.mesh.disconnect("ctl-1")
        self.mesh.connect("ctl-1", mode="oneway")
        self.assertEqual(len(self.handoffs()), 1)

    def test_restart_mid_task_reports_failed_and_never_reruns(self):
        self.worker = self.make_worker(max_concurrent=1)
        self.delegate("a")
        self.delegate("b")  # queued
        self.mesh.disconnect("ctl-1")
        self.worker._loop.stop()
        # A second worker on the same home: the first "died".
        w2 = self.make_worker()
        self.assertEqual(w2.tasks["ctl-1--a"].run.state, "failed")
        self.assertEqual(w2.tasks["ctl-1--a"].handoff["summary"], RESTARTED_SUMMARY)
        # The queued task runs now (it never started), the running one does not.
        self.assertEqual(len(self.spawner.calls), 2)
        self.assertIn(b"Fix it", self.spawner.calls[1]["t"].written[0])
        self.mesh.connect("ctl-1")
        hs = self.handoffs()
        self.assertEqual([h["task_id"] for h in hs], ["a"])
        self.finish(1)
        w3 = self.make_worker()
        self.assertEqual(len(self.spawner.calls), 2)
        self.assertEqual(w3.tasks["ctl-1--b"].run.state, "completed")
        self.assertEqual(w3.tasks["ctl-1--b"].handoff["summary"], "Fixed the tests")
        self.delegate("b")  # the controller asks again: it gets the result, no re-run
        self.assertEqual(len(self.spawner.calls), 2)

    def test_graceful_stop_terminates_and_reports(self):
        self.delegate()
        d = self.worker.stop()
        self.assertEqual(self.kills, [(1001, signal.SIGTERM)])
        self.assertNoResult(d)
        self.spawner.calls[0]["proto"].processEnded(Failure(ProcessTerminated(signal=15)))
        self.successResultOf(d)
        self.assertIn("shut down", self.handoffs()[0]["summary"])

    def test_unreadable_record_is_kept(self):
        bad = self.home.tasks / "incoming" / "ctl-1--x.json"
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_text("{not json")
        self.make_worker()
        self.assertEqual(bad.read_text(), "{not json")
        self.flushLoggedErrors()


class FakeGit:
    """``run_git`` whose answers the test gives; cancelling is recorded."""

    def __init__(self):
        self.calls = []
        self.cancelled = []

    def __call__(self, args, cwd):
        d = Deferred(lambda _d, a=args: self.cancelled.append(a[0]))
        self.calls.append((args, cwd, d))
        return d

    def pending(self):
        return [c for c in self.calls if not c[2].called]

    def answer(self, out=b"", code=0, err=b""):
        args, cwd, d = self.pending()[0]
        d.callback((out, err, code))
        return args

    def checkout(self, commit=b"c0ffee"):
        """Answer clone, rev-parse and checkout."""
        self.answer()
        self.answer(commit + b"\n")
        self.answer()


class GitTestsBase(WorkerTestsBase):
    def setUp(self):
        self.git = FakeGit()
        super().setUp()

    def refusal(self):
        (h,) = self.handoffs()
        self.assertEqual(h["state"], "failed")
        self.assertEqual(self.spawner.calls, [])
        self.assertEqual(self.git.calls, [])
        return h["summary"]


class GitSourceTests(GitTestsBase):
    """S1: a peer must not make the worker read repositories it may not."""

    def test_file_url_outside_allowed_dirs_is_refused(self):
        secret = self.home.root / "secret"
        secret.mkdir()
        self.delegate(git_ref="main", git_remote="file://" + str(secret))
        self.assertIn(
            f"git_remote {secret.resolve()} is not under [delegation] allowed_dirs", self.refusal()
        )

    def test_file_url_inside_is_cloned_from_its_real_path(self):
        repo = self.project / "sub"
        self.delegate(git_ref="main", git_remote="FILE://localhost" + str(repo))
        args, cwd, _ = self.git.calls[0]
        dest = self.home.tasks / "workspaces" / "ctl-1--task_1"
        self.assertEqual(
            args, ["clone", "--quiet", "--no-checkout", "--", str(repo.resolve()), str(dest)]
        )
        self.git.checkout()
        self.assertEqual(self.spawner.calls[0]["path"], str(dest))

    def test_network_remotes_are_refused_unless_allowed(self):
        for i, remote in enumerate(
            [
                "https://git.example/org/repo.git",
                "ssh://git@git.example/org/repo.git",
                "git@git.example:org/repo.git",
            ]
        ):
            self.mesh.sent.clear()
            self.delegate(task_id=f"t{i}", git_ref="main", git_remote=remote)
            summary = self.refusal()
            self.assertIn(f"git_remote {remote} is a network remote", summary)
            self.assertIn("allowed_git_remotes (now: none)", summary)

    def test_allowed_git_remotes(self):
        self.worker = self.make_worker(
            allowed_git_remotes=("https://git.example/org",), max_concurrent=5
        )
        self.delegate("ok", git_ref="main", git_remote="https://git.example/org/repo.git")
        self.assertEqual(self.git.calls[0][0][4], "https://git.example/org/repo.git")
        for task_id, remote in (
            ("other", "https://git.example/org-evil/repo.git"),
            ("dots", "https://git.example/org/../evil/repo.git"),
            ("encoded", "https://git.example/org/%2e%2e/evil/repo.git"),
        ):
            self.delegate(task_id, git_ref="main", git_remote=remote)
            self.assertIn("is a network remote", self.handoffs()[-1]["summary"])
        self.assertEqual(len(self.git.calls), 1)

    def test_bad_sources(self):
        for i, (remote, why) in enumerate(
            [
                ("ext::sh -c touch% /tmp/pwned", "is not allowed"),
                ("--upload-pack=evil", "is not allowed"),
                ("http://git.example/x", "only https, ssh and git URLs"),
                ("file://evil.example/srv/x", "only file:///absolute/path URLs"),
                ("relative/repo", "is not an absolute path"),
            ]
        ):
            self.mesh.sent.clear()
            self.delegate(task_id=f"t{i}", git_ref="main", git_remote=remote)
            self.assertIn(why, self.refusal())

    def test_git_remote_without_a_ref_asks_for_nothing(self):
        self.delegate(git_remote="https://evil.example/x.git")
        self.assertEqual(self.git.calls, [])
        self.assertEqual(self.spawner.calls[0]["path"], str(self.project.resolve()))


class PrepareTests(GitTestsBase):
    """S2/C2: stop, shutdown and timeout while the checkout is being made."""

    def workspace(self):
        return self.home.tasks / "workspaces" / "ctl-1--task_1"

    def test_checkout_then_run_and_result_ref(self):
        self.delegate(git_ref="main")
        self.git.checkout()
        self.assertEqual(self.spawner.calls[0]["path"], str(self.workspace()))
        self.finish()
        self.assertEqual(self.git.answer(b"f00d\n"), ["rev-parse", "--verify", "--quiet", "HEAD"])
        self.assertEqual(self.handoffs()[0]["git_ref"], "f00d")

    def test_shutdown_during_checkout_kills_git_and_never_starts_claude(self):
        self.delegate(git_ref="main")
        d = self.worker.stop()
        self.assertEqual(self.git.cancelled, ["clone"])
        self.successResultOf(d)
        (h,) = self.handoffs()
        self.assertIn("shut down", h["summary"])
        self.clock.advance(60)
        self.assertEqual(self.spawner.calls, [])
        self.assertEqual(len(self.git.calls), 1)
        self.assertFalse(self.workspace().exists())

    def test_stop_during_checkout(self):
        self.delegate(git_ref="main")
        self.git.answer()  # the clone is done, rev-parse runs
        self.mesh.deliver("ctl-1", "task_interrupt", P.build_interrupt("task_1", "stop", "nah"))
        self.assertEqual(self.git.cancelled, ["rev-parse"])
        (h,) = self.handoffs()
        self.assertEqual(h["summary"], "Stopped by controller: nah")
        self.assertEqual(self.spawner.calls, [])
        self.assertEqual(self.worker.tasks["ctl-1--task_1"].run.state, "stopped")

    def test_timeout_covers_the_checkout(self):
        self.worker = self.make_worker(task_timeout_secs=5)
        self.delegate(git_ref="main")
        self.clock.advance(4)
        self.assertEqual(self.handoffs(), [])
        self.clock.advance(1)
        (h,) = self.handoffs()
        self.assertEqual(
            h["summary"],
            "timed out after 5 s ([delegation] task_timeout_secs) while preparing the git checkout",
        )
        self.assertEqual(self.git.cancelled, ["clone"])
        self.assertEqual(self.spawner.calls, [])

    def test_failed_checkout_leaves_no_workspace(self):
        self.delegate(git_ref="main")
        self.workspace().mkdir(parents=True)
        self.git.answer(code=128, err=b"fatal: repository not found\n")
        self.assertEqual(
            self.handoffs()[0]["summary"],
            "git checkout failed: git clone of "
            f"{self.project.resolve()} failed: fatal: repository not found",
        )
        self.assertFalse(self.workspace().exists())


class ShutdownTests(WorkerTestsBase):
    def test_no_queued_task_starts_during_shutdown(self):
        self.delegate("a")
        self.delegate("b")
        d = self.worker.stop()
        proto = self.spawner.calls[0]["proto"]
        proto.processExited(Failure(ProcessTerminated(signal=15)))
        proto.processEnded(Failure(ProcessTerminated(signal=15)))
        self.successResultOf(d)
        self.assertEqual(len(self.spawner.calls), 1)
        rec = json.loads((self.home.tasks / "incoming" / "ctl-1--b.json").read_text())
        self.assertEqual(rec["state"], "queued")

    def test_stop_does_not_wait_forever(self):
        self.delegate()
        d = self.worker.stop()
        # grace 5 + drain 2 + 5: the child never ends (stuck in the kernel, say).
        self.clock.advance(11.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)


class RecheckTests(WorkerTestsBase):
    """C1: a queued task passes the checks again when it is about to start."""

    def test_queued_task_is_checked_again_after_a_restart(self):
        self.delegate("t1")
        self.delegate("t2")
        self.worker._loop.stop()
        self.trust["ctl-1"] = 0.0
        other = self.home.root / "other"
        other.mkdir()
        self.config = dataclasses.replace(self.config, allowed_dirs=(str(other),), max_concurrent=2)
        self.mesh.sent.clear()
        self.worker = self.make_worker()
        self.assertEqual(len(self.spawner.calls), 1)
        h = [p for p in self.handoffs() if p["task_id"] == "t2"][0]
        self.assertTrue(
            h["summary"].startswith("refused by worker-1: peer ctl-1 has trust"), h["summary"]
        )
        self.assertEqual(self.worker.tasks["ctl-1--t2"].run.state, "failed")

    def test_trust_dropped_while_queued(self):
        self.delegate("a")
        self.delegate("b")
        self.trust["ctl-1"] = 0.1
        self.finish(0)
        self.assertEqual(len(self.spawner.calls), 1)
        self.assertIn("trust 0.10", self.handoffs()[-1]["summary"])


class HostileInputTests(WorkerTestsBase):
    """R1-R3: odd payloads get an answer, refusals leak nothing, queues are capped."""

    def test_nul_bytes_are_refused_not_raised(self):
        self.delegate("a", cwd=str(self.project) + "/\0x")
        self.worker.run_git = FakeGit()
        self.delegate("b", git_ref="main", git_remote="/x\0")
        self.delegate("c\0", cwd=str(self.project))
        hs = self.handoffs()
        self.assertEqual([h["task_id"] for h in hs], ["a", "b", "c\0"])
        self.assertIn("is not a valid path", hs[0]["summary"])
        self.assertIn("control characters", hs[1]["summary"])
        self.assertIn("control characters", hs[2]["summary"])
        self.assertEqual(self.spawner.calls, [])

    def test_refusals_do_not_tell_whether_outside_dirs_exist(self):
        outside = self.home.root / "outside"
        outside.mkdir()
        missing = self.home.root / "missing"
        self.delegate("a", cwd=str(outside))
        self.delegate("b", cwd=str(missing))
        a, b = (h["summary"] for h in self.handoffs())
        self.assertEqual(a.replace(str(outside), "X"), b.replace(str(missing), "X"))
        self.assertIn("is not under", a)

    def test_a_flood_of_refused_tasks_costs_bounded_log_lines(self):
        """Review 15: every refused, bad or unknown-task frame wrote a line,
        with the peer's megabyte strings in it."""
        from twisted.logger import capturedLogs

        from claudectl.logbudget import PEER_LINES_PER_MINUTE, PEER_TEXT_CHARS

        outside = "/" + "o" * 3000
        with capturedLogs() as events:
            for i in range(200):
                self.delegate(f"t{i}", cwd=outside)
                self.mesh.deliver("ctl-1", "delegate_task", {"task_id": f"b{i}", "prompt": 5})
                self.mesh.deliver(
                    "ctl-1", "task_interrupt", P.build_interrupt("x" * 200, "stop", "")
                )
        self.assertEqual(self.worker.counters["refused"], 200)
        self.assertEqual(self.worker.counters["bad_payload"], 200)
        self.assertEqual(len(events), PEER_LINES_PER_MINUTE + 1)
        self.assertIn("not logging them", events[-1]["log_format"])
        for e in events:
            for value in e.values():
                if isinstance(value, str) and e["log_format"] != value:
                    self.assertLessEqual(len(value), PEER_TEXT_CHARS + 40, value[:80])
        self.clock.advance(60)  # a new minute: lines again
        with capturedLogs() as events:
            self.delegate("later", cwd=outside)
        self.assertEqual(len(events), 1)
        self.assertEqual(len(self.handoffs()), 201 + 200)  # every refusal still answered

    def test_overlong_ids_and_paths_are_refused_without_an_echo(self):
        from claudectl.delegation.payloads import MAX_CWD_CHARS, MAX_TASK_ID_CHARS

        self.delegate("t" * (MAX_TASK_ID_CHARS + 1))
        self.assertEqual(self.handoffs(), [])  # no id to answer to: no answer
        self.assertEqual(self.worker.counters["bad_payload"], 1)
        self.delegate("ok", cwd="/" + "d" * MAX_CWD_CHARS)
        (h,) = self.handoffs()
        self.assertEqual(h["task_id"], "ok")
        self.assertIn(f"cwd is longer than {MAX_CWD_CHARS} characters", h["summary"])
        self.assertLess(len(h["summary"]), 200)
        self.assertEqual(self.spawner.calls, [])

    def test_an_unexpected_error_is_a_refusal(self):
        def broken(peer):
            raise RuntimeError("trust store exploded")

        self.worker.trust_of = broken
        self.delegate()
        self.assertIn("could not be checked", self.handoffs()[0]["summary"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_queue_is_capped_per_peer(self):
        from claudectl.delegation.worker import MAX_QUEUED_PER_PEER

        for i in range(MAX_QUEUED_PER_PEER + 1):  # one runs, the others wait
            self.delegate(f"t{i}")
        self.assertEqual(self.handoffs(), [])
        self.delegate("one-too-many")
        self.assertIn(
            f"{MAX_QUEUED_PER_PEER} tasks from ctl-1 are already waiting",
            self.handoffs()[0]["summary"],
        )
        self.assertNotIn("ctl-1--one-too-many", self.worker.tasks)
        self.delegate("theirs", peer="other-2")  # another peer's tasks still queue
        self.assertEqual(len(self.handoffs()), 1)
        self.assertIn("other-2--theirs", self.worker.tasks)


class LeftoverTests(WorkerTestsBase):
    """R3: what a crashed worker left is found by its run tag, not by cmdline."""

    def record(self, key="ctl-1--task_1"):
        return self.home.tasks / "incoming" / f"{key}.json"

    def crash_and_restart(self, edit=None):
        self.delegate()
        self.worker._loop.stop()
        rec = json.loads(self.record().read_text())
        if edit:
            edit(rec)
            self.record().write_text(json.dumps(rec))
        self.sweeps.clear()
        self.kills.clear()
        self.make_worker()
        return rec

    def test_leftovers_found_by_run_id(self):
        self.leftovers = [1001, 2002]
        rec = self.crash_and_restart()
        self.assertEqual(len(rec["run_id"]), 24)
        self.assertEqual(rec["pgid"], 1001)
        self.assertEqual(self.sweeps, [{"CLAUDECTL_RUN_ID": rec["run_id"]}])
        self.assertEqual(self.kills, [(1001, signal.SIGKILL)])  # and its group

    def test_older_records_use_task_id_and_peer(self):
        self.crash_and_restart(lambda rec: rec.pop("run_id"))
        self.assertEqual(
            self.sweeps, [{"CLAUDECTL_TASK_ID": "task_1", "CLAUDECTL_TASK_PEER": "ctl-1"}]
        )
        self.assertEqual(self.kills, [])  # the recorded pgid is not ours any more

    def test_workspaces_go_with_their_records(self):
        ws = self.home.tasks / "workspaces"
        for name in ("ctl-1--old", "ctl-1--orphan", "ctl-1--kept"):
            (ws / name).mkdir(parents=True)
        store = TaskStore(self.home.tasks, INCOMING)
        base = {
            "role": "worker",
            "peer": "ctl-1",
            "prompt": "p",
            "cwd": str(self.project),
            "state": "completed",
            "handoff": P.build_handoff("x", "ok"),
            "handoff_acked": True,
        }
        store.save("ctl-1--old", dict(base, task_id="old", ended_at=1.0))
        store.save("ctl-1--kept", dict(base, task_id="kept", ended_at=self.clock.seconds()))
        self.make_worker()
        self.assertEqual(sorted(p.name for p in ws.iterdir()), ["ctl-1--kept"])
        self.assertFalse(store.path("ctl-1--old").exists())


class RealShutdownTests(TestCase):
    """S3: a shutdown ends even when a grandchild escaped the group and holds stdout."""

    timeout = 30

    async def test_shutdown_with_an_escaped_grandchild(self):
        home = temp_home(self)
        project = home.root / "proj"
        project.mkdir()
        mesh = FakeMesh("worker-1", peers=["ctl-1"])
        worker = DelegationWorker(
            identity="worker-1",
            config=DelegationConfig(
                allowed_dirs=(str(project),),
                claude_command=sys.executable,
                claude_args=(FAKE_CLAUDE,),
                stop_grace_secs=1,
            ),
            mesh=mesh,
            store=TaskStore(home.tasks, INCOMING),
            trust_of=lambda p: 1.0,
            clock=reactor,
            spawner=reactor.spawnProcess,
            home_root=home.root,
            drain_secs=0.3,
        )
        mesh.add_handler("delegate_task", worker.on_delegate)
        worker.start()
        self.addCleanup(lambda: worker._loop.running and worker._loop.stop())
        mesh.deliver(
            "ctl-1",
            "delegate_task",
            P.build_delegate_task("t1", "fake:hang-hard +escape", str(project)),
        )
        task = worker.tasks["ctl-1--t1"]
        self.addCleanup(kill_leftovers, task.process.tags)
        while task.run.progress.last_text != "Working on it":
            await deferLater(reactor, 0.05, lambda: None)
        started = time.monotonic()
        await worker.stop()
        self.assertLess(time.monotonic() - started, 5)
        (h,) = [p for _, t, p in mesh.sent if t == "task_handoff"]
        self.assertEqual(h["summary"], "the worker shut down while the task was running")
        self.assertEqual(tagged(task.process), [])


def text_event(i, text=None):
    return (
        json.dumps(
            {
                "type": "assistant",
                "message": {
                    "id": f"t{i}",
                    "content": [{"type": "text", "text": text or f"step {i}"}],
                },
            }
        ).encode()
        + b"\n"
    )


class LiveTailTests(WorkerTestsBase):
    """Extra task_status frames with a "tail" member: mutual peers only, bounded."""

    def tail_frames(self, peer="ctl-1"):
        return [p for to, _, p in self.sent("task_status", tail="only") if to == peer]

    def test_tail_frames_go_to_a_peer_of_this_project(self):
        self.delegate()
        proto = self.spawner.calls[0]["proto"]
        proto.childDataReceived(1, INIT + EDIT)
        self.clock.advance(0)
        (frame,) = self.tail_frames()
        self.assertEqual((frame["task_id"], frame["state"]), ("task_1", "running"))
        self.assertEqual(frame["stats"]["tokens_used"], 15)  # a full status besides
        self.assertEqual(
            frame["tail"],
            [
                {"at": 1_700_000_000.0, "text": "session started"},
                {"at": 1_700_000_000.0, "text": "Edit: /x/a.py"},
            ],
        )
        # The regular statuses carry no tail.
        self.assertTrue(all("tail" not in p for _, _, p in self.sent("task_status")))
        self.assertEqual(self.worker.tail_lines("ctl-1--task_1")[-1]["text"], "Edit: /x/a.py")

    def test_no_tail_frames_to_a_claudectl_peer(self):
        self.mesh.connect("old-3", mode="oneway")
        self.trust["old-3"] = 0.9
        self.delegate(peer="old-3")
        proto = self.spawner.calls[0]["proto"]
        for i in range(30):
            proto.childDataReceived(1, text_event(i))
            self.clock.advance(0.3)
        self.assertEqual(self.sent("task_status", tail="only"), [])
        self.assertGreater(len([s for s in self.sent("task_status") if s[0] == "old-3"]), 1)
        # The worker still keeps it (for its own dashboard).
        self.assertEqual(len(self.worker.tail_lines("old-3--task_1")), 30)
        self.finish()
        self.assertEqual(self.handoffs()[0]["state"], "completed")

    def test_rate_and_size_bounds(self):
        self.delegate()
        proto = self.spawner.calls[0]["proto"]
        stamps = []
        send = self.mesh.send

        def timed(peer, msg_type, payload):
            if "tail" in payload:
                stamps.append(self.clock.seconds())
            return send(peer, msg_type, payload)

        self.mesh.send = timed
        # A steady stream: a line every 0.1 s for 6 s.
        for i in range(60):
            proto.childDataReceived(1, text_event(i))
            self.clock.advance(0.1)
        frames = self.tail_frames()
        self.assertGreaterEqual(len(frames), 10)
        # A burst: 130 lines at once go out 20 per frame, in order, 0.5 s apart.
        burst = b"".join(text_event(100 + i, "z" * 1000) for i in range(130))
        before = len(frames)
        proto.childDataReceived(1, burst)
        self.clock.advance(0)
        for _ in range(30):
            self.clock.advance(0.25)
        frames = self.tail_frames()
        new = frames[before:]
        self.assertEqual(len(new), 7)  # 130 + the leftovers of the steady stream
        self.assertTrue(all(len(f["tail"]) <= 20 for f in frames))
        self.assertTrue(all(len(line["text"]) <= 200 for f in frames for line in f["tail"]))
        texts = [line["text"] for f in frames for line in f["tail"]]
        self.assertEqual(texts[:60], [f"step {i}" for i in range(60)])
        self.assertEqual(len(texts), 190)
        self.assertEqual(self.worker.counters["tail_frames"], len(frames))
        # Never two frames of one task within 0.5 s: at most 2 per second.
        self.assertEqual(len(stamps), len(frames))
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        self.assertGreaterEqual(min(gaps), 0.5 - 1e-6)

    def test_lines_are_cleaned(self):
        self.delegate()
        proto = self.spawner.calls[0]["proto"]
        proto.childDataReceived(
            1, text_event(1, "\x1b[2J\x1b]0;title\x07Fixing\u202e the\rbug\x9b31m")
        )
        self.clock.advance(0)
        (frame,) = self.tail_frames()
        self.assertEqual(frame["tail"][0]["text"], "Fixing the bug")

    def test_tail_waits_for_the_link_and_stops_with_the_worker(self):
        self.delegate()
        proto = self.spawner.calls[0]["proto"]
        self.mesh.disconnect("ctl-1")
        proto.childDataReceived(1, text_event(1))
        self.clock.advance(1)
        self.assertEqual(self.sent("task_status", tail="only"), [])
        self.mesh.connect("ctl-1")  # the lines of the outage follow the link up
        self.clock.advance(0)
        (frame,) = self.sent("task_status", tail="only")
        self.assertEqual([line["text"] for line in frame[2]["tail"]], ["step 1"])
        self.mesh.sent.clear()
        proto.childDataReceived(1, text_event(2))
        self.worker.stop()
        self.clock.advance(1)
        self.assertEqual(self.sent("task_status", tail="only"), [])
