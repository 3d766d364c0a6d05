# -*- test-case-name: tests.test_tui_app -*-
"""
The dashboard: urwid on the Twisted reactor (``urwid.TwistedEventLoop`` with
``manage_reactor=False``: the reactor is the only event loop; urwid only
registers its terminal reader and timers on it).

Three panels -- Peers (``p``), Remote tasks (``t``), Hive (``h``) -- each in
a box, stacked so that all of them fit 80×24.  The data comes from
:mod:`claudectl.tui.feed` (pushed by the service) or, with no service, from
the files (:mod:`claudectl.control.panels`).  Every key handler runs inside
``try``: an error becomes one line in the status bar and a traceback in the
log file, never on the screen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import urwid
from twisted.internet import defer
from twisted.logger import Logger

from claudectl.delegation import taskstate
from claudectl.tui import lines as L
from claudectl.tui.clean import clean

log = Logger()

PANEL_KEYS = {"p": "peers", "t": "tasks", "h": "hive"}
PANEL_TITLES = {"peers": "Peers", "tasks": "Remote tasks", "hive": "Hive"}
#: Relative heights of the panels (peers first: the mission's panel).
PANEL_WEIGHTS = {"peers": 3, "tasks": 3, "hive": 3}

HELP = """\
Keys

  p  t  h       show / hide the Peers, Remote tasks and Hive panels
  Tab           move between panels
  ↑ ↓  j k      move in a panel; PgUp / PgDn scroll
  q             quit (Ctrl+C too)
  ?             this help

Peers panel (on the selected peer)
  c             connect (to its last known address)
  d             disconnect (asks first)
  f             forget: remove its key and address (asks first)
  T             set its trust (0.0 - 1.0)
  i             make an invite (relay code, word phrase, link and QR)

Remote tasks panel (on the selected task)
  Enter         open it: its latest status, live
  s             stop it (asks first)
  n             nudge it with a message

  → a task this machine delegated to a peer
  ← a task this machine runs for a peer

