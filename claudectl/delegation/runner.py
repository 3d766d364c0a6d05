# -*- test-case-name: tests.test_delegation_runner -*-
"""
Running a task file: local tasks through Claude Code here, ``peer`` tasks
delegated through the running relay service (defect D3), with dependencies
across both.

:class:`TaskFileRunner` only schedules; how one attempt runs is injected
(``run_local`` / ``run_remote``, each returning a Deferred
:class:`AttemptResult`).  A task starts when all its dependencies completed;
a failed or skipped dependency makes it ``skipped``.  Sequential by default
(file order), ``parallel`` starts every eligible task.  Failed attempts are
retried after max(1, min(attempts so far, 3)) s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from claudectl.delegation.taskfile import TaskDef, TaskFile, expand_template
from claudectl.delegation.taskstate import (
    COMPLETED,
    FAILED,
    PENDING,
    RETRYING,
    RUNNING,
    SKIPPED,
    TASKFILE_DONE,
)


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    #: What ``{{name.stdout}}`` expands to (Claude Code's final result text).
    output: str
    message: str
    cost_usd: float = 0.0
    tokens: int = 0


RunAttempt = Callable[[TaskDef, str, Callable[[str], None]], "Deferred[AttemptResult]"]


@dataclass
class TaskState:
    task: TaskDef
    status: str = PENDING
    attempts: int = 0
    message: str = ""
    output: str = ""
    cost_usd: float = 0.0
    tokens: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TaskFileRunner:
    _log = Logger()

    def __init__(
        self,
        taskfile: TaskFile,
        run_local: RunAttempt,
        run_remote: RunAttempt,
        clock: Any,
        report: Callable[[str], None],
        parallel: bool = False,
    ) -> None:
        self.taskfile = taskfile
        self.run_local = run_local
        self.run_remote = run_remote
        self.clock = clock
        self.report = report
        self.parallel = parallel
        self.states = {t.name: TaskState(t) for t in taskfile.tasks}
        self._done: Deferred[dict[str, TaskState]] = Deferred()
        #: A task that ends synchronously (it could not start) re-enters
        #: :meth:`_schedule` from inside it; the inner call only asks the
        #: outer one for another pass, so ``_done`` fires exactly once.
        self._scheduling = False
        self._again = False

    def run(self) -> Deferred[dict[str, TaskState]]:
        self._schedule()
        return self._done

    @property
    def all_completed(self) -> bool:
        return all(s.status == COMPLETED for s in self.states.values())

    def _schedule(self) -> None:
        if self._scheduling:
            self._again = True
            return
        self._scheduling = True
        try:
            self._again = True
            while self._again and not self._done.called:
                self._again = False
                self._schedule_pass()
        finally:
            self._scheduling = False

    def _schedule_pass(self) -> None:
        changed = True
        while changed:  # skipping one task can make others skippable
            changed = False
            for st in self.states.values():
                if st.status != PENDING:
                    continue
                bad = [d for d in st.task.depends_on if self.states[d].status in (FAILED, SKIPPED)]
                if bad:
                    st.status = SKIPPED
                    st.message = f"dependency failed: {', '.join(bad)}"
                    self.report(f"[{st.task.name}] skipped: {st.message}")
                    changed = True
        busy = any(s.status in (RUNNING, RETRYING) for s in self.states.values())
        for st in self.states.values():
            if st.status != PENDING:
                continue
            if not all(self.states[d].status == COMPLETED for d in st.task.depends_on):
                continue
            if busy and not self.parallel:
                break
            self._start(st)
            busy = True
        if all(s.status in TASKFILE_DONE for s in self.states.values()):
            self._done.callback(self.states)

    def _start(self, st: TaskState) -> None:
        st.status = RUNNING
        st.started_at = self.clock.seconds()
        ensureDeferred(self._run_task(st)).addErrback(self._crashed, st)

    def _crashed(self, failure: Any, st: TaskState) -> None:
        self._log.failure("task {name} crashed", failure, name=st.task.name)
        st.status = FAILED
        st.message = failure.getErrorMessage()
        self.report(f"[{st.task.name}] failed: {st.message}")
        self._schedule()

    async def _run_task(self, st: TaskState) -> None:
        task = st.task
        outputs = {name: s.output for name, s in self.states.items()}
        prompt = expand_template(task.prompt, outputs)
        max_attempts = self.taskfile.attempts(task)
        where = f"on {task.peer}" if task.peer else "locally"
        runner = self.run_remote if task.peer else self.run_local
        while True:
            st.attempts += 1
            st.status = RUNNING
            self.report(f"[{task.name}] started {where} (attempt {st.attempts}/{max_attempts})")

            def progress(text: str, name: str = task.name) -> None:
                self.report(f"[{name}] {text}")

            result = await runner(task, prompt, progress)
            st.output = result.output
            st.message = result.message
            st.cost_usd += result.cost_usd
            st.tokens += result.tokens
            if result.ok:
                st.status = COMPLETED
                break
            if st.attempts >= max_attempts:
                st.status = FAILED
                break
            delay = max(1, min(st.attempts, 3))
            st.status = RETRYING
            self.report(
                f"[{task.name}] attempt {st.attempts} failed: {result.message}; "
                f"retrying in {delay} s"
            )
            await deferLater(self.clock, delay, lambda: None)
        st.ended_at = self.clock.seconds()
        elapsed = int(st.ended_at - (st.started_at or st.ended_at))
        self.report(
            f"[{task.name}] {st.status} in {elapsed} s "
            f"(${st.cost_usd:.4f}, {st.tokens} tokens): {first_line(st.message)}"
        )
        self._schedule()


def first_line(text: str, limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
