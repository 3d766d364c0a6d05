# -*- test-case-name: tests.test_statestore -*-
"""
Telling a running service that the CLI changed state files (issue 13).

:func:`notify_service` is a small blocking client for one AMP command
(:class:`~claudectl.control.commands.StateChanged`) over the control
socket, usable from any CLI command without a reactor.  When no service
runs for the home it does nothing; it never raises and never waits more
than :data:`NOTICE_TIMEOUT_SECS`.  The service side is
:class:`NoticeLocator`, which hands the names to its
:class:`~claudectl.changes.ChangeWatcher`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from twisted.protocols import amp

from claudectl.control.commands import StateChanged
from claudectl.control.paths import UnsafeSocketDir, check_socket_dir, control_socket_path
from claudectl.home import Home

NOTICE_TIMEOUT_SECS = 2.0


def notify_service(home: Home, names: Iterable[str]) -> bool:
    """Say that ``names`` (files of ``$HIVE``…) changed; True if a service heard it."""
    path = control_socket_path(home)
    if not path.exists():
        return False
    try:
        check_socket_dir(path.parent)  # never talk to a socket someone else placed
    except (OSError, UnsafeSocketDir):
        return False
    box = StateChanged.makeArguments({"names": list(names)}, None)
    box[b"_command"] = StateChanged.commandName
    box[b"_ask"] = b"1"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(NOTICE_TIMEOUT_SECS)
            sock.connect(str(path))
            sock.sendall(box.serialize())
            return _answered(sock)
    except OSError:
        return False


def _answered(sock: socket.socket) -> bool:
    """Read the answer box."""
    data = b""
    while len(data) <= 65_536:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
        boxes = amp.parseString(data)
        if boxes:
            return b"_answer" in boxes[0]
    return False


class NoticeLocator(amp.CommandLocator):
    """The service side: notices go to the change watcher."""

    def __init__(self, changes: Any) -> None:
        self.changes = changes

    @StateChanged.responder
    def state_changed(self, names: list[str]) -> dict[str, Any]:
        return {"watched": self.changes.notice(names[:64])}
