# -*- test-case-name: tests.test_statestore -*-
"""
The service's stored state, off the reactor thread (issue 13).

Hive and delegation state lives in claudectl-compatible files (JSON and
JSON-lines under ``~/.claudectl``) that the CLI and claudectl processes
change too, under ``flock`` (:mod:`claudectl.atomic`).  Taking those locks,
rewriting, fsyncing and removing checkouts may wait for as long as another
process holds a lock -- so the service never does it on the reactor.

:class:`StateWriter` owns ONE writer thread (a thread pool of one, started
and stopped with the service).  :meth:`StateWriter.run` hands it a function
and returns a Deferred of the result, fired on the reactor.  One thread
means the work runs in the order it was queued, and two pieces of the
service's own file work never race each other.  The reactor keeps its
in-memory state; what crosses to the thread is a snapshot (bytes, frozen
units, copies), and what comes back is the thread's result.

Before the service starts and after it stopped (and in reactor-free tests)
the writer runs the work at once, on the calling thread, and returns an
already-fired Deferred.  :meth:`StateWriter.stop` waits for everything
queued -- also what queued work queues in turn -- so nothing is lost on stop.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

T = TypeVar("T")

THREAD_NAME = "claudectl-store"
#: sys.setswitchinterval() of the service (see StateWriterService).
SWITCH_INTERVAL_SECS = 0.001


class StateWriter:
    """Runs file work on one writer thread; Deferreds out."""

    def __init__(self, reactor: Any = None, name: str = THREAD_NAME) -> None:
        self._reactor = reactor
        self._name = name
        self._pool: ThreadPool | None = None
        self._pending: set[defer.Deferred[Any]] = set()
        #: Jobs done on the thread (for tests and ``relay status``).
        self.completed = 0

    @property
    def threaded(self) -> bool:
        """True while work goes to the writer thread (else it runs inline)."""
        return self._pool is not None

    def start(self) -> None:
        if self._pool is not None:
            return
        if self._reactor is None or not IReactorFromThreads.providedBy(self._reactor):
            return  # a memory reactor: keep running inline
        pool = ThreadPool(minthreads=1, maxthreads=1, name=self._name)
        pool.start()
        self._pool = pool

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        """``fn(*args, **kwargs)`` on the writer thread; its result on the reactor."""
        pool = self._pool
        if pool is None:
            return defer.maybeDeferred(fn, *args, **kwargs)
        d: defer.Deferred[T] = deferToThreadPool(self._reactor, pool, fn, *args, **kwargs)
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            self.completed += 1
            return result

        d.addBoth(done)
        return d

    def pending(self) -> int:
        return len(self._pending)

    async def drain(self) -> None:
        """Wait until nothing is queued (including work queued meanwhile)."""
        while self._pending:
            await defer.DeferredList(list(self._pending), consumeErrors=False)

    async def stop(self) -> None:
        """Wait for every queued job, then end the thread; later work runs inline."""
        await self.drain()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # the queue is empty: this returns at once


class StateWriterService(Service):
    """Starts the writer thread with the service; stopping waits for queued writes."""

    name = "state-writer"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, writer: StateWriter) -> None:
        self.writer = writer
        self._switch = sys.getswitchinterval()

    def startService(self) -> None:
        super().startService()
        # While the writer thread computes (parsing a big store, say), the
        # reactor waits for the GIL up to this long each time it wakes: 1 ms
        # instead of Python's 5 ms keeps it inside its stall budget.
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, SWITCH_INTERVAL_SECS))
        self.writer.start()

    async def _stop(self) -> None:
        await self.writer.stop()
        sys.setswitchinterval(self._switch)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


_bulk = threading.local()


@contextlib.contextmanager
def bulk_work() -> Iterator[None]:
    """
    Run a big piece of work (parsing or merging thousands of units) without
    the cyclic garbage collector, and keep what it leaves out of later
    collections.

    A collection runs holding the GIL, whichever thread triggers it, and a
    full one walks every object the process holds: with a store of 15,000
    units in memory that is tens to hundreds of milliseconds during which
    the reactor cannot run (docs/performance.md, "Reactor stalls").  So:

    * first, one collection of what is not frozen (small: what the service
      allocated since the last bulk work), so no cyclic garbage is frozen;
    * the work, with the collector paused;
    * then ``gc.freeze()``: what the work left (the units now cached) goes
      to the permanent generation, which no collection walks.  Frozen
      objects are still freed by reference counting when the cache drops
      them (units hold no reference cycles).

    Nested uses act as one.  The collector is left as it was found.
    """
    if getattr(_bulk, "depth", 0) or not gc.isenabled():
        _bulk.depth = getattr(_bulk, "depth", 0) + 1
        try:
            yield
        finally:
            _bulk.depth -= 1
        return
    gc.collect()
    gc.disable()
    _bulk.depth = 1
    try:
        yield
    finally:
        _bulk.depth = 0
        gc.freeze()
        gc.enable()


def freeze_startup_heap() -> None:
    """Collect once, then freeze what the service holds after its start
    (modules, classes, configuration): later collections skip it."""
    gc.collect()
    gc.freeze()


def logged(what: str) -> Callable[[Any], None]:
    """An errback that logs a failed job (the service goes on)."""

    def errback(failure: Any) -> None:
        log.failure("{what} failed", failure, what=what)

    return errback
