# -*- test-case-name: tests.test_workers -*-
"""
Worker state from session-carrying heartbeats (docs/protocol.md, Session).

A heartbeat whose payload holds a ``sessions`` array reports the Claude Code
sessions of a worker.  The state is stored under the *authenticated* link id
(``worker_id`` from the payload when it is a string, else the peer id) and
expires after three heartbeat intervals.  An empty payload is liveness only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("Needs Input", "Processing", "Waiting", "Idle", "Finished")
#: Bounds on what one peer can make us keep.
MAX_WORKERS_PER_PEER = 16
MAX_SESSIONS_PER_WORKER = 256


@dataclass
class WorkerState:
    worker_id: str
    peer_id: str
    sessions: list[dict[str, Any]] = field(default_factory=list)
    updated_at: float = 0.0


def parse_sessions(value: Any) -> list[dict[str, Any]] | None:
    """The valid session objects of a heartbeat payload, or None if there is no array."""
    if not isinstance(value, list):
        return None
    out = []
    for s in value:
        if (
            isinstance(s, dict)
            and isinstance(s.get("pid"), int)
            and not isinstance(s.get("pid"), bool)
            and isinstance(s.get("project"), str)
        ):
            status = s.get("status")
            out.append({**s, "status": status if status in STATUSES else "Idle"})
    return out


class WorkerTable:
    def __init__(self, now: Callable[[], float], interval: float) -> None:
        self._now = now
        self.interval = interval
        self._workers: dict[tuple[str, str], WorkerState] = {}

    def heartbeat(self, peer_id: str, payload: Any) -> WorkerState | None:
        """Record a heartbeat's sessions; None when it carried none."""
        if not isinstance(payload, dict):
            return None
        sessions = parse_sessions(payload.get("sessions"))
        if sessions is None:
            return None
        wid = payload.get("worker_id")
        worker_id = wid[:128] if isinstance(wid, str) and wid else peer_id
        self._expire()
        key = (peer_id, worker_id)  # a peer can only ever update its own workers
        if (
            key not in self._workers
            and sum(1 for p, _ in self._workers if p == peer_id) >= MAX_WORKERS_PER_PEER
        ):
            return None
        state = WorkerState(worker_id, peer_id, sessions[:MAX_SESSIONS_PER_WORKER], self._now())
        self._workers[key] = state
        return state

    def _expire(self) -> None:
        cutoff = self._now() - 3 * self.interval
        for key in [k for k, s in self._workers.items() if s.updated_at < cutoff]:
            del self._workers[key]

    def current(self) -> list[WorkerState]:
        self._expire()
        return sorted(self._workers.values(), key=lambda s: (s.worker_id, s.peer_id))
