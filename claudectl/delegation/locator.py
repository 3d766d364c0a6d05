# -*- test-case-name: tests.test_delegation_locator -*-
"""The control-channel responders of the delegation layer."""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

from claudectl.delegation import commands as C
from claudectl.delegation.controller import BadRequest, DelegationController, TaskUnknown
from claudectl.delegation.tail import bounded as bounded_tail
from claudectl.delegation.text import cut_utf8

#: Budget for one page of the task list (AMP values are capped at 65,535).
PAGE_BYTES = 56_000
VIEW_PROMPT_BYTES = 2_000
VIEW_SUMMARY_BYTES = 16_000


def _compact(view: dict[str, Any]) -> dict[str, Any]:
    view = dict(view)
    view["prompt"], _ = cut_utf8(view["prompt"] or "", VIEW_PROMPT_BYTES)
    if view.get("summary"):
        view["summary"], _ = cut_utf8(view["summary"], VIEW_SUMMARY_BYTES)
    files = view.get("files_modified") or []
    if len(files) > 50:
        view["files_modified"] = files[:50] + [f"... and {len(files) - 50} more"]
    return view


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class DelegationLocator(amp.CommandLocator):
    def __init__(self, controller: DelegationController, worker: Any = None) -> None:
        super().__init__()
        self.controller = controller
        self.worker = worker

    @C.Delegate.responder
    def delegate(
        self, peer: str, prompt: str, cwd: str | None = None, git_ref: str | None = None
    ) -> dict[str, Any]:
        if len(prompt.encode("utf-8")) > C.MAX_CONTROL_PROMPT_BYTES:
            raise BadRequest(f"the prompt is longer than {C.MAX_CONTROL_PROMPT_BYTES} bytes")
        rec = self.controller.delegate(peer, prompt, cwd or None, git_ref or None)
        return {"task_id": rec["task_id"], "task_json": _dumps(_compact(self.controller.view(rec)))}

    @C.ListTasks.responder
    def list_tasks(
        self, task_id: str | None = None, offset: int | None = None, direction: str | None = None
    ) -> dict[str, Any]:
        if direction == "incoming":
            views = self.worker.views() if self.worker is not None else []
            if task_id:
                views = [v for v in views if v["task_id"] == task_id]
                if not views:
                    raise TaskUnknown(f"no task {task_id} was delegated to this machine")
        elif direction not in (None, "", "outgoing"):
            raise BadRequest(f"direction must be outgoing or incoming, not {direction!r}")
        elif task_id:
            views = [self.controller.view(self.controller.get(task_id))]
        else:
            views = self.controller.list()
        start = max(0, offset or 0)
        page: list[dict[str, Any]] = []
        size = 2
        i = start
        while i < len(views):
            item = _compact(views[i])
            n = len(_dumps(item).encode("utf-8")) + 1
            if page and size + n > PAGE_BYTES:
                break
            page.append(item)
            size += n
            i += 1
        return {
            "tasks_json": _dumps(page),
            "next_offset": i if i < len(views) else -1,
            "total": len(views),
        }

    @C.Interrupt.responder
    def interrupt(
        self, task_id: str, interrupt_type: str, reason: str | None = None
    ) -> dict[str, Any]:
        rec = self.controller.interrupt(task_id, interrupt_type, reason or "")
        return {"peer": rec["peer"]}

    @C.WatchTask.responder
    async def watch(self, task_id: str, version: int, timeout: float) -> dict[str, Any]:
        view = await self.controller.wait_change(task_id, version, timeout)
        return {"task_json": _dumps(_compact(view))}

    @C.TaskTail.responder
    def tail(self, task_id: str, direction: str | None = None) -> dict[str, Any]:
        if direction == "incoming":
            tasks = self.worker.tasks.values() if self.worker is not None else []
            found = [t for t in tasks if t.task_id == task_id]
            if not found:
                raise TaskUnknown(f"no task {task_id} was delegated to this machine")
            lines = found[0].run.tail.view()
        elif direction in (None, "", "outgoing"):
            self.controller.get(task_id)  # TaskUnknown if it is not ours
            lines = self.controller.tail(task_id)
        else:
            raise BadRequest(f"direction must be outgoing or incoming, not {direction!r}")
        return {"tail_json": _dumps(bounded_tail(lines, C.TAIL_BYTES))}
