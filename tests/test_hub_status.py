"""
``relay hub --status`` against hubs that answer badly: each is one clear
``Error:`` line, never a traceback or a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from claudectl.hub import wire
from tests.cli_harness import run_command
from tests.common import temp_home


class _FakeHub(Protocol):
    """Greets like a hub, then answers a status request with ``answer``."""

    def __init__(self, answer: Callable[[Any], None]) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        self.transport.write(wire.greeting())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if b"\n" in data:
            self.answer(self.transport)


class BadHubAnswerTests(TestCase):
    async def _status(self, answer: Callable[[Any], None], *extra: str) -> Any:
        factory = Factory.forProtocol(lambda: _FakeHub(answer))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        address = f"127.0.0.1:{port.getHost().port}"
        return await run_command(
            temp_home(self), "relay", "hub", "--status", "--hub", address, *extra
        )

    async def test_a_bad_line(self) -> None:
        r = await self._status(lambda t: t.write(b"not json\n"))
        self.assertEqual(r.code, 1)
        self.assertIn("Error: the hub answered with a bad line", r.err)
        self.assertNotIn("Traceback", r.err)

    async def test_an_answer_too_long(self) -> None:
        r = await self._status(lambda t: t.write(b"x" * 70_000))
        self.assertEqual(r.code, 1)
        self.assertIn("answer is too long", r.err)

    async def test_closed_without_an_answer(self) -> None:
        r = await self._status(lambda t: t.loseConnection())
        self.assertEqual(r.code, 1)
        self.assertIn("closed the connection", r.err)

    async def test_nobody_listening(self) -> None:
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory())
        address = f"127.0.0.1:{port.getHost().port}"
        await port.stopListening()
        r = await run_command(temp_home(self), "relay", "hub", "--status", "--hub", address)
        self.assertEqual(r.code, 1)
        self.assertIn(f"cannot reach the hub at {address}", r.err)

    async def test_unreadable_token_file(self) -> None:
        home = temp_home(self)
        missing = str(home.root / "no-such-token")
        r = await run_command(home, "relay", "hub", "--status", "--token-file", missing)
        self.assertEqual(r.code, 1)
        self.assertTrue(r.err.startswith("Error: "), r.err)
        self.assertNotIn("Traceback", r.err)
