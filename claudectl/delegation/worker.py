# -*- test-case-name: tests.test_delegation_worker -*-
"""
The worker side: run Claude Code for peers that delegate tasks to us.

:class:`DelegationWorker` receives ``delegate_task`` / ``task_interrupt`` /
``ack`` frames (with the *authenticated* peer id) and answers with
``task_status`` and ``task_handoff``.

* **Guard rails** (defect D9): the peer's trust must reach
  ``[delegation] min_trust``; ``cwd`` must lie under one of ``allowed_dirs``
  (empty = delegation refused) and exist; prompt and ``relevant_files``
  sizes are capped; at most ``max_concurrent`` tasks run, the others wait as
  ``queued`` (at most :data:`MAX_QUEUED_PER_PEER` per peer).  The checks run
  again when a queued task is about to start (trust may have dropped, or the
  worker restarted with another configuration).  A git source is a local
  directory under ``allowed_dirs`` or a network remote listed in
  ``allowed_git_remotes`` (see :mod:`~claudectl.delegation.gitws`).
* **Refusals are told** (D5): a refused task gets an immediate failed
  ``task_handoff`` whose summary is the reason.  A repeated ``delegate_task``
  for a known task gets that task's current status (or its handoff) again.
* **Live stats** (D4): from Claude Code's stream-json output.  ``task_status``
  goes out at the start, on changes (at most every
  :data:`CHANGE_STATUS_MIN_SECS`) and every ``status_interval_secs``.
* **Live tail**: what Claude is doing (tool uses with their target, its
  text, the result), as extra ``task_status`` frames with a ``"tail"``
  member, to peers of this project only (``mutual`` links): at most one
  frame per task every :data:`~claudectl.delegation.tail.TAIL_MIN_INTERVAL_SECS`,
  at most 20 cleaned lines of at most 200 characters each
  (:mod:`~claudectl.delegation.tail`).  claudectl 0.64 peers never get one.
* **Interrupts** (D6, D7): only the peer that delegated a task may interrupt
  it; ``nudge`` is written to the session's stdin; ``stop`` ends the process
  group and the task with a failed ``Stopped by controller`` handoff.
* **Nothing lost** (D1, D10, D12): records live in ``tasks/incoming/``; a
  handoff is re-sent on every link-up until the controller acks it (``ack``
  with ``ack_id`` = the task id; claudectl 0.64 peers never ack, so for them
  a successful send counts).  A task that was running when the worker died
  is reported failed ("worker restarted"), never re-run, and whatever is
  left of it is killed; queued tasks run.
* **Nothing outlives a stop** (D10): a stop or a shutdown while a task's git
  checkout is being made kills git and never starts Claude Code;
  :meth:`DelegationWorker.stop` waits for every running task to end, but no
  longer than ``stop_grace_secs`` + :data:`STOP_DEADLINE_EXTRA_SECS`.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    fail,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from claudectl.config import DelegationConfig
from claudectl.delegation import gitws, payloads
from claudectl.delegation.claude_process import (
    DRAIN_SECS,
    ClaudeProcess,
    Spawner,
    Sweeper,
    child_env,
    claude_argv,
    new_run_id,
    sweep_tagged,
)
from claudectl.delegation.store import TaskStore, incoming_key
from claudectl.delegation.tail import TAIL_FRAME_LINES, TAIL_MIN_INTERVAL_SECS, frame_lines
from claudectl.delegation.taskrun import RunOutcome, TaskRun
from claudectl.delegation.taskstate import COMPLETED, FINISHED, QUEUED, RUNNING, status_state
from claudectl.logbudget import PEER_LINES_PER_MINUTE, PeerLog
from claudectl.process.sweep import RUN_ID_ENV
from claudectl.relay.binding import TLS13
from claudectl.relay.codec import TASK_HANDOFF, TASK_STATUS, Envelope
from claudectl.relay.interfaces import IMesh

#: Least time between two "something changed" statuses of one task.
CHANGE_STATUS_MIN_SECS = 2.0
TICK_SECS = 1.0
#: Finished, acknowledged records older than this are deleted at start-up.
FINISHED_RETENTION_SECS = 30 * 86400
#: Finished task records kept per peer (the oldest go first, acknowledged
#: ones before the rest, with their workspaces): a trusted peer whose tasks
#: fail at once must not fill the disk and memory for FINISHED_RETENTION_SECS.
MAX_FINISHED_PER_PEER = 200
#: Handoffs re-sent on a link's return wait while this much is unsent to
#: the peer, and are tried again after RESEND_RETRY_SECS.
RESEND_BACKLOG_BYTES = 4 * 1024 * 1024
RESEND_RETRY_SECS = 0.5
RESTARTED_SUMMARY = "worker restarted while the task was running; its Claude Code session was ended"
SHUTDOWN_REASON = "the worker shut down while the task was running"
#: Tasks one peer may have waiting in the queue; more are refused.
MAX_QUEUED_PER_PEER = 32
#: :meth:`DelegationWorker.stop` gives up waiting this long after the grace
#: period (and the pipe drain) have passed.
STOP_DEADLINE_EXTRA_SECS = 5.0


@dataclass
class WorkerTask:
    peer: str
    request: payloads.DelegateTask
    cwd: str
    run: TaskRun
    key: str
    process: ClaudeProcess | None = None
    workspace: str | None = None
    git_ref: str | None = None
    handoff: dict[str, Any] | None = None
    handoff_acked: bool = False
    last_status_at: float | None = None
    sent_version: int = -1
    pgid: int | None = None
    run_id: str | None = None
    #: Where the git checkout comes from (set by the checks when one is asked for).
    git_source: str | None = None
    #: git commands in flight for this task (cancelled on stop/shutdown/timeout).
    git_calls: set[Deferred[Any]] = field(default_factory=set)
    #: Fires once the task ended and its handoff was stored.
    done: Deferred[None] = field(default_factory=Deferred)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Sequence number of the newest tail line sent, and when the last tail
    #: frame went out; the pending tail frame (rate limit).
    tail_sent: int = 0
    tail_at: float | None = None
    tail_call: Any = None

    @property
    def task_id(self) -> str:
        return self.request.task_id

    def record(self) -> dict[str, Any]:
        r = self.run
        return {
            "role": "worker",
            "peer": self.peer,
            "task_id": self.task_id,
            "prompt": self.request.prompt,
            "requested_cwd": self.request.cwd,
            "cwd": self.cwd,
            "context": self.request.context.to_payload(),
            "state": r.state,
            "accepted_at": r.accepted_at,
            "started_at": r.started_at,
            "ended_at": r.ended_at,
            "stats": r.stats().to_payload(),
            "session_id": r.progress.session_id,
            "workspace": self.workspace,
            "git_ref": self.git_ref,
            "pgid": self.pgid,
            "run_id": self.run_id,
            "handoff": self.handoff,
            "handoff_acked": self.handoff_acked,
        }


def incoming_view(rec: dict[str, Any], now: float, connected: bool) -> dict[str, Any]:
    """A task a peer delegated to this machine (a worker record), shaped like
    the controller's view so ``relay status`` shows both directions."""
    stats = rec.get("stats") or {}
    handoff = rec.get("handoff") or {}
    start = rec.get("accepted_at") or now
    end = rec.get("ended_at")
    finished = rec.get("state") in FINISHED
    elapsed = int((end if finished and end is not None else now) - start)
    return {
        "direction": "incoming",
        "task_id": rec["task_id"],
        "peer": rec.get("peer", ""),
        "state": rec.get("state", ""),
        "prompt": rec.get("prompt") or "",
        "cwd": rec.get("cwd"),
        "git_ref": rec.get("git_ref"),
        "created_at": start,
        "updated_at": end if end is not None else start,
        "elapsed_secs": max(0, elapsed),
        "tokens": stats.get("tokens_used", 0),
        "cost_usd": stats.get("cost_usd", 0.0),
        "context_pct": stats.get("context_pct", 0),
        "files_modified": stats.get("files_modified", []),
        "last_message": stats.get("last_activity"),
        "summary": handoff.get("summary"),
        "result_git_ref": handoff.get("git_ref"),
        "peer_connected": connected,
        "version": 0,
    }


