"""
The CLI's side of the control channel (claudectl.control.client) over a real
UNIX socket: no service, a stale socket, paged answers, a runaway service.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.trial.unittest import TestCase

from claudectl.control import commands as C
from claudectl.control.client import ServiceNotRunning, call_control, call_paged
from claudectl.control.paths import control_socket_path, ensure_socket_dir
from claudectl.home import Home


class PagedPeers(amp.CommandLocator):
    """Answers Peers in ``pages``; ``stuck`` keeps answering the same offset."""

    def __init__(self, pages: list[str], stuck: bool = False) -> None:
        self.pages = pages
        self.stuck = stuck
        self.offsets: list[int] = []

    @C.Peers.responder
    def peers(self, offset: int | None = None) -> dict[str, Any]:
        offset = offset or 0
        self.offsets.append(offset)
        if self.stuck:
            return {"peers_json": "[", "next_offset": offset}
        index = offset // 10
        nxt = (index + 1) * 10 if index + 1 < len(self.pages) else None
        return {"peers_json": self.pages[index], "next_offset": nxt}


class ControlClientTests(TestCase):
    def setUp(self) -> None:
        # A short path: AF_UNIX paths are limited to ~108 bytes.
        root = Path(tempfile.mkdtemp(prefix="cc-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.home = Home(root)
        self.path = control_socket_path(self.home)
        ensure_socket_dir(self.path)

    async def serve(self, locator: amp.CommandLocator) -> None:
        factory = Factory.forProtocol(lambda: amp.AMP(locator=locator))
        port = await UNIXServerEndpoint(reactor, str(self.path)).listen(factory)
        self.addCleanup(port.stopListening)

    async def test_no_socket_means_not_running(self) -> None:
        with self.assertRaises(ServiceNotRunning) as cm:
            await call_control(reactor, self.home, C.Peers)
        self.assertIn(str(self.home.root), str(cm.exception))
        self.assertIn("claudectl relay serve", str(cm.exception))

    async def test_stale_socket_means_not_running(self) -> None:
        # A socket file left by a service that died: nobody listens on it.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        s.close()
        with self.assertRaises(ServiceNotRunning):
            await call_paged(reactor, self.home, C.Peers, "peers_json")

    async def test_pages_are_joined(self) -> None:
        locator = PagedPeers(['[{"identity": "a"},', ' {"identity": "b"}', "]"])
        await self.serve(locator)
        rows = await call_paged(reactor, self.home, C.Peers, "peers_json")
        self.assertEqual(rows, [{"identity": "a"}, {"identity": "b"}])
        self.assertEqual(locator.offsets, [0, 10, 20])

    async def test_an_answer_that_does_not_end_is_refused(self) -> None:
        locator = PagedPeers([], stuck=True)
        await self.serve(locator)
        with self.assertRaises(ValueError) as cm:
            await call_paged(reactor, self.home, C.Peers, "peers_json")
        self.assertEqual(str(cm.exception), "the service's peers_json answer does not end")
        self.assertEqual(locator.offsets, [0])

    async def test_one_call(self) -> None:
        await self.serve(PagedPeers(["[]"]))
        r = await call_control(reactor, self.home, C.Peers)
        self.assertEqual(r, {"peers_json": "[]", "next_offset": None})
