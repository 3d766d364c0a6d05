# -*- test-case-name: tests.test_tap -*-
"""
``~/.claudectl/relay/run/service.json``: what the running service listens on.

Written once the listener is bound and removed on a clean stop, so CLI
commands that only need to know the service's port (``relay invite``) can
read it without the reactor.  A file left by a dead process is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from claudectl.atomic import atomic_write
from claudectl.home import Home


def _path(home: Home) -> Any:
    return home.run_dir / "service.json"


def write_runinfo(home: Home, identity: str, ports: list[int]) -> None:
    home.ensure_private_dir(home.run_dir)
    atomic_write(
        _path(home),
        json.dumps({"pid": os.getpid(), "identity": identity, "ports": ports}),
        mode=0o600,
    )


def remove_runinfo(home: Home) -> None:
    with contextlib.suppress(FileNotFoundError):
        data = json.loads(_path(home).read_text())
        if data.get("pid") == os.getpid():
            _path(home).unlink()


def read_runinfo(home: Home) -> dict[str, Any] | None:
    """The running service's record, or None (no file, unreadable, or a dead pid)."""
    try:
        data = json.loads(_path(home).read_text())
        pid = int(data["pid"])
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return data if isinstance(data, dict) else None


def running_port(home: Home) -> int | None:
    data = read_runinfo(home)
    if not data:
        return None
    ports = [p for p in data.get("ports", []) if isinstance(p, int) and p > 0]
    return ports[0] if ports else None
