"""delegation_service(...): handlers, link observers, locator, status, service lifecycle."""

from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config, DelegationConfig
from claudectl.delegation import payloads as P
from claudectl.delegation.locator import DelegationLocator
from claudectl.delegation.service import DelegationService, delegation_service
from tests.common import FakeMesh, temp_home


class Node:
    def __init__(self, home, project):
        self.home = home
        self.config = Config(
            delegation=DelegationConfig(allowed_dirs=(str(project),), answer_timeout_secs=60)
        )
        self.identity = "worker-1"
        self.mesh = FakeMesh("worker-1", peers=["ctl-1"])
        self.reactor = Clock()  # no IReactorProcess: tasks fail clearly
        self.trust = 0.5


def attach(node: Node, parent: MultiService) -> DelegationService:
    """The service as the composition root builds it, trust read late from ``node``."""
    svc = delegation_service(
        node.home,
        node.config.delegation,
        node.mesh,
        node.identity,
        node.reactor,
        lambda peer: node.trust,
    )
    svc.setServiceParent(parent)
    return svc


class ServiceTests(SynchronousTestCase):
    def test_attach_and_run(self):
        home = temp_home(self)
        project = home.root / "proj"
        project.mkdir()
        node = Node(home, project)
        parent = MultiService()
        svc = attach(node, parent)
        self.assertIsInstance(svc.locator, DelegationLocator)
        for t in ("delegate_task", "task_interrupt", "ack", "task_status", "task_handoff"):
            self.assertEqual(len(node.mesh.handlers[t]), 1, t)
        parent.startService()
        node.trust = 0.1  # trust_of is asked at each delegation
        node.mesh.deliver("ctl-1", "delegate_task", P.build_delegate_task("t1", "p", str(project)))
        (h,) = [p for _, t, p in node.mesh.sent if t == "task_handoff"]
        self.assertIn("trust 0.10", h["summary"])
        node.trust = 0.5
        node.mesh.deliver("ctl-1", "delegate_task", P.build_delegate_task("t2", "p", str(project)))
        h = [p for _, t, p in node.mesh.sent if t == "task_handoff"][-1]
        self.assertEqual(h["summary"], "this worker cannot start processes")
        self.assertEqual(svc.status()["delegation"]["allowed_dirs"], [str(project.resolve())])
        # A tail for a task we never delegated: ignored and counted.
        tail = dict(P.build_task_status("nope", "running", P.TaskStats()), tail=[{"text": "x"}])
        node.mesh.deliver("ctl-1", "task_status", tail)
        status = svc.status()["delegation"]
        self.assertEqual(status["controller_counters"]["tail_ignored"], 1)
        self.successResultOf(parent.stopService())
        self.assertFalse(svc.running)

    def test_controller_resends_on_link_up_and_gives_up_after_the_answer_timeout(self):
        home = temp_home(self)
        project = home.root / "proj"
        project.mkdir()
        node = Node(home, project)
        (home.peers).mkdir(parents=True, exist_ok=True)
        parent = MultiService()
        svc = attach(node, parent)
        parent.startService()
        peer = "peer-0a1b2c3d"
        (home.peers / f"{peer}.key").write_text("k")
        node.mesh.peers[peer] = "mutual"
        tid = svc.controller.delegate(peer, "p")["task_id"]
        node.mesh.disconnect(peer)
        node.mesh.connect(peer)
        sent = [p for to, t, p in node.mesh.sent if t == "delegate_task" and to == peer]
        self.assertEqual(len(sent), 2)
        node.reactor.advance(60)
        self.assertEqual(svc.controller.get(tid)["state"], "failed")
        self.successResultOf(parent.stopService())
        self.assertEqual(node.reactor.getDelayedCalls(), [])
