"""The delegation control commands over AMP (in memory with iosim)."""

import json

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import commands as C
from claudectl.delegation import locator as L
from claudectl.delegation import payloads as P
from claudectl.delegation.controller import DelegationController, PeerNotConnected, TaskUnknown
from claudectl.delegation.store import OUTGOING, TaskStore
from tests.common import FakeMesh, temp_home


class LocatorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.mesh = FakeMesh("me-1", peers=["ci-1"])
        self.ctl = DelegationController(
            mesh=self.mesh,
            store=TaskStore(temp_home(self).tasks, OUTGOING),
            clock=self.clock,
            is_paired=lambda p: p in ("ci-1", "off-2"),
        )
        self.mesh.handlers = {
            "task_status": [self.ctl.on_status],
            "task_handoff": [self.ctl.on_handoff],
        }
        server = amp.AMP(locator=L.DelegationLocator(self.ctl))
        client = amp.AMP()
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: server, lambda: client
        )

    def call(self, command, **kw):
        # Chain a fresh Deferred before pumping so a failure is captured, not dropped.
        d = Deferred()
        self.client.callRemote(command, **kw).chainDeferred(d)
        self.pump.flush()
        return d

    def test_tail_of_a_task(self):
        tid = self.successResultOf(self.call(C.Delegate, peer="ci-1", prompt="p"))["task_id"]
        payload = P.build_task_status(tid, "running", P.TaskStats())
        for i in range(15):
            payload["tail"] = [{"at": 5.0, "text": f"{i}-{j} " + "ü" * 300} for j in range(20)]
            self.mesh.deliver("ci-1", "task_status", dict(payload))
        r = self.successResultOf(self.call(C.TaskTail, task_id=tid))
        self.assertLessEqual(len(r["tail_json"].encode("utf-8")), C.TAIL_BYTES)
        lines = json.loads(r["tail_json"])
        self.assertGreater(len(lines), 50)
        self.assertTrue(lines[-1]["text"].startswith("14-19 "))
        f = self.failureResultOf(self.call(C.TaskTail, task_id="task_nope"), TaskUnknown)
        self.assertIn("task_nope", str(f.value))
        f = self.failureResultOf(self.call(C.TaskTail, task_id=tid, direction="sideways"))
        self.assertIn("direction", str(f.value))
        # Incoming, without a worker: unknown.
        self.failureResultOf(self.call(C.TaskTail, task_id=tid, direction="incoming"), TaskUnknown)

    def test_delegate_list_watch_interrupt(self):
        r = self.successResultOf(self.call(C.Delegate, peer="ci-1", prompt="-p fix", cwd="/srv"))
        tid = r["task_id"]
        self.assertEqual(json.loads(r["task_json"])["state"], "delegated")
        d = self.call(C.WatchTask, task_id=tid, version=1, timeout=30.0)
        self.assertNoResult(d)
        self.mesh.deliver(
            "ci-1",
            "task_status",
            P.build_task_status(tid, "running", P.TaskStats(10, 0.01, last_activity="Edit a.py")),
        )
        self.pump.flush()
        view = json.loads(self.successResultOf(d)["task_json"])
        self.assertEqual((view["state"], view["last_message"]), ("running", "Edit a.py"))
        r = self.successResultOf(
            self.call(C.Interrupt, task_id=tid, interrupt_type="stop", reason="done")
        )
        self.assertEqual(r["peer"], "ci-1")
        r = self.successResultOf(self.call(C.ListTasks))
        self.assertEqual([t["task_id"] for t in json.loads(r["tasks_json"])], [tid])
        self.assertEqual((r["next_offset"], r["total"]), (-1, 1))

    def test_named_errors_cross_the_wire(self):
        f = self.failureResultOf(self.call(C.Delegate, peer="off-2", prompt="p"))
        f.trap(PeerNotConnected)
        self.assertIn("not connected", str(f.value))
        self.failureResultOf(self.call(C.ListTasks, task_id="nope")).trap(TaskUnknown)

    def test_list_is_paged_under_the_amp_limit(self):
        for i in range(40):
            self.ctl.delegate("ci-1", f"{i} " + "x" * 3000)
        seen, offset, pages = [], 0, 0
        while offset >= 0:
            r = self.successResultOf(self.call(C.ListTasks, offset=offset))
            self.assertLess(len(r["tasks_json"].encode()), 65_535)
            seen += json.loads(r["tasks_json"])
            offset = r["next_offset"]
            pages += 1
        self.assertEqual(len(seen), 40)
        self.assertGreater(pages, 1)
