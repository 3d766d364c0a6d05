# -*- test-case-name: tests.test_delegation_payloads -*-
"""
The delegation payloads, exactly as claudectl 0.64 shapes them
(docs/delegation.md).

Builders return plain dicts (the codec sorts the keys when it encodes the
envelope); parsers take whatever arrived in an envelope's ``payload`` and
return dataclasses or raise :class:`PayloadError` with a short reason.

Shapes worth remembering:

* ``delegate_task.context.dependency_graph`` is always present;
  the other context members are omitted when empty.
* ``context`` decodes entirely or not at all: one mistyped member yields the
  all-default context, silently, as in claudectl.
* ``task_handoff`` has ``git_ref`` (possibly null) only when completed; the
  failed form has no ``git_ref`` key at all.
* ``task_status.stats`` omits ``elapsed_secs``/``last_activity`` when unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from claudectl.delegation.taskstate import COMPLETED, FAILED

#: Sender-side (and, here, receiver-side) cap on the summed content bytes of
#: ``context.relevant_files`` (keys are not counted); exactly this passes.
MAX_RELEVANT_FILES_BYTES = 51_200

#: claudectl's fixed handoff summaries (used when we have nothing better).
SUMMARY_COMPLETED = "Task completed successfully"
SUMMARY_NONZERO = "Task exited with non-zero status"
SUMMARY_STOPPED = "Stopped by controller"

INTERRUPT_STOP = "stop"
INTERRUPT_NUDGE = "nudge"

_U64 = 2**64 - 1


class PayloadError(ValueError):
    """A payload that is not the shape claudectl defines."""


# --- small type checks --------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: The longest ``task_id`` taken (claudectl makes ``task_<epoch_ms>_<seq>``):
#: a peer's id is echoed in replies and logs, so it must stay small.
MAX_TASK_ID_CHARS = 256
#: The longest ``cwd`` taken (Linux's PATH_MAX).
MAX_CWD_CHARS = 4096
#: Of a task_status's ``files_modified``, the paths kept and their length;
#: of its ``last_activity``, the characters kept.
MAX_FILES_LISTED = 500
MAX_LISTED_PATH_CHARS = 1024
MAX_ACTIVITY_CHARS = 1000


def _task_id(payload: Any) -> str:
    value = _require_str(payload, "task_id")
    if len(value) > MAX_TASK_ID_CHARS:
        raise PayloadError(f"task_id is longer than {MAX_TASK_ID_CHARS} characters")
    return value


def _listed(paths: list[str]) -> tuple[str, ...]:
    """A worker's list of files as kept and shown: MAX_FILES_LISTED paths, each cut."""
    return tuple(f[:MAX_LISTED_PATH_CHARS] for f in paths[:MAX_FILES_LISTED])


def _require_str(payload: Any, name: str) -> str:
    if not isinstance(payload, dict):
        raise PayloadError("payload is not a JSON object")
    value = payload.get(name)
    if not isinstance(value, str):
        raise PayloadError(f"missing {name}")
    return value


# --- task ids -----------------------------------------------------------------------


def task_id_from_msg_id(msg_id: str) -> str:
    """``msg_<ms>_<n>`` -> ``task_<ms>_<n>`` (how ``relay delegate`` names tasks)."""
    if msg_id.startswith("msg_"):
        return "task_" + msg_id[len("msg_") :]
    return "task_" + msg_id


# --- delegate_task ------------------------------------------------------------------


@dataclass(frozen=True)
class DependencyGraph:
    blocks: tuple[str, ...] = ()
    blocked_by: tuple[str, ...] = ()

    def to_payload(self) -> dict[str, Any]:
        return {"blocked_by": list(self.blocked_by), "blocks": list(self.blocks)}


@dataclass(frozen=True)
class BrainContext:
    project_preferences: str
    recent_insights: tuple[str, ...] = ()

    def to_payload(self) -> dict[str, Any]:
        return {
            "project_preferences": self.project_preferences,
            "recent_insights": list(self.recent_insights),
        }


