# -*- test-case-name: tests.test_control -*-
"""Calling the running service from the CLI."""

from __future__ import annotations

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
            f"({home.root}); start it with `claudectl relay serve`")


async def open_control(reactor: Any, home: Home) -> amp.AMP:
    path = control_socket_path(home)
    if not path.exists():
        raise ServiceNotRunning(home)
    check_socket_dir(path.parent)  # never talk to a socket someone else placed
    try:
        return await connectProtocol(UNIXClientEndpoint(reactor, str(path), timeout=5), amp.AMP())
    except (ConnectError, OSError):
        raise ServiceNotRunning(home) from None


async def call_control(reactor: Any, home: Home, command: type[amp.Command],
                       **kwargs: Any) -> dict[str, Any]:
    """Run one AMP command against the service; raises ServiceNotRunning."""
    proto = await open_control(reactor, home)
    try:
        return await proto.callRemote(command, **kwargs)
    finally:
        proto.transport.loseConnection()


async def service_running(reactor: Any, home: Home) -> bool:
    try:
        proto = await open_control(reactor, home)
    except ServiceNotRunning:
        return False
    proto.transport.loseConnection()
    return True
