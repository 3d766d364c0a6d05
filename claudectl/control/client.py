# -*- test-case-name: tests.test_control -*-
"""Calling the running service from the CLI."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.protocols import amp

from claudectl.control.paths import check_socket_dir, control_socket_path
from claudectl.home import Home


class ServiceNotRunning(Exception):
    """No relay service answers on this home's control socket."""

    def __init__(self, home: Home) -> None:
        super().__init__(
            "the relay service is not running for this home "
            f"({home.root}); start it with `claudectl relay serve`"
        )


def remote_error_text(e: Exception) -> str:
    """The message of an error from the service (an AMP remote error's description)."""
    description = getattr(e, "description", None)
    if isinstance(description, bytes):
        return description.decode("utf-8", "replace")
    if description:
        return str(description)
    return str(e)


async def open_control(reactor: Any, home: Home) -> amp.AMP:
    path = control_socket_path(home)
    if not path.exists():
        raise ServiceNotRunning(home)
    check_socket_dir(path.parent)  # never talk to a socket someone else placed
    try:
        return await connectProtocol(UNIXClientEndpoint(reactor, str(path), timeout=5), amp.AMP())
    except (ConnectError, OSError):
        raise ServiceNotRunning(home) from None


async def call_control(
    reactor: Any, home: Home, command: type[amp.Command], **kwargs: Any
) -> dict[str, Any]:
    """Run one AMP command against the service; raises ServiceNotRunning."""
    proto = await open_control(reactor, home)
    try:
        return await proto.callRemote(command, **kwargs)
    finally:
        _close(proto)


#: A paged answer longer than this many pages is refused (a runaway service).
MAX_PAGES = 10_000


async def call_paged(
    reactor: Any, home: Home, command: type[amp.Command], key: str, **kwargs: Any
) -> Any:
    """
    Run a paged AMP command (``offset`` / ``next_offset``, see
    :mod:`claudectl.control.commands`) on one connection and return the
    decoded JSON of the whole answer; raises ServiceNotRunning.
    """
    proto = await open_control(reactor, home)
    try:
        parts: list[str] = []
        offset = 0
        for _ in range(MAX_PAGES):
            result = await proto.callRemote(command, offset=offset, **kwargs)
            parts.append(result[key])
            nxt = result.get("next_offset")
            if nxt is None:
                return json.loads("".join(parts))
            if nxt <= offset:
                break
            offset = nxt
        raise ValueError(f"the service's {key} answer does not end")
    finally:
        _close(proto)


def _close(proto: Any) -> None:
    if proto.transport is not None:
        proto.transport.loseConnection()
