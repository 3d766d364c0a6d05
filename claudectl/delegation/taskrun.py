# -*- test-case-name: tests.test_taskrun -*-
"""
One run of Claude Code, as a reactor-free model.

A :class:`TaskRun` is told what happens to the child (started, a stdout line,
stderr bytes, a stop request, the exit) and decides the outcome.  Its
:attr:`~TaskRun.result` Deferred fires exactly once with a :class:`RunOutcome`.
Time comes from an injected ``now()`` callable.

States: ``queued`` -> ``running`` -> ``completed`` | ``failed`` | ``stopped``
(a queued run may also go straight to ``stopped`` or ``failed``).

The outcome is never decided by the exit status alone: a run completes only
when Claude Code printed a ``result`` event with ``is_error`` false *and*
exited 0.
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred

from claudectl.delegation import payloads
from claudectl.delegation.streamjson import StreamProgress, shorten
from claudectl.delegation.tail import Tail
from claudectl.delegation.taskstate import (
    COMPLETED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    STOPPED,
    wire_handoff_state,
)
from claudectl.delegation.text import cut_utf8

#: (the name callers imported before :mod:`~claudectl.delegation.taskstate`)
FINISHED_STATES = FINISHED

#: How much of the child's stderr is kept for failure messages.
STDERR_TAIL_BYTES = 4096
#: Longest handoff summary (bytes); the relay's frames are capped at 1 MiB.
MAX_SUMMARY_BYTES = 32_768
#: The trampoline writes this before exiting 127 when it cannot exec.
SPAWN_ERROR_MARKER = "claudectl-spawn-error:"


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class RunOutcome:
    state: str  # completed, failed or stopped
    summary: str
    cost_usd: float = 0.0
    tokens: int = 0
    files_modified: tuple[str, ...] = ()
    duration_secs: int = 0
    session_id: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    #: The final ``result`` text (what a task file's ``{{x.stdout}}`` means).
    result_text: str = ""

    @property
    def wire_state(self) -> str:
        """``task_handoff.state``: only completed or failed exist on the wire."""
        return wire_handoff_state(self.state)


class TaskRun:
    """The state of one Claude Code run."""

    def __init__(self, task_id: str, now: Callable[[], float]) -> None:
        self.task_id = task_id
        self._now = now
        self.state = QUEUED
        self.progress = StreamProgress()
        self.result: Deferred[RunOutcome] = Deferred()
        self.outcome: RunOutcome | None = None
        self.accepted_at = now()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.note: str | None = None
        self._stop_reason: str | None = None
        self._failure: str | None = None
        self._stderr = bytearray()
        #: Bumped on every change a controller could see.
        self.version = 0
        #: What Claude is doing, line by line (the live tail; memory only).
        self.tail = Tail()
        #: Called after new lines were added to :attr:`tail`.
        self.on_tail: Callable[[], None] | None = None

    # --- inputs ----------------------------------------------------------------------
    def started(self) -> None:
        if self.state != QUEUED:
            return
        self.state = RUNNING
        self.started_at = self._now()
        self.note = None
        self.version += 1

    def line_received(self, line: bytes | str) -> bool:
        before = self.progress.activity_count
        changed = self.progress.feed(line)
        if changed:
            self.version += 1
        new = min(self.progress.activity_count - before, len(self.progress.activity))
        if new > 0:
            now = self._now()
            for text in list(self.progress.activity)[-new:]:
                self.tail.add(now, text)
            self._tail_changed()
        return changed

    def _tail_changed(self) -> None:
        if self.on_tail is not None:
            self.on_tail()

    def stderr_received(self, data: bytes) -> None:
        self._stderr += data
        del self._stderr[:-STDERR_TAIL_BYTES]

    def set_note(self, note: str) -> None:
        """Something to show as the latest activity (e.g. a nudge delivered)."""
        self.note = shorten(note)
        self.version += 1
        if self.tail.add(self._now(), self.note):
            self._tail_changed()

    def request_stop(self, reason: str = "") -> None:
        """The controller asked to stop; the caller terminates the process."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def fail_with(self, reason: str) -> None:
        """Mark the run as failed for ``reason`` (e.g. a timeout) when it ends."""
        if self._failure is None:
            self._failure = reason

    @property
    def failure_reason(self) -> str | None:
        """What :meth:`fail_with` set, if anything."""
        return self._failure

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def stderr_tail(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    # --- endings ---------------------------------------------------------------------
    def cancel(self, reason: str = "") -> RunOutcome | None:
        """Stop a run that has no process: still queued, or still preparing its
        workspace.  The caller makes sure no process was started."""
        if self.finished:
            return None
        self.request_stop(reason)
        return self._finish(STOPPED, self._stopped_summary())

    def abort(self, reason: str) -> RunOutcome | None:
        """Fail a run before or without a process (spawn failure, bad workspace)."""
        if self.finished:
            return None
        return self._finish(FAILED, reason)

    def ended(self, exit_code: int | None, signal: int | None) -> RunOutcome | None:
        """The process ended (and its pipes closed)."""
        if self.finished:
            return None
        p = self.progress
        if self._stop_reason is not None:
            return self._finish(STOPPED, self._stopped_summary(), exit_code, signal)
        if self._failure is not None:
            return self._finish(FAILED, self._failure, exit_code, signal)
        spawn_error = self._spawn_error()
        if spawn_error is not None:
            return self._finish(
                FAILED, f"could not start Claude Code: {spawn_error}", exit_code, signal
            )
        if p.has_result and p.is_error:
            text = p.result_text or "Claude Code reported an error"
            return self._finish(FAILED, text, exit_code, signal)
        if exit_code not in (0, None) or (exit_code is None and signal is None):
            what = (
                f"Claude Code exited with status {exit_code}"
                if exit_code is not None
                else "Claude Code ended for an unknown reason"
            )
            return self._finish(FAILED, self._with_stderr(what), exit_code, signal)
        if signal is not None:
            return self._finish(
                FAILED,
                self._with_stderr(f"Claude Code was killed by {_signal_name(signal)}"),
                exit_code,
                signal,
            )
        if not p.has_result:
            return self._finish(
                FAILED, self._with_stderr("Claude Code exited without a result"), exit_code, signal
            )
        return self._finish(
            COMPLETED, p.result_text or payloads.SUMMARY_COMPLETED, exit_code, signal
        )

    # --- views -----------------------------------------------------------------------
    def elapsed(self) -> int:
        end = self.ended_at if self.ended_at is not None else self._now()
        start = self.accepted_at
        return max(0, int(end - start))

    def stats(self) -> payloads.TaskStats:
        p = self.progress
        activity = self.note or p.last_activity
        if self.state == QUEUED and activity is None:
            activity = QUEUED
        return payloads.TaskStats(
            tokens_used=p.tokens_used,
            cost_usd=p.cost_usd,
            context_pct=p.context_pct,
            files_modified=tuple(p.files_modified),
            elapsed_secs=self.elapsed(),
            last_activity=activity,
        )

    # --- internals -------------------------------------------------------------------
    def _stopped_summary(self) -> str:
        reason = (self._stop_reason or "").strip()
        return f"{payloads.SUMMARY_STOPPED}: {reason}" if reason else payloads.SUMMARY_STOPPED

    def _spawn_error(self) -> str | None:
        for line in self.stderr_tail().splitlines():
            if line.startswith(SPAWN_ERROR_MARKER):
                return line[len(SPAWN_ERROR_MARKER) :].strip()
        return None

    def _with_stderr(self, what: str) -> str:
        lines = [ln.strip() for ln in self.stderr_tail().splitlines() if ln.strip()]
        return f"{what}: {shorten(lines[-1], 300)}" if lines else what

    def _finish(
        self, state: str, summary: str, exit_code: int | None = None, signal: int | None = None
    ) -> RunOutcome:
        self.state = state
        self.ended_at = self._now()
        p = self.progress
        summary, _ = cut_utf8(summary, MAX_SUMMARY_BYTES)
        self.outcome = RunOutcome(
            state=state,
            summary=summary,
            cost_usd=p.cost_usd,
            tokens=p.tokens_used,
            files_modified=tuple(p.files_modified),
            duration_secs=self.elapsed(),
            session_id=p.session_id,
            exit_code=exit_code,
            signal=signal,
            result_text=p.result_text or "",
        )
        self.version += 1
        self.result.callback(self.outcome)
        return self.outcome
