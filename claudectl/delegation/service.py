# -*- test-case-name: tests.test_delegation_service -*-
"""
The delegation layer as one service: :func:`delegation_service`.

It builds the worker and the controller over a mesh, registers their
handlers and link observers on it, and returns a :class:`DelegationService`
that recovers stored tasks on start and stops running ones (whole process
groups, bounded in time) on stop.  The composition root hangs it in the tree
and registers its :attr:`~DelegationService.locator` and
:meth:`~DelegationService.status` with the control socket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger

from claudectl.config import DelegationConfig
from claudectl.delegation import gitws
from claudectl.delegation.controller import DelegationController
from claudectl.delegation.locator import DelegationLocator
from claudectl.delegation.store import INCOMING, OUTGOING, TaskStore
from claudectl.delegation.worker import DelegationWorker
from claudectl.home import Home
from claudectl.relay.codec import ACK, DELEGATE_TASK, TASK_HANDOFF, TASK_INTERRUPT, TASK_STATUS
from claudectl.relay.interfaces import IMesh
from claudectl.relay.keystore import is_remote_peer_id
from claudectl.statestore import StateWriter


class DelegationService(Service):
    _log = Logger()
    name = "delegation"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, worker: DelegationWorker, controller: DelegationController) -> None:
        self.worker = worker
        self.controller = controller
        #: The AMP locator of the ``delegate`` commands.
        self.locator = DelegationLocator(controller, worker)

    def startService(self) -> None:
        super().startService()
        self.controller.load()
        self.worker.start()
        self._log.info(
            "delegation ready: {n} stored task(s) here, {m} delegated",
            n=len(self.worker.tasks),
            m=len(self.controller.records),
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.controller.stop()
        return maybeDeferred(self.worker.stop)

    def status(self) -> dict[str, Any]:
        w = self.worker
        return {
            "delegation": {
                "running": w.running_count(),
                "queued": len(w.queue),
                "max_concurrent": w.config.max_concurrent,
                "allowed_dirs": w.allowed_roots(),
                "counters": dict(w.counters),
                "delegated": len(self.controller.records),
                "controller_counters": dict(self.controller.counters),
            }
        }


def delegation_service(
    home: Home,
    config: DelegationConfig,
    mesh: IMesh,
    identity: str,
    reactor: Any,
    trust_of: Callable[[str], float],
    writer: StateWriter | None = None,
) -> DelegationService:
    """
    The worker (tasks peers delegate here) and the controller (tasks
    delegated from here) over ``mesh``; ``trust_of`` is the hive's trust
    level of a peer.  Processes are spawned through ``reactor`` when it
    provides ``IReactorProcess`` (else every task fails clearly).  Task
    records and checkout removal go through ``writer`` (the service's
    writer thread; inline without one).
    """
    spawner = reactor.spawnProcess if IReactorProcess.providedBy(reactor) else None
    run_git = gitws.default_git_runner(reactor) if spawner is not None else None

    def is_paired(peer: str) -> bool:
        return is_remote_peer_id(peer) and (home.peers / f"{peer}.key").exists()

    worker = DelegationWorker(
        identity=identity,
        config=config,
        mesh=mesh,
        store=TaskStore(home.tasks, INCOMING, writer),
        trust_of=trust_of,
        clock=reactor,
        spawner=spawner,
        home_root=home.root,
        config_hint=str(home.config_file),
        run_git=run_git,
    )
    controller = DelegationController(
        mesh=mesh,
        store=TaskStore(home.tasks, OUTGOING, writer),
        clock=reactor,
        is_paired=is_paired,
        answer_timeout_secs=config.answer_timeout_secs,
    )
    mesh.add_handler(DELEGATE_TASK, worker.on_delegate)
    mesh.add_handler(TASK_INTERRUPT, worker.on_interrupt)
    mesh.add_handler(ACK, worker.on_ack)
    mesh.add_handler(TASK_STATUS, controller.on_status)
    mesh.add_handler(TASK_HANDOFF, controller.on_handoff)
    mesh.add_link_observer(worker.on_link_up, None)
    mesh.add_link_observer(controller.on_link_up, None)
    return DelegationService(worker, controller)
