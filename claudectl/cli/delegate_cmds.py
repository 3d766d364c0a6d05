# -*- test-case-name: tests.test_delegation_cli -*-
"""
Delegation commands: ``relay delegate``, ``relay status``, ``relay interrupt``
and the top-level ``run <task file>``.

The relay commands talk to the running service over the control channel;
``run`` runs local tasks itself and delegates ``peer`` tasks through the
service.  Interrupted (Ctrl-C, SIGTERM), ``run`` stops its local Claude Code
sessions (whole process groups) before it exits, and says which remote tasks
keep running.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click

from claudectl.cli.base import CliContext, CliError, cli, pass_ctx, relay
from claudectl.cli.base import json_flag as _json_option
from claudectl.control.client import remote_error_text as _error_text
from claudectl.delegation import commands as C
from claudectl.delegation.taskrun import FINISHED_STATES
from claudectl.text import clean_line

TERMINAL = FINISHED_STATES
WATCH_SECS = 30.0
PROGRESS_MIN_SECS = 2.0


async def _call(
    reactor: Any, ctx: CliContext, command: type, *, absent_ok: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """One control-channel call; service and command errors become CliError
    (``absent_ok``: a service that is not running raises ServiceNotRunning)."""
    from twisted.internet.error import ConnectionClosed

    from claudectl.control.client import ServiceNotRunning, call_control

    try:
        return await call_control(reactor, ctx.home, command, **kwargs)
    except ServiceNotRunning as e:
        if absent_ok:
            raise
        raise CliError(str(e)) from None
    except tuple(C.ERRORS) as e:
        raise CliError(_error_text(e)) from None
    except ConnectionClosed:
        raise CliError(
            "lost the connection to the relay service (interrupted, or the service stopped)"
        ) from None


#: Costs from this up are shown as it (a peer's number, not a bill).
_COST_SHOWN_MAX = 1_000_000.0


def _cost(usd: float) -> str:
    """A task's cost as shown: ``$0.0123``; a peer's absurd figure kept narrow."""
    if not math.isfinite(usd) or usd < 0:
        return "$?"
    if usd >= _COST_SHOWN_MAX:
        return f">${_COST_SHOWN_MAX:,.0f}"
    return f"${usd:.4f}"


def _duration(secs: float | int) -> str:
    secs = int(secs)
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


class ProgressPrinter:
    """Prints a followed task's progress line when what it says changed: not
    again for a new state or elapsed time alone (a status that only moved the
    task from queued to running printed "preparing a git checkout" twice)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self._last: tuple[Any, ...] | None = None

    def __call__(self, view: dict[str, Any]) -> None:
        key = (view.get("last_message"), view.get("tokens"), view.get("cost_usd"))
        if key == self._last:
            return
        self._last = key
        self.out(f"  {_progress_line(view)}")


def _progress_line(task: dict[str, Any]) -> str:
    msg = clean_line(task.get("last_message") or "")
    return (
        f"{clean_line(task['state']):<9} {_duration(task['elapsed_secs']):>7}  "
        f"{task['tokens']:,} tokens  {_cost(task['cost_usd'])}  {msg}"
    ).rstrip()


async def follow(
    reactor: Any, ctx: CliContext, task_id: str, emit: Any, version: int = 0
) -> dict[str, Any]:
    """Follow a delegated task until it ends; ``emit(view)`` on every change."""
    while True:
        r = await _call(
            reactor, ctx, C.WatchTask, task_id=task_id, version=version, timeout=WATCH_SECS
        )
        task = json.loads(r["task_json"])
        if task["version"] != version:
            version = task["version"]
            emit(task)
        if task["state"] in TERMINAL:
            return task


# --- relay delegate -----------------------------------------------------------------


