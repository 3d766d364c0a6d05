# -*- test-case-name: tests.test_hive_cli -*-
"""
``claudectl hive ...``: inspect and manage the knowledge store.

Readable tables by default; ``--json`` (global, or after the command) for
scripts.  Every change goes through the locked, atomic writers of
:mod:`claudectl.hive`, so these commands are safe while the relay runs.
"""

from __future__ import annotations

import difflib
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from claudectl.atomic import atomic_write, locked
from claudectl.cli.base import CliContext, CliError, hive, pass_ctx
from claudectl.control.notice import notify_service
from claudectl.hive import archive as archive_mod
from claudectl.hive.decisions import append_decisions, brain_decision
from claudectl.hive.delivery import load_delivery
from claudectl.hive.distill import CURSOR, Cursor, maybe_distill
from claudectl.hive.exchange import (
    ImportProblem,
    export_json,
    export_yaml,
    import_units,
    parse_document,
)
from claudectl.hive.prompt import build_prompt
from claudectl.hive.store import (
    ARCHIVE,
    CONFLICTS,
    MODE,
    QUARANTINE,
    hive_active,
    hive_file,
    load_store,
    store_transaction,
)
from claudectl.hive.trust import PeerTrust, TrustBook, load_trust, tier_for, trust_transaction
from claudectl.hive.units import KnowledgeUnit, Scope
from claudectl.relay.keystore import KeyStore, is_valid_peer_id
from claudectl.text import clean_line, json_safe

json_option = click.option("--json", "json_", is_flag=True, help="Machine-readable JSON output.")


def _now() -> int:
    return int(time.time())


def _wants_json(ctx: CliContext, local: bool) -> bool:
    return ctx.json or local


def _identity(ctx: CliContext) -> str:
    return KeyStore(ctx.home).ensure_identity()


