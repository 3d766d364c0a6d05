# -*- test-case-name: tests.test_config -*-
"""
Configuration: ``~/.config/claudectl/config.toml`` overlaid by
``./.claudectl.toml`` (and an optional explicit file), as claudectl reads it,
but parsed as real TOML.

Each section (``[relay]``, ``[hive]``, ``[delegation]``) is a frozen
dataclass.  Every key is declared once in :data:`SCHEMA` with its type, range
and default; a wrong value raises :class:`ConfigError` naming the key, the
file and what is allowed.  Command-line options are applied on top with
:func:`dataclasses.replace` by the caller.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claudectl.home import Home


class ConfigError(Exception):
    """A configuration file could not be read or holds a wrong value."""


# --- value checkers -----------------------------------------------------------


@dataclass(frozen=True)
class Key:
    name: str
    check: Callable[[Any], Any]
    allowed: str
    aliases: tuple[str, ...] = ()


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    raise ValueError


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError
        if v < lo or (hi is not None and v > hi):
            raise ValueError
        return v

    return check


def _float(lo: float, hi: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError
        if not (lo <= float(v) <= hi):
            raise ValueError
        return float(v)

    return check


def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError


def _nonempty_str(v: Any) -> str:
    if isinstance(v, str) and v.strip():
        return v
    raise ValueError


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ValueError


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if isinstance(v, str) and v.lower() in options:
            return v.lower()
        raise ValueError

    return check


# --- sections -----------------------------------------------------------------


@dataclass(frozen=True)
class RelayConfig:
    enabled: bool = False
    listen_port: int = 9847
    listen_addr: str = "0.0.0.0"
    max_peers: int = 8
    heartbeat_interval_secs: int = 30
    reconnect_max_secs: int = 60
    auto_connect: tuple[str, ...] = ()
    handshake_timeout_secs: int = 30
    lan_discovery: bool = True
    lan_broadcast_port: int = 9848
    lan_broadcast_addr: str = "255.255.255.255"
    lan_announce_interval: int = 10
    invite_ttl_hours: int = 24
    require_encryption: bool = False
    #: NAT hubs (docs/hub.md): register there, and reach peers through them.
    hubs: tuple[str, ...] = ()
    hub_token: str = ""


@dataclass(frozen=True)
class HiveConfig:
    enabled: bool = True
    default_trust: float = 0.5
    auto_trust_drift: bool = True
    max_propagation: int = 5
    export_min_evidence: int = 5
    export_min_tool_decisions: int = 10
    knowledge_ttl_days: int = 30
    inject_unverified: bool = True
    max_units: int = 500
    max_prompt_units: int = 20
    stale_peer_days: int = 90
    share_categories: tuple[str, ...] = ()
    exclude_tools: tuple[str, ...] = ()
    exclude_commands: tuple[str, ...] = ()
    exclude_content_types: tuple[str, ...] = ()
    share_mode: str = "auto"
    max_units_per_peer_per_day: int = 1000
    #: conflicts/resolutions/collisions .jsonl: rotated to ``<name>.1`` past this.
    max_log_bytes: int = 16 * 1024 * 1024
    #: The Claude Code permission gate (docs/claude-code.md): off, suggest or auto.
    gate: str = "off"


@dataclass(frozen=True)
class DelegationConfig:
    allowed_dirs: tuple[str, ...] = ()
    min_trust: float = 0.5
    max_concurrent: int = 2
    claude_command: str = "claude"
    claude_args: tuple[str, ...] = ()
    max_prompt_bytes: int = 100_000
    stop_grace_secs: int = 10
    status_interval_secs: int = 30
    task_timeout_secs: int = 0
    allowed_git_remotes: tuple[str, ...] = ()
    answer_timeout_secs: int = 120
    allow_plaintext_tasks: bool = False


@dataclass(frozen=True)
class Config:
    relay: RelayConfig = field(default_factory=RelayConfig)
    hive: HiveConfig = field(default_factory=HiveConfig)
    delegation: DelegationConfig = field(default_factory=DelegationConfig)
    #: The files that were read, in order (for messages and ``--help``).
    sources: tuple[str, ...] = ()
    #: Unknown keys in our sections, each with the nearest known key.
    warnings: tuple[str, ...] = ()


_CATEGORIES = ("best_practice", "technique", "workflow", "workflow_pattern", "personal")

SCHEMA: dict[str, tuple[type, list[Key]]] = {
    "relay": (
        RelayConfig,
        [
            Key("enabled", _bool, "true or false"),
            Key("listen_port", _int(0, 65535), "an integer port 0-65535", ("port",)),
            Key("listen_addr", _nonempty_str, 'an IP address such as "0.0.0.0" or "::"', ("addr",)),
            Key("max_peers", _int(0, 4096), "an integer 0-4096"),
            Key(
                "heartbeat_interval_secs",
                _int(1, 86400),
                "an integer number of seconds 1-86400",
                ("heartbeat_interval",),
            ),
            Key(
                "reconnect_max_secs",
                _int(1, 86400),
                "an integer number of seconds 1-86400",
                ("reconnect_max",),
            ),
            Key("auto_connect", _str_list, 'a list of "host:port" strings'),
            Key("handshake_timeout_secs", _int(1, 3600), "an integer number of seconds 1-3600"),
            Key("lan_discovery", _bool, "true or false"),
            Key("lan_broadcast_port", _int(0, 65535), "an integer port 0-65535"),
            Key("lan_broadcast_addr", _nonempty_str, 'an IPv4 address such as "255.255.255.255"'),
            Key("lan_announce_interval", _int(1, 86400), "an integer number of seconds 1-86400"),
            Key("invite_ttl_hours", _int(1, 24 * 365), "an integer number of hours 1-8760"),
            Key("require_encryption", _bool, "true or false"),
            Key("hubs", _str_list, 'a list of "host:port" strings'),
            Key("hub_token", _str, "a string"),
        ],
    ),
    "hive": (
        HiveConfig,
        [
            Key("enabled", _bool, "true or false"),
            Key("default_trust", _float(0.0, 1.0), "a number from 0.0 to 1.0"),
            Key("auto_trust_drift", _bool, "true or false"),
            Key("max_propagation", _int(0, 2**32 - 1), "a non-negative integer"),
            Key("export_min_evidence", _int(0, 2**32 - 1), "a non-negative integer"),
            Key("export_min_tool_decisions", _int(0, 2**32 - 1), "a non-negative integer"),
            Key("knowledge_ttl_days", _int(0, 2**32 - 1), "a non-negative integer number of days"),
            Key("inject_unverified", _bool, "true or false"),
            Key("max_units", _int(0), "a non-negative integer (0 = no cap)"),
            Key("max_prompt_units", _int(0), "a non-negative integer (0 = all)"),
            Key("stale_peer_days", _int(0, 2**32 - 1), "a non-negative integer number of days"),
            Key("share_categories", _str_list, "a list of categories: " + ", ".join(_CATEGORIES)),
            Key("exclude_tools", _str_list, "a list of tool names"),
            Key("exclude_commands", _str_list, "a list of command patterns"),
            Key("exclude_content_types", _str_list, "a list of content types"),
            Key("share_mode", _choice("auto", "manual"), '"auto" or "manual"'),
            Key("max_units_per_peer_per_day", _int(1), "a positive integer"),
            Key("max_log_bytes", _int(4096), "an integer number of bytes, at least 4096"),
            Key("gate", _choice("off", "suggest", "auto"), '"off", "suggest" or "auto"'),
        ],
    ),
    "delegation": (
        DelegationConfig,
        [
            Key("allowed_dirs", _str_list, "a list of directory paths"),
            Key("min_trust", _float(0.0, 1.0), "a number from 0.0 to 1.0"),
            Key("max_concurrent", _int(1, 256), "an integer 1-256"),
            Key("claude_command", _nonempty_str, "a program name or path"),
            Key("claude_args", _str_list, "a list of extra arguments"),
            Key("max_prompt_bytes", _int(1), "a positive integer"),
            Key("stop_grace_secs", _int(0, 3600), "an integer number of seconds 0-3600"),
            Key("status_interval_secs", _int(1, 3600), "an integer number of seconds 1-3600"),
            Key(
                "task_timeout_secs", _int(0), "a non-negative integer number of seconds (0 = none)"
            ),
            Key(
                "allowed_git_remotes",
                _str_list,
                'a list of git remote URLs or URL prefixes ("*" = any)',
            ),
            Key(
                "answer_timeout_secs",
                _int(0),
                "a non-negative integer number of seconds (0 = wait forever)",
            ),
            Key("allow_plaintext_tasks", _bool, "true or false"),
        ],
    ),
}


#: claudectl 0.64 keys in our sections that this implementation does not use
#: (its HTTP coordinator API): no "unknown key" warning for them.
CLAUDECTL_ONLY_KEYS = {"relay": frozenset({"http_port", "auth_token"})}


def _unknown_key_warning(section: str, raw_name: str, known: Iterable[str], where: str) -> str:
    near = difflib.get_close_matches(raw_name, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{section}.{near[0]}'?" if near else ""
    return f"{where}: unknown key '{section}.{raw_name}' is ignored{hint}"


def _check_allowed_dirs(values: tuple[str, ...], where: str) -> tuple[str, ...]:
    for v in values:
        if not (os.path.isabs(v) or v == "~" or v.startswith("~/")):
            raise ConfigError(
                f"{where}: key 'delegation.allowed_dirs' has the relative path {v!r}; "
                f'write absolute paths (or ~/… for this home), e.g. ["/srv/proj"]'
            )
    return values


def _check_share_categories(values: tuple[str, ...], where: str) -> tuple[str, ...]:
    for v in values:
        if v not in _CATEGORIES:
            raise ConfigError(
                f"{where}: key 'hive.share_categories' has unknown category {v!r}; "
                f"allowed: {', '.join(_CATEGORIES)}"
            )
    return values


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _apply(
    section: str, current: Any, table: dict[str, Any], where: str, warnings: list[str] | None = None
) -> Any:
    cls, keys = SCHEMA[section]
    by_name = {}
    for k in keys:
        by_name[k.name] = k
        for a in k.aliases:
            by_name[a] = k
    changes: dict[str, Any] = {}
    for raw_name, value in table.items():
        key = by_name.get(raw_name)
        if key is None:
            # claudectl ignores unknown keys; so do we (it keeps both tools'
            # configs compatible), but say so: a typo must not pass silently.
            if warnings is not None and raw_name not in CLAUDECTL_ONLY_KEYS.get(section, ()):
                warnings.append(_unknown_key_warning(section, raw_name, by_name, where))
            continue
        try:
            checked = key.check(value)
        except ValueError:
            raise ConfigError(
                f"{where}: key '{section}.{raw_name}' is {_short_repr(value)}; "
                f"expected {key.allowed}"
            ) from None
        if section == "hive" and key.name == "share_categories":
            checked = _check_share_categories(checked, where)
        if section == "delegation" and key.name == "allowed_dirs":
            checked = _check_allowed_dirs(checked, where)
        if isinstance(checked, tuple) and not checked and getattr(current, key.name):
            # As in claudectl: an empty array never overrides a non-empty one.
            continue
        changes[key.name] = checked
    return dataclasses.replace(current, **changes)


def parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(
            f"{where}: not a usable config: arrays or tables are nested too deeply"
        ) from None


def overlay(config: Config, data: dict[str, Any], where: str) -> Config:
    """Return ``config`` with the sections found in ``data`` applied."""
    sections: dict[str, Any] = {}
    warnings: list[str] = []
    for section in SCHEMA:
        table = data.get(section)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: '{section}' must be a table ([{section}])")
        sections[section] = _apply(section, getattr(config, section), table, where, warnings)
    return dataclasses.replace(
        config,
        sources=config.sources + (where,),
        warnings=config.warnings + tuple(warnings),
        **sections,
    )


def risky_settings(config: Config, home_root: Path | None = None) -> list[str]:
    """Settings that work but expose more than a user may expect (logged at start)."""
    found = []
    for d in config.delegation.allowed_dirs:
        path = Path(str(home_root) + d[1:]) if d.startswith("~") and home_root else Path(d)
        path = Path(os.path.normpath(path))
        homes = {Path("/root")} | ({home_root} if home_root is not None else set())
        if path == Path("/"):
            found.append(
                f"[delegation] allowed_dirs contains {d!r}: peers may run tasks "
                f"anywhere on this machine; list project directories instead"
            )
        elif path in homes or path.parent in (Path("/home"), Path("/Users")):
            found.append(
                f"[delegation] allowed_dirs contains the home directory {d!r}: "
                f"peers may run tasks over all of it (dotfiles, keys); list project "
                f"directories instead"
            )
    return found


def config_files(home: Home, cwd: Path | None = None, extra: Iterable[Path] = ()) -> list[Path]:
    """The files that make up the configuration, lowest precedence first."""
    files = [home.config_file]
    if cwd is not None:
        files.append(cwd / ".claudectl.toml")
    files.extend(extra)
    return files


def load_config(home: Home, cwd: Path | None = None, extra: Iterable[Path | str] = ()) -> Config:
    """
    Read the user config, then ``<cwd>/.claudectl.toml``, then each of
    ``extra`` (which must exist).  Missing default files are skipped.
    """
    extra_paths = [Path(p) for p in extra]
    config = Config()
    for path in config_files(home, cwd, extra_paths):
        if not path.exists():
            if path in extra_paths:
                raise ConfigError(f"{path}: config file not found")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        config = overlay(config, parse_toml(text, str(path)), str(path))
    return config
