# -*- test-case-name: tests.test_delegation_process -*-
"""
Trampoline: start a program in a new session (and so its own process group).

    python -I /path/to/setsid_exec.py -- PROGRAM [ARGS...]

It calls :func:`os.setsid` and then :func:`os.execvp`, so the program's pid is
its process group id and the whole tree can be signalled with ``killpg``.
Twisted gives children their own group only under a PTY, and since Twisted
23.8 ``spawnProcess`` may use ``posix_spawnp``, skipping any pre-exec hook.

It is run by file path with ``-I`` (isolated mode), not with ``-m``: the
child's working directory is the task's directory, which must not be able to
shadow this module.  It imports only the standard library.

If the program cannot be executed, one line ``claudectl-spawn-error: <reason>``
goes to stderr and the exit status is 127.
"""

import os
import sys

SPAWN_ERROR_MARKER = "claudectl-spawn-error:"


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        sys.stderr.write(f"{SPAWN_ERROR_MARKER} no program given\n")
        return 127
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader: its group is its own anyway
    try:
        os.execvp(args[0], args)
    except OSError as e:
        sys.stderr.write(f"{SPAWN_ERROR_MARKER} {args[0]}: {e.strerror or e}\n")
        sys.stderr.flush()
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
