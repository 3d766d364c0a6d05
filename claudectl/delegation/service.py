# -*- test-case-name: tests.test_delegation_service -*-
"""
Wiring the delegation layer to a relay node: :func:`attach`.

``attach(node, parent)`` builds the worker and the controller, registers
their handlers on ``node.mesh`` and a link observer, appends the control
locator to ``node.control_locators`` and adds a :class:`DelegationService`
under ``parent`` that recovers stored tasks on start and stops running ones
(whole process groups, bounded in time) on stop.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorProcess
from twisted.logger import Logger

from claudectl.delegation import gitws
from claudectl.delegation.controller import DelegationController
from claudectl.delegation.locator import DelegationLocator
from claudectl.delegation.store import INCOMING, OUTGOING, TaskStore
from claudectl.delegation.worker import DelegationWorker
from claudectl.relay.codec import ACK, DELEGATE_TASK, TASK_HANDOFF, TASK_INTERRUPT, TASK_STATUS
from claudectl.relay.keystore import is_remote_peer_id


class DelegationService(Service):
    _log = Logger()
    name = "delegation"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, worker: DelegationWorker, controller: DelegationController) -> None:
        self.worker = worker
        self.controller = controller

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


def attach(node: Any, parent: Any) -> DelegationService:
    home = node.home
    mesh = node.mesh
    reactor = node.reactor
    config = node.config.delegation
    spawner = reactor.spawnProcess if IReactorProcess.providedBy(reactor) else None
    run_git = gitws.default_git_runner(reactor) if spawner is not None else None

    def is_paired(peer: str) -> bool:
        return is_remote_peer_id(peer) and (home.peers / f"{peer}.key").exists()

    worker = DelegationWorker(
        identity=node.identity,
        config=config,
        mesh=mesh,
        store=TaskStore(home.tasks, INCOMING, node.writer),
        trust_of=lambda peer: node.trust_of(peer),
        clock=reactor,
        spawner=spawner,
        home_root=home.root,
        config_hint=str(home.config_file),
        run_git=run_git,
    )
    controller = DelegationController(
        mesh=mesh,
        store=TaskStore(home.tasks, OUTGOING, node.writer),
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
    node.control_locators.append(DelegationLocator(controller, worker))
    service = DelegationService(worker, controller)
    providers = getattr(node, "status_providers", None)
    if isinstance(providers, list):
        providers.append(service.status)
    service.setServiceParent(parent)
    return service