@dataclass(frozen=True)
class TaskContext:
    git_remote: str | None = None
    git_ref: str | None = None
    git_commit: str | None = None
    relevant_files: dict[str, str] = field(default_factory=dict)
    brain_context: BrainContext | None = None
    dependency_graph: DependencyGraph = field(default_factory=DependencyGraph)

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dependency_graph": self.dependency_graph.to_payload()}
        for name in ("git_remote", "git_ref", "git_commit"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.relevant_files:
            out["relevant_files"] = dict(self.relevant_files)
        if self.brain_context is not None:
            out["brain_context"] = self.brain_context.to_payload()
        return out


def relevant_files_bytes(files: dict[str, str]) -> int:
    """Summed UTF-8 size of the contents (keys are not counted)."""
    return sum(len(v.encode("utf-8")) for v in files.values())


def check_relevant_files(files: dict[str, str]) -> None:
    """Raise :class:`PayloadError` with claudectl's message when over the cap."""
    n = relevant_files_bytes(files)
    if n > MAX_RELEVANT_FILES_BYTES:
        raise PayloadError(
            f"relevant_files payload too large: {n} bytes (max {MAX_RELEVANT_FILES_BYTES})"
        )


def _parse_graph(v: Any) -> DependencyGraph:
    if not isinstance(v, dict):
        raise PayloadError("dependency_graph")
    blocks = v.get("blocks", [])
    blocked_by = v.get("blocked_by", [])
    if not (_is_str_list(blocks) and _is_str_list(blocked_by)):
        raise PayloadError("dependency_graph")
    return DependencyGraph(tuple(blocks), tuple(blocked_by))


def _parse_brain(v: Any) -> BrainContext:
    if not isinstance(v, dict) or not isinstance(v.get("project_preferences"), str):
        raise PayloadError("brain_context")
    insights = v.get("recent_insights", [])
    if not _is_str_list(insights):
        raise PayloadError("brain_context")
    return BrainContext(v["project_preferences"], tuple(insights))


def _parse_context_strict(v: Any) -> TaskContext:
    if not isinstance(v, dict):
        raise PayloadError("context")
    strs: dict[str, str | None] = {}
    for name in ("git_remote", "git_ref", "git_commit"):
        value = v.get(name)
        if value is not None and not isinstance(value, str):
            raise PayloadError(name)
        strs[name] = value
    files = v.get("relevant_files")
    if files is None:
        files = {}
    if not isinstance(files, dict) or not all(isinstance(x, str) for x in files.values()):
        raise PayloadError("relevant_files")
    brain = v.get("brain_context")
    graph = v.get("dependency_graph")
    return TaskContext(
        git_remote=strs["git_remote"],
        git_ref=strs["git_ref"],
        git_commit=strs["git_commit"],
        relevant_files=dict(files),
        brain_context=None if brain is None else _parse_brain(brain),
        dependency_graph=DependencyGraph() if graph is None else _parse_graph(graph),
    )


def parse_context(v: Any) -> TaskContext:
    """The context, or all defaults if any part of it does not decode."""
    try:
        return _parse_context_strict(v)
    except PayloadError:
        return TaskContext()


@dataclass(frozen=True)
class DelegateTask:
    task_id: str
    prompt: str
    cwd: str | None = None
    context: TaskContext = field(default_factory=TaskContext)

    def to_payload(self) -> dict[str, Any]:
        return build_delegate_task(self.task_id, self.prompt, self.cwd, self.context)


def build_delegate_task(
    task_id: str, prompt: str, cwd: str | None = None, context: TaskContext | None = None
) -> dict[str, Any]:
    """The ``delegate_task`` payload; raises :class:`PayloadError` if files are too big."""
    context = context or TaskContext()
    check_relevant_files(context.relevant_files)
    return {"context": context.to_payload(), "cwd": cwd, "prompt": prompt, "task_id": task_id}


def parse_delegate_task(payload: Any) -> DelegateTask:
    task_id = _task_id(payload)
    prompt = _require_str(payload, "prompt")
    cwd = payload.get("cwd")
    if isinstance(cwd, str) and len(cwd) > MAX_CWD_CHARS:
        raise PayloadError(f"cwd is longer than {MAX_CWD_CHARS} characters")
    return DelegateTask(
        task_id=task_id,
        prompt=prompt,
        cwd=cwd if isinstance(cwd, str) else None,
        context=parse_context(payload.get("context")),
    )


# --- task_status --------------------------------------------------------------------


@dataclass(frozen=True)
class TaskStats:
    tokens_used: int = 0
    cost_usd: float = 0.0
    context_pct: int = 0
    files_modified: tuple[str, ...] = ()
    elapsed_secs: int | None = None
    last_activity: str | None = None

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "context_pct": max(0, min(255, int(self.context_pct))),
            "cost_usd": float(self.cost_usd),
            "files_modified": list(self.files_modified),
            "tokens_used": max(0, min(_U64, int(self.tokens_used))),
        }
        if self.elapsed_secs is not None:
            out["elapsed_secs"] = max(0, int(self.elapsed_secs))
        if self.last_activity is not None:
            out["last_activity"] = self.last_activity
        return out