@relay.command()
@click.argument("peer")
@click.argument("prompt", nargs=-1, required=True)
@click.option(
    "--cwd",
    metavar="DIR",
    default=None,
    help="Directory on the peer to run in (must be in its [delegation] allowed_dirs; "
    "default: the peer's first allowed dir).",
)
@click.option(
    "--git-ref",
    metavar="REF",
    default=None,
    help="Run in a fresh checkout of REF (made on the peer from --cwd's repository).",
)
@click.option(
    "--wait",
    is_flag=True,
    help="Follow the task live until it ends; the exit status says whether it completed.",
)
@_json_option
@pass_ctx
async def delegate(
    ctx: CliContext,
    peer: str,
    prompt: tuple[str, ...],
    cwd: str | None,
    git_ref: str | None,
    wait: bool,
) -> None:
    """Run PROMPT with Claude Code on PEER (through the running relay service).

    Words after PEER form the prompt; use `--` before a prompt that starts
    with `-`.  Follow it with `claudectl relay status`.
    """
    text = " ".join(prompt)
    state: dict[str, Any] = {}

    async def go(reactor: Any) -> dict[str, Any] | None:
        r = await _call(reactor, ctx, C.Delegate, peer=peer, prompt=text, cwd=cwd, git_ref=git_ref)
        state["task_id"] = r["task_id"]
        task = json.loads(r["task_json"])
        if ctx.json and not wait:
            ctx.emit_json(
                {
                    "task_id": r["task_id"],
                    "peer": peer,
                    "prompt": text,
                    "cwd": cwd,
                    "status": "delegated",
                    "error": None,
                }
            )
        elif not ctx.json:
            ctx.out(f"Task {r['task_id']} delegated to peer {peer}")
            ctx.out(f"  Prompt: {text}")
            if cwd:
                ctx.out(f"  CWD: {cwd}")
            if git_ref:
                ctx.out(f"  Git ref: {git_ref}")
        if not wait:
            return None

        printer = ProgressPrinter(ctx.out)

        def emit(view: dict[str, Any]) -> None:
            if not ctx.json:
                printer(view)

        final = await follow(reactor, ctx, r["task_id"], emit, task["version"] - 1)
        return final

    def interrupted() -> CliError:
        # The reactor stops under us (Ctrl-C, SIGTERM) before the end.
        task_id = state.get("task_id")
        if task_id is None:
            return CliError("interrupted", code=130)
        return CliError(
            f"interrupted; task {task_id} keeps running on {peer}: follow it with "
            f"`claudectl relay status {task_id}`, stop it with "
            f"`claudectl relay interrupt {task_id} stop`",
            code=130,
        )

    ctx.on_interrupt = interrupted
    final = await ctx.run(go)
    if final is not None:
        if ctx.json:
            ctx.emit_json(final)
        else:
            ctx.out(
                f"Task {clean_line(final['task_id'])} {clean_line(final['state'])}: "
                f"{clean_line(final.get('summary') or '')}"
            )
        if final["state"] != "completed":
            raise CliError(f"task {final['task_id']} did not complete ({final['state']})")


# --- relay status -------------------------------------------------------------------

#: Live-tail lines ``relay status <task>`` prints (``--json`` has them all).
STATUS_TAIL_LINES = 20


def _clock(epoch: Any) -> str:
    import time

    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return "--:--:--"
    try:
        return time.strftime("%H:%M:%S", time.localtime(epoch))
    except (OverflowError, OSError, ValueError):
        return "--:--:--"


