"""
The ``claudectl`` command line.  :func:`main` is the console script.

Command modules register themselves on the groups of :mod:`claudectl.cli.base`
when imported; :data:`COMMAND_MODULES` lists them.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

import click

from claudectl.cli import base
from claudectl.cli.base import CliError, cli
from claudectl.control.paths import UnsafeSocketDir
from claudectl.text import clean_text, json_safe

COMMAND_MODULES = (
    "claudectl.cli.relay_cmds",
    "claudectl.cli.pairing_cmds",
    "claudectl.cli.hive_cmds",
    "claudectl.cli.delegate_cmds",
    "claudectl.cli.tui_cmds",
    "claudectl.cli.hooks_cmds",
)


def load_commands() -> click.Group:
    """The ``claudectl`` group with every command module's commands registered."""
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    return cli


def _json_mode(argv: list[str]) -> bool:
    ctx = base.current_context()
    if ctx is not None and ctx.json:
        return True
    # An error while parsing arguments comes before the flag was applied.
    args = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in args


def _fail(argv: list[str], message: str, code: int, kind: str = "error") -> None:
    """One ``Error: ...`` line on stderr (a JSON object on stdout under ``--json``)."""
    if _json_mode(argv):
        sys.stdout.write(
            json_safe(
                json.dumps({"error": message, "kind": kind, "exit_code": code}, ensure_ascii=False)
            )
            + "\n"
        )
        sys.stdout.flush()
    else:
        sys.stderr.write(f"Error: {clean_text(message)}\n")
    sys.exit(code)


def _os_error_text(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.filename is not None:
        what = f"{what}: {e.filename}"
    ctx = base.current_context()
    where = f" (home: {ctx.home.root})" if ctx is not None else ""
    return (
        f"{what}{where}; check that the home directory (--home / CLAUDECTL_HOME) is a "
        f"writable directory"
    )


def main(argv: list[str] | None = None) -> None:
    group = load_commands()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Without standalone mode click *returns* the code of ctx.exit(n).
        code = group.main(args=argv, prog_name="claudectl", standalone_mode=False)
    except CliError as e:
        _fail(args, e.message, e.code)
    except UnsafeSocketDir as e:
        # From any command that talks to the service's control socket.
        _fail(args, str(e), 1)
    except click.exceptions.Abort:
        sys.stderr.write("Aborted.\n")
        sys.exit(130)
    except click.ClickException as e:
        if _json_mode(args):
            _fail(args, e.format_message(), e.exit_code, "usage")
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        _fail(args, _os_error_text(e), 1)
    except RecursionError:
        _fail(args, "input nested too deeply", 1)
    except Exception as e:  # a bug: still one line, the traceback under -v
        ctx = base.current_context()
        if ctx is not None and ctx.verbose:
            traceback.print_exc()
        _fail(args, f"internal error: {type(e).__name__}: {e} (run with -v for details)", 1)
    sys.exit(code if isinstance(code, int) else 0)
