"""
The ``claudectl`` command line.  :func:`main` is the console script.

Command modules register themselves on the groups of :mod:`claudectl.cli.base`
when imported; :data:`COMMAND_MODULES` lists them.
"""

from __future__ import annotations

import importlib
import sys

import click

from claudectl.cli.base import CliError, cli

COMMAND_MODULES = (
    "claudectl.cli.relay_cmds",
    "claudectl.cli.pairing_cmds",
    "claudectl.cli.hive_cmds",
    "claudectl.cli.delegate_cmds",
    "claudectl.cli.tui_cmds",
)


def load_commands() -> click.Group:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return cli


def main(argv: list[str] | None = None) -> None:
    group = load_commands()
    try:
        # Without standalone mode click *returns* the code of ctx.exit(n).
        code = group.main(args=argv, prog_name="claudectl", standalone_mode=False)
    except CliError as e:
        sys.stderr.write(f"Error: {e.message}\n")
        sys.exit(e.code)
    except click.exceptions.Abort:
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
