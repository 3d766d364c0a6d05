"""
The dashboard's actions (:class:`claudectl.tui.runner.Backend`) against a
real node's control factory over an in-memory AMP connection: the same
commands and library functions the CLI uses.
"""

from __future__ import annotations

from typing import Any

from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import Config
from claudectl.hive.trust import trust_level
from claudectl.relay.keystore import KeyStore
from claudectl.tui.feed import FeedProtocol
from claudectl.tui.runner import Backend
from tests.common import control_with_events, make_node

PEER = "laptop-a3f29b1c"


class FakeUI:
    def __init__(self) -> None:
        self.statuses: list[tuple[str, bool]] = []
        self.shown: list[tuple[str, Any]] = []
        self.applied: list[str] = []
        self.dialog = None
        self.panels: dict[str, Any] = {}

    def status(self, text: str, error: bool = False) -> None:
        self.statuses.append((text, error))

    def show(self, title: str, text: Any) -> Any:
        self.shown.append((title, text))
        return None

    def apply(self, panel: str, data: Any) -> None:
        self.applied.append(panel)

    def set_header(self, text: str) -> None:
        pass

    def redraw(self) -> None:
        pass


class BackendActionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = make_node(self, "me-00000001")
        self.node.keystore.save_key(PEER, b"k" * 32)
        _hub, factory = control_with_events(self.node)
        self.client, self.server, self.pump = connectedServerAndClient(
            ServerClass=lambda: factory.buildProtocol(None),
            ClientClass=lambda: FeedProtocol(lambda p, d: None),
        )
        self.backend = Backend(self.node.reactor, self.node.home, Config())
        self.ui = FakeUI()
        self.backend.ui = self.ui  # type: ignore[assignment]
        self.backend.proto = self.client

    def settle(self) -> None:
        self.pump.flush()
        self.node.reactor.advance(0)
        self.pump.flush()

    def test_disconnect(self) -> None:
        self.backend.disconnect(PEER)
        self.settle()
        self.assertEqual(self.ui.statuses[-1], (f"{PEER} was not connected", False))

    def test_forget_removes_the_key_and_tells_the_service(self) -> None:
        self.node.mesh.dialing[PEER] = "127.0.0.1:9847"
        self.backend.forget(PEER)
        self.settle()
        self.assertIsNone(KeyStore(self.node.home).key(PEER))
        self.assertEqual(self.ui.statuses[-1], (f"forgot {PEER}", False))
        self.assertNotIn(PEER, self.node.mesh.dialing)  # the service dropped its dialer

    def test_connect_without_address_says_so(self) -> None:
        self.backend.connect(PEER, None)
        self.assertTrue(self.ui.statuses[-1][1])
        self.assertIn("no address is known", self.ui.statuses[-1][0])

    def test_connect_failure_is_a_status_line(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        self.backend.connect(PEER, "127.0.0.1:1")
        self.settle()
        self.assertIn("connecting to", self.ui.statuses[-1][0])
        host, port, factory, _timeout, _bind = self.node.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 1))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.settle()
        text, error = self.ui.statuses[-1]
        self.assertTrue(error)
        self.assertIn("connect failed: connect to 127.0.0.1:1: Connection was refused", text)
        from claudectl.control.commands import LinkFailed

        self.assertEqual(len(self.flushLoggedErrors(LinkFailed)), 1)  # and in the log

    def test_set_trust_writes_trust_json(self) -> None:
        self.backend.set_trust(PEER, " 0.9 ")
        self.settle()
        self.assertEqual(trust_level(self.node.home, PEER), 0.9)
        self.backend.set_trust(PEER, "lots")
        self.settle()
        self.assertEqual(self.ui.statuses[-1][1], True)
        self.assertIn("trust must be a number", self.ui.statuses[-1][0])
        self.flushLoggedErrors(ValueError)

    def test_invite_shows_three_formats_and_a_qr(self) -> None:
        self.backend.make_invite()
        self.settle()
        [(title, text)] = self.ui.shown
        self.assertEqual(title, "Invite")
        joined = "\n".join(text)
        for label in ("RELAY CODE:", "WORD PHRASE:", "INVITE LINK: cctl://", "QR code"):
            self.assertIn(label, joined)
        self.assertTrue(any("█" in line or "▀" in line or "▄" in line for line in text))
        self.assertIsNotNone(KeyStore(self.node.home).pending_key())

    def test_task_action_on_unknown_task(self) -> None:
        self.backend.task_action("out", "task_9", "stop", "")
        self.settle()
        self.assertTrue(self.ui.statuses[-1][1])
        self.flushLoggedErrors()

    def test_without_a_service(self) -> None:
        self.backend.proto = None
        self.backend.disconnect(PEER)
        self.assertIn("needs the relay service", self.ui.statuses[-1][0])
        self.backend.show_files()
        self.assertEqual(self.ui.applied, ["peers", "tasks", "hive"])