def _when(epoch: int | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M")


def _table(ctx: CliContext, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    # Cells hold peer text (ids, summaries): one line each, nothing raw.
    cells = [[clean_line(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    ctx.out("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    ctx.out("  ".join("\u2500" * w for w in widths))
    for row in cells:
        ctx.out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _warn_damage(ctx: CliContext) -> Callable[[str], None]:
    return lambda text: ctx.err(f"Warning: {text}.")


def _trust_book(ctx: CliContext) -> TrustBook:
    """trust.json, with a ``Warning:`` line if it is damaged (every tier changed)."""
    return load_trust(ctx.home, ctx.config.hive.default_trust, on_damage=_warn_damage(ctx))


def _loaded_units(ctx: CliContext) -> list[KnowledgeUnit]:
    loaded = load_store(ctx.home)
    if loaded.bad:
        ctx.err(
            f"Warning: {len(loaded.bad)} unreadable line(s) in knowledge.jsonl "
            "(they will be moved to quarantine.jsonl at the next write)."
        )
    return loaded.store.units()


# --- status --------------------------------------------------------------------------


@hive.command()
@json_option
@pass_ctx
def status(ctx: CliContext, json_: bool) -> None:
    """Show an overview of the knowledge store."""
    cfg = ctx.config.hive
    me = _identity(ctx)
    units = _loaded_units(ctx)
    local = [u for u in units if u.source_peer == me]
    peers = Counter(u.source_peer for u in units if u.source_peer != me)
    book = _trust_book(ctx)
    frozen = sorted(p for p, r in book.records.items() if r.frozen)
    cursor = Cursor.load(hive_file(ctx.home, CURSOR))
    try:
        mode = hive_file(ctx.home, MODE).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        mode = None
    info = {
        "active": hive_active(ctx.home, cfg),
        "mode_file": mode,
        "identity": me,
        "units": len(units),
        "local_units": len(local),
        "peer_units": sum(peers.values()),
        "by_type": dict(Counter(u.type for u in units).most_common()),
        "by_peer": dict(peers.most_common()),
        "trust_records": len(book.records),
        "frozen_peers": frozen,
        "archived_units": _count_lines(hive_file(ctx.home, ARCHIVE)),
        "quarantined_lines": _count_lines(hive_file(ctx.home, QUARANTINE)),
        "conflicts_logged": _count_lines(hive_file(ctx.home, CONFLICTS)),
        "last_distill": cursor.last_distill if cursor else None,
        "pending_decisions": cursor.pending if cursor else None,
        "max_units": cfg.max_units,
    }
    if _wants_json(ctx, json_):
        ctx.emit_json(info)
        return
    why = (
        f"mode file says {mode}"
        if mode in ("on", "off")
        else f"[hive] enabled = {'true' if cfg.enabled else 'false'}"
    )
    ctx.out(f"Hive:        {'active' if info['active'] else 'inactive'} ({why})")
    ctx.out(f"Identity:    {me}")
    cap = f" (cap {cfg.max_units})" if cfg.max_units else ""
    ctx.out(
        f"Knowledge:   {len(units)} units{cap}: {len(local)} local, "
        f"{info['peer_units']} from {len(peers)} peer(s)"
    )
    if units:
        by_type: dict[str, int] = info["by_type"]  # type: ignore[assignment]
        ctx.out("  by type:   " + ", ".join(f"{t} {n}" for t, n in by_type.items()))
    if peers:
        ctx.out("  by peer:   " + ", ".join(f"{clean_line(p)} {n}" for p, n in peers.most_common()))
    ctx.out(
        f"Trust:       {len(book.records)} peer record(s)"
        + (f", frozen: {clean_line(', '.join(frozen))}" if frozen else "")
    )
    for peer_id, rec in sorted(book.records.items()):
        ctx.out(
            f"  {clean_line(peer_id)}: trust {rec.trust_level:.2f}, accepted "
            f"{rec.knowledge_accepted}, conflicted {rec.knowledge_conflicted}, "
            f"last sync {_when(rec.last_sync)}"
        )
    ctx.out(f"Archive:     {info['archived_units']} unit(s)")
    if info["quarantined_lines"]:
        ctx.out(
            f"Quarantine:  {info['quarantined_lines']} unreadable line(s) kept in "
            f"{hive_file(ctx.home, QUARANTINE)}"
        )
    ctx.out(f"Conflicts:   {info['conflicts_logged']} logged")
    if cursor:
        ctx.out(
            f"Distilled:   {_when(cursor.last_distill)} ({cursor.pending} new decision(s) since)"
        )
    else:
        ctx.out("Distilled:   never (run `claudectl hive distill`)")


# --- knowledge -------------------------------------------------------------------------


@hive.command()
@click.option(
    "--from", "from_", metavar="PEER", help="Only units from this peer (an id or the start of one)."
)
@click.option(
    "--scope", metavar="SCOPE", help="Only units of this scope: universal, language:X or project:X."
)
@click.option("--type", "type_", metavar="TYPE", help="Only units of this content type.")
@json_option
@pass_ctx
def knowledge(
    ctx: CliContext, from_: str | None, scope: str | None, type_: str | None, json_: bool
) -> None:
    """List knowledge units (--json: an array of units in claudectl's form)."""
    units = _loaded_units(ctx)
    if from_ is not None:
        units = [u for u in units if u.source_peer == from_ or u.source_peer.startswith(from_)]
    if scope is not None:
        want = Scope.parse(scope)
        units = [u for u in units if u.scope == want]
    if type_ is not None:
        units = [u for u in units if u.type == type_]
    if _wants_json(ctx, json_):
        ctx.out_json_text(export_json(units))
        return
    if not units:
        ctx.out("No knowledge units.")
        return
    now = _now()
    delivery = load_delivery(ctx.home)
    # VIA: the peers that delivered a unit to us (trust by path, docs/hive.md).
    rows = [
        (
            u.id,
            u.scope.display(),
            u.type,
            f"{u.effective_confidence(now):.2f}",
            u.evidence_count,
            u.source_peer,
            ",".join(delivery.deliverers(u)) or "-",
            _shown(u) + (" [stale]" if u.is_stale(now) else ""),
        )
        for u in units
    ]
    _table(ctx, ("ID", "SCOPE", "TYPE", "CONF", "EVID", "FROM", "VIA", "SUMMARY"), rows)
    ctx.out(f"{len(units)} unit(s)")


# --- export / import ------------------------------------------------------------------------


@hive.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "yaml"]),
    default="json",
    show_default=True,
    help="Output format.",
)
@json_option
@pass_ctx
def export(ctx: CliContext, fmt: str, json_: bool) -> None:
    """Print all knowledge units (personal ones included) for `hive import`.

    The output is JSON unless --format yaml (--json says the same as the default).
    """
    if _wants_json(ctx, json_) and fmt == "yaml":
        raise CliError("--json asks for JSON but --format yaml for YAML: give one of them")
    units = _loaded_units(ctx)
    # JSON: claudectl's form, C1/bidi characters as \u escapes (same data).
    text = json_safe(export_json(units)) if fmt == "json" else export_yaml(units)
    ctx.stdout.write(text if text.endswith("\n") else text + "\n")
    ctx.stdout.flush()


@hive.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@json_option
@pass_ctx
def import_(ctx: CliContext, file: str, json_: bool) -> None:
    """Merge knowledge from a JSON or YAML file (local knowledge always wins).

    The whole file is checked first: if any record is bad, nothing changes.
    """
    try:
        data = click.open_file(file, "rb").read()
    except OSError as e:
        raise CliError(f"cannot read {file}: {e.strerror or e}") from None
    try:
        units = parse_document(data)
    except ImportProblem as e:
        raise CliError(f"{file}: {e}; nothing was imported") from None
    result = import_units(
        ctx.home, units, local_id=_identity(ctx), config=ctx.config.hive, now=_now()
    )
    notify_service(ctx.home, ["knowledge.jsonl", "trust.json"])
    if _wants_json(ctx, json_):
        ctx.emit_json(result.stats())
        return
    ctx.out(f"Imported {result.accepted} new knowledge units.")
    ctx.out(
        f"  updated {result.updated}, rejected {result.rejected} "
        f"(local knowledge wins), duplicates {result.duplicates}"
    )


@hive.command()
@click.argument("unit_id")
@json_option
@pass_ctx
def forget(ctx: CliContext, unit_id: str, json_: bool) -> None:
    """Remove a knowledge unit by id."""
    cfg = ctx.config.hive
    with store_transaction(ctx.home, local_id=_identity(ctx), config=cfg) as store:
        gone = store.remove_id(unit_id)
    notify_service(ctx.home, ["knowledge.jsonl"])
    if not gone:
        raise CliError(f"no knowledge unit with id {unit_id}")
    if _wants_json(ctx, json_):
        ctx.emit_json({"removed": [u.to_json() for u in gone]})
        return
    for u in gone:
        ctx.out(f"Removed {clean_line(u.id)}: {clean_line(_shown(u))}")


# --- on / off -------------------------------------------------------------------------------


def _set_mode(ctx: CliContext, word: str, json_: bool) -> None:
    path = hive_file(ctx.home, MODE)
    with locked(path):
        atomic_write(path, word)  # the bare word, no newline (as claudectl writes it)
    active = hive_active(ctx.home, ctx.config.hive)
    if _wants_json(ctx, json_):
        ctx.emit_json({"mode": word, "active": active, "path": str(path)})
        return
    if active:
        ctx.out(f"Hive on: this instance shares and receives knowledge ({path}).")
    else:
        ctx.out(
            f"Hive off: no knowledge is shared, received or injected ({path}); "
            "`claudectl hive on` turns it back on."
        )


@hive.command(name="on")
@json_option
@pass_ctx
def hive_on(ctx: CliContext, json_: bool) -> None:
    """Turn the hive on for this home (writes `on` to hive/mode, over [hive] enabled)."""
    _set_mode(ctx, "on", json_)


@hive.command(name="off")
@json_option
@pass_ctx
def hive_off(ctx: CliContext, json_: bool) -> None:
    """Turn the hive off for this home (writes `off` to hive/mode, over [hive] enabled)."""
    _set_mode(ctx, "off", json_)


# --- trust ----------------------------------------------------------------------------------


def _shown(unit: KnowledgeUnit) -> str:
    """A unit's summary for the CLI's tables.  A pattern says what its percentage
    is: claudectl's summary (kept byte for byte in prompts) writes ``deny (0%)``
    for "denied every time", which reads like "0% sure"."""
    from claudectl.hive.units import Pattern, pct

    c = unit.content
    if isinstance(c, Pattern):
        return (
            f"[{c.tool}, {c.command_pattern or '*'}] {c.preferred_action} "
            f"({pct(c.accept_rate)}% accepted over {c.sample_count})"
        )
    return unit.summary()


def _trust_json(rec: PeerTrust | None, peer: str, book: TrustBook, now: int) -> dict[str, Any]:
    level = book.level(peer)
    out: dict[str, Any] = {
        "peer_id": peer,
        "trust_level": level,
        "tier": tier_for(level).display,
        "record": rec is not None,
    }
    if rec is not None:
        out.update(rec.to_json())
        out["tier"] = rec.tier.display
        out["quarantined"] = rec.is_quarantined(now)
    out["trust_level"] = round(out["trust_level"], 4)  # not 0.3999999999999999
    return out


@hive.command()
@click.argument("peer", required=False)
@click.argument("level", required=False)
@click.option("--unfreeze", is_flag=True, help="Clear a freeze set by the sybil checks.")
@json_option
@pass_ctx
def trust(
    ctx: CliContext, peer: str | None, level: str | None, unfreeze: bool, json_: bool
) -> None:
    """Show peers' trust, show one peer's, or set it (0.0-1.0, clamped).

    Tiers: Confirmed >= 0.8 [hive], Suggested >= 0.5 [hive, suggested],
    Unverified >= 0.2 [hive, unverified], Ignored < 0.2 (never in prompts).
    """
    cfg = ctx.config.hive
    now = _now()
    if peer is not None and not is_valid_peer_id(peer):
        raise CliError(f"{peer!r} is not a valid peer id")
    if peer is None:
        if unfreeze:
            raise CliError("--unfreeze needs a peer")
        book = _trust_book(ctx)
        peers = _known_peers(ctx, book)
        items = [_trust_json(book.get(p), p, book, now) for p in peers]
        if _wants_json(ctx, json_):
            ctx.emit_json(items)
            return
        if not items:
            ctx.out(f"No peers yet (new peers start at trust {cfg.default_trust:.2f}).")
            return
        rows = []
        for it in items:
            flags = []
            if it.get("frozen"):
                flags.append("frozen")
            if it.get("quarantined"):
                flags.append("quarantined")
            if not it["record"]:
                flags.append("default")
            rows.append(
                (
                    it["peer_id"],
                    f"{it['trust_level']:.2f}",
                    it["tier"],
                    it.get("knowledge_accepted", 0),
                    it.get("knowledge_conflicted", 0),
                    _when(it.get("last_sync")),
                    ",".join(flags) or "-",
                )
            )
        _table(ctx, ("PEER", "TRUST", "TIER", "AGREED", "DISAGREED", "LAST SYNC", "FLAGS"), rows)
        return
    peer = _resolve_known_peer(ctx, peer, _trust_book(ctx))
    if level is None and not unfreeze:
        book = _trust_book(ctx)
        it = _trust_json(book.get(peer), peer, book, now)
        if _wants_json(ctx, json_):
            ctx.emit_json(it)
            return
        ctx.out(
            f"{peer}: trust {it['trust_level']:.2f} ({it['tier']})"
            + ("" if it["record"] else " -- no record yet, default trust")
        )
        if it["record"]:
            ctx.out(
                f"  agreed {it['knowledge_accepted']}, disagreed "
                f"{it['knowledge_conflicted']}, first seen {_when(it['first_seen'])}, "
                f"last sync {_when(it['last_sync'])}"
            )
            if it["frozen"]:
                ctx.out(f"  frozen: {clean_line(it['freeze_reason'])} (clear with --unfreeze)")
            if it["quarantined"]:
                ctx.out(f"  quarantined until {_when(it['quarantined_until'])}")
        return
    value: float | None = None
    if level is not None:
        try:
            value = float(level)
        except ValueError:
            raise CliError(f"trust level must be a number from 0.0 to 1.0, not {level!r}") from None
        if value != value:  # NaN
            raise CliError("trust level must be a number from 0.0 to 1.0")
    with trust_transaction(ctx.home, cfg.default_trust, _warn_damage(ctx)) as book:
        unfrozen = book.unfreeze(peer) if unfreeze else False
        rec = book.set_level(peer, value, now) if value is not None else book.get(peer)
        it = _trust_json(rec, peer, book, now)
    if unfreeze or value is not None:
        notify_service(ctx.home, ["trust.json"])
    if _wants_json(ctx, json_):
        ctx.emit_json(it)
        return
    if unfreeze:
        ctx.out(f"{peer} unfrozen." if unfrozen else f"{peer} was not frozen.")
    if value is not None:
        clamped = f" (clamped from {level})" if rec is not None and rec.trust_level != value else ""
        ctx.out(f"Trust for {peer} set to {it['trust_level']:.2f} ({it['tier']}){clamped}.")


def _known_peers(ctx: CliContext, book: Any) -> list[str]:
    """Peers this home knows: paired, with a trust record, or the source of a unit."""
    me = _identity(ctx)
    seen = {u.source_peer for u in load_store(ctx.home).store if u.source_peer != me}
    return sorted(set(book.records) | set(KeyStore(ctx.home).known_peers()) | seen)


def _resolve_known_peer(ctx: CliContext, text: str, book: Any) -> str:
    """A known peer id, or the one known id that ``text`` is a prefix of; else an error
    (a typo must not create a trust record for a peer that does not exist)."""
    known = _known_peers(ctx, book)
    if text in known:
        return text
    matches = [p for p in known if p.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CliError(f"{text!r} matches several peers: {', '.join(matches)}; give more of the id")
    hint = ""
    near = difflib.get_close_matches(text, known, n=1, cutoff=0.6)
    if near:
        hint = f"; did you mean {near[0]}?"
    elif known:
        hint = f"; known peers: {', '.join(known[:10])}{' …' if len(known) > 10 else ''}"
    else:
        hint = "; no peers yet: pair first (`claudectl relay invite` / `relay join`)"
    raise CliError(f"unknown peer {text!r}{hint} (see `claudectl hive trust`)")


# --- archive, distill, curriculum ---------------------------------------------------------------


@hive.command(name="archive")
@click.option(
    "--prune",
    metavar="AGE",
    help="Remove archived units last validated longer ago than AGE (e.g. 90d).",
)
@json_option
@pass_ctx
def archive_cmd(ctx: CliContext, prune: str | None, json_: bool) -> None:
    """Show the cold-storage archive of evicted units, or prune it."""
    now = _now()
    pruned = None
    if prune is not None:
        try:
            age = archive_mod.parse_age(prune)
        except ValueError as e:
            raise CliError(str(e)) from None
        removed, kept = archive_mod.prune_archive(ctx.home, age, now)
        pruned = {"removed": removed, "kept": kept}
    stats = archive_mod.archive_stats(ctx.home)
    if _wants_json(ctx, json_):
        out = stats.to_json()
        if pruned is not None:
            out["pruned"] = pruned
        ctx.emit_json(out)
        return
    if pruned is not None:
        ctx.out(
            f"Pruned {pruned['removed']} archived unit(s) older than {prune}; "
            f"{pruned['kept']} kept."
        )
    ctx.out(f"Archive: {stats.units} unit(s), {stats.bytes} bytes ({hive_file(ctx.home, ARCHIVE)})")
    if stats.units:
        ctx.out(f"  validated between {_when(stats.oldest)} and {_when(stats.newest)}")
        ctx.out("  by type: " + ", ".join(f"{t} {n}" for t, n in stats.by_type.items()))
        ctx.out("  by peer: " + ", ".join(f"{clean_line(p)} {n}" for p, n in stats.by_peer.items()))
    if stats.unreadable:
        ctx.out(f"  {stats.unreadable} unreadable line(s) (moved to quarantine on prune)")


@hive.command()
@json_option
@pass_ctx
def distill(ctx: CliContext, json_: bool) -> None:
    """Distil the brain's decision log into knowledge, then the curriculum.

    Reads ~/.claudectl/brain/decisions.jsonl (and preferences.json), updates
    the store (a re-distilled unit keeps its id and gets a new version), then
    condenses archive + store into curriculum.json.
    """
    cfg = ctx.config.hive
    me = _identity(ctx)
    now = _now()
    res = maybe_distill(ctx.home, cfg, now, local_id=me, force=True)
    notify_service(ctx.home, ["knowledge.jsonl", "trust.json"])
    cur = archive_mod.write_curriculum(ctx.home, me, now)
    report = res.report
    assert report is not None
    if _wants_json(ctx, json_):
        ctx.emit_json(
            {"distill": report.to_json(), "trust_drift": res.drift, "curriculum": cur.meta}
        )
        return
    ctx.out(
        f"Distilled {report.decisions} decision(s): {report.new} new, "
        f"{report.updated} updated, {report.unchanged} unchanged unit(s)"
        + (f", {report.replaced_peer} peer unit(s) superseded" if report.replaced_peer else "")
        + "."
    )
    if res.drift:
        ctx.out(f"Trust adjusted {res.drift} time(s) from new decisions.")
    ctx.out(
        f"Curriculum v{cur.meta['version']}: {cur.meta['unit_count']} unit(s) from "
        f"{cur.meta['source_archive_units']} archived + the store."
    )
    log_path = ctx.home.brain / "decisions.jsonl"
    if report.decisions == 0 and not log_path.exists():
        ctx.out()
        ctx.out(
            f"No decision log yet ({log_path}). claudectl's brain writes one line there "
            f"for every tool call you approve or deny."
        )
        ctx.out("To try the hive without it, record some decisions, then distil again:")
        ctx.out('  claudectl hive record --tool Bash --command "cargo test" --count 10')
        ctx.out(
            '  claudectl hive record --tool Bash --command "rm -rf build" --user reject --count 6'
        )


_USER_ACTIONS = (
    "accept",
    "reject",
    "auto",
    "user_approve",
    "rule_approve",
    "deny_rule_override",
    "rule_deny",
    "conflict_deny",
)


@hive.command(name="record")
@click.option("--tool", required=True, metavar="TOOL", help="The tool, e.g. Bash, Write, Read.")
@click.option(
    "--command",
    "command_",
    metavar="TEXT",
    default=None,
    help='The command or file path, e.g. "cargo test --all" or /src/Cargo.lock.',
)
@click.option(
    "--user",
    "user_action",
    type=click.Choice(_USER_ACTIONS),
    default="accept",
    show_default=True,
    help="What the user did (accept/auto/... count as approval, reject/rule_deny/... as denial).",
)
@click.option(
    "--brain",
    "brain_action",
    type=click.Choice(["approve", "deny"]),
    default=None,
    help="What the brain suggested (default: what the user did).",
)
@click.option("--project", default="example", show_default=True, help="The project name.")
@click.option(
    "--count",
    type=click.IntRange(1, 10_000),
    default=1,
    show_default=True,
    help="How many identical decisions to record.",
)
@json_option
@pass_ctx
def record(
    ctx: CliContext,
    tool: str,
    command_: str | None,
    user_action: str,
    brain_action: str | None,
    project: str,
    count: int,
    json_: bool,
) -> None:
    """Record decisions in the brain's log, as claudectl's brain would.

    claudectl's brain appends one line to ~/.claudectl/brain/decisions.jsonl
    for every tool call you approve or deny; `hive distill` turns that log into
    knowledge.  Without claudectl's brain, record a few decisions here to try
    the hive, e.g. `hive record --tool Bash --command "cargo test" --count 10`.
    """
    from claudectl.hive.trust import NEGATIVE_ACTIONS

    if brain_action is None:
        brain_action = "deny" if user_action in NEGATIVE_ACTIONS else "approve"
    now = _now()
    pid = os.getpid()
    records = [
        brain_decision(
            tool=tool,
            command=command_,
            project=project,
            user_action=user_action,
            brain_action=brain_action,
            now=now,
            pid=pid,
            n=n,
            reasoning="recorded with claudectl hive record",
        )
        for n in range(count)
    ]
    path = append_decisions(ctx.home, records)
    if _wants_json(ctx, json_):
        ctx.emit_json(
            {
                "recorded": count,
                "path": str(path),
                "tool": tool,
                "command": command_,
                "user_action": user_action,
                "brain_action": brain_action,
            }
        )
        return
    what = f"{tool} {command_!r}" if command_ else tool
    ctx.out(
        f"Recorded {count} decision(s) in {path}: {what}, user {user_action}, brain {brain_action}."
    )
    ctx.out(
        "Run `claudectl hive distill` to turn them into knowledge units "
        f"(a pattern needs {ctx.config.hive.export_min_evidence} decisions)."
    )


@hive.command()
@json_option
@pass_ctx
def curriculum(ctx: CliContext, json_: bool) -> None:
    """Show the distilled curriculum (written by `hive distill`)."""
    cur = archive_mod.read_curriculum(ctx.home)
    if _wants_json(ctx, json_):
        ctx.out_json_text(export_json(cur.units))
        return
    if not cur.meta and not cur.units:
        ctx.out("No curriculum yet; run `claudectl hive distill`.")
        return
    ctx.out(
        f"Curriculum v{cur.meta.get('version', '?')} ({_when(cur.meta.get('timestamp'))}): "
        f"{len(cur.units)} unit(s), from {cur.meta.get('source_archive_units', 0)} "
        "archived unit(s) and the store"
    )
    if cur.units:
        rows = [
            (i, f"{u.confidence:.2f}", u.evidence_count, u.source_peer, _shown(u))
            for i, u in enumerate(cur.units, 1)
        ]
        _table(ctx, ("#", "CONF", "EVID", "FROM", "LESSON"), rows)


# --- prompt ------------------------------------------------------------------------------------


@hive.command()
@click.option("--tool", metavar="TOOL", help="Only knowledge about this tool (e.g. Bash).")
@click.option("--command", "command_", metavar="CMD", help="Only knowledge covering CMD.")
@click.option("--project", metavar="NAME", help="Leave out units scoped to other projects.")
@click.option(
    "--pid",
    type=int,
    metavar="PID",
    help="Apply rollout sampling as for the session with this pid.",
)
@json_option
@pass_ctx
def prompt(
    ctx: CliContext,
    tool: str | None,
    command_: str | None,
    project: str | None,
    pid: int | None,
    json_: bool,
) -> None:
    """Print the `## Hive Knowledge` section the brain would get."""
    cfg = ctx.config.hive
    text = build_prompt(
        ctx.home, cfg, _identity(ctx), _now(), pid=pid, tool=tool, command=command_, project=project
    )
    if _wants_json(ctx, json_):
        ctx.emit_json({"text": text})
        return
    if not text:
        ctx.err("No hive knowledge to inject (no peer units pass the trust and relevance filters).")
        return
    ctx.out(text)
