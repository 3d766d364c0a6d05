"""Tests for claudectl.config: defaults, file overlay, aliases, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import (
    SCHEMA,
    Config,
    ConfigError,
    DelegationConfig,
    HiveConfig,
    RelayConfig,
    config_files,
    load_config,
    overlay,
    parse_toml,
)
from tests.common import temp_home

# The [relay] and [hive] blocks of the mission's "Configuration" section.
MISSION_RELAY = dict(
    enabled=True,
    listen_port=9847,
    listen_addr="0.0.0.0",
    max_peers=8,
    heartbeat_interval_secs=30,
    reconnect_max_secs=60,
    auto_connect=(),
)
MISSION_HIVE = dict(
    enabled=True,
    default_trust=0.5,
    auto_trust_drift=True,
    max_propagation=5,
    export_min_evidence=5,
    export_min_tool_decisions=10,
    knowledge_ttl_days=30,
    inject_unverified=True,
    max_units=500,
    max_prompt_units=20,
    stale_peer_days=90,
    share_categories=(),
    exclude_tools=(),
    exclude_commands=(),
)


class DefaultTests(SynchronousTestCase):
    def test_relay_defaults(self) -> None:
        relay = RelayConfig()
        for key, value in MISSION_RELAY.items():
            if key == "enabled":
                # claudectl's default (wire.md 7) is false; the mission's example
                # block turns it on.  Without a config the relay is not started.
                self.assertIs(relay.enabled, False)
                continue
            self.assertEqual(getattr(relay, key), value, key)

    def test_hive_defaults(self) -> None:
        hive = HiveConfig()
        for key, value in MISSION_HIVE.items():
            self.assertEqual(getattr(hive, key), value, key)

    def test_mission_block_parses_to_mission_values(self) -> None:
        """The mission's example, comments included, is a valid file."""
        text = """
[relay]
enabled = true # start relay with TUI/brain
listen_port = 9847 # TCP port for peer connections
listen_addr = "0.0.0.0" # bind address
max_peers = 8 # maximum connected peers
heartbeat_interval_secs = 30 # heartbeat frequency
reconnect_max_secs = 60 # max reconnect backoff
auto_connect = [] # list of "host:port" to auto-connect
[hive]
enabled = true # enable knowledge sharing
default_trust = 0.5 # trust level for new peers
auto_trust_drift = true # adjust trust based on concordance
max_propagation = 5 # max gossip hops for knowledge units
export_min_evidence = 5 # min decisions before sharing a pattern
export_min_tool_decisions = 10 # min decisions before sharing accuracy
knowledge_ttl_days = 30 # expire unvalidated knowledge after N days
inject_unverified = true # include low-trust knowledge in brain prompt
max_units = 500 # hard cap on stored knowledge units
max_prompt_units = 20 # cap on units injected into brain prompt
stale_peer_days = 90 # prune knowledge from peers gone this long
share_categories = [] # empty = share all (or: ["best_practice", "technique"])
exclude_tools = [] # tools to never share (e.g., ["Write"])
exclude_commands = [] # command patterns to never share
"""
        config = overlay(Config(), parse_toml(text, "mission"), "mission")
        for key, value in MISSION_RELAY.items():
            self.assertEqual(getattr(config.relay, key), value, key)
        for key, value in MISSION_HIVE.items():
            self.assertEqual(getattr(config.hive, key), value, key)

    def test_schema_covers_every_field(self) -> None:
        for section, (cls, keys) in SCHEMA.items():
            names = {k.name for k in keys}
            self.assertEqual(names, {f.name for f in dataclasses.fields(cls)}, section)
            for k in keys:
                # Every default passes its own checker.
                default = getattr(cls(), k.name)
                value = list(default) if isinstance(default, tuple) else default
                self.assertEqual(k.check(value), default, f"{section}.{k.name}")
        self.assertEqual(Config().delegation, DelegationConfig())


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.cwd = Path(self.mktemp())
        self.cwd.mkdir()

    def user(self, text: str) -> Path:
        path = self.home.config_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def project(self, text: str) -> Path:
        path = self.cwd / ".claudectl.toml"
        path.write_text(text)
        return path

    def test_no_files(self) -> None:
        config = load_config(self.home, self.cwd)
        self.assertEqual(config, Config())
        self.assertEqual(config.sources, ())

    def test_user_file_location(self) -> None:
        self.assertEqual(
            self.home.config_file, self.home.root / ".config" / "claudectl" / "config.toml"
        )
        self.assertEqual(
            config_files(self.home, self.cwd), [self.home.config_file, self.cwd / ".claudectl.toml"]
        )

    def test_project_overlays_user_per_key(self) -> None:
        user = self.user(
            "[relay]\nlisten_port = 1111\nmax_peers = 3\n[hive]\ndefault_trust = 0.9\n"
        )
        proj = self.project("[relay]\nlisten_port = 2222\n")
        config = load_config(self.home, self.cwd)
        self.assertEqual(config.relay.listen_port, 2222)
        self.assertEqual(config.relay.max_peers, 3)
        self.assertEqual(config.hive.default_trust, 0.9)
        self.assertEqual(config.sources, (str(user), str(proj)))

    def test_extra_file_last(self) -> None:
        self.user("[relay]\nlisten_port = 1111\n")
        extra = Path(self.mktemp())
        extra.write_text("[relay]\nlisten_port = 3333\n")
        self.assertEqual(load_config(self.home, self.cwd, [extra]).relay.listen_port, 3333)

    def test_missing_extra_file(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd, ["/nonexistent/claudectl.toml"])
        self.assertIn("/nonexistent/claudectl.toml", str(cm.exception))
        self.assertIn("not found", str(cm.exception))

    def test_aliases(self) -> None:
        self.project(
            '[relay]\nport = 7777\naddr = "::"\nheartbeat_interval = 5\nreconnect_max = 120\n'
        )
        relay = load_config(self.home, self.cwd).relay
        self.assertEqual(
            (
                relay.listen_port,
                relay.listen_addr,
                relay.heartbeat_interval_secs,
                relay.reconnect_max_secs,
            ),
            (7777, "::", 5, 120),
        )

    def test_alias_in_project_overrides_full_name_in_user(self) -> None:
        self.user("[relay]\nlisten_port = 1111\n")
        self.project("[relay]\nport = 2222\n")
        self.assertEqual(load_config(self.home, self.cwd).relay.listen_port, 2222)

    def test_wrong_values_name_key_file_and_allowed(self) -> None:
        cases = [
            ('[relay]\nlisten_port = "9847"', "relay.listen_port", "0-65535"),
            ("[relay]\nlisten_port = 70000", "relay.listen_port", "0-65535"),
            ("[relay]\nport = -1", "relay.port", "0-65535"),
            ("[relay]\nmax_peers = 4097", "relay.max_peers", "0-4096"),
            ('[relay]\nenabled = "yes"', "relay.enabled", "true or false"),
            ("[relay]\nenabled = 1", "relay.enabled", "true or false"),
            ("[relay]\nheartbeat_interval_secs = 0", "relay.heartbeat_interval_secs", "1-86400"),
            ("[relay]\nheartbeat_interval_secs = 1.5", "relay.heartbeat_interval_secs", "1-86400"),
            ("[relay]\nreconnect_max_secs = true", "relay.reconnect_max_secs", "1-86400"),
            ('[relay]\nauto_connect = "h:1"', "relay.auto_connect", "host:port"),
            ("[relay]\nauto_connect = [1]", "relay.auto_connect", "host:port"),
            ('[relay]\nlisten_addr = ""', "relay.listen_addr", "IP address"),
            ("[hive]\ndefault_trust = 1.5", "hive.default_trust", "0.0 to 1.0"),
            ('[hive]\nshare_categories = ["gossip"]', "hive.share_categories", "best_practice"),
            ('[hive]\nshare_mode = "sometimes"', "hive.share_mode", "manual"),
            ("[delegation]\nmax_concurrent = 0", "delegation.max_concurrent", "1-256"),
        ]
        for text, key, allowed in cases:
            with self.subTest(text):
                path = self.project(text + "\n")
                with self.assertRaises(ConfigError) as cm:
                    load_config(self.home, self.cwd)
                msg = str(cm.exception)
                self.assertIn(f"'{key}'", msg)
                self.assertIn(str(path), msg)
                self.assertIn(allowed, msg)

    def test_error_in_user_file_names_user_file(self) -> None:
        user = self.user("[relay]\nmax_peers = -3\n")
        self.project("[relay]\nmax_peers = 3\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd)
        self.assertIn(str(user), str(cm.exception))

    def test_invalid_toml(self) -> None:
        path = self.project("[relay\nport = 1\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd)
        self.assertIn(str(path), str(cm.exception))
        self.assertIn("not valid TOML", str(cm.exception))

    def test_deeply_nested_toml_is_a_config_error(self) -> None:
        """Issue 11 item 10: not a RecursionError in every command."""
        for text in (
            "a = " + "[" * 5000 + "]" * 5000 + "\n",
            "[relay]\nauto_connect = " + "[" * 500 + "]" * 500 + "\n",
            "x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n",
        ):
            path = self.project(text)
            with self.assertRaises(ConfigError) as cm:
                load_config(self.home, self.cwd)
            self.assertIn(str(path), str(cm.exception))
            self.assertIn("nested too deeply", str(cm.exception))

    def test_long_wrong_value_is_cut_in_the_message(self) -> None:
        self.project('[relay]\nlisten_port = "' + "9" * 10_000 + '"\n')
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd)
        self.assertLess(len(str(cm.exception)), 400)
        self.assertIn("relay.listen_port", str(cm.exception))

    def test_hash_inside_string_is_not_a_comment(self) -> None:
        """Defect W19: values are parsed as real TOML."""
        self.project('[relay]\nlisten_addr = "a#b"\n')
        self.assertEqual(load_config(self.home, self.cwd).relay.listen_addr, "a#b")

    def test_not_utf8(self) -> None:
        (self.cwd / ".claudectl.toml").write_bytes(b'[relay]\nlisten_addr = "\xff"\n')
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd)
        self.assertIn(".claudectl.toml", str(cm.exception))

    def test_section_not_a_table(self) -> None:
        self.project("relay = 5\n")
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd)
        self.assertIn("'relay' must be a table", str(cm.exception))

    def test_empty_array_does_not_override(self) -> None:
        self.user('[relay]\nauto_connect = ["10.0.0.1:9847"]\n[hive]\nexclude_tools = ["Write"]\n')
        self.project("[relay]\nauto_connect = []\n[hive]\nexclude_tools = []\n")
        config = load_config(self.home, self.cwd)
        self.assertEqual(config.relay.auto_connect, ("10.0.0.1:9847",))
        self.assertEqual(config.hive.exclude_tools, ("Write",))

    def test_non_empty_array_overrides(self) -> None:
        self.user('[relay]\nauto_connect = ["10.0.0.1:9847"]\n')
        self.project('[relay]\nauto_connect = ["10.0.0.2:9847", "[::1]:1"]\n')
        self.assertEqual(
            load_config(self.home, self.cwd).relay.auto_connect, ("10.0.0.2:9847", "[::1]:1")
        )

    def test_unknown_keys_and_sections_ignored(self) -> None:
        self.project(
            '[relay]\nhttp_port = 8080\nauth_token = "x"\nfuture = 1\n'
            "[tui]\ntheme = 'dark'\n[brain]\nmodel = 'x'\n"
        )
        self.assertEqual(load_config(self.home, self.cwd).relay, RelayConfig())

    def test_unknown_key_warns_with_the_nearest_known_one(self) -> None:
        """Issue 12 item 6: `listen_prot = 9900` is not silently ignored."""
        path = self.project(
            '[relay]\nlisten_prot = 9900\nhttp_port = 8080\nauth_token = "x"\n'
            '[delegation]\nalowed_dirs = ["/srv"]\nrequire_encryption = 1\n'
            '[hive]\nzzzzzz = 1\n[brain]\nmodel = "x"\n'
        )
        config = load_config(self.home, self.cwd)
        self.assertEqual(config.relay.listen_port, 9847)
        self.assertEqual(
            config.warnings,
            (
                f"{path}: unknown key 'relay.listen_prot' is ignored; did you mean "
                f"'relay.listen_port'?",
                f"{path}: unknown key 'hive.zzzzzz' is ignored",
                f"{path}: unknown key 'delegation.alowed_dirs' is ignored; did you mean "
                f"'delegation.allowed_dirs'?",
                f"{path}: unknown key 'delegation.require_encryption' is ignored",
            ),
        )
        self.assertEqual(load_config(self.home, None).warnings, ())

    def test_new_keys_are_known(self) -> None:
        self.project(
            "[relay]\nrequire_encryption = true\n[delegation]\nallow_plaintext_tasks = true\n"
        )
        config = load_config(self.home, self.cwd)
        self.assertEqual(config.warnings, ())
        self.assertTrue(config.relay.require_encryption)
        self.assertTrue(config.delegation.allow_plaintext_tasks)

    def test_relative_allowed_dirs_are_refused(self) -> None:
        """Issue 11 item 11: not silently ignored."""
        path = self.project('[delegation]\nallowed_dirs = ["/srv/a", "proj"]\n')
        with self.assertRaises(ConfigError) as cm:
            load_config(self.home, self.cwd)
        self.assertIn(str(path), str(cm.exception))
        self.assertIn("relative path 'proj'", str(cm.exception))
        self.project('[delegation]\nallowed_dirs = ["/srv/a", "~", "~/p"]\n')
        self.assertEqual(
            load_config(self.home, self.cwd).delegation.allowed_dirs, ("/srv/a", "~", "~/p")
        )

    def test_risky_allowed_dirs(self) -> None:
        from claudectl.config import risky_settings

        self.project(
            f'[delegation]\nallowed_dirs = ["/", "~", "/home/alice/", '
            f'"{self.home.root}", "/srv/proj", "~/proj"]\n'
        )
        found = risky_settings(load_config(self.home, self.cwd), self.home.root)
        self.assertEqual(len(found), 4, found)
        self.assertIn("allowed_dirs contains '/': peers may run tasks anywhere", found[0])
        self.assertIn("home directory '~'", found[1])
        self.assertIn("home directory '/home/alice/'", found[2])
        self.assertEqual(risky_settings(Config(), self.home.root), [])

    def test_float_accepted_for_trust(self) -> None:
        self.project("[hive]\ndefault_trust = 1\n[delegation]\nmin_trust = 0.25\n")
        config = load_config(self.home, self.cwd)
        self.assertEqual(config.hive.default_trust, 1.0)
        self.assertIsInstance(config.hive.default_trust, float)
        self.assertEqual(config.delegation.min_trust, 0.25)

    def test_share_mode_case_insensitive(self) -> None:
        self.project('[hive]\nshare_mode = "Manual"\n')
        self.assertEqual(load_config(self.home, self.cwd).hive.share_mode, "manual")

    def test_cli_override_by_replace(self) -> None:
        """Command-line options go on top with dataclasses.replace."""
        self.project("[relay]\nlisten_port = 1111\n")
        config = load_config(self.home, self.cwd)
        config = dataclasses.replace(
            config, relay=dataclasses.replace(config.relay, listen_port=9847)
        )
        self.assertEqual(config.relay.listen_port, 9847)

    def test_config_is_frozen(self) -> None:
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, RelayConfig(), "max_peers", 1)
