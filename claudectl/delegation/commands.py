# -*- test-case-name: tests.test_delegation_locator -*-
"""
AMP commands of the delegation layer on the control channel.

Command names are prefixed (``delegation.…``) so they never clash with the
relay core's commands.  Values that may be long (task lists, prompts) travel
as JSON text; the task list is paged with ``offset`` so every value stays
under AMP's 65,535-byte limit.
"""

from __future__ import annotations

from twisted.protocols import amp

from claudectl.delegation.controller import (
    BadRequest,
    PeerNotConnected,
    PeerUnknown,
    TaskFinished,
    TaskUnknown,
)

#: A prompt sent over the control channel must fit one AMP value.
MAX_CONTROL_PROMPT_BYTES = 60_000

ERRORS: dict[type[Exception], bytes] = {
    PeerUnknown: b"PEER_UNKNOWN",
    PeerNotConnected: b"PEER_NOT_CONNECTED",
    TaskUnknown: b"TASK_UNKNOWN",
    TaskFinished: b"TASK_FINISHED",
    BadRequest: b"BAD_REQUEST",
}


class Delegate(amp.Command):
    """Delegate a prompt to a connected peer; returns the new task id."""

    commandName = b"delegation.delegate"
    arguments = [
        (b"peer", amp.Unicode()),
        (b"prompt", amp.Unicode()),
        (b"cwd", amp.Unicode(optional=True)),
        (b"git_ref", amp.Unicode(optional=True)),
    ]
    response = [(b"task_id", amp.Unicode()), (b"task_json", amp.Unicode())]
    errors = ERRORS


class ListTasks(amp.Command):
    """Delegated tasks (or one), as a JSON list, from ``offset`` on.

    ``direction``: ``outgoing`` (default: tasks this machine delegated) or
    ``incoming`` (tasks peers delegated to this machine)."""

    commandName = b"delegation.list"
    arguments = [
        (b"task_id", amp.Unicode(optional=True)),
        (b"offset", amp.Integer(optional=True)),
        (b"direction", amp.Unicode(optional=True)),
    ]
    response = [
        (b"tasks_json", amp.Unicode()),
        (b"next_offset", amp.Integer()),  # -1: no more
        (b"total", amp.Integer()),
    ]
    errors = ERRORS


class Interrupt(amp.Command):
    """Send ``nudge`` or ``stop`` to the peer that runs the task."""

    commandName = b"delegation.interrupt"
    arguments = [
        (b"task_id", amp.Unicode()),
        (b"interrupt_type", amp.Unicode()),
        (b"reason", amp.Unicode(optional=True)),
    ]
    response = [(b"peer", amp.Unicode())]
    errors = ERRORS


class WatchTask(amp.Command):
    """Wait (up to ``timeout`` s) until the task's version passes ``version``."""

    commandName = b"delegation.watch"
    arguments = [
        (b"task_id", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"timeout", amp.Float()),
    ]
    response = [(b"task_json", amp.Unicode())]
    errors = ERRORS


class TaskTail(amp.Command):
    """The live tail of one task (``direction`` ``outgoing``, the default, or
    ``incoming``): a JSON list of ``{"at", "text"}``, oldest first, under
    ``TAIL_BYTES``."""

    commandName = b"delegation.tail"
    arguments = [
        (b"task_id", amp.Unicode()),
        (b"direction", amp.Unicode(optional=True)),
    ]
    response = [(b"tail_json", amp.Unicode())]
    errors = ERRORS


#: Budget of a ``delegation.tail`` answer (AMP values are capped at 65,535).
TAIL_BYTES = 56_000
