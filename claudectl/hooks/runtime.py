# -*- test-case-name: tests.test_hooks_entry -*-
"""
The hook process's own limits, below both :mod:`claudectl.hooks.entry` (which
sets them) and :mod:`claudectl.hooks.events` (whose slow paths use them): the
SIGALRM deadline, whether work may finish in a detached child, and the error
log ``hooks.log``.  Imports nothing Python has not loaded at start-up.
"""

from __future__ import annotations

import os

from claudectl.hooks.files import append_bounded

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_LOG_BYTES = 256 * 1024
DEADLINE_SECS = 8


class Deadline(Exception):
    """The hook ran past :data:`DEADLINE_SECS`."""


#: Set by :func:`allow` from ``entry.run`` (only ``main`` allows; never in a
#: test's own process): the slow paths may arm a SIGALRM deadline, and may
#: finish work in a detached child.
_deadline_allowed: list[bool] = [False]


def allow(deadline: bool) -> None:
    _deadline_allowed[:] = [deadline]


def may_detach() -> bool:
    return _deadline_allowed[0]


def arm_deadline() -> None:
    """Give up after :data:`DEADLINE_SECS` (slow paths only: signal imports enum)."""
    if not _deadline_allowed[0]:
        return
    import signal

    try:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(DEADLINE_SECS)
    except (ValueError, OSError, AttributeError):
        pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise Deadline()


def log_error(home: Any, event: str | None, message: str) -> None:
    """One line in ``hooks.log``; a failure to log is ignored too."""
    try:
        import time

        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = f"{stamp} {event or '?'}: {message}".replace("\n", " ")[:2000] + "\n"
        path = os.path.join(str(home.data), "hooks", "hooks.log")
        append_bounded(path, line.encode("utf-8", "replace"), MAX_LOG_BYTES)
    except Exception:
        pass
