"""The controller: records, live updates from the owning peer, acks, routing, restarts."""

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import controller as C
from claudectl.delegation import payloads as P
from claudectl.delegation.store import OUTGOING, TaskStore
from claudectl.relay.codec import MessageIds
from tests.common import FakeMesh, temp_home


class ControllerTestsBase(SynchronousTestCase):
    def setUp(self):
        self.home = temp_home(self)
        self.clock = Clock()
        self.clock.advance(1_714_000_040)
        self.mesh = FakeMesh("laptop-1", peers=["ci-1", "evil-2"])
        self.ctl = self.make()

    def make(self, **kwargs):
        ctl = C.DelegationController(
            mesh=self.mesh,
            store=TaskStore(self.home.tasks, OUTGOING),
            clock=self.clock,
            is_paired=lambda p: p in ("ci-1", "evil-2", "offline-3"),
            ids=MessageIds(self.clock.seconds, start=0),
            **kwargs,
        )
        ctl.load()
        self.mesh.handlers = {"task_status": [ctl.on_status], "task_handoff": [ctl.on_handoff]}
        self.mesh.up = [ctl.on_link_up]
        self.addCleanup(ctl.stop)
        return ctl


class ControllerTests(ControllerTestsBase):
    def test_delegate_sends_the_claudectl_payload(self):
        rec = self.ctl.delegate("ci-1", "Fix the tests")
        self.assertEqual(rec["task_id"], "task_1714000040000_0")
        self.assertEqual(
            self.mesh.sent,
            [
                (
                    "ci-1",
                    "delegate_task",
                    {
                        "context": {"dependency_graph": {"blocked_by": [], "blocks": []}},
                        "cwd": None,
                        "prompt": "Fix the tests",
                        "task_id": "task_1714000040000_0",
                    },
                )
            ],
        )
        self.ctl.delegate("ci-1", "x", "/srv/proj", "feat/auth")
        self.assertEqual(self.mesh.sent[1][2]["context"]["git_ref"], "feat/auth")

    def test_delegate_errors(self):
        self.assertRaises(C.PeerUnknown, self.ctl.delegate, "stranger", "p")
        self.assertRaises(C.PeerNotConnected, self.ctl.delegate, "offline-3", "p")
        self.assertRaises(C.BadRequest, self.ctl.delegate, "ci-1", "  ")
        self.assertEqual(self.ctl.list(), [])

    def test_status_and_handoff_update_the_record_and_are_acked(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        d = self.ctl.wait_change(tid, 1, 30)
        self.assertNoResult(d)
        self.mesh.deliver(
            "ci-1",
            "task_status",
            P.build_task_status(
                tid, "running", P.TaskStats(1500, 0.1, 3, ("a.py",), 12, "Edit a.py")
            ),
        )
        view = self.successResultOf(d)
        self.assertEqual(
            (view["state"], view["tokens"], view["cost_usd"], view["last_message"]),
            ("running", 1500, 0.1, "Edit a.py"),
        )
        self.clock.advance(20)
        self.assertEqual(self.ctl.view(self.ctl.get(tid))["elapsed_secs"], 20)
        self.mesh.deliver(
            "ci-1", "task_handoff", P.build_handoff(tid, "Fixed", ["a.py"], "abc123", 0.5, 4000)
        )
        view = self.ctl.view(self.ctl.get(tid))
        self.assertEqual(
            (view["state"], view["summary"], view["tokens"], view["result_git_ref"]),
            ("completed", "Fixed", 4000, "abc123"),
        )
        self.assertEqual(self.mesh.sent[-1], ("ci-1", "ack", {"ack_id": tid}))
        # Late status after the end is ignored; a repeated handoff is acked again.
        self.mesh.deliver("ci-1", "task_status", P.build_task_status(tid, "running", P.TaskStats()))
        self.assertEqual(self.ctl.get(tid)["state"], "completed")
        self.mesh.deliver("ci-1", "task_handoff", P.build_handoff(tid, "Fixed"))
        self.assertEqual(self.mesh.sent[-1], ("ci-1", "ack", {"ack_id": tid}))

    def test_stopped_handoff(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver("ci-1", "task_handoff", P.build_failure(tid, "Stopped by controller: x"))
        self.assertEqual(self.ctl.get(tid)["state"], "stopped")

    def test_frames_from_another_peer_are_ignored(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver("evil-2", "task_handoff", P.build_failure(tid, "ha"))
        self.mesh.deliver(
            "evil-2", "task_status", P.build_task_status(tid, "running", P.TaskStats(9))
        )
        self.assertEqual(self.ctl.get(tid)["state"], "delegated")
        self.assertNotIn(("evil-2", "ack", {"ack_id": tid}), self.mesh.sent)

    def test_interrupt_routes_to_owner(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.assertEqual(self.ctl.interrupt(tid, "nudge", "go")["peer"], "ci-1")
        self.assertEqual(
            self.mesh.sent[-1],
            ("ci-1", "task_interrupt", {"interrupt_type": "nudge", "reason": "go", "task_id": tid}),
        )
        self.assertRaises(C.BadRequest, self.ctl.interrupt, tid, "reroute")
        self.assertRaises(C.TaskUnknown, self.ctl.interrupt, "nope", "stop")
        self.mesh.disconnect("ci-1")
        self.assertRaises(C.PeerNotConnected, self.ctl.interrupt, tid, "stop")
        self.mesh.connect("ci-1")
        self.mesh.deliver("ci-1", "task_handoff", P.build_handoff(tid, "done"))
        self.assertRaises(C.TaskFinished, self.ctl.interrupt, tid, "stop")

    def test_records_survive_a_restart(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver(
            "ci-1", "task_status", P.build_task_status(tid, "running", P.TaskStats(7))
        )
        ctl2 = self.make()
        self.assertEqual(ctl2.get(tid)["stats"]["tokens_used"], 7)
        self.mesh.deliver("ci-1", "task_handoff", P.build_handoff(tid, "ok"))
        self.assertEqual(
            json.loads((self.home.tasks / "outgoing" / f"{tid}.json").read_text())["state"],
            "completed",
        )

    def test_wait_times_out_with_the_current_view(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        d = self.ctl.wait_change(tid, 1, 10)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(d)["version"], 1)
        self.ctl.stop()  # the answer timer
        self.assertEqual(self.clock.getDelayedCalls(), [])


class NoAnswerTests(ControllerTestsBase):
    """C3: a task nobody answers does not stay `delegated` forever."""

    def delegate_calls(self):
        return [p for peer, t, p in self.mesh.sent if t == "delegate_task"]

    def test_no_answer_fails_the_record_and_wakes_waiters(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        d = self.ctl.wait_change(tid, 1, 300)
        self.clock.advance(119)
        self.assertNoResult(d)
        self.clock.advance(1)
        view = self.successResultOf(d)
        self.assertEqual(view["state"], "failed")
        self.assertTrue(
            view["summary"].startswith("no answer from ci-1 within 120 s"), view["summary"]
        )
        rec = json.loads((self.home.tasks / "outgoing" / f"{tid}.json").read_text())
        self.assertEqual((rec["state"], rec["no_answer"]), ("failed", True))

    def test_an_answer_disarms_the_timer(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver("ci-1", "task_status", P.build_task_status(tid, "queued", P.TaskStats()))
        self.clock.advance(1000)
        self.assertEqual(self.ctl.get(tid)["state"], "queued")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_resent_when_the_link_comes_up(self):
        tid = self.ctl.delegate("ci-1", "p", "/srv/proj", "main")["task_id"]
        first = self.delegate_calls()
        self.clock.advance(100)
        self.mesh.disconnect("ci-1")
        self.mesh.connect("ci-1")
        self.assertEqual(self.delegate_calls(), first * 2)
        self.clock.advance(119)  # counted from the new send
        self.assertEqual(self.ctl.get(tid)["state"], "delegated")
        self.clock.advance(1)
        self.assertEqual(self.ctl.get(tid)["state"], "failed")
        # Answered or finished tasks are not sent again.
        self.mesh.connect("ci-1")
        self.assertEqual(len(self.delegate_calls()), 2)

    def test_a_late_answer_revives_the_record(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.clock.advance(120)
        self.mesh.deliver(
            "ci-1",
            "task_status",
            P.build_task_status(tid, "running", P.TaskStats(last_activity="working")),
        )
        rec = self.ctl.get(tid)
        self.assertEqual((rec["state"], rec["summary"], rec["ended_at"]), ("running", None, None))
        self.assertNotIn("no_answer", rec)
        self.mesh.deliver("ci-1", "task_handoff", P.build_handoff(tid, "done"))
        self.assertEqual(self.ctl.get(tid)["state"], "completed")

    def test_zero_waits_forever(self):
        self.ctl = self.make(answer_timeout_secs=0)
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.clock.advance(10**6)
        self.assertEqual(self.ctl.get(tid)["state"], "delegated")

    def test_a_restart_waits_a_full_period_again(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.ctl.stop()
        self.clock.advance(500)
        ctl2 = self.make()
        self.clock.advance(119)
        self.assertEqual(ctl2.get(tid)["state"], "delegated")
        self.clock.advance(1)
        self.assertEqual(ctl2.get(tid)["state"], "failed")


def tail_frame(task_id, lines, state="running"):
    payload = P.build_task_status(task_id, state, P.TaskStats(5, 0.01, 1, (), 3, "x"))
    payload["tail"] = lines
    return payload


class LiveTailTests(ControllerTestsBase):
    def test_tail_lines_are_kept_in_memory_cleaned(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver("ci-1", "task_status", P.build_task_status(tid, "running", P.TaskStats()))
        version = self.ctl.get(tid)["version"]
        stored = (self.home.tasks / "outgoing").glob("*.json")
        before = {p.name: p.read_bytes() for p in stored}
        self.mesh.deliver(
            "ci-1",
            "task_status",
            tail_frame(
                tid,
                [
                    {"at": 1_714_000_041.5, "text": "Bash: \x1b[2Jpytest\u202e"},
                    {"at": 1_714_000_042, "text": "w" * 900},
                ],
            ),
        )
        self.assertEqual(self.ctl.tail(tid)[0], {"at": 1_714_000_041.5, "text": "Bash: pytest"})
        self.assertEqual(len(self.ctl.tail(tid)[1]["text"]), 200)
        self.assertEqual(self.ctl.tail_seq(tid), 2)
        # Memory only: the stored record and its version are untouched.
        self.assertEqual(self.ctl.get(tid)["version"], version)
        after = {p.name: p.read_bytes() for p in (self.home.tasks / "outgoing").glob("*.json")}
        self.assertEqual(after, before)
        self.assertNotIn("tail", json.dumps(self.ctl.view(self.ctl.get(tid))))

    def test_storage_is_bounded(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        for i in range(30):
            self.mesh.deliver(
                "ci-1",
                "task_status",
                tail_frame(tid, [{"at": 1_714_000_041, "text": f"l{i}-{j}"} for j in range(25)]),
            )
        tail = self.ctl.tail(tid)
        self.assertEqual(len(tail), 200)  # the last 200 lines
        self.assertEqual(tail[-1]["text"], "l29-19")  # 20 lines per frame at most
        self.assertEqual(self.ctl.counters["tail_dropped"], 30 * 5)
        # Tails of at most TAIL_TASKS tasks are kept (the most recently active).
        ids = [self.ctl.delegate("ci-1", f"p{i}")["task_id"] for i in range(C.TAIL_TASKS + 5)]
        for t in ids:
            self.mesh.deliver("ci-1", "task_status", tail_frame(t, [{"text": "hi"}]))
        self.assertEqual(len(self.ctl.tails), C.TAIL_TASKS)
        self.assertEqual(self.ctl.tail(tid), [])
        self.assertEqual(self.ctl.tail(ids[-1])[0]["text"], "hi")

    def test_a_tail_from_the_wrong_peer_or_for_no_task_is_ignored(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver("evil-2", "task_status", tail_frame(tid, [{"text": "forged"}]))
        self.mesh.deliver("evil-2", "task_status", tail_frame("task_nope", [{"text": "x"}]))
        self.assertEqual(self.ctl.tail(tid), [])
        self.assertEqual(self.ctl.counters["tail_ignored"], 2)
        self.assertEqual(self.ctl.get(tid)["state"], "delegated")

    def test_a_tail_frame_counts_as_an_answer_and_late_lines_are_kept(self):
        tid = self.ctl.delegate("ci-1", "p")["task_id"]
        self.mesh.deliver("ci-1", "task_status", tail_frame(tid, [{"text": "session started"}]))
        self.assertEqual(self.ctl.get(tid)["state"], "running")
        self.mesh.deliver("ci-1", "task_handoff", P.build_handoff(tid, "Done", [], None, 0.1, 9))
        self.mesh.deliver("ci-1", "task_status", tail_frame(tid, [{"text": "done: Done"}]))
        self.assertEqual(self.ctl.get(tid)["state"], "completed")
        self.assertEqual([t["text"] for t in self.ctl.tail(tid)], ["session started", "done: Done"])


class HostileWorkerTests(ControllerTestsBase):
    """Review 15: a worker's frames cost bounded log lines and bounded records."""

    def test_a_flood_of_bad_and_stray_frames_costs_bounded_lines(self):
        from twisted.logger import capturedLogs

        from claudectl.logbudget import PEER_LINES_PER_MINUTE

        self.ctl.delegate("ci-1", "Fix the tests")
        with capturedLogs() as events:
            for _ in range(100):
                self.mesh.deliver("evil-2", "task_status", {"task_id": "t", "state": 7})
                self.mesh.deliver("evil-2", "task_handoff", {"task_id": "x" * 250})
                self.mesh.deliver(
                    "evil-2",
                    "task_handoff",
                    P.build_failure("task_1714000040000_0", "not yours"),  # ci-1's task
                )
        self.assertEqual(len(events), PEER_LINES_PER_MINUTE + 1)
        self.assertIn("not logging them", events[-1]["log_format"])

    def test_status_lists_are_bounded(self):
        rec = self.ctl.delegate("ci-1", "Fix the tests")
        stats = P.TaskStats(files_modified=tuple("f" * 5000 for _ in range(2000)))
        payload = P.build_task_status(rec["task_id"], "running", stats)
        payload["stats"]["last_activity"] = "a" * 50_000
        self.mesh.deliver("ci-1", "task_status", payload)
        kept = self.ctl.records[rec["task_id"]]["stats"]
        self.assertEqual(len(kept["files_modified"]), P.MAX_FILES_LISTED)
        self.assertEqual({len(f) for f in kept["files_modified"]}, {P.MAX_LISTED_PATH_CHARS})
        self.assertEqual(len(kept["last_activity"]), P.MAX_ACTIVITY_CHARS)