class DelegationWorker:
    _log = Logger()

    def __init__(
        self,
        *,
        identity: str,
        config: DelegationConfig,
        mesh: IMesh,
        store: TaskStore,
        trust_of: Callable[[str], float],
        clock: Any,
        spawner: Spawner | None,
        home_root: Path,
        config_hint: str = "",
        environ: dict[str, str] | None = None,
        run_git: gitws.GitRunner | None = None,
        kill: Callable[[int, int], None] = os.killpg,
        sweep: Sweeper = sweep_tagged,
        drain_secs: float = DRAIN_SECS,
    ) -> None:
        self.identity = identity
        self.config = config
        self.mesh = mesh
        self.store = store
        self.trust_of = trust_of
        self.clock = clock
        #: Lines a peer's frames cause: a budget per peer, its strings cut.
        self._peer_log = PeerLog(self._log, clock.seconds, PEER_LINES_PER_MINUTE, "delegation")
        self.spawner = spawner
        self.home_root = home_root
        self.config_hint = config_hint or "~/.config/claudectl/config.toml"
        self.environ = environ
        self.run_git = run_git
        self.kill = kill
        self.sweep = sweep
        self.drain_secs = drain_secs
        self.tasks: dict[str, WorkerTask] = {}
        self.queue: list[str] = []
        self.counters = {
            "accepted": 0,
            "refused": 0,
            "bad_payload": 0,
            "interrupts_refused": 0,
            "tail_frames": 0,
            "records_pruned": 0,
        }
        self._loop: LoopingCall | None = None
        self._stopping = False
        #: peer -> the next try of :meth:`_resend_handoffs` (a busy link),
        #: and the keys of the handoffs its link has still to be sent.
        self._resend_calls: dict[str, Any] = {}
        self._resend_queue: dict[str, deque[str]] = {}
        self._starting = False

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self.recover()
        self._prune_workspaces()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(TICK_SECS, now=False)
        self._start_queued()

    def stop(self) -> Deferred[Any]:
        """Stop every running task (D10); the Deferred fires when all ended.

        Queued tasks stay queued on disk and run after the restart.  A task
        still preparing its git checkout ends at once (git is killed).  The
        wait is bounded: after ``stop_grace_secs`` + :data:`DRAIN_SECS` +
        :data:`STOP_DEADLINE_EXTRA_SECS` the Deferred fires anyway.
        """
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for call in self._resend_calls.values():
            if call.active():
                call.cancel()
        self._resend_calls.clear()
        self._resend_queue.clear()
        for task in self.tasks.values():
            self._cancel_tail(task)
        waits = []
        for task in list(self.tasks.values()):
            if task.run.state == QUEUED or task.run.finished:
                continue
            task.run.fail_with(SHUTDOWN_REASON)
            if task.process is not None:
                task.process.terminate()
            else:
                task.run.abort(SHUTDOWN_REASON)
                self._cancel_git(task)
            waits.append(task.done)
        if not waits:
            return succeed(None)
        return self._bounded(
            DeferredList(waits, consumeErrors=True),
            self.config.stop_grace_secs + self.drain_secs + STOP_DEADLINE_EXTRA_SECS,
        )

    def _bounded(self, d: Deferred[Any], secs: float) -> Deferred[None]:
        out: Deferred[None] = Deferred()

        def give_up() -> None:
            left = [
                t.task_id
                for t in self.tasks.values()
                if not t.done.called and t.run.state != QUEUED
            ]
            self._log.warn(
                "delegation: gave up waiting for {n} task(s) to end after {secs} s: {tasks}",
                n=len(left),
                secs=secs,
                tasks=left,
            )
            if not out.called:
                out.callback(None)

        timer = self.clock.callLater(secs, give_up)

        def fired(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(None)

        d.addBoth(fired)
        return out

    def recover(self) -> None:
        now = self.clock.seconds()
        for key, rec in self.store.load_all().items():
            try:
                task = self._from_record(key, rec)
            except (KeyError, TypeError, ValueError) as e:
                self._log.warn("ignoring task record {key}: {error}", key=key, error=str(e))
                continue
            state = rec.get("state")
            if state in FINISHED:
                ended = rec.get("ended_at") or 0
                if task.handoff_acked and now - ended > FINISHED_RETENTION_SECS:
                    self.store.delete(key)
                    self._remove_workspace(key)
                    continue
                self.tasks[key] = task
            elif state == RUNNING:
                self._kill_leftover(rec)
                self.tasks[key] = task
                task.run.started()
                task.run.abort(RESTARTED_SUMMARY)
            else:
                # Checked again (trust, allowed_dirs...) when it is about to start.
                self.tasks[key] = task
                self.queue.append(key)

    def _from_record(self, key: str, rec: dict[str, Any]) -> WorkerTask:
        request = payloads.DelegateTask(
            task_id=rec["task_id"],
            prompt=rec["prompt"],
            cwd=rec.get("requested_cwd"),
            context=payloads.parse_context(rec.get("context")),
        )
        run = TaskRun(rec["task_id"], self.clock.seconds)
        run.accepted_at = float(rec.get("accepted_at") or self.clock.seconds())
        task = WorkerTask(
            peer=rec["peer"],
            request=request,
            cwd=rec["cwd"],
            run=run,
            key=key,
            workspace=rec.get("workspace"),
            git_ref=rec.get("git_ref"),
            handoff=rec.get("handoff"),
            handoff_acked=bool(rec.get("handoff_acked")),
            pgid=rec.get("pgid") if isinstance(rec.get("pgid"), int) else None,
            run_id=rec.get("run_id") if isinstance(rec.get("run_id"), str) else None,
        )
        if rec.get("state") in FINISHED:
            run.state = rec["state"]
            run.started_at = rec.get("started_at")
            run.ended_at = rec.get("ended_at")
            stats = payloads.parse_stats(rec.get("stats"))
            run.progress.cost_usd = stats.cost_usd
            run.progress.files_modified = list(stats.files_modified)
            run.progress.last_activity = stats.last_activity
            run.progress._result_tokens = stats.tokens_used
            task.done.callback(None)
        else:
            run.result.addCallback(self._finished, task)
            self._watch_tail(task)
        return task

    def _kill_leftover(self, rec: dict[str, Any]) -> None:
        """End what a crashed worker left of a task: every process tagged with
        its run id (or, for older records, its task id and peer) in
        ``/proc/<pid>/environ``, and the group of its leader."""
        run_id = rec.get("run_id")
        if isinstance(run_id, str) and run_id:
            tags = {RUN_ID_ENV: run_id}
        else:
            tags = {
                "CLAUDECTL_TASK_ID": str(rec.get("task_id")),
                "CLAUDECTL_TASK_PEER": str(rec.get("peer")),
            }
        try:
            killed = list(self.sweep(tags) or [])
        except Exception:
            self._log.failure(
                "looking for leftovers of task {task_id} failed", task_id=rec.get("task_id")
            )
            return
        pgid = rec.get("pgid")
        if isinstance(pgid, int) and pgid > 1 and pgid in killed:
            try:
                self.kill(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if killed:
            self._log.info(
                "killed {n} leftover process(es) of task {task_id}",
                n=len(killed),
                task_id=rec.get("task_id"),
            )

    # --- inbound frames --------------------------------------------------------------
    def on_delegate(self, peer: str, env: Envelope) -> None:
        try:
            request = payloads.parse_delegate_task(env.payload)
        except payloads.PayloadError as e:
            self.counters["bad_payload"] += 1
            task_id = env.payload.get("task_id") if isinstance(env.payload, dict) else None
            if isinstance(task_id, str) and len(task_id) > payloads.MAX_TASK_ID_CHARS:
                task_id = None  # not echoed back: no answer, as to a frame without one
            self._peer_log.warn(peer, "bad delegate_task from {peer}: {error}", error=str(e))
            if isinstance(task_id, str):
                self._send(
                    peer,
                    TASK_HANDOFF,
                    payloads.build_failure(
                        task_id, f"refused by {self.identity}: bad delegate_task: {e}"
                    ),
                )
            return
        key = incoming_key(peer, request.task_id)
        existing = self.tasks.get(key)
        if existing is not None:
            self._peer_log.info(
                peer,
                "task {task_id} from {peer} is already known; re-sending its state",
                task_id=request.task_id,
            )
            if existing.run.finished and existing.handoff is not None:
                self._send_handoff(existing)
            else:
                self._send_status(existing)
            return
        try:
            self._check_link(peer)
            cwd, git_source = self._check(peer, request)
            waiting = sum(1 for k in self.queue if self.tasks[k].peer == peer)
            if waiting >= MAX_QUEUED_PER_PEER:
                raise Refused(
                    f"{waiting} tasks from {peer} are already waiting in the queue "
                    f"(at most {MAX_QUEUED_PER_PEER}); try again when some ended"
                )
        except Refused as e:
            self._refuse(peer, request.task_id, str(e))
            return
        except Exception:
            self._log.failure(
                "checking task {task_id} from {peer} failed", task_id=request.task_id, peer=peer
            )
            self._refuse(
                peer, request.task_id, "the task could not be checked (see the worker's log)"
            )
            return
        run = TaskRun(request.task_id, self.clock.seconds)
        task = WorkerTask(
            peer=peer, request=request, cwd=cwd, run=run, key=key, git_source=git_source
        )
        run.result.addCallback(self._finished, task)
        self._watch_tail(task)
        self.tasks[key] = task
        self.queue.append(key)
        self.counters["accepted"] += 1
        self._peer_log.info(
            peer,
            "accepted task {task_id} from {peer} in {cwd}",
            task_id=request.task_id,
            cwd=cwd,
        )
        self._save(task)
        self._start_queued()
        if task.run.state == QUEUED:
            position = self.queue.index(key) + 1
            run.set_note(
                f"queued: {position} waiting, {self.config.max_concurrent} running (max_concurrent)"
            )
            self._send_status(task)

    def _refuse(self, peer: str, task_id: str, reason: str) -> None:
        self.counters["refused"] += 1
        self._peer_log.info(
            peer,
            "refused task {task_id} from {peer}: {reason}",
            task_id=task_id,
            reason=reason,
        )
        self._send(
            peer,
            TASK_HANDOFF,
            payloads.build_failure(task_id, f"refused by {self.identity}: {reason}"),
        )

    def on_interrupt(self, peer: str, env: Envelope) -> None:
        try:
            req = payloads.parse_interrupt(env.payload)
        except payloads.PayloadError as e:
            self.counters["bad_payload"] += 1
            self._peer_log.warn(peer, "bad task_interrupt from {peer}: {error}", error=str(e))
            return
        task = self.tasks.get(incoming_key(peer, req.task_id))
        if task is None:
            owners = [t.peer for t in self.tasks.values() if t.task_id == req.task_id]
            if owners:
                self.counters["interrupts_refused"] += 1
                self._peer_log.warn(
                    peer,
                    "refused {kind} of task {task_id} from {peer}: the task "
                    "belongs to another peer",
                    kind=req.interrupt_type,
                    task_id=req.task_id,
                )
            else:
                self._peer_log.info(
                    peer,
                    "{kind} for unknown task {task_id} from {peer} ignored",
                    kind=req.interrupt_type,
                    task_id=req.task_id,
                )
            return
        self._peer_log.info(
            peer,
            "{kind} for task {task_id} from {peer}",
            kind=req.interrupt_type,
            task_id=req.task_id,
        )
        if task.run.finished:
            if task.handoff is not None:
                self._send_handoff(task)
            return
        if req.interrupt_type == payloads.INTERRUPT_STOP:
            self.stop_task(task, req.reason)
        elif req.interrupt_type == payloads.INTERRUPT_NUDGE:
            self.nudge_task(task, req.reason)
        else:
            task.run.set_note(
                f"interrupt {req.interrupt_type!r} is not supported (only stop and nudge)"
            )
            self._send_status(task)

    def on_ack(self, peer: str, env: Envelope) -> None:
        try:
            ack_id = payloads.parse_ack(env.payload)
        except payloads.PayloadError:
            return
        task = self.tasks.get(incoming_key(peer, ack_id))
        if task is not None and task.handoff is not None and not task.handoff_acked:
            task.handoff_acked = True
            self._save(task)
            self._prune_finished(peer)

    def _prune_finished(self, peer: str) -> None:
        """
        Keep at most MAX_FINISHED_PER_PEER finished records of ``peer``: the
        oldest acknowledged ones go first, then -- a peer that never acks must
        not keep them all -- the oldest whose handoff it never acknowledged.
        """
        done = [t for t in self.tasks.values() if t.peer == peer and t.run.finished]
        if len(done) <= MAX_FINISHED_PER_PEER:
            return
        done.sort(key=lambda t: (not t.handoff_acked, t.run.ended_at or 0.0, t.key))
        for task in done[: len(done) - MAX_FINISHED_PER_PEER]:
            del self.tasks[task.key]
            self.store.delete(task.key)
            self._remove_workspace(task.key)
        self.counters["records_pruned"] += len(done) - MAX_FINISHED_PER_PEER

    def on_link_up(self, peer: str) -> None:
        for task in list(self.tasks.values()):
            if task.peer != peer or task.run.finished:
                continue
            self._send_status(task)
            self._tail_soon(task)  # lines that came while the link was down
        # This link's re-send, from the start: each unacknowledged handoff
        # once, oldest first (a try left from the last link is void).
        pending = self._resend_calls.pop(peer, None)
        if pending is not None and pending.active():
            pending.cancel()
        waiting = sorted(
            (
                t
                for t in self.tasks.values()
                if t.peer == peer
                and t.run.finished
                and t.handoff is not None
                and not t.handoff_acked
            ),
            key=lambda t: (t.run.ended_at or 0.0, t.key),
        )
        self._resend_queue[peer] = deque(t.key for t in waiting)
        self._resend_handoffs(peer)

    def _resend_handoffs(self, peer: str) -> None:
        """
        The handoffs queued for ``peer`` at its link-up, each sent once,
        paced: each can be most of a megabyte (a long summary, 500 files),
        and a link with more than MAX_UNSENT_BYTES waiting would be closed --
        so while RESEND_BACKLOG_BYTES wait unsent, the rest wait for the next
        try.  (A handoff the peer does not acknowledge goes again at its next
        link-up, as before.)
        """
        self._resend_calls.pop(peer, None)
        queue = self._resend_queue.get(peer)
        while queue:
            if self.mesh.peer_mode(peer) is None:
                self._resend_queue.pop(peer, None)
                return  # the link went down: its next link-up starts again
            if self.mesh.unsent_bytes(peer) > RESEND_BACKLOG_BYTES:
                if not self._stopping:
                    self._resend_calls[peer] = self.clock.callLater(
                        RESEND_RETRY_SECS, self._resend_handoffs, peer
                    )
                return
            task = self.tasks.get(queue.popleft())
            if task is not None and task.handoff is not None and not task.handoff_acked:
                self._send_handoff(task)
        self._resend_queue.pop(peer, None)

    # --- actions ---------------------------------------------------------------------
    def stop_task(self, task: WorkerTask, reason: str = "") -> None:
        if task.run.state == QUEUED:
            if task.key in self.queue:
                self.queue.remove(task.key)
            task.run.cancel(reason)
        elif task.process is not None:
            task.process.stop(reason)
        else:
            # Still preparing its checkout: end now, kill git, never start Claude Code.
            task.run.cancel(reason)
            self._cancel_git(task)

    def nudge_task(self, task: WorkerTask, reason: str) -> None:
        text = reason.strip() or "(no message)"
        if task.process is not None and task.process.send_user_message(
            f"Message from {task.peer}, who delegated this task: {text}"
        ):
            task.run.set_note(f"nudge delivered: {text}")
        elif task.run.state == QUEUED:
            task.run.set_note(f"nudge not delivered: the task is still queued ({text})")
        elif task.process is None:
            task.run.set_note(f"nudge not delivered: the task is still being prepared ({text})")
        else:
            task.run.set_note(f"nudge not delivered: the session no longer takes input ({text})")
        self._send_status(task)

    def tick(self) -> None:
        try:
            now = self.clock.seconds()
            timeout = self.config.task_timeout_secs
            for task in list(self.tasks.values()):
                run = task.run
                if run.finished:
                    continue
                if (
                    timeout
                    and run.state == RUNNING
                    and run.started_at is not None
                    and now - run.started_at >= timeout
                    and not run.stop_requested
                ):
                    self._time_out(task, timeout)
                    if run.finished:
                        continue
                last = task.last_status_at
                if last is None:
                    continue
                if now - last >= self.config.status_interval_secs:
                    self._send_status(task)
                elif run.version != task.sent_version and now - last >= CHANGE_STATUS_MIN_SECS:
                    self._send_status(task)
        except Exception:
            self._log.failure("delegation tick failed")

    def _time_out(self, task: WorkerTask, timeout: int) -> None:
        reason = f"timed out after {timeout} s ([delegation] task_timeout_secs)"
        if task.process is not None:
            if task.run.failure_reason is None:
                task.run.fail_with(reason)
                task.process.terminate()
        else:
            # Still preparing (a slow clone): the timeout covers that too.
            task.run.abort(reason + " while preparing the git checkout")
            self._cancel_git(task)

    # --- validation ------------------------------------------------------------------
    def allowed_roots(self) -> list[str]:
        roots = []
        for d in self.config.allowed_dirs:
            if d == "~" or d.startswith("~/"):
                d = str(self.home_root) + d[1:]
            if os.path.isabs(d):
                try:
                    roots.append(os.path.realpath(d))
                except (ValueError, OSError):
                    continue
        return roots

    def _check_link(self, peer: str) -> None:
        """A task arrives only over an encrypted link, unless the owner allows plaintext."""
        if self.mesh.peer_transport(peer) != TLS13 and not self.config.allow_plaintext_tasks:
            raise Refused(
                f"the link from {peer} to {self.identity} is not encrypted (plaintext: "
                f"a claudectl 0.64 peer?), and anyone on the path could forge or read "
                f"a task; {self.identity}'s owner can accept tasks over plaintext "
                f"links with [delegation] allow_plaintext_tasks = true"
            )

    def _check(self, peer: str, request: payloads.DelegateTask) -> tuple[str, str | None]:
        """``(cwd, git source or None)`` for an acceptable task; raises :class:`Refused`."""
        trust = self.trust_of(peer)
        if trust < self.config.min_trust:
            raise Refused(
                f"peer {peer} has trust {trust:.2f}, below [delegation] min_trust "
                f"{self.config.min_trust:.2f}; raise it on {self.identity} with "
                f"`claudectl hive trust {peer} <level>`"
            )
        roots = self.allowed_roots()
        if not roots:
            raise Refused(
                f"delegation is disabled on {self.identity}: no directory is allowed. "
                f"To allow tasks in a project, add it to [delegation] allowed_dirs "
                f'in {self.config_hint} (for example allowed_dirs = ["/srv/proj"]) '
                f"and restart the relay"
            )
        if any(ord(c) < 32 for c in request.task_id):
            raise Refused("the task id contains control characters")
        size = len(request.prompt.encode("utf-8"))
        if size > self.config.max_prompt_bytes:
            raise Refused(
                f"prompt is {size} bytes, more than [delegation] max_prompt_bytes "
                f"{self.config.max_prompt_bytes}"
            )
        if not request.prompt.strip():
            raise Refused("the prompt is empty")
        try:
            payloads.check_relevant_files(request.context.relevant_files)
        except payloads.PayloadError as e:
            raise Refused(str(e)) from None
        cwd = self._check_dir(request.cwd if request.cwd is not None else roots[0], roots, "cwd")
        return cwd, self._check_git(request.context, cwd, roots)

    def _check_git(self, ctx: payloads.TaskContext, cwd: str, roots: list[str]) -> str | None:
        """Where a requested checkout comes from (None: no checkout asked for)."""
        if not (ctx.git_ref or ctx.git_commit):
            return None  # a git_remote alone asks for nothing
        if self.run_git is None:
            raise Refused("git checkouts are not available on this worker")
        try:
            if ctx.git_ref:
                gitws.check_ref(ctx.git_ref)
            if ctx.git_commit:
                gitws.check_commit(ctx.git_commit)
            if not ctx.git_remote:
                return cwd
            kind, where = gitws.parse_source(ctx.git_remote)
        except gitws.WorkspaceError as e:
            raise Refused(str(e)) from None
        if kind == gitws.LOCAL:
            return self._check_dir(where, roots, "git_remote")
        if not gitws.remote_allowed(where, self.config.allowed_git_remotes):
            listed = ", ".join(self.config.allowed_git_remotes) or "none"
            raise Refused(
                f"git_remote {where} is a network remote and {self.identity} only "
                f"fetches from [delegation] allowed_git_remotes (now: {listed}); "
                f"to allow it, add it (or a prefix) to allowed_git_remotes in "
                f"{self.config_hint}"
            )
        return where

    def _check_dir(self, path: str, roots: list[str], what: str) -> str:
        """The real path of ``path`` if it is a directory under ``roots``.

        Containment is decided before existence, so a refusal never tells a
        peer whether a directory outside ``allowed_dirs`` exists.
        """
        if not os.path.isabs(path):
            raise Refused(f"{what} {path!r} is not an absolute path")
        try:
            real = os.path.realpath(path)
        except (ValueError, OSError):
            raise Refused(f"{what} {path!r} is not a valid path") from None
        if not any(os.path.commonpath([root, real]) == root for root in roots):
            raise Refused(
                f"{what} {path} is not under [delegation] allowed_dirs on "
                f"{self.identity} ({', '.join(roots)}); add it to allowed_dirs in "
                f"{self.config_hint}"
            )
        try:
            is_dir = os.path.isdir(real)
        except (ValueError, OSError):
            is_dir = False
        if not is_dir:
            raise Refused(
                f"{what} {path} does not exist on {self.identity} (or is not a directory)"
            )
        return real

    # --- running ---------------------------------------------------------------------
    def views(self) -> list[dict[str, Any]]:
        """Every task peers delegated here that is still kept (recovered at start
        too, see :meth:`recover`), oldest first."""
        now = self.clock.seconds()
        connected = set(self.mesh.connected_peers())
        views = [incoming_view(t.record(), now, t.peer in connected) for t in self.tasks.values()]
        return sorted(views, key=lambda v: (v["created_at"], v["task_id"]))

    def running_count(self) -> int:
        return sum(1 for t in self.tasks.values() if t.run.state == RUNNING)

    def _start_queued(self) -> None:
        if self._stopping or self._starting:
            return  # no new task during a shutdown; no re-entry from a refusal's handoff
        self._starting = True
        try:
            while self.queue and self.running_count() < self.config.max_concurrent:
                task = self.tasks[self.queue.pop(0)]
                if task.run.finished:
                    continue
                try:
                    task.cwd, task.git_source = self._check(task.peer, task.request)
                except Refused as e:
                    self._peer_log.info(
                        task.peer,
                        "queued task {task_id} from {peer} no longer passes the checks: {reason}",
                        task_id=task.task_id,
                        reason=str(e),
                    )
                    self.counters["refused"] += 1
                    task.run.abort(f"refused by {self.identity}: {e}")
                    continue
                except Exception as e:
                    self._log.failure("checking queued task {task_id} failed", task_id=task.task_id)
                    task.run.abort(f"could not start the task: {e}")
                    continue
                task.run.started()
                self._save(task)
                ensureDeferred(self._launch(task)).addErrback(self._launch_failed, task)
        finally:
            self._starting = False

    def _launch_failed(self, failure: Any, task: WorkerTask) -> None:
        self._log.failure("could not launch task {task_id}", failure, task_id=task.task_id)
        task.run.abort(f"could not start the task: {failure.getErrorMessage()}")
        self._cancel_git(task)

    def _git_for(self, task: WorkerTask) -> gitws.GitRunner:
        """``run_git`` for one task: tracked, so a stop can cancel (kill) it."""
        assert self.run_git is not None
        run_git = self.run_git

        def run(args: list[str], cwd: str) -> Deferred[tuple[bytes, bytes, int]]:
            if task.run.finished:
                return fail(CancelledError())
            d = run_git(args, cwd)
            task.git_calls.add(d)

            def untrack(result: Any) -> Any:
                task.git_calls.discard(d)
                return result

            d.addBoth(untrack)
            return d

        return run

    def _cancel_git(self, task: WorkerTask) -> None:
        for d in list(task.git_calls):
            d.cancel()

    async def _launch(self, task: WorkerTask) -> None:
        ctx = task.request.context
        cwd = task.cwd
        if task.git_source is not None:
            task.run.set_note("preparing a git checkout")
            self._send_status(task)
            dest = self.store.workspace(task.key)
            try:
                if dest.exists():  # a leftover checkout goes on the writer thread
                    await self.store.remove_workspace(dest)
                await gitws.prepare(
                    self._git_for(task), task.git_source, dest, ctx.git_ref, ctx.git_commit
                )
            except CancelledError:
                self._remove_workspace(task.key)
                return  # whoever cancelled it ended the run
            except gitws.WorkspaceError as e:
                task.run.abort(f"git checkout failed: {e}")
                self._remove_workspace(task.key)
                return
            if task.run.finished:
                self._remove_workspace(task.key)
                return
            task.workspace = cwd = str(dest)
        if task.run.finished:
            return  # stopped, timed out or shut down meanwhile: never start Claude Code
        if self.spawner is None:
            task.run.abort("this worker cannot start processes")
            return
        cfg = self.config
        task.run_id = new_run_id()
        task.process = ClaudeProcess(
            task.run,
            claude_argv(cfg.claude_command, cfg.claude_args),
            cwd,
            child_env(
                self.environ, {"CLAUDECTL_TASK_ID": task.task_id, "CLAUDECTL_TASK_PEER": task.peer}
            ),
            self.spawner,
            self.clock,
            cfg.stop_grace_secs,
            kill=self.kill,
            run_id=task.run_id,
            sweep=self.sweep,
            drain_secs=self.drain_secs,
        )
        self._save(task)  # the run id first: a crash right after the spawn can be cleaned up
        task.process.start(task.request.prompt)
        task.pgid = task.process.pid
        if not task.run.finished:
            self._save(task)
            self._send_status(task)

    def _finished(self, outcome: RunOutcome, task: WorkerTask) -> RunOutcome:
        def done(result: Any) -> None:
            if not task.done.called:
                task.done.callback(None)

        ensureDeferred(self._handoff(outcome, task)).addErrback(
            lambda f: self._log.failure("handoff of {task_id} failed", f, task_id=task.task_id)
        ).addBoth(done)
        return outcome

    async def _handoff(self, outcome: RunOutcome, task: WorkerTask) -> None:
        if task.key in self.queue:
            self.queue.remove(task.key)
        git_ref = None
        if outcome.state == COMPLETED and self.run_git is not None:
            git_ref = await gitws.head(self.run_git, task.workspace or task.cwd)
        task.git_ref = git_ref
        handoff = payloads.TaskHandoff(
            task_id=task.task_id,
            state=outcome.wire_state,
            summary=outcome.summary,
            artifacts=outcome.files_modified,
            git_ref=git_ref,
            total_cost_usd=outcome.cost_usd,
            total_tokens=outcome.tokens,
        )
        task.handoff = handoff.to_payload()
        task.handoff_acked = False
        self._peer_log.info(
            task.peer,
            "task {task_id} from {peer} {state}: {summary}",
            task_id=task.task_id,
            state=outcome.state,
            summary=outcome.summary[:200],
        )
        self._save(task)
        self._send_handoff(task)
        self._prune_finished(task.peer)
        self._start_queued()

    # --- workspaces ------------------------------------------------------------------
    def _remove_workspace(self, key: str) -> None:
        path = self.store.workspace(key)
        if path.exists():
            self.store.remove_workspace(path)

    def _prune_workspaces(self) -> None:
        """Delete checkouts whose task record is gone (deleted, or never saved)."""
        root = self.store.workspace("x").parent
        try:
            entries = list(root.iterdir())
        except OSError:
            return
        for entry in entries:
            if self.store.path(entry.name).exists() or entry.name in self.tasks:
                continue
            if entry.is_dir() and not entry.is_symlink():
                self._log.info(
                    "removing the workspace {path}: its task record is gone", path=str(entry)
                )
                self.store.remove_workspace(entry)

    # --- sending ---------------------------------------------------------------------
    def _send(self, peer: str, msg_type: str, payload: dict[str, Any]) -> bool:
        try:
            return bool(self.mesh.send(peer, msg_type, payload))
        except Exception:
            self._log.failure("sending {msg_type} to {peer} failed", msg_type=msg_type, peer=peer)
            return False

    def _send_status(self, task: WorkerTask) -> None:
        run = task.run
        state = status_state(run.state)
        task.last_status_at = self.clock.seconds()
        task.sent_version = run.version
        self._send(
            task.peer, TASK_STATUS, payloads.build_task_status(task.task_id, state, run.stats())
        )

    # --- the live tail ---------------------------------------------------------------
    def _watch_tail(self, task: WorkerTask) -> None:
        task.run.on_tail = lambda: self._tail_soon(task)

    def _tail_soon(self, task: WorkerTask) -> None:
        """New tail lines: send them now, or once the rate limit allows."""
        if self._stopping or (task.tail_call is not None and task.tail_call.active()):
            return
        if self.mesh.peer_mode(task.peer) != "mutual":
            return  # claudectl 0.64 (or not connected): no tail frames
        wait = 0.0
        if task.tail_at is not None:
            wait = max(0.0, task.tail_at + TAIL_MIN_INTERVAL_SECS - self.clock.seconds())
        task.tail_call = self.clock.callLater(wait, self._send_tail, task)

    def _cancel_tail(self, task: WorkerTask) -> None:
        if task.tail_call is not None and task.tail_call.active():
            task.tail_call.cancel()
        task.tail_call = None

    def _send_tail(self, task: WorkerTask) -> None:
        task.tail_call = None
        if self.mesh.peer_mode(task.peer) != "mutual":
            return
        lines = task.run.tail.since(task.tail_sent, TAIL_FRAME_LINES)
        if not lines:
            return
        run = task.run
        state = status_state(run.state)
        payload = payloads.build_task_status(task.task_id, state, run.stats())
        payload["tail"] = frame_lines(lines)
        task.tail_at = self.clock.seconds()
        if not self._send(task.peer, TASK_STATUS, payload):
            return  # the link is down: the next line tries again
        self.counters["tail_frames"] += 1
        task.tail_sent = lines[-1][0]
        if run.tail.since(task.tail_sent, 1):
            self._tail_soon(task)  # more than one frame's worth: the rest in turn

    def tail_lines(self, key: str) -> list[dict[str, Any]]:
        """The live tail of a task run here (``key`` as in :attr:`tasks`)."""
        task = self.tasks.get(key)
        return task.run.tail.view() if task is not None else []

    def _send_handoff(self, task: WorkerTask) -> None:
        assert task.handoff is not None
        sent = self._send(task.peer, TASK_HANDOFF, task.handoff)
        if sent and self.mesh.peer_mode(task.peer) == "oneway" and not task.handoff_acked:
            # claudectl 0.64 never acks: a delivered frame is all we can know.
            task.handoff_acked = True
            self._save(task)

    def _save(self, task: WorkerTask) -> None:
        # On the writer thread; a failure is logged there.
        self.store.save(task.key, task.record())


class Refused(Exception):
    """A delegate_task the worker will not run; the message is the reason."""
