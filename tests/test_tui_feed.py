"""
The dashboard's feed (claudectl.tui.feed): what a service's ``events.update``
pushes do to the dashboard, damaged ones included, and the failures of
opening the feed over a real UNIX socket.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.control.client import ServiceNotRunning
from claudectl.control.events import PANELS, Subscribe
from claudectl.control.paths import control_socket_path, ensure_socket_dir
from claudectl.home import Home
from claudectl.tui.feed import FeedProtocol, open_feed


class UpdateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.proto = FeedProtocol(lambda panel, data: self.seen.append((panel, data)))

    def test_a_good_update_reaches_the_dashboard(self) -> None:
        panel = PANELS[0]
        self.assertEqual(self.proto.update(panel, json.dumps({"rows": []}), 7), {})
        self.assertEqual((self.seen, self.proto.last_seq), ([(panel, {"rows": []})], 7))

    def test_damaged_updates_are_ignored(self) -> None:
        with capturedLogs() as events:
            self.proto.update("no-such-panel", "{}", 1)
            self.proto.update(PANELS[0], "{not json", 2)
            self.proto.update(PANELS[0], "[1, 2]", 3)
        self.assertEqual((self.seen, self.proto.last_seq), ([], 0))
        texts = [e["log_format"] for e in events]
        self.assertIn("ignoring an update of unknown panel {panel!r}", texts)
        self.assertIn("ignoring an unreadable {panel} update", texts)

    def test_a_failing_handler_is_logged_not_raised(self) -> None:
        def boom(panel: str, data: Any) -> None:
            raise RuntimeError("draw failed")

        proto = FeedProtocol(boom, on_lost=lambda reason: 1 / 0)  # type: ignore[arg-type,return-value]
        self.assertEqual(proto.update(PANELS[0], "{}", 1), {})
        proto.makeConnection(_NullTransport())
        proto.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class _NullTransport:
    disconnecting = False

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None


class RefusesSubscribe(amp.CommandLocator):
    @Subscribe.responder
    def subscribe(self, panels: list[str]) -> dict[str, Any]:
        raise ValueError("no")


class OpenFeedTests(TestCase):
    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="tf-"))  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, root, True)
        self.home = Home(root)
        self.path = control_socket_path(self.home)

    async def test_no_service(self) -> None:
        with self.assertRaises(ServiceNotRunning):
            await open_feed(reactor, self.home, lambda panel, data: None)
        ensure_socket_dir(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))  # a socket nobody listens on
        s.close()
        with self.assertRaises(ServiceNotRunning):
            await open_feed(reactor, self.home, lambda panel, data: None)

    async def test_a_refused_subscription_closes_the_connection(self) -> None:
        ensure_socket_dir(self.path)
        servers: list[amp.AMP] = []

        def build() -> amp.AMP:
            servers.append(amp.AMP(locator=RefusesSubscribe()))
            return servers[-1]

        port = await UNIXServerEndpoint(reactor, str(self.path)).listen(Factory.forProtocol(build))
        self.addCleanup(port.stopListening)
        lost: list[Failure] = []
        with self.assertRaises(amp.UnknownRemoteError):
            await open_feed(reactor, self.home, lambda panel, data: None, on_lost=lost.append)
        self.flushLoggedErrors(ValueError)
        # The client hung up: its on_lost ran.
        for _ in range(50):
            if lost:
                break
            await _tick()
        self.assertEqual(len(lost), 1)


def _tick() -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.02, lambda: None)
