"""
The asynchronous store (issue 13): one writer thread, change notices,
nothing blocking the reactor, nothing written by an idle service.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl import changes
from claudectl.atomic import atomic_write
from claudectl.config import Config
from claudectl.control.lagprobe import LagProbe
from claudectl.control.notice import NoticeLocator, notify_service
from claudectl.hive import gossip as gossip_mod
from claudectl.hive.distill import CURSOR
from claudectl.hive.gossip import Gossip
from claudectl.relay.handshake import KeyAuth
from claudectl.relay.keystore import KeyStore
from claudectl.statestore import THREAD_NAME, StateWriter, bulk_work
from tests.common import FakeMesh, ServeProcess, make_node, run_cli, temp_home
from tests.test_gossip import NOW, put, stored, unit_json
from tests.test_services import RunningService


def writer_of(s: RunningService) -> StateWriter:
    assert s.svc is not None
    return s.svc.getServiceNamed("state-writer").writer  # type: ignore[attr-defined, no-any-return]


def watcher_of(s: RunningService) -> changes.ChangeWatcher:
    assert s.svc is not None
    return s.svc.getServiceNamed("state-watcher").watcher  # type: ignore[attr-defined, no-any-return]


def gossip_of(s: RunningService) -> Gossip:
    assert s.svc is not None
    hive = s.svc.getServiceNamed("hive")
    return hive.getServiceNamed("gossip").gossip  # type: ignore[attr-defined, no-any-return]


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


def file_states(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``root``: (mtime_ns, size, inode)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


class StateWriterTests(TestCase):
    def test_inline_until_started(self) -> None:
        writer = StateWriter(reactor)
        d = writer.run(threading.current_thread)
        self.assertIs(self.successResultOf(d), threading.current_thread())
        self.assertFalse(writer.threaded)

    async def test_one_thread_in_order(self) -> None:
        writer = StateWriter(reactor)
        writer.start()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(writer.stop()))
        seen: list[tuple[int, str]] = []
        ds = [
            writer.run(lambda i=i: seen.append((i, threading.current_thread().name)))
            for i in range(20)
        ]
        await defer.gatherResults(ds)
        self.assertEqual([i for i, _ in seen], list(range(20)))
        [name] = {name for _, name in seen}
        self.assertIn(THREAD_NAME, name)
        self.assertNotEqual(name, threading.current_thread().name)

    async def test_stop_waits_for_queued_writes(self) -> None:
        """Queued work, and work that queued work queues, is done before stop fires."""
        writer = StateWriter(reactor)
        writer.start()
        root = Path(self.mktemp())
        root.mkdir()

        def slow_write(name: str) -> str:
            time.sleep(0.2)
            atomic_write(root / name, b"x")
            return name

        d = writer.run(slow_write, "first")
        d.addCallback(lambda _: writer.run(slow_write, "second"))
        await defer.Deferred.fromCoroutine(writer.stop())
        self.assertEqual(sorted(os.listdir(root)), ["first", "second"])
        # After stop, work runs at once on the caller's thread.
        self.assertFalse(writer.threaded)
        self.assertEqual(self.successResultOf(writer.run(lambda: 7)), 7)

    async def test_a_lock_held_elsewhere_does_not_block_the_reactor(self) -> None:
        """The writer thread waits for another process's flock; the reactor runs on."""
        writer = StateWriter(reactor)
        writer.start()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(writer.stop()))
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        holder = hold_lock(self, target)
        from claudectl.atomic import locked

        def write() -> None:
            with locked(target):
                atomic_write(target, b"done")

        d = writer.run(write)
        started = time.monotonic()
        await deferLater(reactor, 0.3, lambda: None)
        self.assertLess(time.monotonic() - started, 0.5)  # the reactor ran on time
        self.assertFalse(d.called)  # the write waits for the lock
        release(holder)
        await d
        self.assertEqual(target.read_bytes(), b"done")


