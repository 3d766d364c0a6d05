"""Tests for claudectl.atomic: atomic writes, appends and the advisory lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from claudectl.atomic import append_line, atomic_write, locked


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class AtomicWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.dir))

    def test_creates_parents_and_writes(self) -> None:
        path = self.dir / "a" / "b" / "file"
        atomic_write(path, "héllo")
        self.assertEqual(path.read_bytes(), "héllo".encode())
        self.assertEqual(_mode(path), 0o600)
        self.assertEqual(os.listdir(path.parent), ["file"])

    def test_temporary_names_are_what_the_sweep_looks_for(self) -> None:
        from claudectl.atomic import TEMP_NAME, _create_temp

        self.dir.mkdir()
        fd, tmp = _create_temp(self.dir / "knowledge.jsonl")
        os.close(fd)
        self.assertEqual(_mode(Path(tmp)), 0o600)
        self.assertIsNotNone(TEMP_NAME.match(os.path.basename(tmp)))

    def test_a_directory_removed_meanwhile_is_made_again(self) -> None:
        path = self.dir / "hive" / "file"
        atomic_write(path, "one")
        for name in os.listdir(path.parent):
            os.unlink(path.parent / name)
        os.rmdir(path.parent)  # (a user cleaning up under a running service)
        atomic_write(path, "two")
        self.assertEqual(path.read_bytes(), b"two")
        os.unlink(path)
        os.rmdir(path.parent)
        with locked(path):
            append_line(path, "three")
        self.assertEqual(path.read_bytes(), b"three\n")

    def test_mode_ignores_umask(self) -> None:
        old = os.umask(0o077)
        try:
            atomic_write(self.dir / "pub", b"x", mode=0o644)
        finally:
            os.umask(old)
        self.assertEqual(_mode(self.dir / "pub"), 0o644)

    def test_replace_changes_mode(self) -> None:
        path = self.dir / "k"
        atomic_write(path, b"1", mode=0o644)
        atomic_write(path, b"2", mode=0o600)
        self.assertEqual((path.read_bytes(), _mode(path)), (b"2", 0o600))

    def test_failed_write_leaves_old_file_and_no_temp(self) -> None:
        path = self.dir / "state.json"
        atomic_write(path, b"old")
        with self.assertRaises(TypeError):
            atomic_write(path, 12345)  # type: ignore[arg-type]
        self.assertEqual(path.read_bytes(), b"old")
        self.assertEqual(self.entries(), ["state.json"])

    def test_failed_rename_leaves_no_temp(self) -> None:
        target = self.dir / "is-a-dir"
        target.mkdir(parents=True)
        (target / "inside").write_text("keep")
        with self.assertRaises(OSError):
            atomic_write(target, b"data")
        self.assertEqual(self.entries(), ["is-a-dir"])
        self.assertEqual((target / "inside").read_text(), "keep")

    def test_interrupt_leaves_no_temp(self) -> None:
        """Even a KeyboardInterrupt mid-write cleans up."""
        path = self.dir / "f"
        atomic_write(path, b"old")

        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            raise KeyboardInterrupt

        os.fsync = fsync  # type: ignore[assignment]
        try:
            with self.assertRaises(KeyboardInterrupt):
                atomic_write(path, b"new")
        finally:
            os.fsync = real_fsync
        self.assertEqual(path.read_bytes(), b"old")
        self.assertEqual(self.entries(), ["f"])


class AppendTests(SynchronousTestCase):
    def test_lines(self) -> None:
        path = Path(self.mktemp()) / "log.jsonl"
        append_line(path, '{"a":1}')
        append_line(path, b'{"b":2}\n')
        self.assertEqual(path.read_bytes(), b'{"a":1}\n{"b":2}\n')
        self.assertEqual(_mode(path), 0o600)


_WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[3])
    from claudectl.atomic import locked
    path = sys.argv[1]
    for _ in range(int(sys.argv[2])):
        with locked(path):
            with open(path) as f:
                n = int(f.read() or 0)
            time.sleep(0)  # invite the other process in
            with open(path, "w") as f:
                f.write(str(n + 1))
""")


