# -*- test-case-name: tests.test_delegation_store -*-
"""
Task records on disk, under ``~/.claudectl/relay/tasks/``.

* ``incoming/<peer>--<task>.json`` -- tasks peers delegated to this machine
  (the worker side).  Task ids are only unique per controller (claudectl makes
  ``task_<ms>_0`` in every fresh process), so the peer is part of the key.
* ``outgoing/<task>.json`` -- tasks this machine delegated (the controller).
* ``workspaces/<peer>--<task>/`` -- git checkouts made for tasks.

One pretty JSON object per file, written atomically (temp file, fsync,
rename), mode 0600.  A file that cannot be read is logged and left alone --
never deleted or overwritten by a load.

In the service, writes, deletions and checkout removals go to the writer
thread (:class:`claudectl.statestore.StateWriter`, in the order they were
asked for) and return Deferreds; the record is encoded on the caller's
thread, so the thread only sees bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from claudectl.atomic import atomic_write
from claudectl.statestore import StateWriter, logged

INCOMING = "incoming"
OUTGOING = "outgoing"
WORKSPACES = "workspaces"
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")

log = Logger()


def safe_name(task_id: str) -> str:
    """A file-name-safe form of an opaque task id (stable, collision-free)."""
    if _SAFE.match(task_id) and "--" not in task_id:
        return task_id
    return "x-" + hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:40]


def incoming_key(peer_id: str, task_id: str) -> str:
    return f"{peer_id}--{safe_name(task_id)}"


class TaskStore:
    """JSON records in one directory (``incoming`` or ``outgoing``)."""

    def __init__(self, tasks_root: Path, kind: str, writer: StateWriter | None = None) -> None:
        self.root = tasks_root
        self.dir = tasks_root / kind
        self.writer = writer or StateWriter()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def save(self, key: str, record: dict[str, Any]) -> Deferred[None]:
        data = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        d = self.writer.run(self._write, self.path(key), data.encode("utf-8"))
        d.addErrback(logged(f"saving task record {key}"))
        return d

    def _write(self, path: Path, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, data)

    def load(self, key: str) -> dict[str, Any] | None:
        return self._read(self.path(key))

    def delete(self, key: str) -> Deferred[None]:
        d = self.writer.run(_unlink, self.path(key))
        d.addErrback(logged(f"deleting task record {key}"))
        return d

    def remove_workspace(self, path: Path) -> Deferred[None]:
        """``rmtree`` a checkout on the writer thread (never on the reactor)."""
        d = self.writer.run(shutil.rmtree, path, ignore_errors=True)
        d.addErrback(logged(f"removing {path}"))
        return d

    def load_all(self) -> dict[str, dict[str, Any]]:
        """Every readable record by key; unreadable files are logged and kept."""
        out: dict[str, dict[str, Any]] = {}
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.json")):
            record = self._read(path)
            if record is not None:
                out[path.name[: -len(".json")]] = record
        return out

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warn(
                "ignoring unreadable task record {path}: {error}", path=str(path), error=str(e)
            )
            return None
        if not isinstance(record, dict) or not isinstance(record.get("task_id"), str):
            log.warn("ignoring task record {path}: not a task record", path=str(path))
            return None
        return record

    def workspace(self, key: str) -> Path:
        return self.root / WORKSPACES / key


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