def hold_lock(testcase: Any, path: Path) -> subprocess.Popen[str]:
    """A real subprocess holding ``flock`` on ``<path>.lock`` until released."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path) + ".lock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    testcase.addCleanup(lambda: proc.poll() is None and proc.kill())
    testcase.addCleanup(lambda: proc.wait(5))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(5)


class BulkWorkTests(SynchronousTestCase):
    """The collector is paused during bulk work, and what it leaves is frozen."""

    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)

    def test_paused_then_frozen(self) -> None:
        kept: list[Any] = []
        with bulk_work():
            self.assertFalse(gc.isenabled())
            with bulk_work():  # nested: one bulk work
                kept.extend({"unit": i} for i in range(1000))
            self.assertFalse(gc.isenabled())
            frozen_inside = gc.get_freeze_count()
        self.assertTrue(gc.isenabled())
        self.assertGreaterEqual(gc.get_freeze_count(), frozen_inside + 1000)
        walked = {id(o) for o in gc.get_objects()}  # what collections walk
        self.assertNotIn(id(kept[0]), walked)

    def test_cyclic_garbage_collected_before_freezing(self) -> None:
        class Node:
            other: Any = None

        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = __import__("weakref").ref(a)
        del a, b
        with bulk_work():
            pass
        self.assertIsNone(gone())

    def test_collector_back_on_after_an_error(self) -> None:
        with self.assertRaises(RuntimeError):
            with bulk_work():
                raise RuntimeError("boom")
        self.assertTrue(gc.isenabled())

    def test_leaves_a_paused_collector_alone(self) -> None:
        gc.disable()
        self.addCleanup(gc.enable)
        before = gc.get_freeze_count()
        with bulk_work():
            pass
        self.assertFalse(gc.isenabled())
        self.assertEqual(gc.get_freeze_count(), before)


class ChangeWatcherTests(SynchronousTestCase):
    def test_slow_poll_where_inotify_is_missing(self) -> None:
        clock = Clock()
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        watcher = changes.ChangeWatcher(clock)  # no reactor: no inotify
        seen: list[str] = []
        watcher.on(home.hive, "knowledge.jsonl", seen.append)
        watcher.start()
        self.addCleanup(watcher.stop)
        self.assertEqual(watcher.mode, "poll")
        atomic_write(home.hive / "knowledge.jsonl", b"\n")
        clock.advance(changes.POLL_SECS - 0.5)
        self.assertEqual(seen, [])
        clock.advance(0.5)
        clock.advance(changes.SETTLE_SECS)
        self.assertEqual(seen, ["knowledge.jsonl"])
        clock.advance(changes.POLL_SECS * 3)  # nothing changed: no more calls
        self.assertEqual(seen, ["knowledge.jsonl"])

    def test_notices_are_coalesced(self) -> None:
        clock = Clock()
        watcher = changes.ChangeWatcher(clock)
        seen: list[str] = []
        watcher.on(Path("/nonexistent"), "trust.json", seen.append)
        self.assertEqual(watcher.notice(["trust.json", "other"]), 1)
        watcher.notice(["trust.json"])
        clock.advance(changes.SETTLE_SECS)
        self.assertEqual(seen, ["trust.json"])


class InotifyTests(TestCase):
    async def replace_two_files(self, watcher: changes.ChangeWatcher) -> list[str]:
        """``watcher`` on knowledge.jsonl: another file, then it, replaced atomically."""
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        seen: list[str] = []
        watcher.on(home.hive, "knowledge.jsonl", seen.append)
        watcher.start()
        self.addCleanup(watcher.stop)
        if watcher.mode != "inotify":
            raise self.skipTest("no inotify here")
        atomic_write(home.hive / "other.json", b"{}")
        atomic_write(home.hive / "knowledge.jsonl", b"\n")
        await wait_for(lambda: seen, 5, "the change notice")
        return seen

    async def test_inotify_sees_an_atomic_replace(self) -> None:
        seen = await self.replace_two_files(changes.ChangeWatcher(reactor, reactor))
        self.assertEqual(seen, ["knowledge.jsonl"])

    async def test_an_atomic_write_costs_two_events(self) -> None:
        """IN_CREATE is not watched: a temporary file's creation is no event
        (each atomic write of the service's own was three)."""
        watcher = changes.ChangeWatcher(reactor, reactor)
        events: list[int] = []
        real = watcher._event

        def counted(ignored: Any, path: Any, mask: int) -> None:
            events.append(mask)
            real(ignored, path, mask)

        watcher._event = counted  # type: ignore[method-assign]
        await self.replace_two_files(watcher)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(events), 4, events)

    async def test_inotify_sees_writes_in_place_and_removals(self) -> None:
        """Without IN_CREATE: a file written in place or removed is still noticed."""
        home = temp_home(self)
        home.hive.mkdir(parents=True)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(home.hive.parent)  # the directory given relative: inotify's paths are absolute
        watcher = changes.ChangeWatcher(reactor, reactor)
        seen: list[str] = []
        watcher.on(Path("hive"), "trust.json", seen.append)
        watcher.start()
        self.addCleanup(watcher.stop)
        if watcher.mode != "inotify":
            raise self.skipTest("no inotify here")
        (home.hive / "trust.json.lock").touch()  # not watched
        (home.hive / "trust.json").write_bytes(b"{}")  # created and written in place
        await wait_for(lambda: seen, 5, "the in-place write")
        await deferLater(reactor, 2 * changes.SETTLE_SECS, lambda: None)
        (home.hive / "trust.json").unlink()
        await wait_for(lambda: len(seen) == 2, 5, "the removal")
        self.assertEqual(seen, ["trust.json", "trust.json"])


