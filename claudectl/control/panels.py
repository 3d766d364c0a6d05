# -*- test-case-name: tests.test_tui_events -*-
"""
The data of the dashboard's panels, as JSON-ready dicts.

The running service builds them from its live objects
(:mod:`claudectl.control.events` pushes them to ``claudectl tui``); the
dashboard builds the same shapes from the files when no service runs.

Every panel is bounded so its JSON fits one AMP value (65,535 bytes) with
room to spare: at most ``MAX_ROWS`` rows, each text field cut, and rows
dropped from the end while the encoding is over ``MAX_PANEL_BYTES``
(``"total"`` keeps the real count, so the screen can say "… and N more").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from claudectl.delegation import taskstate
from claudectl.delegation.tail import bounded as bounded_tail
from claudectl.home import Home

#: A panel's JSON stays under this (AMP's value limit is 65,535 bytes).
MAX_PANEL_BYTES = 60_000
MAX_ROWS = 200
#: Text fields (summaries, last activity) are cut to this many characters.
MAX_TEXT = 240
#: Recent merge/conflict records shown in the hive panel.
RECENT_RECORDS = 8
#: Only the tail of a merge log is read (bounded work on a long log).
LOG_TAIL_BYTES = 64 * 1024


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def bounded(panel: dict[str, Any], key: str = "rows") -> str:
    """``panel`` as JSON of at most ``MAX_PANEL_BYTES``, dropping rows from the end."""
    rows = list(panel.get(key) or [])[:MAX_ROWS]
    panel = dict(panel, **{key: rows})
    text = dumps(panel)
    while len(text.encode("utf-8")) > MAX_PANEL_BYTES and rows:
        cut = max(1, len(rows) // 8)
        rows = rows[:-cut]
        panel[key] = rows
        text = dumps(panel)
    return text


def _cut(text: Any, limit: int = MAX_TEXT) -> str | None:
    if text is None:
        return None
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# --- peers -------------------------------------------------------------------------


def peers_panel(rows: list[dict[str, Any]], identity: str, live: bool) -> dict[str, Any]:
    """``rows`` are ``relay peers --json`` rows (:func:`claudectl.relay.peers_view.peer_rows`)."""
    keep = (
        "identity",
        "state",
        "trust",
        "bytes_up",
        "bytes_down",
        "transport",
        "last_seen",
        "address",
        "mode",
        "units_up",
        "units_down",
        "last_error",
    )
    out = []
    for r in rows:
        row = {k: r.get(k) for k in keep}
        row["last_error"] = _cut(row.get("last_error"), 120)
        out.append(row)
    return {"identity": identity, "live": live, "rows": out, "total": len(out)}


# --- tasks -------------------------------------------------------------------------


def outgoing_row(view: dict[str, Any]) -> dict[str, Any]:
    """A delegated task (the controller's ``view``)."""
    return {
        "dir": "out",
        "key": view["task_id"],
        "task_id": view["task_id"],
        "peer": view["peer"],
        "state": view["state"],
        "elapsed": int(view.get("elapsed_secs") or 0),
        "tokens": int(view.get("tokens") or 0),
        "cost": float(view.get("cost_usd") or 0.0),
        "summary": _cut(view.get("last_message") or view.get("summary") or view.get("prompt")),
        "version": view.get("version", 0),
        "created_at": view.get("created_at", 0),
    }


def incoming_row(task: Any) -> dict[str, Any]:
    """A task this machine runs for a peer (a ``WorkerTask``)."""
    run = task.run
    stats = run.stats()
    summary = None
    if task.handoff:
        summary = task.handoff.get("summary")
    return {
        "dir": "in",
        "key": task.key,
        "task_id": task.task_id,
        "peer": task.peer,
        "state": run.state,
        "elapsed": run.elapsed(),
        "tokens": int(stats.tokens_used),
        "cost": float(stats.cost_usd),
        "summary": _cut(stats.last_activity or summary or task.request.prompt),
        "version": run.version,
        "created_at": run.accepted_at,
        "tail_seq": run.tail.seq,
    }


def tasks_panel(
    outgoing: list[dict[str, Any]], incoming: list[dict[str, Any]], available: bool = True
) -> dict[str, Any]:
    """Newest first; running and queued tasks before finished ones."""
    rows = outgoing + incoming
    rows.sort(key=lambda r: (r["state"] not in taskstate.ACTIVE, -_number(r.get("created_at"))))
    return {"rows": rows, "total": len(rows), "available": available}


def outgoing_detail(view: dict[str, Any]) -> dict[str, Any]:
    return {
        "dir": "out",
        "task_id": view["task_id"],
        "peer": view["peer"],
        "state": view["state"],
        "elapsed": view.get("elapsed_secs", 0),
        "tokens": view.get("tokens", 0),
        "cost": view.get("cost_usd", 0.0),
        "context_pct": view.get("context_pct", 0),
        "prompt": view.get("prompt"),
        "cwd": view.get("cwd"),
        "last_message": view.get("last_message"),
        "summary": view.get("summary"),
        "files": list(view.get("files_modified") or [])[:50],
        "version": view.get("version", 0),
    }


def incoming_detail(task: Any) -> dict[str, Any]:
    run = task.run
    stats = run.stats()
    return {
        "dir": "in",
        "task_id": task.task_id,
        "peer": task.peer,
        "state": run.state,
        "elapsed": run.elapsed(),
        "tokens": stats.tokens_used,
        "cost": stats.cost_usd,
        "context_pct": stats.context_pct,
        "prompt": task.request.prompt,
        "cwd": task.cwd,
        "last_message": stats.last_activity,
        "summary": (task.handoff or {}).get("summary"),
        "files": list(stats.files_modified)[:50],
        "version": run.version,
    }


def bounded_detail(detail: dict[str, Any]) -> str:
    """One task's detail as JSON under ``MAX_PANEL_BYTES`` (long texts cut)."""
    detail = dict(detail)
    for key, limit in (("prompt", 8_000), ("summary", 16_000), ("last_message", 2_000)):
        if detail.get(key):
            detail[key] = _cut(detail[key], limit)
    detail["files"] = [_cut(f, 300) for f in detail.get("files") or []]
    lines = [
        {"at": line.get("at"), "text": _cut(line.get("text"), 300)}
        for line in list(detail.get("tail") or [])[-MAX_ROWS:]
        if isinstance(line, dict)
    ]
    detail["tail"] = []
    room = MAX_PANEL_BYTES - len(dumps(detail).encode("utf-8"))
    detail["tail"] = bounded_tail(lines, room)
    return dumps(detail)


# --- hive ----------------------------------------------------------------------------


def _tail_records(path: Any, n: int) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.splitlines()[-n * 2 :]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out[-n:]


def hive_panel(
    home: Home,
    identity: str,
    default_trust: float = 0.5,
    trust_of: Callable[[str], float] | None = None,
) -> dict[str, Any]:
    """Units by origin and tier, last sync per peer, recent merges and conflicts."""
    from claudectl.hive.store import CONFLICTS, RESOLUTIONS, hive_file, load_store
    from claudectl.hive.trust import load_trust, tier_for

    units = load_store(home).store.units()
    book = load_trust(home, default_trust)
    origins = Counter(u.source_peer for u in units)
    by_origin = []
    for origin, count in sorted(origins.items(), key=lambda kv: (kv[0] != identity, -kv[1], kv[0])):
        if origin == identity:
            by_origin.append({"origin": origin, "local": True, "tier": "local", "units": count})
        else:
            level = trust_of(origin) if trust_of is not None else book.level(origin)
            by_origin.append(
                {
                    "origin": origin,
                    "local": False,
                    "tier": tier_for(level).display,
                    "trust": level,
                    "units": count,
                }
            )
    try:
        from claudectl.hive.gossip import SyncState

        sync = {p: s.last_sync_epoch for p, s in SyncState(home).peers.items()}
    except Exception:
        sync = {}
    for peer, trust_rec in book.records.items():
        if trust_rec.last_sync and trust_rec.last_sync > sync.get(peer, 0):
            sync[peer] = trust_rec.last_sync
    last_sync = [
        {"peer": p, "last_sync": t} for p, t in sorted(sync.items(), key=lambda kv: -kv[1]) if t
    ][: MAX_ROWS // 4]
    recent = []
    for rec in _tail_records(hive_file(home, CONFLICTS), RECENT_RECORDS):
        recent.append(
            {
                "kind": "conflict",
                "ts": rec.get("ts", 0),
                "key": _cut(rec.get("semantic_key"), 80),
                "peer": _cut(rec.get("incoming_peer"), 80),
                "other": _cut(rec.get("local_peer"), 80),
            }
        )
    for rec in _tail_records(hive_file(home, RESOLUTIONS), RECENT_RECORDS):
        recent.append(
            {
                "kind": "merge",
                "ts": rec.get("ts", 0),
                "key": _cut(rec.get("semantic_key"), 80),
                "peer": _cut(rec.get("winner_peer"), 80),
                "other": _cut(rec.get("loser_peer"), 80),
                "result": _cut(rec.get("result"), 40),
            }
        )
    recent.sort(key=lambda r: -(r["ts"] if isinstance(r["ts"], (int, float)) else 0))
    return {
        "identity": identity,
        "units": len(units),
        "local_units": origins.get(identity, 0),
        "rows": by_origin,
        "last_sync": last_sync,
        "recent": recent[:RECENT_RECORDS],
    }


def local_tasks_panel(home: Home, now: float) -> dict[str, Any]:
    """The tasks panel from the stored records (no service runs: states as last saved)."""
    from claudectl.delegation.store import INCOMING, OUTGOING, TaskStore

    out: list[dict[str, Any]] = []
    inc: list[dict[str, Any]] = []
    for key, rec in TaskStore(home.tasks, OUTGOING).load_all().items():
        stats: dict[str, Any] = rec["stats"] if isinstance(rec.get("stats"), dict) else {}
        start = rec.get("created_at") or 0
        end = rec.get("ended_at") or rec.get("updated_at") or start
        out.append(
            {
                "dir": "out",
                "key": str(rec.get("task_id", key)),
                "task_id": rec.get("task_id"),
                "peer": rec.get("peer"),
                "state": rec.get("state"),
                "elapsed": _elapsed(start, end),
                "tokens": stats.get("tokens_used", 0),
                "cost": stats.get("cost_usd", 0.0),
                "summary": _cut(rec.get("last_message") or rec.get("summary") or rec.get("prompt")),
                "version": rec.get("version", 0),
                "created_at": start,
                "prompt": _cut(rec.get("prompt"), 2_000),
                "cwd": rec.get("cwd"),
            }
        )
    for key, rec in TaskStore(home.tasks, INCOMING).load_all().items():
        stats = rec["stats"] if isinstance(rec.get("stats"), dict) else {}
        start = rec.get("accepted_at") or 0
        end = rec.get("ended_at") or start
        inc.append(
            {
                "dir": "in",
                "key": key,
                "task_id": rec.get("task_id"),
                "peer": rec.get("peer"),
                "state": rec.get("state"),
                "elapsed": _elapsed(start, end),
                "tokens": stats.get("tokens_used", 0),
                "cost": stats.get("cost_usd", 0.0),
                "summary": _cut(
                    stats.get("last_activity")
                    or (rec.get("handoff") or {}).get("summary")
                    or rec.get("prompt")
                ),
                "version": 0,
                "created_at": start,
                "prompt": _cut(rec.get("prompt"), 2_000),
                "cwd": rec.get("cwd"),
            }
        )
    return tasks_panel(out, inc)


def _number(value: Any) -> float:
    """A stored record's time as a number (0 for a damaged or missing one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value)


def _elapsed(start: Any, end: Any) -> int:
    try:
        return max(0, int(float(end) - float(start)))
    except (TypeError, ValueError):
        return 0
