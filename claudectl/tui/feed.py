# -*- test-case-name: tests.test_tui_events -*-
"""
The dashboard's connection to the running service: the control socket,
``events.subscribe`` once, then ``events.update`` pushes arrive on the same
AMP connection (:mod:`claudectl.control.events`).  Nothing here polls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from claudectl.control.client import ServiceNotRunning
from claudectl.control.events import PANELS, PanelUpdate, Subscribe
from claudectl.control.paths import check_socket_dir, control_socket_path
from claudectl.home import Home

log = Logger()

UpdateHandler = Callable[[str, Any], None]


class FeedProtocol(amp.AMP):
    """An AMP client that also answers the service's ``events.update``."""

    def __init__(
        self, on_update: UpdateHandler, on_lost: Callable[[Failure], None] = lambda reason: None
    ) -> None:
        super().__init__()
        self.on_update = on_update
        self.on_lost = on_lost
        self.last_seq = 0

    @PanelUpdate.responder
    def update(self, panel: str, data_json: str, seq: int) -> dict[str, Any]:
        if panel not in PANELS:
            log.info("ignoring an update of unknown panel {panel!r}", panel=panel)
            return {}
        try:
            data = json.loads(data_json)
        except ValueError:
            log.warn("ignoring an unreadable {panel} update", panel=panel)
            return {}
        if not isinstance(data, dict):
            return {}
        self.last_seq = seq
        try:
            self.on_update(panel, data)
        except Exception:
            log.failure("showing the {panel} update failed", panel=panel)
        return {}

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        try:
            self.on_lost(reason)
        except Exception:
            log.failure("connection-lost handler failed")


async def open_feed(
    reactor: Any,
    home: Home,
    on_update: UpdateHandler,
    on_lost: Callable[[Failure], None] = lambda reason: None,
    panels: tuple[str, ...] = PANELS,
) -> tuple[FeedProtocol, str]:
    """Connect and subscribe; returns the protocol and the service's identity."""
    path = control_socket_path(home)
    if not path.exists():
        raise ServiceNotRunning(home)
    check_socket_dir(path.parent)
    proto = FeedProtocol(on_update, on_lost)
    try:
        await connectProtocol(UNIXClientEndpoint(reactor, str(path), timeout=5), proto)
    except (ConnectError, OSError):
        raise ServiceNotRunning(home) from None
    try:
        answer = await proto.callRemote(Subscribe, panels=list(panels))
    except Exception:
        if proto.transport is not None:
            proto.transport.loseConnection()
        raise
    return proto, str(answer["identity"])
