# -*- test-case-name: tests.test_statestore -*-
"""
Noticing changes to state files made by other processes (issue 13).

:class:`ChangeWatcher` calls ``callback(name)`` when a watched file of a
watched directory was replaced, written or removed: through inotify
(:mod:`twisted.internet.inotify`) where the platform has it, else by a slow
poll of the files' ``stat()`` (every :data:`POLL_SECS`).  A CLI that
changes state also tells a running service over the control socket
(:mod:`claudectl.control.notice`), which ends in :meth:`ChangeWatcher.notice`:
the same callbacks, at once.

Bursts are coalesced: a name noticed several times within
:data:`SETTLE_SECS` gives one call, at the end of that time.  A name watched
``at_once`` is coalesced on the leading edge instead: its first notice is
passed on in the next reactor turn (a unit written into knowledge.jsonl
should start travelling at once, issue 16), and further notices within
:data:`SETTLE_SECS` after that call give one more call at the end of that
window -- still at most one call per window.  Callbacks
run on the reactor and must not block: they hand file work to the
:class:`~claudectl.statestore.StateWriter`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from claudectl.filesig import Signature, signature

log = Logger()

#: The poll period where inotify is missing.
POLL_SECS = 3.0
#: Notices of one name within this long are one call (for an ``at_once``
#: name: after a call, further notices within this long are one more call at
#: the end of the window).
SETTLE_SECS = 0.05


class ChangeWatcher:
    """``on(directory, name, callback)``; started and stopped with the service."""

    def __init__(self, clock: Any, reactor: Any = None) -> None:
        self.clock = clock
        self._reactor = reactor
        #: (directory, name) -> callbacks
        self._watched: dict[tuple[Path, str], list[Callable[[str], object]]] = {}
        self._sigs: dict[tuple[Path, str], Signature] = {}
        #: Keys passed on at once (leading edge).
        self._at_once: set[tuple[Path, str]] = set()
        #: key -> the call due for it; for an ``at_once`` key the leading
        #: call (next turn), or the end of the window after it (``_settling``).
        self._soon: dict[tuple[Path, str], Any] = {}
        self._settling: set[tuple[Path, str]] = set()
        #: Keys noticed again inside their settle window.
        self._again: set[tuple[Path, str]] = set()
        #: A watched file's path as inotify gives it (absolute, bytes) -> key.
        self._by_path: dict[bytes, tuple[Path, str]] = {}
        self._inotify: Any = None
        self._poll: LoopingCall | None = None
        self.mode = "stopped"

    def on(
        self,
        directory: Path,
        name: str,
        callback: Callable[[str], object],
        *,
        at_once: bool = False,
    ) -> None:
        key = (Path(directory), name)
        self._watched.setdefault(key, []).append(callback)
        # inotify's paths are absolute bytes (FilePath's): the key as they come.
        self._by_path[os.fsencode(os.path.abspath(key[0] / name))] = key
        if at_once:
            self._at_once.add(key)

    def names(self) -> list[str]:
        return sorted({name for _, name in self._watched})

    def start(self) -> None:
        for key in self._watched:
            self._sigs[key] = signature(key[0] / key[1])
        if self._start_inotify():
            self.mode = "inotify"
            return
        self.mode = "poll"
        self._poll = LoopingCall(self.poll)
        self._poll.clock = self.clock
        self._poll.start(POLL_SECS, now=False)

    def _start_inotify(self) -> bool:
        if self._reactor is None:
            return False
        try:
            from twisted.internet import inotify
        except ImportError:  # not Linux
            return False
        # A file written in place ends with IN_CLOSE_WRITE, one replaced with
        # IN_MOVED_TO: IN_CREATE would add an event per temporary file of
        # every atomic write (this service's own, one per merged batch).
        mask = inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE | inotify.IN_DELETE
        try:
            notifier = inotify.INotify(self._reactor)
            notifier.startReading()
            for directory in {d for d, _ in self._watched}:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                notifier.watch(FilePath(str(directory)), mask=mask, callbacks=[self._event])
        except Exception as e:
            log.info("no inotify ({error}): polling state files", error=str(e))
            return False
        self._inotify = notifier
        return True

    def stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        if self._inotify is not None:
            self._inotify.connectionLost(None)
            self._inotify = None
        for call in self._soon.values():
            if call.active():
                call.cancel()
        self._soon.clear()
        self._settling.clear()
        self._again.clear()
        self.mode = "stopped"

    def _event(self, _ignored: Any, path: FilePath[Any], _mask: int) -> None:
        # Most events are of files nobody watches (temporary files, locks):
        # they cost a dict lookup, not a Path.
        key = self._by_path.get(path.path)
        if key is not None:
            self._schedule(key)

    def notice(self, names: Iterable[str]) -> int:
        """Another process says these files changed; returns how many are watched."""
        wanted = set(names)
        hits = [key for key in self._watched if key[1] in wanted]
        for key in hits:
            self._schedule(key)
        return len(hits)

    def poll(self) -> None:
        """The slow poll where inotify is missing."""
        for key in self._watched:
            sig = signature(key[0] / key[1])
            if sig != self._sigs.get(key):
                self._sigs[key] = sig
                self._schedule(key)

    def _schedule(self, key: tuple[Path, str]) -> None:
        if key in self._settling:
            self._again.add(key)  # one more call when the window ends
            return
        if key in self._soon:
            return  # the call due covers this notice
        delay = 0 if key in self._at_once else SETTLE_SECS
        self._soon[key] = self.clock.callLater(delay, self._fire, key)

    def _fire(self, key: tuple[Path, str]) -> None:
        if key in self._at_once:
            self._settling.add(key)
            self._soon[key] = self.clock.callLater(SETTLE_SECS, self._settled, key)
        else:
            self._soon.pop(key, None)
        for callback in list(self._watched.get(key, ())):
            try:
                callback(key[1])
            except Exception:
                log.failure("change callback for {name} failed", name=key[1])

    def _settled(self, key: tuple[Path, str]) -> None:
        self._soon.pop(key, None)
        self._settling.discard(key)
        if key in self._again:
            self._again.discard(key)
            self._schedule(key)


class ChangeWatcherService(Service):
    name = "state-watcher"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, watcher: ChangeWatcher) -> None:
        self.watcher = watcher

    def startService(self) -> None:
        super().startService()
        self.watcher.start()

    def stopService(self) -> Any:
        self.watcher.stop()
        return super().stopService()
