"""
The one vocabulary of task states, as claudectl 0.64 spells them on the wire
and in stored records (docs/delegation.md, docs/protocol.md).  The strings
are claudectl's and must stay byte-identical: they travel in
``task_status.state`` / ``task_handoff.state`` and are written to the task
records under ``~/.claudectl/relay/tasks/``.

A delegated task (both directions)::

    DELEGATED ──▶ QUEUED ──▶ RUNNING ──▶ COMPLETED | FAILED | STOPPED
    (controller:   (the worker's task_status)     (task_handoff; STOPPED is
     no answer yet)                                FAILED on the wire, with
                                                   the "Stopped by controller"
                                                   summary)

A task of a task file (``claudectl run FILE``) adds PENDING (not started:
waits for its dependencies), RETRYING and SKIPPED (a dependency failed).
"""

from __future__ import annotations

#: The controller sent ``delegate_task`` and has no answer yet.
DELEGATED = "delegated"
#: Accepted by the worker, waiting for a free slot.
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
#: Stopped by the controller (``task_interrupt`` stop).
STOPPED = "stopped"

#: Task files only.
PENDING = "pending"
RETRYING = "retrying"
SKIPPED = "skipped"

#: Nothing more happens to the task.
FINISHED = frozenset({COMPLETED, FAILED, STOPPED})
#: Shown first in the dashboard and counted as "active".
ACTIVE = frozenset({DELEGATED, QUEUED, RUNNING})
#: What ``task_status.state`` may carry.
WIRE_STATUS = frozenset({QUEUED, RUNNING})
#: A task-file task that will not change any more.
TASKFILE_DONE = frozenset({COMPLETED, FAILED, SKIPPED})


def wire_handoff_state(state: str) -> str:
    """``task_handoff.state`` of a finished task: ``completed`` or ``failed``."""
    return COMPLETED if state == COMPLETED else FAILED


def status_state(state: str) -> str:
    """``task_status.state`` of an unfinished task: ``queued`` or ``running``."""
    return QUEUED if state == QUEUED else RUNNING