def parse_stats(v: Any) -> TaskStats:
    """All or nothing, as claudectl: any mistyped member gives the defaults."""
    if not isinstance(v, dict):
        return TaskStats()
    try:
        tokens = v.get("tokens_used", 0)
        cost = v.get("cost_usd", 0.0)
        pct = v.get("context_pct", 0)
        files = v.get("files_modified", [])
        elapsed = v.get("elapsed_secs")
        last = v.get("last_activity")
        if not (_is_int(tokens) and 0 <= tokens <= _U64):
            raise PayloadError("tokens_used")
        if not _is_number(cost):
            raise PayloadError("cost_usd")
        if not (_is_int(pct) and 0 <= pct <= 255):
            raise PayloadError("context_pct")
        if not _is_str_list(files):
            raise PayloadError("files_modified")
        if elapsed is not None and not (_is_int(elapsed) and elapsed >= 0):
            raise PayloadError("elapsed_secs")
        if last is not None and not isinstance(last, str):
            raise PayloadError("last_activity")
    except PayloadError:
        return TaskStats()
    # Kept as records and shown: bounded, whatever a worker sends.
    listed = _listed(files)
    if last is not None:
        last = last[:MAX_ACTIVITY_CHARS]
    return TaskStats(tokens, float(cost), pct, listed, elapsed, last)


@dataclass(frozen=True)
class TaskStatus:
    task_id: str
    state: str
    stats: TaskStats = field(default_factory=TaskStats)


def build_task_status(task_id: str, state: str, stats: TaskStats) -> dict[str, Any]:
    return {"state": state, "stats": stats.to_payload(), "task_id": task_id}


def parse_task_status(payload: Any) -> TaskStatus:
    task_id = _task_id(payload)
    state = _require_str(payload, "state")
    return TaskStatus(task_id, state, parse_stats(payload.get("stats")))


# --- task_handoff -------------------------------------------------------------------


@dataclass(frozen=True)
class TaskHandoff:
    task_id: str
    state: str
    summary: str
    artifacts: tuple[str, ...] = ()
    git_ref: str | None = None
    total_cost_usd: float = 0.0
    total_tokens: int = 0

    def to_payload(self) -> dict[str, Any]:
        if self.state == COMPLETED:
            return build_handoff(
                self.task_id,
                self.summary,
                list(self.artifacts),
                self.git_ref,
                self.total_cost_usd,
                self.total_tokens,
            )
        return build_failure(
            self.task_id, self.summary, self.total_cost_usd, self.total_tokens, list(self.artifacts)
        )


def build_handoff(
    task_id: str,
    summary: str,
    artifacts: list[str] | None = None,
    git_ref: str | None = None,
    total_cost_usd: float = 0.0,
    total_tokens: int = 0,
) -> dict[str, Any]:
    """A completed handoff (``git_ref`` is always present, maybe null)."""
    return {
        "artifacts": list(artifacts or []),
        "git_ref": git_ref,
        "state": COMPLETED,
        "summary": summary,
        "task_id": task_id,
        "total_cost_usd": float(total_cost_usd),
        "total_tokens": int(total_tokens),
    }


def build_failure(
    task_id: str,
    reason: str,
    total_cost_usd: float = 0.0,
    total_tokens: int = 0,
    artifacts: list[str] | None = None,
) -> dict[str, Any]:
    """A failed handoff: no ``git_ref`` key, the reason as the summary."""
    return {
        "artifacts": list(artifacts or []),
        "state": FAILED,
        "summary": reason,
        "task_id": task_id,
        "total_cost_usd": float(total_cost_usd),
        "total_tokens": int(total_tokens),
    }


def parse_handoff(payload: Any) -> TaskHandoff:
    task_id = _task_id(payload)
    state = _require_str(payload, "state")
    summary = payload.get("summary")
    artifacts = payload.get("artifacts", [])
    git_ref = payload.get("git_ref")
    cost = payload.get("total_cost_usd", 0.0)
    tokens = payload.get("total_tokens", 0)
    return TaskHandoff(
        task_id=task_id,
        state=state,
        summary=summary if isinstance(summary, str) else "",
        artifacts=_listed(artifacts) if _is_str_list(artifacts) else (),
        git_ref=git_ref if isinstance(git_ref, str) else None,
        total_cost_usd=float(cost) if _is_number(cost) else 0.0,
        total_tokens=tokens if _is_int(tokens) and tokens >= 0 else 0,
    )


# --- task_interrupt and ack ---------------------------------------------------------


@dataclass(frozen=True)
class TaskInterrupt:
    task_id: str
    interrupt_type: str
    reason: str = ""


def build_interrupt(task_id: str, interrupt_type: str, reason: str = "") -> dict[str, Any]:
    return {"interrupt_type": interrupt_type, "reason": reason, "task_id": task_id}


def parse_interrupt(payload: Any) -> TaskInterrupt:
    task_id = _task_id(payload)
    kind = _require_str(payload, "interrupt_type")
    reason = payload.get("reason", "")
    return TaskInterrupt(task_id, kind, reason if isinstance(reason, str) else "")


def build_ack(ack_id: str) -> dict[str, Any]:
    return {"ack_id": ack_id}


def parse_ack(payload: Any) -> str:
    return _require_str(payload, "ack_id")
