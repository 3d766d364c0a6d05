# -*- test-case-name: tests.test_hive_store -*-
"""
The hive's bounded append-only logs (``conflicts.jsonl``,
``resolutions.jsonl``, ``collisions.jsonl``): below both the knowledge
store and the trust book, which each write one.
"""

from __future__ import annotations

from collections.abc import Iterable

from claudectl.atomic import fsync_append, locked
from claudectl.home import Home
from claudectl.lazylog import LazyLogger

log = LazyLogger(__name__)

COLLISIONS = "collisions.jsonl"


def append_log(home: Home, name: str, lines: Iterable[str], max_bytes: int) -> None:
    """
    Append ``lines`` to the log ``$HIVE/<name>`` (one write, one fsync) and
    keep it bounded: once it holds ``max_bytes`` or more, it is renamed to
    ``<name>.1`` (replacing the previous one) and a new log is started, so a
    log never takes more than about twice ``max_bytes`` of disk.
    """
    data = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if not data:
        return
    path = home.hive / name
    with locked(path):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > max_bytes:
            path.replace(path.with_name(name + ".1"))
            log.info(
                "{name} reached {max_bytes} bytes: rotated to {name}.1",
                name=name,
                max_bytes=max_bytes,
            )
        fsync_append(path, data.encode("utf-8"))
