# -*- test-case-name: tests.test_tui_lines -*-
"""
The text of the dashboard's lines, from panel data (no urwid here).

Each line is built from *fields*: the essential ones always show (the
mission's peer line: dot, id, state, ``trust:0.8``, ``↑12 ↓8 kb``); the
optional ones (transport, last seen, address) are added only while they fit
the width whole, so a narrow terminal drops a field rather than cutting one
in the middle.  Every string that came from a peer passes through
:func:`claudectl.tui.clean.clean` first.
"""

from __future__ import annotations

import time
from typing import Any

from claudectl.delegation import taskstate
from claudectl.text import ago
from claudectl.tui.clean import clean

#: State -> (glyph, word, attribute).  The glyph and the word carry the
#: meaning without colour.
PEER_STATES = {
    "connected": ("●", "connected", "good"),
    "connecting": ("◐", "connecting", "warn"),
    "disconnected": ("○", "offline", "dim"),
}
TRANSPORTS = {"tls1.3": "TLS 1.3", "plaintext": "plaintext"}
TASK_ATTRS = {
    taskstate.RUNNING: "good",
    taskstate.QUEUED: "warn",
    taskstate.DELEGATED: "warn",
    taskstate.COMPLETED: "dim",
    taskstate.FAILED: "bad",
    taskstate.STOPPED: "dim",
}
ID_WIDTH_MAX = 28


def kb(n: Any) -> str:
    """Kilobytes (the mission's ``↑12 ↓8 kb``); one decimal below 1 kb."""
    try:
        v = max(0, int(n)) / 1024
    except (TypeError, ValueError):
        return "0"
    if v == 0:
        return "0"
    return f"{v:.1f}" if v < 1 else str(round(v))


def trust_text(level: Any) -> str:
    if not isinstance(level, (int, float)) or isinstance(level, bool):
        return "trust:-"
    s = f"{max(0.0, min(1.0, float(level))):.2f}"
    if s.endswith("0"):
        s = s[:-1]
    return f"trust:{s}"


def duration(secs: Any) -> str:
    try:
        s = max(0, int(secs))
    except (TypeError, ValueError):
        return "-"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def tokens(n: Any) -> str:
    try:
        v = max(0, int(n))
    except (TypeError, ValueError):
        return "-"
    if v < 1000:
        return f"{v} tok"
    if v < 1_000_000:
        return f"{v / 1000:.1f}k tok"
    return f"{v / 1_000_000:.1f}M tok"


def cost(v: Any) -> str:
    try:
        return f"${max(0.0, float(v)):.2f}"
    except (TypeError, ValueError):
        return "$-"


def fit(essential: str, extras: list[str], width: int, sep: str = "  ") -> str:
    """``essential`` plus as many whole ``extras`` as fit in ``width`` columns."""
    line = essential
    if len(line) > width:
        return line[: max(0, width - 1)] + "…"
    for extra in extras:
        if not extra:
            continue
        candidate = line + sep + extra
        if len(candidate.rstrip()) > width:
            break
        line = candidate
    return line.rstrip()


def fill(essential: str, free_text: str, width: int, sep: str = "  ") -> str:
    """``essential`` then as much of ``free_text`` as fits (ellipsis when cut)."""
    if len(essential) >= width:
        return fit(essential, [], width)
    room = width - len(essential) - len(sep)
    if room < 4 or not free_text:
        return essential
    text = free_text if len(free_text) <= room else free_text[: room - 1] + "…"
    return essential + sep + text


# --- peers ---------------------------------------------------------------------------


def id_width(rows: list[dict[str, Any]], key: str = "identity") -> int:
    widths = [len(clean(r.get(key), ID_WIDTH_MAX)) for r in rows]
    return max([8, *widths]) if widths else 8


def peer_line(row: dict[str, Any], now: float, width: int, idw: int) -> tuple[str, str]:
    """``(attribute, text)`` of one peer."""
    glyph, word, attr = PEER_STATES.get(str(row.get("state")), ("?", "unknown", "dim"))
    ident = clean(row.get("identity"), ID_WIDTH_MAX)
    essential = (
        f"{glyph} {ident:<{idw}} {word:<10} {trust_text(row.get('trust')):<10} "
        f"↑{kb(row.get('bytes_up'))} ↓{kb(row.get('bytes_down'))} kb"
    )
    transport = TRANSPORTS.get(str(row.get("transport") or ""), "")
    extras = [
        f"{transport:<9}" if transport else "-        ",
        f"seen {ago(row.get('last_seen'), now)}",
        clean(row.get("address"), 60),
    ]
    return attr, fit(essential, extras, width)


