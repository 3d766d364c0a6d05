# -*- test-case-name: tests.test_tui_app -*-
"""
What the dashboard does: attach to the service (or start one here, or read
the files), and carry out the keyboard's actions with the same control
commands and library functions the CLI uses.

:func:`run_dashboard` is the ``claudectl tui`` command's body, a coroutine
run under the reactor.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from claudectl.control import commands as C
from claudectl.control import panels as P
from claudectl.control.client import ServiceNotRunning
from claudectl.control.events import TaskAction, TaskDetail
from claudectl.home import Home
from claudectl.tui import lines as L
from claudectl.tui.app import Dashboard
from claudectl.tui.clean import clean
from claudectl.tui.feed import FeedProtocol, open_feed

log = Logger()

#: Reattach delays after the service went away (seconds; the last repeats).
REATTACH_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

NOT_RUNNING = (
    "The relay service is not running: start it with `claudectl relay serve` "
    "([relay] enabled = true starts it with the dashboard). Showing the files."
)


def _error_text(e: BaseException) -> str:
    description = getattr(e, "description", None)
    if isinstance(description, bytes):
        return description.decode("utf-8", "replace")
    return str(description or e) or type(e).__name__


class Backend:
    def __init__(
        self, reactor: Any, home: Home, config: Any, config_files: tuple[str, ...] = ()
    ) -> None:
        self.reactor = reactor
        self.home = home
        self.config = config
        self.config_files = config_files
        self.ui: Dashboard | None = None
        self.proto: FeedProtocol | None = None
        self.identity = ""
        self.service: Any = None
        self.mode = "not running"
        self._reattach_call: Any = None
        self._reattach_n = 0
        self._stopping = False

    # --- attaching ---------------------------------------------------------------------
    async def attach(self) -> bool:
        """Subscribe to the service's pushes; False when none answers."""
        try:
            self.proto, self.identity = await open_feed(
                self.reactor, self.home, self._on_update, self._on_lost
            )
        except ServiceNotRunning:
            return False
        except Exception as e:
            log.failure("attaching to the service failed")
            self._status(
                f"the relay service did not accept the dashboard: {_error_text(e)}", error=True
            )
            return False
        self._reattach_n = 0
        self._header()
        return True

    async def start(self) -> None:
        if await self.attach():
            self.mode = "attached"
            self._status("Attached to the relay service; changes appear as they happen.")
            self._header()
            return
        if self.config.relay.enabled:
            if self._start_service_here() and await self.attach():
                self.mode = "running in this process"
                self._status(
                    "Started the relay service in this process ([relay] enabled = "
                    "true); it stops when you quit."
                )
                self._header()
                return
        self.mode = "not running"
        self.show_files()
        self._status(NOT_RUNNING)

    def _start_service_here(self) -> bool:
        from twisted.python import usage

        from claudectl.service import compose

        options = {
            "home": str(self.home.root),
            "config": list(self.config_files),
            "listen": None,
            "port": None,
            "no-discovery": False,
        }
        try:
            service = compose.makeService(options, self.reactor)
            service.privilegedStartService()
            service.startService()
        except (usage.UsageError, Exception) as e:
            log.failure("starting the relay service in the dashboard failed")
            self._status(f"could not start the relay service here: {_error_text(e)}", error=True)
            return False
        self.service = service
        return True

    def _on_update(self, panel: str, data: dict[str, Any]) -> None:
        if self.ui is not None:
            self.ui.apply(panel, data)

    def _on_lost(self, reason: Failure) -> None:
        self.proto = None
        if self._stopping:
            return
        self.mode = "not running"
        self._header()
        self._status(
            "The relay service stopped; showing the files. Reattaching when it is back.", error=True
        )
        self.show_files()
        self._schedule_reattach()

    def _schedule_reattach(self) -> None:
        delay = REATTACH_DELAYS[min(self._reattach_n, len(REATTACH_DELAYS) - 1)]
        self._reattach_n += 1
        self._reattach_call = self.reactor.callLater(delay, self._reattach)

    def _reattach(self) -> None:
        self._reattach_call = None

        async def go() -> None:
            if await self.attach():
                self.mode = "attached"
                self._header()
                self._status("Attached to the relay service again.")
            elif not self._stopping:
                self._schedule_reattach()

        defer.ensureDeferred(go()).addErrback(lambda f: log.failure("reattach failed", f))

    async def stop(self) -> None:
        self._stopping = True
        if self._reattach_call is not None and self._reattach_call.active():
            self._reattach_call.cancel()
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.loseConnection()
        if self.service is not None:
            await defer.maybeDeferred(self.service.stopService)

    # --- the files (no service) ---------------------------------------------------------
    def _identity_from_files(self) -> str:
        from claudectl.relay.keystore import KeyStore

        return KeyStore(self.home).ensure_identity()

    def show_files(self) -> None:
        """Fill the panels from the files (no service answers)."""
        if self.ui is None:
            return
        try:
            if not self.identity:
                self.identity = self._identity_from_files()
            self._header()
            self.ui.apply("peers", self._file_peers())
            self.ui.apply("tasks", P.local_tasks_panel(self.home, time.time()))
            self.ui.apply(
                "hive", P.hive_panel(self.home, self.identity, self.config.hive.default_trust)
            )
        except Exception as e:
            log.failure("reading the files failed")
            self._status(f"could not read the files: {_error_text(e)}", error=True)

    def _file_peers(self) -> dict[str, Any]:
        from claudectl.hive.gossip import SyncState
        from claudectl.hive.trust import trust_level
        from claudectl.relay.keystore import KeyStore
        from claudectl.relay.peers_view import peer_rows

        default = self.config.hive.default_trust
        state = SyncState(self.home)

        def sync(peer: str) -> dict[str, Any]:
            ps = state.peers.get(peer)
            return {} if ps is None else {"units_up": ps.units_up, "units_down": ps.units_down}

        rows = peer_rows(
            KeyStore(self.home), None, lambda peer: trust_level(self.home, peer, default), [sync]
        )
        return P.peers_panel(rows, self.identity, False)

    # --- screen helpers ------------------------------------------------------------------
    def _header(self) -> None:
        if self.ui is not None:
            who = clean(self.identity, 60) or "?"
            self.ui.set_header(f"claudectl dashboard — {who} — relay service: {self.mode}")

    def _status(self, text: str, error: bool = False) -> None:
        if self.ui is not None:
            self.ui.status(text, error)
        elif error:
            log.warn("{message}", message=text)

    def _run(self, what: str, d: Any, done: Any = None) -> None:
        """Run an action's Deferred/coroutine; its outcome goes to the status line."""

        def ok(result: Any) -> None:
            if done is not None:
                try:
                    done(result)
                except Exception:
                    log.failure("after {what}", what=what)
            if self.proto is None:
                self.show_files()

        def bad(f: Failure) -> None:
            log.failure("{what} failed", f, what=what)
            self._status(f"{what} failed: {_error_text(f.value)}", error=True)

        defer.ensureDeferred(d).addCallbacks(ok, bad)

    def _need_service(self, what: str) -> bool:
        if self.proto is None:
            self._status(
                f"{what} needs the relay service: start it with `claudectl relay serve`", error=True
            )
            return False
        return True

    async def _call(self, command: Any, **kw: Any) -> dict[str, Any]:
        if self.proto is None:
            raise ServiceNotRunning(self.home)
        result: dict[str, Any] = await self.proto.callRemote(command, **kw)
        return result

    # --- peer actions -------------------------------------------------------------------
    def connect(self, peer: str, address: Any) -> None:
        if not self._need_service("connecting"):
            return
        if not address:
            self._status(
                f"no address is known for {clean(peer, 40)}: connect once with "
                "`claudectl relay connect HOST:PORT`",
                error=True,
            )
            return
        self._status(f"connecting to {clean(peer, 40)} at {clean(address, 60)}…")
        self._run(
            "connect",
            self._call(C.Connect, address=str(address), peer=peer),
            lambda r: self._status(
                f"{clean(peer, 40)} is connected ({r['mode']})"
                if not r["already"]
                else f"{clean(peer, 40)} was already connected"
            ),
        )

    def disconnect(self, peer: str) -> None:
        if not self._need_service("disconnecting"):
            return
        self._run(
            "disconnect",
            self._call(C.Disconnect, peer=peer),
            lambda r: self._status(
                f"disconnected from {clean(peer, 40)}"
                if r["was_connected"]
                else f"{clean(peer, 40)} was not connected"
            ),
        )

    def forget(self, peer: str) -> None:
        from claudectl.relay.keystore import KeyStore

        async def go() -> None:
            if not KeyStore(self.home).forget(peer):
                raise ValueError(f"unknown peer {clean(peer, 40)}")
            if self.proto is not None:
                await self._call(C.Forgotten, peer=peer)

        self._run("forget", go(), lambda _r: self._status(f"forgot {clean(peer, 40)}"))

    def set_trust(self, peer: str, text: str) -> None:
        from claudectl.hive.trust import trust_transaction

        async def go() -> float:
            try:
                value = float(text.strip())
            except ValueError:
                raise ValueError(
                    f"trust must be a number from 0.0 to 1.0, not {clean(text, 20)!r}"
                ) from None
            if value != value:
                raise ValueError("trust must be a number from 0.0 to 1.0")
            with trust_transaction(self.home, self.config.hive.default_trust) as book:
                rec = book.set_level(peer, value, int(time.time()))
            return float(rec.trust_level)

        self._run(
            "set trust",
            go(),
            lambda level: self._status(
                f"trust for {clean(peer, 40)} set to {L.trust_text(level)[6:]}"
            ),
        )

    def make_invite(self) -> None:
        from claudectl.pairing.hosts import invite_host, qr_text
        from claudectl.pairing.invites import InviteStore
        from claudectl.relay.keystore import KeyStore
        from claudectl.relay.runinfo import running_port

        async def go() -> list[str]:
            relay_cfg = self.config.relay
            port = running_port(self.home) or relay_cfg.listen_port
            if not port:
                raise ValueError(
                    "relay.listen_port is 0: set a fixed port so an invite can name it"
                )
            host, warning = invite_host(relay_cfg.listen_addr, None)
            identity = KeyStore(self.home).shareable_identity()
            now = time.time()
            inv = InviteStore(self.home).create(
                identity, host, port, relay_cfg.invite_ttl_hours * 3600, now
            )
            out = [
                f"Single use, valid {relay_cfg.invite_ttl_hours} h. The peer runs "
                "`claudectl relay join <any of these>`:",
                "",
            ]
            if inv.relay_code is not None:
                out.append(f"  RELAY CODE:  {inv.relay_code}")
            else:
                out.append(f"  RELAY CODE:  (none: {inv.not_carried_reason})")
            if inv.word_phrase is not None:
                out.append(f"  WORD PHRASE: {inv.word_phrase}")
            out.append(f"  INVITE LINK: {inv.link}")
            if warning:
                out += ["", f"Warning: {warning}"]
            if self.proto is None:
                out += ["", "The relay service must be running here when the peer joins."]
            try:
                out += ["", "QR code of the link:", *qr_text(inv.link).splitlines()]
            except Exception:
                log.failure("drawing the QR code failed")
            return out

        def shown(text: list[str]) -> None:
            if self.ui is not None:
                self.ui.show("Invite", text)

        self._run("making an invite", go(), shown)

    # --- task actions -------------------------------------------------------------------
    def open_task(self, direction: str, key: str) -> None:
        if self.ui is None:
            return
        ui = self.ui
        if self.proto is None:
            rows = (ui.panels["tasks"].data or {}).get("rows") or []
            row = next((r for r in rows if (r.get("dir"), r.get("key")) == (direction, key)), None)
            ui.show(
                "Task",
                L.task_detail_lines(row or {}, time.time())
                + ["", "(from the files: the relay service is not running)"],
            )
            return
        dialog = ui.show("Task", ["loading…"])
        ui.detail_key = (direction, key)

        def refresh() -> None:
            async def go() -> None:
                r = await self._call(TaskDetail, direction=direction, key=key)
                import json

                detail = json.loads(r["detail_json"])
                if ui.dialog is dialog:
                    dialog.set_body(L.task_detail_lines(detail, time.time()))
                    ui.redraw()

            self._run("opening the task", go())

        dialog.refresh = refresh
        refresh()

    def task_action(self, direction: str, key: str, action: str, reason: str) -> None:
        if not self._need_service(f"{action} a task"):
            return
        self._run(
            action,
            self._call(TaskAction, direction=direction, key=key, action=action, reason=reason),
            lambda r: self._status(f"{action} sent to {clean(r['peer'], 40)}"),
        )


async def run_dashboard(
    reactor: Any,
    home: Home,
    config: Any,
    config_files: tuple[str, ...],
    colour: bool,
    screen: Any = None,
) -> None:
    backend = Backend(reactor, home, config, config_files)
    ui = Dashboard(backend, colour=colour)
    backend.ui = ui
    cleaned: list[bool] = []

    def cleanup() -> defer.Deferred[None]:
        """Restore the terminal, then stop what we started (once)."""
        if cleaned:
            return defer.succeed(None)
        cleaned.append(True)
        ui.stop()
        d = defer.ensureDeferred(backend.stop())
        d.addErrback(lambda f: log.failure("stopping the dashboard failed", f))
        return d

    # SIGINT / SIGTERM stop the reactor: the terminal is restored and an
    # in-process service stopped before it exits.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", cleanup)
    ui.start(reactor, screen)
    try:
        await backend.start()
        await ui.done
    finally:
        if not cleaned:  # quit from the keyboard (or an error)
            try:
                reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError, TypeError):
                pass
            await cleanup()
