# -*- test-case-name: tests.test_delegation_controller -*-
"""
The controller side: tasks this machine delegated, and their live state.

:class:`DelegationController` sends ``delegate_task`` through the mesh,
keeps one record per task in ``tasks/outgoing/`` and updates it from the
``task_status`` and ``task_handoff`` frames that the *owning* peer sends
(defects D1, D2).  Every handoff is acknowledged with ``ack`` whose
``ack_id`` is the task id, so the worker stops re-sending it (D8; claudectl
0.64 ignores acks).  Interrupts are routed to the peer that owns the task
(D13: no ``--peer`` needed).

Record states: ``delegated`` (sent, nothing heard yet), ``queued``,
``running``, then ``completed``, ``failed`` or ``stopped``.

A record that stays ``delegated`` gets its ``delegate_task`` again each time
the peer's link comes up (a worker answers a repeat with the task's state and
never runs it twice), and is marked failed -- "no answer from <peer>" --
``[delegation] answer_timeout_secs`` after the last send (a claudectl 0.64
worker refuses silently, a frame may be lost).  Should the peer answer after
all, the record follows it again.

A peer of this project also sends the live tail of a running task: extra
``task_status`` frames with a ``"tail"`` member
(:mod:`~claudectl.delegation.tail`).  Their lines, cleaned and bounded
again, are kept in memory only -- the last ``TAIL_KEEP`` per task, for the
:data:`TAIL_TASKS` most recently active tasks -- and never change the stored
record.  A tail for a task that is not ours, or from a peer that does not
run it, is ignored and counted (``counters["tail_ignored"]``).
"""

from __future__ import annotations

import builtins
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from claudectl.delegation import payloads
from claudectl.delegation.store import TaskStore, safe_name
from claudectl.delegation.tail import Tail, parse_tail
from claudectl.delegation.taskstate import (
    COMPLETED,
    DELEGATED,
    FAILED,
    FINISHED,
    RUNNING,
    STOPPED,
    WIRE_STATUS,
)
from claudectl.logbudget import PEER_LINES_PER_MINUTE, PeerLog
from claudectl.relay.codec import ACK, DELEGATE_TASK, TASK_INTERRUPT, Envelope, MessageIds
from claudectl.relay.interfaces import IMesh


def outgoing_view(rec: dict[str, Any], now: float, connected: bool) -> dict[str, Any]:
    """A task this machine delegated, as ``relay status`` shows it (also from a
    stored record when the service is not running)."""
    end = rec.get("ended_at") if rec["state"] in FINISHED else None
    elapsed = int((end if end is not None else now) - rec["created_at"])
    stats = rec.get("stats") or {}
    return {
        "direction": "outgoing",
        "task_id": rec["task_id"],
        "peer": rec["peer"],
        "state": rec["state"],
        "prompt": rec["prompt"],
        "cwd": rec.get("cwd"),
        "git_ref": rec.get("git_ref"),
        "created_at": rec["created_at"],
        "updated_at": rec["updated_at"],
        "elapsed_secs": max(0, elapsed),
        "tokens": stats.get("tokens_used", 0),
        "cost_usd": stats.get("cost_usd", 0.0),
        "context_pct": stats.get("context_pct", 0),
        "files_modified": stats.get("files_modified", []),
        "last_message": rec.get("last_message"),
        "summary": rec.get("summary"),
        "result_git_ref": (rec.get("handoff") or {}).get("git_ref"),
        "peer_connected": connected,
        "version": rec["version"],
    }


MAX_WAIT_SECS = 300
#: Tasks whose live tail is kept (the most recently active ones).
TAIL_TASKS = 64
DEFAULT_ANSWER_TIMEOUT_SECS = 120


class DelegationError(Exception):
    """Base of the controller's errors; the message is for the user."""


class PeerUnknown(DelegationError):
    pass


class PeerNotConnected(DelegationError):
    pass


class TaskUnknown(DelegationError):
    pass


class TaskFinished(DelegationError):
    pass


class BadRequest(DelegationError):
    pass


def handoff_state(handoff: payloads.TaskHandoff) -> str:
    if handoff.state == COMPLETED:
        return COMPLETED
    if handoff.summary.startswith(payloads.SUMMARY_STOPPED):
        return STOPPED
    return FAILED