@relay.command()
@click.argument("task_id", required=False)
@_json_option
@pass_ctx
async def status(ctx: CliContext, task_id: str | None) -> None:
    """Show delegated tasks in both directions: those this machine delegated to
    peers (outgoing) and those peers delegated to this machine (incoming) --
    state, elapsed time, tokens, cost, last message.

    Without a running service it shows the stored tasks.
    """
    from claudectl.control.client import ServiceNotRunning

    async def fetch(reactor: Any, direction: str) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = []
        offset = 0
        while offset >= 0:
            kwargs: dict[str, Any] = {"offset": offset}
            if direction != "outgoing":
                kwargs["direction"] = direction
            r = await _call(reactor, ctx, C.ListTasks, absent_ok=True, **kwargs)
            tasks.extend(json.loads(r["tasks_json"]))
            offset = r["next_offset"]
        return tasks

    async def fetch_tail(reactor: Any, t: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            r = await _call(
                reactor,
                ctx,
                C.TaskTail,
                absent_ok=True,
                task_id=t["task_id"],
                direction=t["direction"],
            )
            lines = json.loads(r["tail_json"])
        except Exception:  # optional: an older service, or it stopped meanwhile
            return []
        return [x for x in lines if isinstance(x, dict)] if isinstance(lines, list) else []

    tail: list[dict[str, Any]] = []
    #: The service's own status (``--json``): identity, links, counters.
    node: dict[str, Any] = {}

    async def fetch_node(reactor: Any) -> None:
        from claudectl.control.commands import Status as ControlStatus

        parts: list[str] = []
        offset: int | None = 0
        try:
            while offset is not None and len(parts) < 1000:
                r = await _call(reactor, ctx, ControlStatus, absent_ok=True, offset=offset)
                parts.append(r["status_json"])
                offset = r.get("next_offset")
            value = json.loads("".join(parts))
        except Exception:  # optional: it stopped meanwhile
            return
        if isinstance(value, dict):
            node.update(value)

    async def go(reactor: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        try:
            found = await fetch(reactor, "outgoing"), await fetch(reactor, "incoming")
        except ServiceNotRunning:
            return None
        if ctx.json and not task_id:
            await fetch_node(reactor)
        for t in found[0] + found[1] if task_id else []:
            if t["task_id"] == task_id:
                tail.extend(await fetch_tail(reactor, t))
                break
        return found

    fetched = await ctx.run(go)
    running = fetched is not None
    outgoing, incoming = fetched if fetched is not None else _stored_tasks(ctx)
    if task_id:
        found = [t for t in outgoing + incoming if t["task_id"] == task_id]
        if not found:
            raise CliError(f"no delegated task {task_id!r} (see `claudectl relay status`)")
        t = found[0]
        if ctx.json:
            ctx.emit_json(dict(t, tail=tail) if running else t)
            return
        peer_label = "Peer" if t["direction"] == "outgoing" else "From"
        for label, value in (
            ("Task", t["task_id"]),
            (
                "Direction",
                "delegated to a peer (outgoing)"
                if t["direction"] == "outgoing"
                else "run here for a peer (incoming)",
            ),
            (peer_label, t["peer"] + ("" if t["peer_connected"] else " (not connected)")),
            (
                "State",
                t["state"] + ("" if running else " (stored; the relay service is not running)"),
            ),
            ("Elapsed", _duration(t["elapsed_secs"])),
            ("Tokens", f"{t['tokens']:,}"),
            ("Cost", _cost(t["cost_usd"])),
            ("Context", f"{t['context_pct']}%"),
            ("CWD", t.get("cwd") or "(peer default)"),
            ("Git ref", t.get("git_ref")),
            ("Result ref", t.get("result_git_ref")),
            ("Files", ", ".join(t.get("files_modified") or []) or None),
            ("Prompt", t["prompt"]),
            ("Last", t.get("last_message")),
            ("Summary", t.get("summary")),
        ):
            if value:
                # Summaries, messages and file names come from the worker peer.
                ctx.out(f"{label + ':':<11} {clean_line(value)}")
        if tail:
            shown = tail[-STATUS_TAIL_LINES:]
            more = f" (the last {len(shown)} of {len(tail)})" if len(tail) > len(shown) else ""
            ctx.out()
            ctx.out(f"Recent activity{more}:")
            for line in shown:
                ctx.out(f"  {_clock(line.get('at'))}  {clean_line(line.get('text', ''))[:200]}")
        return
    if ctx.json:
        ctx.emit_json(
            {
                "tasks": outgoing,
                "incoming": incoming,
                "service_running": running,
                # The running service's status (links, counters: "hive" has
                # the gossip engine's); null without a service.
                "service": node if running else None,
            }
        )
        return
    if not running:
        ctx.out("The relay service is not running: stored tasks, as last saved.")
    if not outgoing and not incoming:
        ctx.out("No delegated tasks. Delegate one with `claudectl relay delegate <peer> <prompt>`.")
        return
    sections = [
        ("Delegated by this machine (outgoing)", "PEER", outgoing),
        ("Run here for peers (incoming)", "FROM", incoming),
    ]
    first = True
    for title, peer_col, tasks in sections:
        if not tasks:
            continue
        if not first:
            ctx.out()
        first = False
        ctx.out(f"{title}:")
        ctx.out(
            f"{'TASK':<36} {peer_col:<20} {'STATE':<9} {'ELAPSED':>7} {'TOKENS':>9} "
            f"{'COST':>8}  LAST MESSAGE"
        )
        for t in tasks:
            msg = clean_line(t.get("last_message") or "")
            if len(msg) > 60:
                msg = msg[:59] + "…"
            peer = clean_line(t["peer"]) + ("" if t["peer_connected"] else "*")
            ctx.out(
                f"{clean_line(t['task_id']):<36} {peer:<20} {clean_line(t['state']):<9} "
                f"{_duration(t['elapsed_secs']):>7} {t['tokens']:>9,} "
                f"{_cost(t['cost_usd']):>8}  {msg}".rstrip()
            )
    if any(not t["peer_connected"] for t in outgoing + incoming):
        ctx.out("* peer not connected now")


def _stored_tasks(ctx: CliContext) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both directions from the task files, for when the service is not running."""
    from claudectl.delegation.controller import outgoing_view
    from claudectl.delegation.store import INCOMING, OUTGOING, TaskStore
    from claudectl.delegation.worker import incoming_view

    now = time.time()
    out: dict[str, list[dict[str, Any]]] = {OUTGOING: [], INCOMING: []}
    for kind, view in ((OUTGOING, outgoing_view), (INCOMING, incoming_view)):
        for rec in TaskStore(ctx.home.tasks, kind).load_all().values():
            try:
                out[kind].append(view(rec, now, False))
            except (KeyError, TypeError, ValueError):
                continue  # not a record this version can show
        out[kind].sort(key=lambda v: (v["created_at"], v["task_id"]))
    return out[OUTGOING], out[INCOMING]


# --- relay interrupt ----------------------------------------------------------------


@relay.command()
@click.argument("task_id")
@click.argument("interrupt_type", type=click.Choice(["nudge", "stop"]))
@click.argument("reason", nargs=-1)
@_json_option
@pass_ctx
async def interrupt(
    ctx: CliContext, task_id: str, interrupt_type: str, reason: tuple[str, ...]
) -> None:
    """Nudge or stop a delegated task; it goes to the peer that runs it.

    A nudge is written into the running Claude Code session as a message; stop
    terminates it (SIGTERM, then SIGKILL after the peer's grace period).
    """
    text = " ".join(reason)

    async def go(reactor: Any) -> dict[str, Any]:
        return await _call(
            reactor, ctx, C.Interrupt, task_id=task_id, interrupt_type=interrupt_type, reason=text
        )

    r = await ctx.run(go)
    if ctx.json:
        ctx.emit_json(
            {
                "task_id": task_id,
                "peer": r["peer"],
                "interrupt_type": interrupt_type,
                "reason": text,
                "status": "sent",
            }
        )
        return
    ctx.out(f"Interrupt sent for task {task_id} to peer {r['peer']}")
    ctx.out(f"  Type: {interrupt_type}")
    if text:
        ctx.out(f"  Reason: {text}")


# --- run <task file> ----------------------------------------------------------------


@cli.command(name="run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--parallel",
    is_flag=True,
    help="Start every task whose dependencies are done (default: one at a time, in file order).",
)
@_json_option
@pass_ctx
async def run_file(ctx: CliContext, file: str, parallel: bool) -> None:
    """Run a task file (JSON, YAML or TOML): local tasks here, `peer` tasks delegated.

    Everything is checked before anything starts.  Exit status 0 only if every
    task completed.
    """
    from claudectl.delegation import runner as R
    from claudectl.delegation import taskfile as TF
    from claudectl.relay.keystore import is_remote_peer_id

    def is_paired(peer: str) -> bool:
        return is_remote_peer_id(peer) and (ctx.home.peers / f"{peer}.key").exists()

    try:
        tf = TF.load(file, is_paired)
    except TF.TaskFileError as e:
        raise CliError(str(e)) from None
    config = ctx.config.delegation

    def report(line: str) -> None:
        if not ctx.json:
            # Lines carry task summaries (a peer's text): one line each.
            ctx.out(f"{time.strftime('%H:%M:%S')} {clean_line(line)}")

    remote_tasks: dict[str, str] = {}  # delegated task id -> peer, until it ended

    async def go(reactor: Any) -> dict[str, Any]:
        sessions = LocalSessions(reactor, config.stop_grace_secs)
        trigger = reactor.addSystemEventTrigger("before", "shutdown", sessions.stop_all)
        local = _local_runner(reactor, ctx, config, sessions)
        remote = _remote_runner(reactor, ctx, remote_tasks)
        runner = R.TaskFileRunner(tf, local, remote, reactor, report, parallel)
        states = await runner.run()
        # Not left behind on a reactor that goes on (a test's, in-process).
        reactor.removeSystemEventTrigger(trigger)
        return states

    def interrupted() -> CliError:
        # Ctrl-C, SIGTERM: local sessions are stopped on the way out.
        lines = ["interrupted; local Claude Code sessions were stopped"]
        for task_id, peer in sorted(remote_tasks.items()):
            lines.append(
                f"  task {task_id} keeps running on {peer}; stop it with "
                f"`claudectl relay interrupt {task_id} stop`"
            )
        return CliError("\n".join(lines), code=130)

    ctx.on_interrupt = interrupted
    states = await ctx.run(go)
    counts: dict[str, int] = {}
    for st in states.values():
        counts[st.status] = counts.get(st.status, 0) + 1
    ok = all(st.status == "completed" for st in states.values())
    if ctx.json:
        ctx.emit_json(
            {
                "status": "completed" if ok else "failed",
                "parallel": parallel,
                "counts": counts,
                "tasks": [
                    {
                        "name": st.task.name,
                        "peer": st.task.peer,
                        "status": st.status,
                        "message": st.message,
                        "attempts": st.attempts,
                        "cost_usd": st.cost_usd,
                        "tokens": st.tokens,
                    }
                    for st in states.values()
                ],
            }
        )
    else:
        ctx.out(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if not ok:
        bad = sum(n for k, n in counts.items() if k != "completed")
        raise CliError(f"{bad} of {len(states)} task(s) did not complete")


class LocalSessions:
    """The local Claude Code sessions of one ``run``, so that an interrupted
    run stops them all before it exits (they are in their own sessions, so a
    Ctrl-C on the terminal does not reach them)."""

    def __init__(self, reactor: Any, grace: float) -> None:
        self.reactor = reactor
        self.grace = grace
        self.live: set[Any] = set()
        self.stopping = False

    def stop_all(self) -> Any:
        """End every live session (whole groups); a Deferred, bounded in time."""
        from twisted.internet.defer import Deferred, DeferredList

        from claudectl.delegation.claude_process import DRAIN_SECS

        self.stopping = True  # and no new session (a retry) starts from now on
        if not self.live:
            return None
        done: Deferred[None] = Deferred()
        waits = DeferredList(
            [p.stop("claudectl run was interrupted") for p in list(self.live)], consumeErrors=True
        )

        def give_up() -> None:
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(self.grace + DRAIN_SECS + 5, give_up)

        def ended(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        waits.addBoth(ended)
        return done


def _local_runner(reactor: Any, ctx: CliContext, config: Any, sessions: LocalSessions) -> Any:
    from claudectl.delegation.claude_process import ClaudeProcess, child_env, claude_argv
    from claudectl.delegation.runner import AttemptResult
    from claudectl.delegation.taskrun import TaskRun

    async def run(task: Any, prompt: str, progress: Any) -> AttemptResult:
        if sessions.stopping:
            return AttemptResult(False, "", "interrupted")
        cwd = Path(ctx.cwd, task.cwd or ".")
        if not cwd.is_dir():
            return AttemptResult(False, "", f"cwd {cwd} does not exist")
        taskrun = TaskRun(task.name, reactor.seconds)
        last: dict[str, Any] = {"text": None, "at": 0.0}

        def changed() -> None:
            text = taskrun.stats().last_activity
            now = reactor.seconds()
            if text and text != last["text"] and now - last["at"] >= PROGRESS_MIN_SECS:
                last.update(text=text, at=now)
                progress(text)

        proc = ClaudeProcess(
            taskrun,
            claude_argv(config.claude_command, config.claude_args, task.resume),
            str(cwd.resolve()),
            child_env(),
            reactor.spawnProcess,
            reactor,
            config.stop_grace_secs,
            on_change=changed,
        )
        sessions.live.add(proc)
        try:
            outcome = await proc.start(prompt)
        finally:
            sessions.live.discard(proc)
        return AttemptResult(
            outcome.state == "completed",
            outcome.result_text,
            outcome.summary,
            outcome.cost_usd,
            outcome.tokens,
        )

    return run


def _remote_runner(reactor: Any, ctx: CliContext, in_flight: dict[str, str]) -> Any:
    from claudectl.delegation.runner import AttemptResult

    async def run(task: Any, prompt: str, progress: Any) -> AttemptResult:
        try:
            r = await _call(reactor, ctx, C.Delegate, peer=task.peer, prompt=prompt, cwd=task.cwd)
        except CliError as e:
            return AttemptResult(False, "", e.message)
        progress(f"delegated as {r['task_id']}")
        last = {"text": None}

        def emit(view: dict[str, Any]) -> None:
            text = view.get("last_message")
            if text and text != last["text"] and view["state"] not in TERMINAL:
                last["text"] = text
                progress(f"{clean_line(view['state'])}: {clean_line(text)}")

        in_flight[r["task_id"]] = task.peer
        try:
            final = await follow(reactor, ctx, r["task_id"], emit)
        except CliError as e:
            return AttemptResult(False, "", e.message)
        in_flight.pop(r["task_id"], None)
        summary = final.get("summary") or ""
        return AttemptResult(
            final["state"] == "completed",
            summary,
            summary,
            final.get("cost_usd", 0.0),
            final.get("tokens", 0),
        )

    return run