class IdleWritesTests(SynchronousTestCase):
    def test_distill_timer_writes_nothing_when_idle(self) -> None:
        """The 5 s distillation timer rewrote distill_cursor.json every tick (issue 16)."""
        home = temp_home(self)
        clock = Clock()
        clock.advance(NOW)
        g = Gossip(home, Config(), FakeMesh("me-1"), "me-1", clock.seconds, clock.callLater)
        timer = TimerService(gossip_mod.DISTILL_POLL_SECS, g.distill_tick)
        timer.clock = clock
        timer.startService()
        self.addCleanup(timer.stopService)
        cursor = home.hive / CURSOR
        first = cursor.stat()
        before = file_states(home.root)
        for _ in range(10):
            clock.advance(gossip_mod.DISTILL_POLL_SECS)
        after = cursor.stat()
        self.assertEqual((first.st_mtime_ns, first.st_ino), (after.st_mtime_ns, after.st_ino))
        self.assertEqual(file_states(home.root), before)

    def test_sync_state_writes_are_coalesced(self) -> None:
        """Requests no longer rewrite sync_state.json each: one write per STATE_SAVE_SECS."""
        home = temp_home(self)
        clock = Clock()
        clock.advance(NOW)
        mesh = FakeMesh("me-1")
        g = Gossip(home, Config(), mesh, "me-1", clock.seconds, clock.callLater)
        g.register()
        put(home, "me-1", unit_json("ku_1", "me-1"))
        mesh.peers["peer-a"] = "mutual"
        path = home.hive / gossip_mod.SYNC_STATE
        writes: list[Any] = []
        real = g.state.write
        g.state.write = lambda peers: (writes.append(peers), real(peers))  # type: ignore[method-assign]
        for _ in range(20):
            mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
            clock.advance(0.1)
            g._save_soon()  # as every change of the state asks
        self.assertEqual(writes, [])
        self.assertFalse(path.exists())
        clock.advance(gossip_mod.STATE_SAVE_SECS)
        self.assertEqual(len(writes), 1)
        self.assertIn("peer-a", json.loads(path.read_text()))
        clock.advance(gossip_mod.STATE_SAVE_SECS * 3)  # nothing changed since
        self.assertEqual(len(writes), 1)
        # Stopping writes what changed since.
        mesh.deliver("peer-a", "knowledge_request", {"since_epoch": 0})
        g.stop()
        self.assertEqual(len(writes), 2)


class LagProbeTests(SynchronousTestCase):
    def test_lag_is_how_late_the_timer_ran(self) -> None:
        clock = Clock()
        probe = LagProbe(clock, interval=0.001)
        probe.start()
        for _ in range(99):
            clock.advance(0.001)
        clock.advance(0.021)  # the reactor was held for 20 ms
        report = probe.report()
        self.assertEqual(report["samples"], 100)
        self.assertAlmostEqual(report["max_ms"], 20.0, places=1)
        self.assertLess(report["p50_ms"], 0.01)
        probe.reset()
        self.assertEqual(probe.report()["samples"], 0)
        probe.stop()


