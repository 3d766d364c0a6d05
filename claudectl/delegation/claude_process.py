# -*- test-case-name: tests.test_delegation_process -*-
"""
Running Claude Code: the thin Twisted layer around a :class:`TaskRun`.

The child is started as::

    <claude_command> <claude_args...> -p --output-format stream-json --verbose
        --input-format stream-json [--resume ID]

through the :mod:`claudectl.process.setsid_exec` trampoline, so it leads its
own process group.  The prompt is never on the command line: it is written to
stdin as a stream-json user message, so a prompt that starts with ``-`` is
still a prompt (defect D11).  Stdin stays open while the session runs so a
``nudge`` can be delivered as a further user message; it is closed when the
``result`` event arrives, which lets Claude Code exit.

Stopping sends SIGTERM to the whole group and SIGKILL after a grace period on
the injected clock.  Nothing the session started outlives it:

* when the direct child exits, its group gets SIGKILL at once (the group id
  cannot be reused while members remain, so this never hits a stranger);
* every process of the run carries ``CLAUDECTL_RUN_ID=<random>`` in its
  environment; when the run ends, processes with that tag that escaped the
  group (``setsid``) are killed too (:mod:`claudectl.process.sweep`);
* if something still holds the child's stdout/stderr :data:`DRAIN_SECS`
  after the child exited, those tagged processes are killed and our ends of
  the pipes are closed, so ``processEnded`` (which waits for every holder of
  the pipes) always comes and the run always ends.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from claudectl.delegation.taskrun import RunOutcome, TaskRun
from claudectl.lines import OVERLONG, LineSplitter
from claudectl.process import setsid_exec, sweep
from claudectl.process.sweep import RUN_ID_ENV

#: Longest stdout line kept; longer ones (huge tool results) are skipped.
MAX_LINE_BYTES = 8 * 1024 * 1024
#: After the child exited, how long others may hold its pipes before we close them.
DRAIN_SECS = 2.0
SETSID_EXEC = str(Path(setsid_exec.__file__).resolve())

#: Environment passed to Claude Code: these names, and names with these prefixes.
CHILD_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TERM",
        "TMPDIR",
        "TZ",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_CACHE_HOME",
        "XDG_STATE_HOME",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "GOOGLE_APPLICATION_CREDENTIALS",
    }
)
CHILD_ENV_PREFIXES = ("ANTHROPIC_", "CLAUDE_", "AWS_", "CLOUD_ML_", "VERTEX_")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"

Spawner = Callable[..., Any]
Killer = Callable[[int, int], None]
#: ``sweep(tags)``: kill the processes whose environment holds ``tags``.
Sweeper = Callable[[Mapping[str, str]], Any]


def new_run_id() -> str:
    return secrets.token_hex(12)


def claude_argv(
    command: str, extra_args: tuple[str, ...] | list[str] = (), resume: str | None = None
) -> list[str]:
    argv = [
        command,
        *extra_args,
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--input-format",
        "stream-json",
    ]
    if resume:
        argv += ["--resume", resume]
    return argv


def child_env(
    environ: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """An explicit environment for Claude Code (never everything we have)."""
    env = os.environ if environ is None else environ
    out = {k: v for k, v in env.items() if k in CHILD_ENV_NAMES or k.startswith(CHILD_ENV_PREFIXES)}
    out.setdefault("PATH", DEFAULT_PATH)
    if extra:
        out.update(extra)
    return out


def user_message(text: str) -> bytes:
    """One stream-json user message line for Claude Code's stdin."""
    event = {
        "type": "user",
        "session_id": "",
        "parent_tool_use_id": None,
        "message": {"role": "user", "content": [{"type": "text", "text": text}]},
    }
    return (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")


class ClaudeProcessProtocol(ProcessProtocol):
    """Routes the child's stdout line by line into a :class:`TaskRun`."""

    _log = Logger()

    def __init__(
        self,
        run: TaskRun,
        on_change: Callable[[], None],
        on_exited: Callable[[], None],
        on_ended: Callable[[], None],
        max_line: int = MAX_LINE_BYTES,
    ) -> None:
        self.run = run
        self._on_change = on_change
        self._on_exited = on_exited
        self._on_ended = on_ended
        self._lines = LineSplitter(max_line)
        self.overlong_lines = 0

    @property
    def max_line(self) -> int:
        """The longest stdout line kept (longer ones are skipped and counted)."""
        return self._lines.max_length

    @max_line.setter
    def max_line(self, value: int) -> None:
        self._lines.max_length = value

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._stdout(data)
        elif childFD == 2:
            self.run.stderr_received(data)

    def _stdout(self, data: bytes) -> None:
        for line in self._lines.feed(data):
            if line is OVERLONG:
                self._overlong()
            else:
                self._line(line)

    def _overlong(self) -> None:
        self.overlong_lines += 1
        self._log.warn(
            "task {task_id}: skipped a stdout line longer than {limit} bytes",
            task_id=self.run.task_id,
            limit=self.max_line,
        )

    def _line(self, line: bytes) -> None:
        had_result = self.run.progress.has_result
        if self.run.line_received(line):
            self._on_change()
        if self.run.progress.has_result and not had_result and self.transport is not None:
            # The session is over: closing stdin lets Claude Code exit.
            self.transport.closeStdin()

    def processExited(self, reason: Failure) -> None:
        self._on_exited()

    def processEnded(self, reason: Failure) -> None:
        last = self._lines.finish()
        if last is not None:
            self._line(last)
        value = reason.value
        exit_code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        self._on_ended()  # leftovers are cleaned up before the result is delivered
        self.run.ended(exit_code, sig)


class ClaudeProcess:
    """
    Starts, feeds and stops one Claude Code child for a :class:`TaskRun`.

    ``spawner`` has the signature of ``reactor.spawnProcess``; ``clock``
    provides ``callLater``; ``kill`` is :func:`os.killpg` and ``sweep`` is
    :func:`claudectl.process.sweep.kill_tagged` (both injected for tests).
    ``run_id`` tags every process of the run (``CLAUDECTL_RUN_ID``).
    """

    _log = Logger()

    def __init__(
        self,
        run: TaskRun,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        spawner: Spawner,
        clock: IReactorTime,
        stop_grace_secs: float = 10,
        on_change: Callable[[], None] = lambda: None,
        kill: Killer = os.killpg,
        python: str = sys.executable,
        run_id: str | None = None,
        sweep: Sweeper | None = None,
        drain_secs: float = DRAIN_SECS,
    ) -> None:
        self.run = run
        self.argv = argv
        self.cwd = cwd
        self.run_id = run_id or new_run_id()
        self.env = dict(env)
        self.env[RUN_ID_ENV] = self.run_id
        self._spawner = spawner
        self._clock = clock
        self.stop_grace_secs = stop_grace_secs
        self.drain_secs = drain_secs
        self._on_change = on_change
        self._kill = kill
        self._sweep = sweep if sweep is not None else sweep_tagged
        self._python = python
        self.pid: int | None = None
        self.protocol: ClaudeProcessProtocol | None = None
        self._kill_timer: IDelayedCall | None = None
        self._drain_timer: IDelayedCall | None = None
        self._stdin_open = False
        self._leader_gone = False
        self._ended_flag = False

    @property
    def tags(self) -> dict[str, str]:
        return {RUN_ID_ENV: self.run_id}

    def start(self, prompt: str) -> Deferred[RunOutcome]:
        """Spawn the child and send the prompt; returns ``run.result``.

        A run that already ended (stopped or shut down while it was being
        prepared) is never started.
        """
        if self.run.finished:
            return self.run.result
        program = self.argv[0]
        if shutil.which(program, path=self.env.get("PATH", DEFAULT_PATH)) is None:
            self.run.abort(
                f"could not start Claude Code: {program!r} was not found or is "
                f"not executable (PATH={self.env.get('PATH', '')}); set "
                f"[delegation] claude_command"
            )
            return self.run.result
        self.protocol = ClaudeProcessProtocol(self.run, self._on_change, self._exited, self._ended)
        args = [self._python, "-I", SETSID_EXEC, "--", *self.argv]
        try:
            transport = self._spawner(
                self.protocol, self._python, args, env=self.env, path=self.cwd
            )
        except Exception as e:  # OSError, or a bad cwd
            self.run.abort(f"could not start Claude Code: {e}")
            return self.run.result
        self.pid = transport.pid
        self.run.started()
        self._stdin_open = True
        transport.writeToChild(0, user_message(prompt))
        self._log.info(
            "task {task_id}: started Claude Code (pid {pid}) in {cwd}",
            task_id=self.run.task_id,
            pid=self.pid,
            cwd=self.cwd,
        )
        self._on_change()
        return self.run.result

    @property
    def can_take_input(self) -> bool:
        return (
            self._stdin_open
            and not self.run.finished
            and self.protocol is not None
            and not self.run.progress.has_result
            and self.protocol.transport is not None
        )

    @property
    def ended(self) -> bool:
        """True once the child and everything holding its pipes are gone."""
        return self._ended_flag

    def send_user_message(self, text: str) -> bool:
        """Write a user message to the running session; False if it cannot be."""
        if not self.can_take_input:
            return False
        assert self.protocol is not None and self.protocol.transport is not None
        try:
            self.protocol.transport.writeToChild(0, user_message(text))
        except (OSError, KeyError, ProcessExitedAlready):
            return False
        return True

    def stop(self, reason: str = "") -> Deferred[RunOutcome]:
        """Terminate the group: SIGTERM now, SIGKILL after the grace period."""
        self.run.request_stop(reason)
        self.terminate()
        return self.run.result

    def terminate(self) -> None:
        if self._ended_flag or self.pid is None:
            return
        if self._leader_gone:
            return  # the group already got SIGKILL; the drain timer ends the run
        self._signal(signal.SIGTERM)
        if self._kill_timer is None:
            self._kill_timer = self._clock.callLater(self.stop_grace_secs, self._sigkill)

    def _sigkill(self) -> None:
        self._kill_timer = None
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.pid is None:
            return
        try:
            self._kill(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            self._log.warn(
                "task {task_id}: not allowed to signal group {pid}",
                task_id=self.run.task_id,
                pid=self.pid,
            )

    def _exited(self) -> None:
        """The direct child is gone: nothing left in its group may live on."""
        self._stdin_open = False
        self._leader_gone = True
        self._cancel(self._kill_timer)
        self._kill_timer = None
        self._signal(signal.SIGKILL)
        if self._drain_timer is None and not self._ended_flag:
            self._drain_timer = self._clock.callLater(self.drain_secs, self._drain)

    def _drain(self) -> None:
        """Something outside the group still holds the pipes: end it, close ours."""
        self._drain_timer = None
        if self._ended_flag:
            return
        killed = self._sweep_quietly()
        self._log.warn(
            "task {task_id}: Claude Code exited {secs} s ago but its output "
            "pipes are still held; killed {n} leftover process(es) and closed them",
            task_id=self.run.task_id,
            secs=self.drain_secs,
            n=len(killed),
        )
        transport = self.protocol.transport if self.protocol is not None else None
        if transport is not None:
            try:
                transport.loseConnection()
            except Exception:
                self._log.failure(
                    "task {task_id}: closing the pipes failed", task_id=self.run.task_id
                )

    def _ended(self) -> None:
        self._ended_flag = True
        self._stdin_open = False
        if not self._leader_gone:
            self._leader_gone = True
            self._signal(signal.SIGKILL)
        for timer in (self._kill_timer, self._drain_timer):
            self._cancel(timer)
        self._kill_timer = self._drain_timer = None
        # Daemons that left the group (setsid) and closed their stdio.
        killed = self._sweep_quietly()
        if killed:
            self._log.info(
                "task {task_id}: killed {n} process(es) the session left behind",
                task_id=self.run.task_id,
                n=len(killed),
            )

    def _sweep_quietly(self) -> list[int]:
        try:
            return list(self._sweep(self.tags) or [])
        except Exception:
            self._log.failure(
                "task {task_id}: looking for leftover processes failed", task_id=self.run.task_id
            )
            return []

    @staticmethod
    def _cancel(timer: IDelayedCall | None) -> None:
        if timer is not None and timer.active():
            timer.cancel()


def sweep_tagged(tags: Mapping[str, str]) -> list[int]:
    return sweep.kill_tagged(tags)
