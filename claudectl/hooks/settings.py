# -*- test-case-name: tests.test_hooks_install -*-
"""
Our entries in Claude Code's ``settings.json`` (``claudectl hooks ...``).

Claude Code reads hooks from ``~/.claude/settings.json`` (user scope) and
``<project>/.claude/settings.json`` (project scope)::

    {"hooks": {"PostToolUse": [{"matcher": "*",
                                "hooks": [{"type": "command", "command": "...",
                                           "timeout": 10}]}]}}

:func:`install` adds one group per event of :data:`claudectl.hooks.entry.EVENTS`
and leaves every other key, event and hook as it was; run twice, the second
run changes nothing.  Before changing a file it copies it to
``settings.json.claudectl-backup``.  A file that is not a JSON object (or
whose ``hooks`` is not shaped as above) is refused, never rewritten.
:func:`uninstall` removes exactly our hooks (and the groups, events and
``hooks`` object that only they filled).  Our hooks are recognised by
:data:`MARKERS` in their command.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claudectl.atomic import atomic_write
from claudectl.hooks.entry import EVENTS

#: Strings that only our hook commands contain.
MARKERS = ("claudectl/hooks/run.py", "-m claudectl.hooks ")
#: Events that have no matcher (every other one matches tool names).
NO_MATCHER = frozenset({"SessionStart", "UserPromptSubmit", "Stop", "SessionEnd"})
TIMEOUT_SECS = 10
BACKUP_SUFFIX = ".claudectl-backup"
MAX_SETTINGS_BYTES = 4 * 1024 * 1024


class SettingsError(Exception):
    """A settings file we must not touch."""


@dataclass
class Change:
    path: Path
    changed: bool
    backup: Path | None = None
    events: list[str] = field(default_factory=list)
    command: str = ""


def settings_path(root: Path) -> Path:
    """``<root>/.claude/settings.json`` (root: the home, or a project directory)."""
    return root / ".claude" / "settings.json"


def runner_path() -> Path:
    return Path(__file__).resolve().parent / "run.py"


def hook_command(event: str, home: Path | None, python: str | None = None) -> str:
    """The command for ``event``: this Python, ``-S``, our runner (and ``--home``)."""
    parts = [python or sys.executable, "-S", str(runner_path()), event]
    if home is not None:
        parts += ["--home", str(home)]
    return " ".join(shlex.quote(p) for p in parts)


def is_ours(hook: object) -> bool:
    if not isinstance(hook, dict):
        return False
    command = hook.get("command")
    return isinstance(command, str) and any(m in command + " " for m in MARKERS)


def read_settings(path: Path) -> dict[str, Any]:
    """The settings object ({} when the file is missing); SettingsError if unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SettingsError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_SETTINGS_BYTES:
        raise SettingsError(f"{path} is larger than {MAX_SETTINGS_BYTES} bytes; not touching it")
    if not data.strip():
        return {}
    try:
        settings = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SettingsError(
            f"cannot parse {path} ({e}); not touching it -- fix the file or move it away"
        ) from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path} is not a JSON object; not touching it")
    hooks = settings.get("hooks", {})
    if not isinstance(hooks, dict):
        raise SettingsError(f'{path}: "hooks" is not an object; not touching it')
    for event, groups in hooks.items():
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("hooks", []), list) for g in groups
        ):
            raise SettingsError(
                f'{path}: "hooks"."{event}" is not a list of {{"matcher", "hooks"}} groups; '
                "not touching it"
            )
    return settings


def _group(event: str, command: str) -> dict[str, Any]:
    hook = {"type": "command", "command": command, "timeout": TIMEOUT_SECS}
    if event in NO_MATCHER:
        return {"hooks": [hook]}
    return {"matcher": "*", "hooks": [hook]}


def _without_ours(groups: list[Any]) -> list[Any]:
    """``groups`` without our hooks; a group only ours filled goes too."""
    out = []
    for g in groups:
        hooks = g.get("hooks", [])
        kept = [h for h in hooks if not is_ours(h)]
        if len(kept) == len(hooks):
            out.append(g)
        elif kept:
            out.append({**g, "hooks": kept})
    return out


def merged(settings: dict[str, Any], home: Path | None) -> dict[str, Any]:
    """``settings`` with our hooks installed (a new object)."""
    new = copy.deepcopy(settings)
    hooks = new.setdefault("hooks", {})
    for event in EVENTS:
        want = _group(event, hook_command(event, home))
        groups = hooks.get(event, [])
        ours = [h for g in groups for h in g.get("hooks", []) if is_ours(h)]
        if len(ours) == 1 and want in groups:
            continue  # installed as we would install it: leave its place alone
        hooks[event] = _without_ours(groups) + [want]
    return new


def removed(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without our hooks (a new object)."""
    new = copy.deepcopy(settings)
    hooks = new.get("hooks")
    if not isinstance(hooks, dict):
        return new
    for event in list(hooks):
        groups = hooks[event]
        kept = _without_ours(groups)
        if kept == groups:
            continue
        if kept:
            hooks[event] = kept
        else:
            del hooks[event]
    if not hooks and hooks != settings.get("hooks"):
        del new["hooks"]
    return new


def installed(settings: dict[str, Any]) -> dict[str, list[str]]:
    """Event -> the commands of our hooks installed for it."""
    out: dict[str, list[str]] = {}
    hooks = settings.get("hooks")
    if not isinstance(hooks, dict):
        return out
    for event, groups in hooks.items():
        if not isinstance(groups, list):
            continue
        for g in groups:
            for h in g.get("hooks", []) if isinstance(g, dict) else ():
                if is_ours(h):
                    out.setdefault(event, []).append(h["command"])
    return out


def other_hooks(settings: dict[str, Any]) -> int:
    """How many hooks in ``settings`` are not ours."""
    hooks = settings.get("hooks")
    if not isinstance(hooks, dict):
        return 0
    return sum(
        1
        for groups in hooks.values()
        if isinstance(groups, list)
        for g in groups
        if isinstance(g, dict)
        for h in g.get("hooks", [])
        if not is_ours(h)
    )


def _write(path: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> Path | None:
    backup = None
    mode = 0o644
    if path.exists():
        mode = path.stat().st_mode & 0o777
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        atomic_write(backup, path.read_bytes(), mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(new, indent=2, ensure_ascii=False) + "\n", mode=mode)
    return backup


def install(path: Path, home: Path | None) -> Change:
    settings = read_settings(path)
    new = merged(settings, home)
    change = Change(path, new != settings, events=list(EVENTS))
    change.command = hook_command("EVENT", home)
    if change.changed:
        change.backup = _write(path, settings, new)
    return change


def uninstall(path: Path) -> Change:
    settings = read_settings(path)
    ours = installed(settings)
    new = removed(settings)
    change = Change(path, new != settings, events=sorted(ours))
    if change.changed:
        change.backup = _write(path, settings, new)
    return change


def current(command: str, home: Path | None) -> bool:
    """Is ``command`` what :func:`install` would write now (same Python, runner, home)?"""
    for event in EVENTS:
        if command == hook_command(event, home):
            return True
    return False


def home_argument(home_root: Path) -> Path | None:
    """The ``--home`` for the hook command: only when the home is not the user's own."""
    real = Path(os.path.expanduser("~"))
    try:
        if home_root.resolve() == real.resolve():
            return None
    except OSError:
        pass
    return home_root