Peer states: ● connected   ◐ connecting   ○ offline
Updates are pushed by the relay service as they happen.
Esc closes a window."""


def palette(colour: bool) -> list[tuple[Any, ...]]:
    """urwid palette; the fourth column is what a monochrome (NO_COLOR) screen uses."""
    entries = [
        ("body", "default", "default", ""),
        ("header", "white,bold", "dark blue", "bold"),
        ("footer", "light gray", "default", ""),
        ("status", "yellow", "default", "bold"),
        ("error", "light red,bold", "default", "bold,standout"),
        ("good", "light green", "default", ""),
        ("warn", "yellow", "default", ""),
        ("bad", "light red", "default", ""),
        ("dim", "dark gray", "default", ""),
        ("focus", "black", "light gray", "standout"),
        ("title", "white,bold", "default", "bold"),
        ("dialog", "default", "default", ""),
    ]
    if colour:
        return entries
    return [(name, "default", "default", mono) for name, _fg, _bg, mono in entries]


class FitLine(urwid.Widget):
    """One line whose text is made for the width it is drawn at (no wrapping)."""

    _sizing = frozenset([urwid.Sizing.FLOW])
    _selectable = True
    ignore_focus = False
    #: The text depends on the width and the clock ("seen 5s ago"): never reuse a canvas.
    no_cache = ["render"]

    def __init__(self, make: Callable[[int], tuple[str, str]], payload: Any = None) -> None:
        super().__init__()
        self.make = make
        self.payload = payload

    def rows(self, size: Any, focus: bool = False) -> int:
        return 1

    def render(self, size: Any, focus: bool = False) -> Any:
        (maxcol,) = size
        attr, text = self.make(max(1, maxcol - 1))
        return urwid.Text(("focus" if focus else attr, " " + text), wrap="clip").render(
            (maxcol,), focus
        )

    def keypress(self, size: Any, key: str) -> str:
        return key


class Panel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.walker: urwid.SimpleFocusListWalker[Any] = urwid.SimpleFocusListWalker([])
        self.listbox = urwid.ListBox(self.walker)
        self.box = urwid.LineBox(
            self.listbox, title=PANEL_TITLES[name], title_align="left", title_attr="title"
        )
        self.data: dict[str, Any] | None = None

    def set_title(self, text: str) -> None:
        self.box.set_title(text)

    def selected(self) -> Any:
        w = self.listbox.focus
        return getattr(w, "payload", None)

    def set_lines(self, widgets: list[Any], keep: Callable[[Any], bool] | None) -> None:
        pos = 0
        if keep is not None:
            for i, w in enumerate(widgets):
                payload = getattr(w, "payload", None)
                if payload is not None and keep(payload):
                    pos = i
                    break
        else:
            try:
                pos = min(self.walker.focus or 0, max(0, len(widgets) - 1))
            except (IndexError, TypeError):
                pos = 0
        self.walker[:] = widgets
        if widgets:
            self.walker.set_focus(pos)


class Dialog:
    """What is shown over the panels: text to read, a question, or an input."""

    def __init__(
        self,
        title: str,
        body: list[str] | str,
        kind: str = "info",
        on_yes: Callable[[Any], Any] | None = None,
        prompt: str = "",
        refresh: Callable[[], Any] | None = None,
        key: Any = None,
    ) -> None:
        self.kind = kind
        self.on_yes = on_yes
        self.key = key
        self.refresh = refresh
        self.edit: urwid.Edit | None = None
        texts = body if isinstance(body, list) else body.splitlines()
        self.walker = urwid.SimpleFocusListWalker(
            [urwid.Text(t, wrap="any") for t in texts] or [urwid.Text("")]
        )
        items: list[Any] = [urwid.ListBox(self.walker)]
        if kind == "confirm":
            items = [("pack", urwid.Text(t)) for t in texts] + [
                ("pack", urwid.Divider()),
                ("pack", urwid.Text("y = yes    n / Esc = no")),
            ]
        elif kind == "input":
            self.edit = urwid.Edit(prompt)
            items = [("pack", urwid.Text(t)) for t in texts] + [
                ("pack", urwid.Divider()),
                ("pack", self.edit),
                ("pack", urwid.Divider()),
                ("pack", urwid.Text("Enter = OK    Esc = cancel")),
            ]
        else:
            items.append(("pack", urwid.Text("Esc / q / Enter = close    ↑ ↓ scroll")))
        self.pile = urwid.Pile(items)
        self.widget = urwid.AttrMap(
            urwid.LineBox(self.pile, title=title, title_align="left"), "dialog"
        )

    def set_body(self, texts: list[str]) -> None:
        pos = self.walker.focus or 0
        self.walker[:] = [urwid.Text(t, wrap="any") for t in texts] or [urwid.Text("")]
        self.walker.set_focus(min(pos, len(self.walker) - 1))


class Dashboard:
    """
    The screen and what it shows.  ``backend`` does the work (see
    :class:`claudectl.tui.runner.Backend`): it answers the actions and
    calls :meth:`apply` with panel data.
    """

    def __init__(
        self, backend: Any, colour: bool = True, now: Callable[[], float] = time.time
    ) -> None:
        self.backend = backend
        self.colour = colour
        self.now = now
        self.panels = {name: Panel(name) for name in PANEL_TITLES}
        self.visible = {name: True for name in PANEL_TITLES}
        self.header = urwid.Text("claudectl", wrap="clip")
        self.status_text = urwid.Text("")
        self.status_attr = urwid.AttrMap(self.status_text, "status")
        self.hints = urwid.Text(
            "p peers  t tasks  h hive  Tab next  Enter open  ? help  q quit", wrap="clip"
        )
        self.pile = urwid.Pile([])
        self.frame = urwid.Frame(
            self.pile,
            header=urwid.AttrMap(self.header, "header"),
            footer=urwid.Pile([self.status_attr, urwid.AttrMap(self.hints, "footer")]),
        )
        self.top = _Top(self)
        self.dialog: Dialog | None = None
        self.loop: urwid.MainLoop | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.detail_key: tuple[str, str] | None = None
        self._relayout()
        for name in PANEL_TITLES:
            self._placeholder(name, "waiting for data…")

    # --- screen ----------------------------------------------------------------------
    def start(self, reactor: Any, screen: Any = None) -> None:
        ev = urwid.TwistedEventLoop(reactor=reactor, manage_reactor=False)
        self.loop = urwid.MainLoop(
            self.top, palette(self.colour), screen=screen, event_loop=ev, handle_mouse=False
        )
        if not self.colour:
            getattr(self.loop.screen, "set_terminal_properties", lambda **kw: None)(colors=1)
        self.loop.start()

    def stop(self) -> None:
        loop, self.loop = self.loop, None
        if loop is not None:
            try:
                loop.stop()
            except Exception:
                log.failure("restoring the terminal failed")

    def redraw(self) -> None:
        if self.loop is not None:
            try:
                self.loop.draw_screen()
            except Exception:
                log.failure("drawing the screen failed")

    def quit(self) -> None:
        if not self.done.called:
            self.done.callback(None)

    # --- layout ------------------------------------------------------------------------
    def _relayout(self) -> None:
        shown = [n for n in PANEL_TITLES if self.visible[n]]
        if not shown:
            body: list[Any] = [
                urwid.Filler(
                    urwid.Text(
                        "All panels are hidden: press p, t or h to show one.", align="center"
                    )
                )
            ]
            self.pile.contents[:] = [(w, self.pile.options("weight", 1)) for w in body]
            return
        focus_name = None
        try:
            current = self.pile.focus
            for n, p in self.panels.items():
                if p.box is current:
                    focus_name = n
        except (IndexError, AttributeError):
            pass
        self.pile.contents[:] = [
            (self.panels[n].box, self.pile.options("weight", PANEL_WEIGHTS[n])) for n in shown
        ]
        self.pile.focus_position = shown.index(focus_name) if focus_name in shown else 0

    def toggle(self, name: str) -> None:
        self.visible[name] = not self.visible[name]
        self._relayout()

    def focused_panel(self) -> str | None:
        try:
            current = self.pile.focus
        except IndexError:
            return None
        for n, p in self.panels.items():
            if p.box is current:
                return n
        return None

    def next_panel(self) -> None:
        n = len(self.pile.contents)
        if n > 1:
            self.pile.focus_position = (self.pile.focus_position + 1) % n

    def set_header(self, text: str) -> None:
        self.header.set_text(" " + text)

    def status(self, text: str, error: bool = False) -> None:
        self.status_text.set_text(" " + clean(text, 400))
        self.status_attr.set_attr_map({None: "error" if error else "status"})
        if error:
            log.warn("dashboard: {message}", message=text)
        self.redraw()

    def _placeholder(self, name: str, text: str) -> None:
        self.panels[name].set_lines([urwid.Text(("dim", " " + text), wrap="clip")], None)

    # --- data ------------------------------------------------------------------------------
    def apply(self, panel: str, data: dict[str, Any]) -> None:
        """New data for one panel (pushed, or read from the files)."""
        try:
            getattr(self, f"_apply_{panel}")(data)
        except Exception:
            log.failure("showing the {panel} panel failed", panel=panel)
            self.status(f"could not show the {panel} panel (details in the log)", error=True)
        self.redraw()

    def _apply_peers(self, data: dict[str, Any]) -> None:
        p = self.panels["peers"]
        old = p.selected()
        p.data = data
        rows = L.rows_of(data)
        p.set_title(L.peers_title(data))
        if not rows:
            self._placeholder("peers", "No peers yet: press i to make an invite.")
            return
        idw = L.id_width(rows)

        def peer(r: dict[str, Any]) -> FitLine:
            return FitLine(lambda w: L.peer_line(r, self.now(), w, idw), r)

        widgets: list[Any] = [peer(r) for r in rows]
        more = L.total_of(data, rows) - len(rows)
        if more > 0:
            widgets.append(urwid.Text(("dim", f" … and {more} more"), wrap="clip"))
        p.set_lines(
            widgets, None if old is None else (lambda r: r.get("identity") == old.get("identity"))
        )

    def _apply_tasks(self, data: dict[str, Any]) -> None:
        p = self.panels["tasks"]
        old = p.selected()
        p.data = data
        rows = L.rows_of(data)
        active = sum(1 for r in rows if r.get("state") in taskstate.ACTIVE)
        p.set_title(f"Remote tasks ({active} active, {L.total_of(data, rows)} total)")
        if not rows:
            self._placeholder(
                "tasks",
                "No remote tasks."
                if data.get("available", True)
                else "Delegation is not part of this service.",
            )
        else:
            idw = L.id_width(rows, "peer")

            def task(r: dict[str, Any]) -> FitLine:
                return FitLine(lambda w: L.task_line(r, w, idw), r)

            widgets = [task(r) for r in rows]
            p.set_lines(
                widgets,
                None
                if old is None
                else (lambda r: (r.get("dir"), r.get("key")) == (old.get("dir"), old.get("key"))),
            )
        if (
            self.dialog is not None
            and self.detail_key is not None
            and self.dialog.refresh is not None
        ):
            for r in rows:
                if (r.get("dir"), r.get("key")) == self.detail_key:
                    seen = (r.get("version"), r.get("tail_seq"))
                    if seen != getattr(self.dialog, "version", None):
                        self.dialog.version = seen  # type: ignore[attr-defined]
                        self.dialog.refresh()

    def _apply_hive(self, data: dict[str, Any]) -> None:
        p = self.panels["hive"]
        p.data = data
        p.set_title(f"Hive ({data.get('units', 0)} units)")
        count = len(L.hive_lines(data, self.now(), 10_000))

        def line(i: int) -> FitLine:
            return FitLine(lambda w: L.hive_lines(data, self.now(), w)[i], i)

        p.set_lines([line(i) for i in range(count)], None)

    # --- dialogs --------------------------------------------------------------------------
    def open_dialog(self, dialog: Dialog, height: int | None = None) -> None:
        self.dialog = dialog
        if dialog.kind == "info":
            h: Any = ("relative", 90)
        else:
            h = height or "pack"
        overlay = urwid.Overlay(
            dialog.widget,
            self.frame,
            "center",
            ("relative", 90),
            "middle",
            h,
            min_width=30,
            min_height=5,
        )
        self.top._w = overlay
        self.redraw()

    def close_dialog(self) -> None:
        self.dialog = None
        self.detail_key = None
        self.top._w = self.frame
        self.redraw()

    def confirm(self, question: str, action: Callable[[], Any]) -> None:
        self.open_dialog(
            Dialog("Confirm", question, "confirm", on_yes=lambda _v: action()), height=7
        )

    def ask(self, title: str, question: str, prompt: str, action: Callable[[str], Any]) -> None:
        self.open_dialog(Dialog(title, question, "input", on_yes=action, prompt=prompt), height=9)

    def show(self, title: str, text: list[str] | str) -> Dialog:
        d = Dialog(title, text)
        self.open_dialog(d)
        return d

    # --- keys ------------------------------------------------------------------------------
    def on_key(self, size: Any, key: str) -> str | None:
        if key in ("ctrl c",):
            self.quit()
            return None
        d = self.dialog
        if d is not None:
            return self._dialog_key(d, size, key)
        if key == "q":
            self.quit()
            return None
        if key in PANEL_KEYS:
            self.toggle(PANEL_KEYS[key])
            return None
        if key == "?":
            self.show("Help", HELP)
            return None
        if key == "tab":
            self.next_panel()
            return None
        if key == "i":
            self.backend.make_invite()
            return None
        panel = self.focused_panel()
        sel = self.panels[panel].selected() if panel else None
        if panel == "peers" and isinstance(sel, dict) and key in ("c", "d", "f", "T"):
            self._peer_action(key, sel)
            return None
        if panel == "tasks" and isinstance(sel, dict) and key in ("enter", "s", "n"):
            self._task_action(key, sel)
            return None
        key = {"j": "down", "k": "up"}.get(key, key)
        return self.frame.keypress(size, key)

    def _dialog_key(self, d: Dialog, size: Any, key: str) -> str | None:
        if key == "esc" or (d.kind == "confirm" and key in ("n", "N")):
            self.close_dialog()
            return None
        if d.kind == "confirm":
            if key in ("y", "Y") and d.on_yes is not None:
                self.close_dialog()
                d.on_yes(None)
            return None
        if d.kind == "input":
            if key == "enter" and d.on_yes is not None and d.edit is not None:
                value = d.edit.edit_text
                self.close_dialog()
                d.on_yes(value)
                return None
            return self.top._w.keypress(size, key)
        if key in ("q", "enter"):
            self.close_dialog()
            return None
        key = {"j": "down", "k": "up"}.get(key, key)
        return self.top._w.keypress(size, key)

    def _peer_action(self, key: str, row: dict[str, Any]) -> None:
        peer = str(row.get("identity"))
        shown = clean(peer, L.ID_WIDTH_MAX)
        b = self.backend
        if key == "c":
            b.connect(peer, row.get("address"))
        elif key == "d":
            self.confirm(
                f"Disconnect from {shown}? This side stops redialing it until the next start.",
                lambda: b.disconnect(peer),
            )
        elif key == "f":
            self.confirm(
                f"Forget {shown}? Its key and address are removed; you must pair "
                "again to reconnect.",
                lambda: b.forget(peer),
            )
        elif key == "T":
            self.ask(
                "Set trust",
                f"Trust for {shown} (now {L.trust_text(row.get('trust'))[6:]}), 0.0 - 1.0:",
                "trust: ",
                lambda v: b.set_trust(peer, v),
            )

    def _task_action(self, key: str, row: dict[str, Any]) -> None:
        direction, k = str(row.get("dir")), str(row.get("key"))
        b = self.backend
        label = clean(row.get("task_id"), 60)
        if key == "enter":
            b.open_task(direction, k)
        elif key == "s":
            self.confirm(
                f"Stop task {label} on {clean(row.get('peer'), L.ID_WIDTH_MAX)}?",
                lambda: b.task_action(direction, k, "stop", "stopped from the dashboard"),
            )
        elif key == "n":
            self.ask(
                "Nudge",
                f"A message for the Claude Code session of task {label}:",
                "> ",
                lambda v: b.task_action(direction, k, "nudge", v),
            )


class _Top(urwid.WidgetWrap):
    """The root widget: routes keys through :meth:`Dashboard.on_key`, never raises."""

    def __init__(self, app: Dashboard) -> None:
        super().__init__(app.frame)
        self.app = app

    def selectable(self) -> bool:
        # urwid gives keys only to a selectable root; a question with no
        # input field must still get its y / n.
        return True

    def keypress(self, size: Any, key: str) -> str | None:
        try:
            return self.app.on_key(size, key)
        except Exception as e:
            log.failure("key {key!r} failed", key=key)
            self.app.status(f"error: {type(e).__name__}: {e}", error=True)
            return None


def colour_wanted(environ: Any = os.environ) -> bool:
    """https://no-color.org: any non-empty NO_COLOR turns colour off."""
    return not environ.get("NO_COLOR")