def rows_of(panel: Any) -> list[dict[str, Any]]:
    """The well-formed rows of a panel (anything else is skipped)."""
    rows = panel.get("rows") if isinstance(panel, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def total_of(panel: Any, rows: list[dict[str, Any]]) -> int:
    total = panel.get("total") if isinstance(panel, dict) else None
    return total if isinstance(total, int) and total >= len(rows) else len(rows)


def peers_title(panel: dict[str, Any] | None) -> str:
    if not panel:
        return "Peers"
    rows = rows_of(panel)
    up = sum(1 for r in rows if r.get("state") == "connected")
    total = total_of(panel, rows)
    return f"Peers ({total})" if up == total else f"Peers ({up}/{total} connected)"


# --- tasks ---------------------------------------------------------------------------


def task_line(row: dict[str, Any], width: int, idw: int) -> tuple[str, str]:
    arrow = "→" if row.get("dir") == "out" else "←"
    state = clean(row.get("state"), 10)
    peer = clean(row.get("peer"), ID_WIDTH_MAX)
    essential = (
        f"{arrow} {state:<9} {peer:<{idw}} {duration(row.get('elapsed')):>7} "
        f"{tokens(row.get('tokens')):>10} {cost(row.get('cost')):>6}"
    )
    return TASK_ATTRS.get(state, "body"), fill(essential, clean(row.get("summary"), 240), width)


#: Live tail lines shown in a task's window (the newest).
DETAIL_TAIL_LINES = 40


def clock(epoch: Any) -> str:
    """``HH:MM:SS`` (local time) of an epoch, or ``--:--:--``."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return "--:--:--"
    try:
        return time.strftime("%H:%M:%S", time.localtime(epoch))
    except (OverflowError, OSError, ValueError):
        return "--:--:--"


def task_detail_lines(d: dict[str, Any], now: float) -> list[str]:
    who = "delegated to" if d.get("dir") == "out" else "run here for"
    out = [
        f"Task {clean(d.get('task_id'), 80)} — {who} {clean(d.get('peer'), ID_WIDTH_MAX)}",
        f"State: {clean(d.get('state'), 20)}   elapsed {duration(d.get('elapsed'))}   "
        f"{tokens(d.get('tokens'))}   {cost(d.get('cost'))}   "
        f"context {clean(d.get('context_pct'), 5)}%",
        f"Directory: {clean(d.get('cwd'), 300) or '-'}",
        "",
        "Latest: " + (clean(d.get("last_message"), 2000) or "-"),
        "",
    ]
    tail = [t for t in d.get("tail") or [] if isinstance(t, dict)][-DETAIL_TAIL_LINES:]
    if tail:
        out += [
            "Recent activity:",
            *[f"  {clock(t.get('at'))}  {clean(t.get('text'), 300)}" for t in tail],
            "",
        ]
    if d.get("summary"):
        out += ["Summary:", *[clean(line, 500) for line in str(d["summary"]).splitlines()[:40]], ""]
    files = d.get("files") or []
    if files:
        out += [f"Files modified ({len(files)}):", *[f"  {clean(f, 300)}" for f in files[:20]], ""]
    out += ["Prompt:", *[clean(line, 500) for line in str(d.get("prompt") or "").splitlines()[:20]]]
    return out


# --- hive ----------------------------------------------------------------------------


def _units(n: Any) -> str:
    n = n if isinstance(n, int) else 0
    return f"{n:>5} unit" + ("" if n == 1 else "s")


def hive_lines(panel: dict[str, Any], now: float, width: int) -> list[tuple[str, str]]:
    rows = rows_of(panel)
    total = panel.get("units", 0)
    local = panel.get("local_units", 0)
    peers = [r for r in rows if not r.get("local")]
    out = [
        (
            "body",
            fit(
                f"{total} units: {local} local, {total - local} from {len(peers)} peer(s)",
                [],
                width,
            ),
        )
    ]
    idw = id_width([{"identity": r.get("origin")} for r in rows] or [{}])
    for r in rows:
        if r.get("local"):
            essential = f"  {'local':<{idw}} {'(this machine)':<16} {_units(r.get('units'))}"
        else:
            essential = (
                f"  {clean(r.get('origin'), ID_WIDTH_MAX):<{idw}} "
                f"{clean(r.get('tier'), 12) + ' ' + trust_text(r.get('trust'))[6:]:<16}"
                f" {_units(r.get('units'))}"
            )
        out.append(("body", fit(essential, [], width)))
    syncs = [s for s in panel.get("last_sync") or [] if isinstance(s, dict)]
    if syncs:
        parts = [
            f"{clean(s.get('peer'), ID_WIDTH_MAX)} {ago(s.get('last_sync'), now)}" for s in syncs
        ]
        out.append(("dim", fit("last sync:", parts, width, sep=" ")))
    for rec in [r for r in panel.get("recent") or [] if isinstance(r, dict)]:
        kind = "conflict" if rec.get("kind") == "conflict" else "merged"
        attr = "warn" if kind == "conflict" else "dim"
        text = (
            f"{'⚠' if kind == 'conflict' else '✓'} {kind:<8} "
            f"{clean(rec.get('peer'), ID_WIDTH_MAX)} vs {clean(rec.get('other'), ID_WIDTH_MAX)}"
            f"  {ago(rec.get('ts'), now)}"
        )
        out.append((attr, fill(text, clean(rec.get("key"), 80), width)))
    return out
