# -*- test-case-name: tests.test_tui_events -*-
"""
The push channel of the control socket: ``claudectl tui`` subscribes once
and the service sends it panel updates on the same AMP connection (AMP is
symmetric: the service's side of the connection can ``callRemote`` too).

::

    dashboard                                service
    ── events.subscribe [peers,tasks,hive] ─▶
    ◀─────────────── {identity} ────────────
    ◀──── events.update peers {...} seq=1 ──   (the current state of each panel)
    ◀──── events.update tasks {...} seq=2 ──
    ...                                        (then only on change)

What triggers an update:

* peer link up or down: the mesh's link observers (at once);
* a frame from a peer (heartbeat: traffic; task status or handoff: tasks;
  knowledge sync or snapshot: hive);
* everything else -- a dialer starting or giving up, outbound traffic, a
  ``hive trust`` or ``hive import`` written by another process, a task's
  progress on this machine -- by comparing cheap signatures (in-memory
  counters and ``stat`` of a few files) every ``WATCH_SECS``, only while a
  dashboard is subscribed.

Updates are coalesced per panel: at most one every ``PUSH_INTERVAL_SECS``,
and the first one after a quiet period goes out on the next reactor turn.
An update whose JSON equals the last one that subscriber got is not sent.
Each update is one panel's JSON, bounded by :mod:`claudectl.control.panels`
to fit one AMP value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp

from claudectl.control import panels as P
from claudectl.control.server import ControlRegistry
from claudectl.relay import codec
from claudectl.relay.node import RelayNode
from claudectl.relay.peers_view import peer_rows

log = Logger()

#: At most one update per panel this often.
PUSH_INTERVAL_SECS = 0.1
#: How often the signatures are compared while someone is subscribed.
WATCH_SECS = 0.05
#: Dashboards attached at once (each costs a watch share and pushes).
MAX_SUBSCRIPTIONS = 16
PANELS = ("peers", "tasks", "hive")


class NoSuchTask(Exception):
    pass


class BadPanel(Exception):
    pass


class TooManyDashboards(Exception):
    pass


ERRORS: dict[type[Exception], bytes] = {
    NoSuchTask: b"NO_SUCH_TASK",
    BadPanel: b"BAD_PANEL",
    TooManyDashboards: b"TOO_MANY_DASHBOARDS",
}


class Subscribe(amp.Command):
    """Ask for ``events.update`` pushes of these panels on this connection."""

    commandName = b"events.subscribe"
    arguments = [(b"panels", amp.ListOf(amp.Unicode()))]
    response = [(b"identity", amp.Unicode())]
    errors = ERRORS


class PanelUpdate(amp.Command):
    """Service → dashboard: the new data of one panel (JSON, ≤ 60,000 bytes)."""

    commandName = b"events.update"
    arguments = [(b"panel", amp.Unicode()), (b"data_json", amp.Unicode()), (b"seq", amp.Integer())]
    requiresAnswer = False


class TaskDetail(amp.Command):
    """One task (``direction`` ``out``: delegated by us, ``in``: run for a peer)."""

    commandName = b"events.task_detail"
    arguments = [(b"direction", amp.Unicode()), (b"key", amp.Unicode())]
    response = [(b"detail_json", amp.Unicode())]
    errors = ERRORS


class TaskAction(amp.Command):
    """``stop`` or ``nudge`` a task, whichever side runs it."""

    commandName = b"events.task_action"
    arguments = [
        (b"direction", amp.Unicode()),
        (b"key", amp.Unicode()),
        (b"action", amp.Unicode()),
        (b"reason", amp.Unicode(optional=True)),
    ]
    response = [(b"peer", amp.Unicode())]
    errors = ERRORS


# --- the hub (no I/O of its own: sinks and a clock are injected) ----------------------


Sink = Callable[[str, str, int], Any]


@dataclass(eq=False)
class Subscription:
    sink: Sink
    panels: frozenset[str]
    alive: Callable[[], bool] = lambda: True
    sent: dict[str, str] = field(default_factory=dict)
    #: The connection's buffer is full (a dashboard that stopped reading):
    #: nothing is sent until it drains; then the owed panels go out.
    paused: bool = False
    owed: set[str] = field(default_factory=set)


class EventHub:
    """
    Knows how to build each panel (``builders``: panel -> JSON text) and how
    to tell cheaply that it may have changed (``signatures``: panel -> any
    comparable value); sends coalesced updates to the subscriptions.
    """

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        builders: dict[str, Callable[[], str]],
        signatures: dict[str, Callable[[], Any]] | None = None,
        push_interval: float = PUSH_INTERVAL_SECS,
        watch_secs: float = WATCH_SECS,
    ) -> None:
        self.clock = clock
        self.builders = builders
        self.signatures = signatures or {}
        self.push_interval = push_interval
        self.watch_secs = watch_secs
        self.subscriptions: list[Subscription] = []
        self.seq = 0
        self.pushes = 0
        self._last_push: dict[str, float] = {}
        self._pending: dict[str, Any] = {}
        self._sigs: dict[str, Any] = {}
        self._watch: LoopingCall | None = None

    # --- subscriptions -------------------------------------------------------------
    def subscribe(
        self, sink: Sink, panels: list[str], alive: Callable[[], bool] = lambda: True
    ) -> Subscription:
        unknown = [p for p in panels if p not in self.builders]
        if unknown:
            raise BadPanel(f"unknown panel(s): {', '.join(unknown)}")
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise TooManyDashboards(f"{MAX_SUBSCRIPTIONS} dashboards are attached already")
        sub = Subscription(sink, frozenset(panels), alive)
        self.subscriptions.append(sub)
        # The current state of each panel, after the Subscribe answer.
        self.clock.callLater(0, self._initial, sub)
        self._start_watch()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscriptions:
            self.subscriptions.remove(sub)
        if not self.subscriptions:
            self._stop_watch()

    def _initial(self, sub: Subscription) -> None:
        for panel in PANELS:
            if panel in sub.panels and sub in self.subscriptions:
                data = self._build(panel)
                if data is not None:
                    self._send(sub, panel, data)

    # --- changes ---------------------------------------------------------------------
    def changed(self, panel: str) -> None:
        """Something in ``panel`` may have changed: push within ``push_interval``."""
        if panel in self._pending or not any(panel in s.panels for s in self.subscriptions):
            return
        wait = self._last_push.get(panel, -1e9) + self.push_interval - self.clock.seconds()
        self._pending[panel] = self.clock.callLater(max(0.0, wait), self._flush, panel)

    def _flush(self, panel: str) -> None:
        self._pending.pop(panel, None)
        self._last_push[panel] = self.clock.seconds()
        subs = [s for s in self.subscriptions if panel in s.panels]
        if not subs:
            return
        data = self._build(panel)
        if data is None:
            return
        for sub in subs:
            if sub.sent.get(panel) != data:
                self._send(sub, panel, data)

    def _build(self, panel: str) -> str | None:
        try:
            return self.builders[panel]()
        except Exception:
            self._log.failure("building the {panel} panel failed", panel=panel)
            return None

    def pause(self, sub: Subscription) -> None:
        sub.paused = True

    def resume(self, sub: Subscription) -> None:
        sub.paused = False
        owed, sub.owed = sub.owed, set()
        for panel in PANELS:
            if panel in owed and sub in self.subscriptions:
                data = self._build(panel)
                if data is not None and sub.sent.get(panel) != data:
                    self._send(sub, panel, data)

    def _send(self, sub: Subscription, panel: str, data: str) -> None:
        if not sub.alive():
            self.unsubscribe(sub)
            return
        if sub.paused:
            sub.owed.add(panel)  # the latest state goes out once it drains
            return
        self.seq += 1
        try:
            sub.sink(panel, data, self.seq)
        except Exception as e:
            self._log.info("dropping a dashboard subscription: {error}", error=repr(e))
            self.unsubscribe(sub)
            return
        sub.sent[panel] = data
        self.pushes += 1

    # --- the signature watch ------------------------------------------------------------
    def _start_watch(self) -> None:
        if self._watch is not None or not self.signatures:
            return
        self._sigs = {p: self._signature(p) for p in self.signatures}
        self._watch = LoopingCall(self._tick)
        self._watch.clock = self.clock
        self._watch.start(self.watch_secs, now=False)

    def _stop_watch(self) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()

    def stop(self) -> None:
        self.subscriptions.clear()
        self._stop_watch()

    def _signature(self, panel: str) -> Any:
        try:
            return self.signatures[panel]()
        except Exception:
            self._log.failure("signature of the {panel} panel failed", panel=panel)
            return None

    def _tick(self) -> None:
        # A LoopingCall stops at the first exception: nothing may escape.
        try:
            for sub in list(self.subscriptions):
                if not sub.alive():
                    self.unsubscribe(sub)
            if not self.subscriptions:
                return
            for panel in self.signatures:
                sig = self._signature(panel)
                if sig != self._sigs.get(panel):
                    self._sigs[panel] = sig
                    self.changed(panel)
        except Exception:
            self._log.failure("dashboard watch failed")


# --- the control-socket side ---------------------------------------------------------


class EventsLocator(amp.CommandLocator):
    """One per control connection: it knows the connection to push to."""

    def __init__(
        self, hub: EventHub, proto: amp.AMP, identity: str, tasks: TaskAccess | None
    ) -> None:
        super().__init__()
        self.hub = hub
        self.proto = proto
        self.identity = identity
        self.tasks = tasks
        self.subscription: Subscription | None = None
        self._producer: _Backpressure | None = None

    def _alive(self) -> bool:
        return self.proto.transport is not None

    def _sink(self, panel: str, data: str, seq: int) -> None:
        self.proto.callRemote(PanelUpdate, panel=panel, data_json=data, seq=seq)

    @Subscribe.responder
    def subscribe(self, panels: list[str]) -> dict[str, Any]:
        if self.subscription is not None:  # again on this connection: replace it
            self.hub.unsubscribe(self.subscription)
        self.subscription = self.hub.subscribe(self._sink, list(panels), self._alive)
        transport: Any = self.proto.transport  # an IConsumer too (a stream transport)
        if (
            self._producer is None
            and transport is not None
            and getattr(transport, "producer", None) is None
        ):
            self._producer = _Backpressure(self)
            transport.registerProducer(self._producer, True)
        return {"identity": self.identity}

    @TaskDetail.responder
    def task_detail(self, direction: str, key: str) -> dict[str, Any]:
        if self.tasks is None:
            raise NoSuchTask("delegation is not part of this service")
        return {"detail_json": P.bounded_detail(self.tasks.detail(direction, key))}

    @TaskAction.responder
    def task_action(
        self, direction: str, key: str, action: str, reason: str | None = None
    ) -> dict[str, Any]:
        if self.tasks is None:
            raise NoSuchTask("delegation is not part of this service")
        return {"peer": self.tasks.act(direction, key, action, reason or "")}


class _Backpressure:
    """
    A streaming producer on the dashboard's connection: Twisted pauses it when
    the connection's write buffer is full, so a dashboard that stops reading
    (suspended with Ctrl+Z, say) costs at most one buffer and one owed update
    per panel, not an ever-growing queue.
    """

    def __init__(self, locator: EventsLocator) -> None:
        self.locator = locator

    def pauseProducing(self) -> None:
        if self.locator.subscription is not None:
            self.locator.hub.pause(self.locator.subscription)

    def resumeProducing(self) -> None:
        if self.locator.subscription is not None:
            self.locator.hub.resume(self.locator.subscription)

    def stopProducing(self) -> None:
        if self.locator.subscription is not None:
            self.locator.hub.unsubscribe(self.locator.subscription)


class TaskAccess:
    """The dashboard's view of the delegation layer (controller and worker)."""

    def __init__(self, controller: Any, worker: Any) -> None:
        self.controller = controller
        self.worker = worker

    def rows(self) -> str:
        out = []
        for v in self.controller.list():
            row = P.outgoing_row(v)
            row["tail_seq"] = self.controller.tail_seq(v["task_id"])
            out.append(row)
        inc = [P.incoming_row(t) for t in self.worker.tasks.values()]
        return P.bounded(P.tasks_panel(out, inc))

    def signature(self) -> Any:
        return (
            tuple(
                (k, r.get("version"), self.controller.tail_seq(k))
                for k, r in self.controller.records.items()
            ),
            tuple(
                (k, t.run.state, t.run.version, t.run.tail.seq)
                for k, t in self.worker.tasks.items()
            ),
        )

    def _incoming(self, key: str) -> Any:
        task = self.worker.tasks.get(key)
        if task is None:
            raise NoSuchTask(f"no task {key!r} run for a peer here")
        return task

    def detail(self, direction: str, key: str) -> dict[str, Any]:
        if direction == "out":
            rec = self.controller.records.get(key)
            if rec is None:
                raise NoSuchTask(f"no delegated task {key!r}")
            detail = P.outgoing_detail(self.controller.view(rec))
            detail["tail"] = self.controller.tail(key)
            return detail
        task = self._incoming(key)
        detail = P.incoming_detail(task)
        detail["tail"] = task.run.tail.view()
        return detail

    def act(self, direction: str, key: str, action: str, reason: str) -> str:
        if action not in ("stop", "nudge"):
            raise NoSuchTask(f"unknown action {action!r}: stop or nudge")
        if direction == "out":
            from claudectl.delegation.controller import DelegationError

            try:
                rec = self.controller.interrupt(key, action, reason)
            except DelegationError as e:
                raise NoSuchTask(str(e)) from None
            return str(rec["peer"])
        task = self._incoming(key)
        if task.run.finished:
            raise NoSuchTask(f"task {task.task_id} already {task.run.state}")
        if action == "stop":
            self.worker.stop_task(task, reason or "stopped from the dashboard")
        else:
            self.worker.nudge_task(task, reason)
        return str(task.peer)


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _marks_changed(hub: EventHub, panel: str) -> Callable[[str, Any], None]:
    """A frame handler that marks ``panel`` changed."""

    def handler(_peer: str, _env: Any) -> None:
        hub.changed(panel)

    return handler