class ServiceTests(TestCase):
    """The service on the real reactor, its peers on real loopback TCP."""

    timeout = 60

    async def start_service(self) -> RunningService:
        s = RunningService(temp_home(self))
        KeyStore(s.home).ensure_identity()
        s.start()
        self.addCleanup(s.stop)
        await wait_for(lambda: s.node.listening_ports, 10, "the listener")
        return s

    def peer(self, s: RunningService, name: str) -> Any:
        node = make_node(self, name, reactor=reactor)
        psk = bytes([len(name)]) * 32
        node.keystore.save_key(s.node.identity, psk)
        KeyStore(s.home).save_key(name, psk)
        return node, KeyAuth(psk, s.node.identity)

    async def link(self, s: RunningService, node: Any, auth: Any) -> Any:
        proto = await node.open_link(f"127.0.0.1:{s.port}", auth)
        self.addCleanup(lambda: node.close_all())
        return proto

    async def test_handshakes_while_another_process_holds_the_store_lock(self) -> None:
        """
        A peer's batch waits on the writer thread for the CLI's lock; the
        service meanwhile accepts a new peer (handshake on loopback) and
        answers the control socket in time.
        """
        from claudectl.control import commands as C
        from claudectl.control.client import call_control

        s = await self.start_service()
        sender, auth = self.peer(s, "peer-send")
        await self.link(s, sender, auth)
        acks: list[Any] = []
        sender.mesh.add_handler("ack", lambda peer, env: acks.append(env.payload))
        holder = hold_lock(self, s.home.hive / "knowledge.jsonl")
        unit = unit_json("ku_locked", "peer-send", validated=int(time.time()))
        sender.mesh.send(
            s.node.identity, "knowledge_sync", {"sync_epoch": int(time.time()), "units": [unit]}
        )
        await wait_for(lambda: writer_of(s).pending() > 0, 5, "the merge to be queued")
        prober, auth2 = self.peer(s, "peer-probe")
        started = time.monotonic()
        await self.link(s, prober, auth2)
        self.assertLess(time.monotonic() - started, 2.0)
        started = time.monotonic()
        await call_control(reactor, s.home, C.Status)
        self.assertLess(time.monotonic() - started, 2.0)
        # A heartbeat from the sender is processed meanwhile (its sessions are recorded).
        sessions = [{"pid": 7, "project": "demo", "status": "Idle"}]
        sender.mesh.send(s.node.identity, "heartbeat", {"worker_id": "w-1", "sessions": sessions})
        await wait_for(
            lambda: [w.worker_id for w in s.node.workers.current()] == ["w-1"],
            2,
            "the heartbeat",
        )
        # The batch is still waiting for the lock: nothing merged, nothing acked.
        self.assertNotIn("ku_locked", stored(s.home))
        self.assertEqual(acks, [])
        release(holder)
        await wait_for(lambda: acks, 10, "the ack after the merge")
        self.assertIn("ku_locked", stored(s.home))

    async def test_a_cli_write_reaches_the_service_by_control_notice(self) -> None:
        """`hive import` (a real CLI process) tells the service; no poll, no inotify needed."""
        self.patch(changes, "POLL_SECS", 3600.0)
        s = RunningService(temp_home(self))
        me = KeyStore(s.home).ensure_identity()
        s.start()
        self.addCleanup(s.stop)
        # Forget inotify for this service: only the notice can tell it.
        watcher = watcher_of(s)
        watcher.stop()
        watcher._reactor = None
        watcher.start()
        self.assertEqual(watcher.mode, "poll")
        await wait_for(lambda: s.node.listening_ports, 10, "the listener")
        g = gossip_of(s)
        g._load_units()
        doc = Path(self.mktemp()).absolute()
        doc.write_text(json.dumps([unit_json("ku_cli", "peer-x", validated=int(time.time()))]))
        done = await deferToThread(run_cli, s.home, "hive", "import", str(doc))
        self.assertEqual(done.returncode, 0, done.stderr)
        await wait_for(
            lambda: any(u.id == "ku_cli" for u in g._load_units()), 5, "the service to reload"
        )
        self.assertTrue(me)

    async def test_stopping_writes_what_was_queued(self) -> None:
        """A sync-state change still waiting for its 5 s save is on disk once stop fires."""
        s = await self.start_service()
        g, writer = gossip_of(s), writer_of(s)
        g.state.peer("peer-late").cursor = 1234
        g._save_soon()
        path = s.home.hive / gossip_mod.SYNC_STATE
        self.assertFalse(path.exists())
        await s.stop()
        self.assertEqual(json.loads(path.read_text())["peer-late"]["cursor"], 1234)
        self.assertFalse(writer.threaded)  # the thread ended after the queue

    async def test_notify_without_a_service_does_nothing(self) -> None:
        home = temp_home(self)
        started = time.monotonic()
        self.assertFalse(await deferToThread(notify_service, home, ["knowledge.jsonl"]))
        self.assertLess(time.monotonic() - started, 1.0)


class NoticeLocatorTests(SynchronousTestCase):
    def test_names_reach_the_watcher(self) -> None:
        from twisted.test.iosim import connectedServerAndClient

        clock = Clock()
        watcher = changes.ChangeWatcher(clock)
        seen: list[str] = []
        watcher.on(Path("/x"), "knowledge.jsonl", seen.append)
        from claudectl.control.commands import StateChanged

        client, server, pump = connectedServerAndClient(
            lambda: amp.AMP(locator=NoticeLocator(watcher)), amp.AMP
        )
        d = client.callRemote(StateChanged, names=["knowledge.jsonl", "nope"])
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"watched": 1})
        clock.advance(changes.SETTLE_SECS)
        self.assertEqual(seen, ["knowledge.jsonl"])


class IdleServiceTests(SynchronousTestCase):
    def test_an_idle_service_writes_nothing(self) -> None:
        """
        A real `relay serve`, idle: no file under its home changes.  Takes
        about 8 s: it must outlast one distillation tick (5 s) and one
        sync-state period, which is what used to write.
        """
        home = temp_home(self)
        run_cli(home, "relay", "identity")
        proc = ServeProcess.serve(home, "--listen", "tcp:0:interface=127.0.0.1")
        self.addCleanup(proc.stop)
        proc.port()
        proc.expect("ready")
        time.sleep(1.0)  # start-up writes (cursor, service.json) are done
        before = file_states(home.root)
        time.sleep(gossip_mod.DISTILL_POLL_SECS + 1.5)
        after = file_states(home.root)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        self.assertEqual(changed, set(), "\n".join(proc.lines[-20:]))