class LockTests(SynchronousTestCase):
    def test_two_processes_serialised(self) -> None:
        """Two writers doing read-modify-write 100 times each lose no update."""
        directory = Path(self.mktemp())
        directory.mkdir()
        counter = directory / "counter"
        counter.write_text("0")
        root = str(Path(__file__).resolve().parent.parent)
        procs = [
            subprocess.Popen([sys.executable, "-c", _WORKER, str(counter), "100", root])
            for _ in range(2)
        ]
        for p in procs:
            self.assertEqual(p.wait(timeout=60), 0)
        self.assertEqual(counter.read_text(), "200")
        # The lock file stays (removing it would race); the target is untouched otherwise.
        self.assertTrue((directory / "counter.lock").exists())
        self.assertEqual(_mode(directory / "counter.lock"), 0o600)

    def test_lock_released_on_error(self) -> None:
        path = Path(self.mktemp()) / "f"
        with self.assertRaises(ValueError):
            with locked(path):
                raise ValueError
        # Another process can take it now (a held flock would block it).
        root = str(Path(__file__).resolve().parent.parent)
        code = (
            "import sys; sys.path.insert(0, sys.argv[2]); import fcntl, os; "
            "fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(path) + ".lock", root], check=True, timeout=30
        )

    def test_held_lock_blocks_other_process(self) -> None:
        path = Path(self.mktemp()) / "f"
        code = (
            "import sys, fcntl, os; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
        )
        with locked(path):
            result = subprocess.run(
                [sys.executable, "-c", code, str(path) + ".lock"], capture_output=True, timeout=30
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(b"BlockingIOError", result.stderr)

    def test_shared_locks_coexist(self) -> None:
        path = Path(self.mktemp()) / "f"
        code = (
            "import sys, fcntl, os; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)"
        )
        with locked(path, shared=True):
            subprocess.run(
                [sys.executable, "-c", code, str(path) + ".lock"], check=True, timeout=30
            )


class SweepTests(SynchronousTestCase):
    """Temp files of interrupted writes are removed; nothing else is (issue 11, item 6)."""

    def test_removes_only_stale_unlocked_temp_files_of_our_pattern(self) -> None:
        import fcntl
        import time

        from claudectl.atomic import sweep_temp_files

        d = Path(self.mktemp())
        d.mkdir()
        old = time.time() - 60
        names = {
            "dead": ".knowledge.jsonl.ab12cd_9.tmp",  # a killed writer's: removed
            "fresh": ".trust.json.zz99yy88.tmp",  # just created: kept
            "alive": ".sync_state.json.q1w2e3r4.tmp",  # a live writer holds it: kept
            "foreign": ".notes.tmp",  # not our pattern: kept
            "other": "knowledge.jsonl",  # the real file: kept
            "long": ".x.abcdefghi.tmp",  # 9 random characters: kept
        }
        for key, name in names.items():
            (d / name).write_text(key)
            if key != "fresh":
                os.utime(d / name, (old, old))
        (d / ".dir.abcdefgh.tmp").mkdir()
        os.utime(d / ".dir.abcdefgh.tmp", (old, old))
        (d / ".link.abcdefgh.tmp").symlink_to(d / "knowledge.jsonl")
        fd = os.open(d / names["alive"], os.O_RDONLY)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed = sweep_temp_files([d, d / "missing"])
        self.assertEqual(removed, [d / names["dead"]])
        left = set(os.listdir(d))
        self.assertEqual(
            left,
            set(names.values()) - {names["dead"]} | {".dir.abcdefgh.tmp", ".link.abcdefgh.tmp"},
        )

    def test_a_writer_holds_its_temp_file_locked(self) -> None:
        import fcntl

        d = Path(self.mktemp())
        seen: list[bool] = []
        real_replace = os.replace

        def replace(src: str, dst: object) -> None:
            # During the write the temp file cannot be locked by anyone else.
            fd = os.open(src, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except OSError:
                seen.append(True)
            finally:
                os.close(fd)
            real_replace(src, dst)  # type: ignore[arg-type]

        self.patch(os, "replace", replace)
        atomic_write(d / "f", "x")
        self.assertEqual(seen, [True])


class NfsLockTests(SynchronousTestCase):
    """Where flock needs a descriptor open for writing (NFS), locks still work."""

    def test_an_exclusive_lock_falls_back_to_a_writable_descriptor(self) -> None:
        import errno
        import fcntl
        import os

        from claudectl import atomic

        real = fcntl.flock
        modes: list[int] = []

        def nfs_like(fd: int, how: int) -> None:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            modes.append(mode)
            if how & fcntl.LOCK_EX and mode == os.O_RDONLY:
                raise OSError(errno.EBADF, "Bad file descriptor")
            real(fd, how)

        self.patch(atomic.fcntl, "flock", nfs_like)
        target = Path(self.mktemp())
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic.locked(target):
            pass
        with atomic.locked(target, shared=True):
            pass
        self.assertEqual(modes[:2], [os.O_RDONLY, os.O_RDWR])  # tried, then reopened
        self.assertIn(os.O_RDONLY, modes[2:])  # shared locks stay read-only