class DelegationController:
    _log = Logger()

    def __init__(
        self,
        *,
        mesh: IMesh,
        store: TaskStore,
        clock: Any,
        is_paired: Callable[[str], bool],
        ids: MessageIds | None = None,
        answer_timeout_secs: float = DEFAULT_ANSWER_TIMEOUT_SECS,
    ) -> None:
        self.mesh = mesh
        self.store = store
        self.clock = clock
        #: Lines a peer's frames cause: a budget per peer, its strings cut.
        self._peer_log = PeerLog(self._log, clock.seconds, PEER_LINES_PER_MINUTE, "delegation")
        self.is_paired = is_paired
        self.ids = ids or MessageIds(clock.seconds)
        self.answer_timeout_secs = answer_timeout_secs
        self.records: dict[str, dict[str, Any]] = {}
        self._waiters: dict[str, list[Deferred[dict[str, Any]]]] = {}
        self._answer_timers: dict[str, IDelayedCall] = {}
        #: task id -> its live tail (memory only; see the module docstring).
        self.tails: OrderedDict[str, Tail] = OrderedDict()
        self.counters = {"tail_lines": 0, "tail_dropped": 0, "tail_ignored": 0}

    def load(self) -> None:
        for rec in self.store.load_all().values():
            self.records[rec["task_id"]] = rec
            if rec.get("state") == DELEGATED:
                self._arm(rec)  # a full answer period again, counted from now

    def stop(self) -> None:
        """The service is stopping: cancel the answer timers, answer the watchers."""
        for timer in self._answer_timers.values():
            if timer.active():
                timer.cancel()
        self._answer_timers.clear()
        waiters, self._waiters = self._waiters, {}
        for task_id, ds in waiters.items():
            for d in ds:
                d.callback(self.view(self.records[task_id]))

    # --- commands from the CLI -------------------------------------------------------
    def delegate(
        self,
        peer: str,
        prompt: str,
        cwd: str | None = None,
        git_ref: str | None = None,
        source: str = "cli",
    ) -> dict[str, Any]:
        if not prompt.strip():
            raise BadRequest("the prompt is empty")
        if not self.is_paired(peer):
            raise PeerUnknown(
                f"peer '{peer}' is not paired — run `claudectl relay pair` or "
                f"`claudectl relay join` first"
            )
        if peer not in self.mesh.connected_peers():
            raise PeerNotConnected(
                f"peer '{peer}' is not connected; check `claudectl relay "
                f"peers` and try again when it is"
            )
        task_id = self.ids.next("task")
        context = payloads.TaskContext(git_ref=git_ref or None)
        payload = payloads.build_delegate_task(task_id, prompt, cwd, context)
        now = self.clock.seconds()
        rec: dict[str, Any] = {
            "role": "controller",
            "task_id": task_id,
            "peer": peer,
            "prompt": prompt,
            "cwd": cwd,
            "git_ref": git_ref,
            "state": DELEGATED,
            "created_at": now,
            "updated_at": now,
            "ended_at": None,
            "stats": payloads.TaskStats().to_payload(),
            "last_message": None,
            "summary": None,
            "handoff": None,
            "version": 1,
            "source": source,
        }
        self.records[task_id] = rec
        self._save(rec)
        if not self.mesh.send(peer, DELEGATE_TASK, payload):
            del self.records[task_id]
            self.store.delete(safe_name(task_id))
            raise PeerNotConnected(f"peer '{peer}' is not connected")
        self._log.info("delegated task {task_id} to {peer}", task_id=task_id, peer=peer)
        self._arm(rec)
        return rec

    # --- unanswered tasks ------------------------------------------------------------
    def on_link_up(self, peer: str) -> None:
        """Send ``delegate_task`` again for this peer's tasks that got no answer yet."""
        for rec in list(self.records.values()):
            if rec["peer"] != peer or rec["state"] != DELEGATED:
                continue
            context = payloads.TaskContext(git_ref=rec.get("git_ref") or None)
            payload = payloads.build_delegate_task(
                rec["task_id"], rec["prompt"], rec.get("cwd"), context
            )
            if self.mesh.send(peer, DELEGATE_TASK, payload):
                self._log.info(
                    "sent task {task_id} to {peer} again (no answer yet)",
                    task_id=rec["task_id"],
                    peer=peer,
                )
                self._arm(rec)

    def _arm(self, rec: dict[str, Any]) -> None:
        task_id = rec["task_id"]
        self._disarm(task_id)
        if self.answer_timeout_secs and self.answer_timeout_secs > 0:
            self._answer_timers[task_id] = self.clock.callLater(
                self.answer_timeout_secs, self._no_answer, task_id
            )

    def _disarm(self, task_id: str) -> None:
        timer = self._answer_timers.pop(task_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _no_answer(self, task_id: str) -> None:
        self._answer_timers.pop(task_id, None)
        rec = self.records.get(task_id)
        if rec is None or rec["state"] != DELEGATED:
            return
        secs = int(self.answer_timeout_secs)
        rec["state"] = FAILED
        rec["no_answer"] = True
        rec["summary"] = (
            f"no answer from {rec['peer']} within {secs} s of sending the task "
            f"([delegation] answer_timeout_secs); the peer may have refused it "
            f"without saying so (claudectl 0.64 does) or the message was lost"
        )
        rec["last_message"] = f"no answer from {rec['peer']}"
        rec["ended_at"] = self.clock.seconds()
        self._log.warn(
            "task {task_id}: no answer from {peer} within {secs} s",
            task_id=task_id,
            peer=rec["peer"],
            secs=secs,
        )
        self._changed(rec)

    def interrupt(self, task_id: str, kind: str, reason: str = "") -> dict[str, Any]:
        rec = self.get(task_id)
        if kind not in (payloads.INTERRUPT_STOP, payloads.INTERRUPT_NUDGE):
            raise BadRequest(f"unknown interrupt type {kind!r}: use nudge or stop")
        if rec["state"] in FINISHED:
            raise TaskFinished(f"task {task_id} already {rec['state']}")
        if not self.mesh.send(
            rec["peer"], TASK_INTERRUPT, payloads.build_interrupt(task_id, kind, reason)
        ):
            raise PeerNotConnected(
                f"peer '{rec['peer']}' (which runs task {task_id}) is not "
                f"connected; try again when it is"
            )
        return rec

    def get(self, task_id: str) -> dict[str, Any]:
        rec = self.records.get(task_id)
        if rec is None:
            raise TaskUnknown(f"no delegated task {task_id!r} (see `claudectl relay status`)")
        return rec

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        """A record as ``relay status`` shows it (with elapsed and connectivity)."""
        return outgoing_view(rec, self.clock.seconds(), rec["peer"] in self.mesh.connected_peers())

    def list(self) -> list[dict[str, Any]]:
        recs = sorted(self.records.values(), key=lambda r: (r["created_at"], r["task_id"]))
        return [self.view(r) for r in recs]

    def wait_change(self, task_id: str, version: int, timeout: float) -> Deferred[dict[str, Any]]:
        """Fires with the record's view once its version passes ``version`` (or on timeout)."""
        rec = self.get(task_id)
        if rec["version"] > version or rec["state"] in FINISHED:
            d: Deferred[dict[str, Any]] = Deferred()
            d.callback(self.view(rec))
            return d
        d = Deferred()
        self._waiters.setdefault(task_id, []).append(d)
        call = self.clock.callLater(
            min(max(timeout, 0.0), MAX_WAIT_SECS), self._timeout, task_id, d
        )
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def _timeout(self, task_id: str, d: Deferred[dict[str, Any]]) -> None:
        waiters = self._waiters.get(task_id, [])
        if d in waiters:
            waiters.remove(d)
            d.callback(self.view(self.records[task_id]))

    # --- frames from workers ---------------------------------------------------------
    def on_status(self, peer: str, env: Envelope) -> None:
        try:
            status = payloads.parse_task_status(env.payload)
        except payloads.PayloadError as e:
            self._peer_log.warn(peer, "bad task_status from {peer}: {error}", error=str(e))
            return
        rec = self._owned(peer, status.task_id, "task_status")
        if "tail" in env.payload:
            if rec is None:
                self.counters["tail_ignored"] += 1
                return
            self._add_tail(rec["task_id"], env.payload["tail"])
            if rec["state"] != DELEGATED and not rec.get("no_answer"):
                return  # a tail frame: the regular statuses carry the state
        if rec is None or (rec["state"] in FINISHED and not rec.get("no_answer")):
            return
        self._revive(rec)
        rec["state"] = status.state if status.state in WIRE_STATUS else RUNNING
        rec["stats"] = status.stats.to_payload()
        if status.stats.last_activity is not None:
            rec["last_message"] = status.stats.last_activity
        self._changed(rec)

    def _add_tail(self, task_id: str, value: Any) -> None:
        now = self.clock.seconds()
        lines, dropped = parse_tail(value, now)
        self.counters["tail_dropped"] += dropped
        if not lines:
            return
        tail = self.tails.get(task_id)
        if tail is None:
            tail = self.tails[task_id] = Tail()
            while len(self.tails) > TAIL_TASKS:
                self.tails.popitem(last=False)
        self.tails.move_to_end(task_id)
        for at, text in lines:
            tail.add(at, text)
        self.counters["tail_lines"] += len(lines)

    def tail(self, task_id: str) -> builtins.list[dict[str, Any]]:
        """The live tail of a delegated task ([] when none arrived)."""
        tail = self.tails.get(task_id)
        return tail.view() if tail is not None else []

    def tail_seq(self, task_id: str) -> int:
        tail = self.tails.get(task_id)
        return tail.seq if tail is not None else 0

    def on_handoff(self, peer: str, env: Envelope) -> None:
        try:
            handoff = payloads.parse_handoff(env.payload)
        except payloads.PayloadError as e:
            self._peer_log.warn(peer, "bad task_handoff from {peer}: {error}", error=str(e))
            return
        rec = self.records.get(handoff.task_id)
        if rec is not None and rec["peer"] != peer:
            self._peer_log.warn(
                peer,
                "ignored task_handoff for {task_id} from {peer}: the task was delegated to {owner}",
                task_id=handoff.task_id,
                owner=rec["peer"],
            )
            return
        self.mesh.send(peer, ACK, payloads.build_ack(handoff.task_id))
        if rec is None:
            self._peer_log.info(
                peer,
                "task_handoff for unknown task {task_id} from {peer}: {summary}",
                task_id=handoff.task_id,
                summary=handoff.summary[:200],
            )
            return
        if rec["state"] in FINISHED and not rec.get("no_answer"):
            return  # a re-sent handoff: already recorded
        self._revive(rec)
        rec["state"] = handoff_state(handoff)
        stats = dict(rec.get("stats") or {})
        stats.update({"tokens_used": handoff.total_tokens, "cost_usd": handoff.total_cost_usd})
        if handoff.artifacts:
            stats["files_modified"] = list(handoff.artifacts)
        rec["stats"] = stats
        rec["summary"] = handoff.summary
        rec["last_message"] = handoff.summary.splitlines()[0][:200] if handoff.summary else None
        rec["handoff"] = handoff.to_payload()
        rec["ended_at"] = self.clock.seconds()
        self._peer_log.info(
            peer,
            "task {task_id} on {peer} {state}",
            task_id=handoff.task_id,
            state=rec["state"],
        )
        self._changed(rec)

    def _owned(self, peer: str, task_id: str, what: str) -> dict[str, Any] | None:
        rec = self.records.get(task_id)
        if rec is None:
            self._log.debug(
                "{what} for unknown task {task_id} from {peer}",
                what=what,
                task_id=task_id,
                peer=peer,
            )
            return None
        if rec["peer"] != peer:
            self._peer_log.warn(
                peer,
                "ignored {what} for {task_id} from {peer}: the task was delegated to {owner}",
                what=what,
                task_id=task_id,
                owner=rec["peer"],
            )
            return None
        return rec

    def _revive(self, rec: dict[str, Any]) -> None:
        """The peer answered: stop waiting, and undo an earlier "no answer"."""
        self._disarm(rec["task_id"])
        if rec.pop("no_answer", None):
            self._peer_log.info(
                rec["peer"],
                "task {task_id}: {peer} answered after all",
                task_id=rec["task_id"],
            )
            rec["summary"] = None
            rec["ended_at"] = None

    def _changed(self, rec: dict[str, Any]) -> None:
        rec["version"] += 1
        rec["updated_at"] = self.clock.seconds()
        self._save(rec)
        for d in self._waiters.pop(rec["task_id"], []):
            d.callback(self.view(rec))

    def _save(self, rec: dict[str, Any]) -> None:
        try:
            self.store.save(safe_name(rec["task_id"]), rec)
        except OSError:
            self._log.failure("could not save task {task_id}", task_id=rec["task_id"])