class EventsService(Service):
    """The push channel's lifetime: its hub stops watching on stop."""

    name = "events"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, hub: EventHub, identity: str, tasks: TaskAccess | None) -> None:
        self.hub = hub
        self.identity = identity
        self.tasks = tasks

    def locator_for(self, proto: amp.AMP) -> EventsLocator:
        """The events locator of one control connection."""
        return EventsLocator(self.hub, proto, self.identity, self.tasks)

    def status(self) -> dict[str, Any]:
        return {"dashboards": len(self.hub.subscriptions)}

    def stopService(self) -> Any:
        self.hub.stop()
        return super().stopService()


def events_service(
    node: RelayNode, registry: ControlRegistry, tasks: TaskAccess | None
) -> EventsService:
    """
    The push channel of ``node``: panels built from the node's mesh and keys,
    ``registry``'s trust and per-peer fields, and ``tasks`` (None: this
    service runs no delegation layer).  The composition root registers the
    service's :meth:`~EventsService.locator_for` and status.
    """
    home = node.home
    mesh = node.mesh
    trust_of = registry.trust_of

    def peers() -> str:
        rows = peer_rows(node.keystore, mesh, trust_of, registry.peer_info_providers)
        return P.bounded(P.peers_panel(rows, node.identity, True))

    def peers_sig() -> Any:
        states = tuple(
            sorted(
                (
                    p,
                    st.counters.bytes_in,
                    st.counters.bytes_out,
                    st.last_error,
                    st.transport,
                    st.address,
                )
                for p, st in mesh.states.items()
            )
        )
        return (
            states,
            tuple(sorted(mesh.links)),
            tuple(sorted(mesh.dialing)),
            _stat(home.peers),
            _stat(home.hive / "trust.json"),
            _stat(home.hive / "sync_state.json"),
        )

    def hive() -> str:
        return P.bounded(
            P.hive_panel(home, node.identity, node.config.hive.default_trust, trust_of)
        )

    def hive_sig() -> Any:
        return tuple(
            _stat(home.hive / name)
            for name in (
                "knowledge.jsonl",
                "trust.json",
                "sync_state.json",
                "conflicts.jsonl",
                "resolutions.jsonl",
            )
        )

    def no_tasks() -> str:
        return P.bounded(P.tasks_panel([], [], available=False))

    builders: dict[str, Callable[[], str]] = {
        "peers": peers,
        "hive": hive,
        "tasks": tasks.rows if tasks is not None else no_tasks,
    }
    signatures: dict[str, Callable[[], Any]] = {"peers": peers_sig, "hive": hive_sig}
    if tasks is not None:
        signatures["tasks"] = tasks.signature
    hub = EventHub(node.reactor, builders, signatures)

    mesh.add_link_observer(lambda _peer: hub.changed("peers"), lambda _peer: hub.changed("peers"))
    for msg_type, panel in (
        (codec.HEARTBEAT, "peers"),
        (codec.TASK_STATUS, "tasks"),
        (codec.TASK_HANDOFF, "tasks"),
        (codec.DELEGATE_TASK, "tasks"),
        (codec.TASK_INTERRUPT, "tasks"),
        (codec.KNOWLEDGE_SYNC, "hive"),
        (codec.KNOWLEDGE_SNAPSHOT, "hive"),
    ):
        mesh.add_handler(msg_type, _marks_changed(hub, panel))

    return EventsService(hub, node.identity, tasks)
