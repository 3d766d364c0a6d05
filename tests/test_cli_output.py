"""Issue 12 item 14: small output faults of the CLI, checked in-process."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from claudectl.cli.delegate_cmds import ProgressPrinter
from claudectl.cli.relay_cmds import _kb, explain_code_error
from claudectl.relay.crypto import CodeError, psk_from_code
from claudectl.relay.keystore import KeyStore
from claudectl.relay.peers_view import peer_rows
from tests.common import temp_home


class OutputTests(SynchronousTestCase):
    def test_byte_counts_use_one_unit_system(self) -> None:
        self.assertEqual(
            [_kb(n) for n in (0, 329, 1023, 1024, 2048, 1536 * 1024, 3 << 30)],
            ["0 B", "329 B", "1023 B", "1.0 KiB", "2.0 KiB", "1.5 MiB", "3.0 GiB"],
        )

    def test_trust_in_peer_rows_is_rounded(self) -> None:
        home = temp_home(self)
        KeyStore(home).save_key("peer-a", b"k" * 32)
        [row] = peer_rows(KeyStore(home), None, lambda _p: 0.1 + 0.2 + 0.1 - 0.0000000000000001)
        self.assertEqual(row["trust"], 0.4)

    def test_pair_code_error_says_what_was_ignored(self) -> None:
        e = self.assertRaises(CodeError, psk_from_code, "zzzz-1234")
        text = explain_code_error("zzzz-1234", str(e))
        self.assertTrue(
            text.startswith(
                "invalid PSK code: expected 16 hex chars, got 4 "
                "('z' is not a hex digit and was ignored)"
            ),
            text,
        )
        self.assertIn("like a3f2-9b1c-d4e5-f678", text)
        self.assertIn("`claudectl relay join`", text)
        # Only separators dropped: claudectl's message alone.
        e = self.assertRaises(CodeError, psk_from_code, "a3f2-9b1c")
        self.assertEqual(
            explain_code_error("a3f2-9b1c", str(e)),
            "invalid PSK code: expected 16 hex chars, got 8",
        )

    def test_progress_line_once_per_change(self) -> None:
        lines: list[str] = []
        show = ProgressPrinter(lines.append)

        def view(state: str, secs: int, msg: str | None, tokens: int = 0) -> dict:  # type: ignore[type-arg]
            return {
                "state": state,
                "elapsed_secs": secs,
                "tokens": tokens,
                "cost_usd": 0.0,
                "last_message": msg,
            }

        show(view("queued", 0, "preparing a git checkout"))
        show(view("running", 1, "preparing a git checkout"))
        show(view("running", 2, "Edit src/a.rs", 10))
        show(view("running", 5, "Edit src/a.rs", 10))
        show(view("completed", 6, "Edit src/a.rs", 12))
        self.assertEqual(len(lines), 3, lines)
        self.assertEqual(sum("preparing a git checkout" in ln for ln in lines), 1)


class JsonEverywhereTests(SynchronousTestCase):
    """Issue 12 item 13: the README's `--json` claims are true."""

    def test_every_command_but_serve_and_tui_takes_json_after_it(self) -> None:
        import click

        from claudectl.cli import load_commands

        missing = []

        def walk(cmd: click.Command, path: list[str]) -> None:
            if isinstance(cmd, click.Group):
                for name, sub in cmd.commands.items():
                    walk(sub, path + [name])
            elif not any("--json" in getattr(p, "opts", []) for p in cmd.params):
                missing.append(" ".join(path))

        walk(load_commands(), [])
        # The two long-running ones: a service and a full-screen dashboard.
        self.assertEqual(sorted(missing), ["relay serve", "tui"])

    def test_errors_are_json_under_json(self) -> None:
        import json

        from tests.cli_harness import run_now as run_cli

        home = temp_home(self)
        for args in (
            ["--json", "relay", "accept", "zzzz", "peer-1"],
            ["relay", "accept", "zzzz", "peer-1", "--json"],
            ["hive", "trust", "nobody", "0.5", "--json"],
            ["relay", "interrupt", "task_1", "stop", "--json"],
        ):
            r = run_cli(home, *args)
            self.assertEqual(r.returncode, 1, args)
            self.assertEqual(r.stderr, "", args)
            err = json.loads(r.stdout)
            self.assertEqual((err["kind"], err["exit_code"]), ("error", 1), args)
            self.assertTrue(err["error"], args)
        r = run_cli(home, "--json", "relay", "no-such-command")
        self.assertEqual(r.returncode, 2)
        self.assertEqual(json.loads(r.stdout)["kind"], "usage")
        r = run_cli(home, "--json", "relay")  # the group alone: not its help as the error
        self.assertEqual(r.returncode, 2)
        self.assertEqual(
            json.loads(r.stdout),
            {
                "error": "Missing command (see `claudectl relay --help`).",
                "kind": "usage",
                "exit_code": 2,
            },
        )
        r = run_cli(home, "relay", "accept", "zzzz", "peer-1")
        self.assertTrue(r.stderr.startswith("Error: invalid PSK code"), r.stderr)
        self.assertEqual(r.stdout, "")
        out = run_cli(home, "hive", "export", "--json")
        self.assertEqual((out.returncode, json.loads(out.stdout)), (0, []))
        r = run_cli(home, "hive", "export", "--json", "--format", "yaml")
        self.assertEqual(r.returncode, 1)


class CostShownTests(SynchronousTestCase):
    def test_a_peers_absurd_cost_stays_narrow(self) -> None:
        """Review 15: a cost of 1e308 printed a 300-digit cell."""
        from claudectl.cli.delegate_cmds import _cost

        self.assertEqual(_cost(0.01234), "$0.0123")
        self.assertEqual(_cost(1e308), ">$1,000,000")
        self.assertEqual(_cost(float("nan")), "$?")
        self.assertEqual(_cost(-1e308), "$?")
