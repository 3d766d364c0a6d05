# -*- test-case-name: tests.test_hooks_install -*-
"""
``claudectl hooks install | uninstall | status``: this project's hooks in
Claude Code's settings (docs/claude-code.md).

User scope by default (``<home>/.claude/settings.json``, under the resolved
``--home`` / ``CLAUDECTL_HOME``), project scope with ``--project DIR``
(``DIR/.claude/settings.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from claudectl.cli.base import CliContext, CliError, cli, json_flag, pass_ctx
from claudectl.hooks import settings as hook_settings
from claudectl.hooks.entry import EVENTS


@cli.group()
def hooks() -> None:
    """Claude Code hooks: hive knowledge in, permission decisions out."""


project_option = click.option(
    "--project",
    "project",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Project scope: DIR/.claude/settings.json (default: user scope, "
    "<home>/.claude/settings.json).",
)


def _target(ctx: CliContext, project: Path | None) -> tuple[str, Path]:
    if project is None:
        return "user", hook_settings.settings_path(ctx.home.root)
    if not project.is_dir():
        raise CliError(f"project directory {project} does not exist")
    return "project", hook_settings.settings_path(project.absolute())


def _change_json(scope: str, change: hook_settings.Change) -> dict[str, Any]:
    return {
        "scope": scope,
        "path": str(change.path),
        "changed": change.changed,
        "backup": str(change.backup) if change.backup else None,
        "events": change.events,
        "command": change.command or None,
    }


@hooks.command()
@project_option
@json_flag
@pass_ctx
def install(ctx: CliContext, project: Path | None) -> None:
    """Add the hooks to Claude Code's settings (merged; twice changes nothing)."""
    scope, path = _target(ctx, project)
    try:
        change = hook_settings.install(path, hook_settings.home_argument(ctx.home.root))
    except hook_settings.SettingsError as e:
        raise CliError(str(e)) from None
    if ctx.json:
        ctx.emit_json(_change_json(scope, change))
        return
    if not change.changed:
        ctx.out(f"Hooks already installed in {path} ({scope} scope): nothing changed.")
        return
    ctx.out(f"Installed hooks for {', '.join(EVENTS)} in {path} ({scope} scope).")
    if change.backup:
        ctx.out(f"The previous settings are in {change.backup}.")
    ctx.out(
        f"Gate: {ctx.config.hive.gate} ([hive] gate = off | suggest | auto). "
        "Undo with `claudectl hooks uninstall`."
    )


@hooks.command()
@project_option
@json_flag
@pass_ctx
def uninstall(ctx: CliContext, project: Path | None) -> None:
    """Remove claudectl's hooks, leaving every other setting as it was."""
    scope, path = _target(ctx, project)
    try:
        change = hook_settings.uninstall(path)
    except hook_settings.SettingsError as e:
        raise CliError(str(e)) from None
    if ctx.json:
        ctx.emit_json(_change_json(scope, change))
        return
    if not change.changed:
        ctx.out(f"No claudectl hooks in {path} ({scope} scope): nothing changed.")
        return
    ctx.out(f"Removed the claudectl hooks ({', '.join(change.events)}) from {path}.")
    if change.backup:
        ctx.out(f"The previous settings are in {change.backup}.")


def _scope_status(ctx: CliContext, scope: str, path: Path) -> dict[str, Any]:
    home_arg = hook_settings.home_argument(ctx.home.root)
    row: dict[str, Any] = {"scope": scope, "path": str(path), "exists": path.exists()}
    try:
        settings = hook_settings.read_settings(path)
    except hook_settings.SettingsError as e:
        row.update(error=str(e), events={}, missing=list(EVENTS), current=False, other_hooks=0)
        return row
    ours = hook_settings.installed(settings)
    row["events"] = ours
    row["missing"] = [e for e in EVENTS if e not in ours]
    row["current"] = bool(ours) and all(
        hook_settings.current(c, home_arg) for cmds in ours.values() for c in cmds
    )
    row["other_hooks"] = hook_settings.other_hooks(settings)
    return row


@hooks.command()
@project_option
@json_flag
@pass_ctx
def status(ctx: CliContext, project: Path | None) -> None:
    """Say where the hooks are installed (user scope, and the project's)."""
    rows = [_scope_status(ctx, "user", hook_settings.settings_path(ctx.home.root))]
    proj = (project or ctx.cwd).absolute()
    rows.append(_scope_status(ctx, "project", hook_settings.settings_path(proj)))
    gate = ctx.config.hive.gate
    if ctx.json:
        ctx.emit_json({"scopes": rows, "gate": gate, "events": list(EVENTS)})
        return
    for row in rows:
        head = f"{row['scope'].capitalize()} scope: {row['path']}"
        if row.get("error"):
            ctx.out(f"{head}\n  unreadable: {row['error']}")
        elif not row["events"]:
            ctx.out(f"{head}\n  not installed" + ("" if row["exists"] else " (no file)"))
        else:
            state = "installed" if not row["missing"] else "partly installed"
            ctx.out(f"{head}\n  {state}: {', '.join(sorted(row['events']))}")
            if row["missing"]:
                ctx.out(f"  missing: {', '.join(row['missing'])} (run `claudectl hooks install`)")
            if not row["current"]:
                ctx.out(
                    "  the hook command points at another Python, copy or home "
                    "(run `claudectl hooks install` again)"
                )
        if row.get("other_hooks"):
            ctx.out(f"  {row['other_hooks']} other hook(s) in this file")
    ctx.out(f"Gate: {gate}")
