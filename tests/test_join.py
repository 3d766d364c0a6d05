"""
``relay join`` end to end on loopback: an inviter's running service and a
joiner, with each of the four formats (invite link, relay code, word phrase,
pair code), plus wrong, reused and expired codes.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from claudectl.config import Config
from claudectl.control.join import JoinFailed, join_peer
from claudectl.pairing.detect import decode_join
from claudectl.pairing.invites import InviteStore
from claudectl.relay.keystore import KeyStore
from tests.common import temp_home, wrong_password_naming
from tests.test_services import RunningService, wait_for


def free_code_port() -> int:
    """A free loopback port that a relay code can carry (9847…10102)."""
    import random

    ports = [p for p in range(9848, 10103) if p != 9975]
    random.shuffle(ports)
    for port in ports:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        return port
    raise RuntimeError("no free port in 9847-10102")


class JoinTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        from twisted.internet.error import CannotListenError

        home = temp_home(self)
        for attempt in range(10):
            # The port was free a moment ago; another process may take it
            # before we listen (parallel test runs): pick another one then.
            self.port = free_code_port()
            self.inviter = RunningService(home, f"tcp:{self.port}:interface=127.0.0.1")
            try:
                self.inviter.start()
                break
            except CannotListenError:
                if attempt == 9:
                    raise
        self.addCleanup(self.inviter.stop)
        self.joiner_home = temp_home(self)
        self.inviter_id = KeyStore(self.inviter.home).ensure_identity()
        self.joiner_id = KeyStore(self.joiner_home).ensure_identity()
        self.invites = InviteStore(self.inviter.home)

    def invite(self, ttl: int = 3600) -> Any:
        return self.invites.create(self.inviter_id, "127.0.0.1", self.port, ttl, time.time())

    async def join(self, text: str) -> Any:
        return await join_peer(reactor, self.joiner_home, Config(), decode_join(text))

    async def assert_paired(self, text: str) -> None:
        result = await self.join(text)
        peer, addr = result
        self.assertEqual(peer, self.inviter_id)
        self.assertEqual(addr, f"127.0.0.1:{self.port}")
        self.assertEqual(result.mode, "mutual")
        self.assertFalse(result.kept_by_service)
        joiner_keys, inviter_keys = KeyStore(self.joiner_home), KeyStore(self.inviter.home)
        key = joiner_keys.key(self.inviter_id)
        self.assertIsNotNone(key)
        self.assertEqual(inviter_keys.key(self.joiner_id), key)
        meta = joiner_keys.meta(self.inviter_id)
        assert meta is not None
        self.assertEqual(meta.addr, f"127.0.0.1:{self.port}")
        await wait_for(lambda: not self.inviter.node.mesh.is_connected(self.joiner_id))

    async def test_invite_link(self) -> None:
        inv = self.invite()
        await self.assert_paired(inv.link)
        self.assertEqual(self.invites.get(inv.id).state, "used")

    async def test_relay_code(self) -> None:
        inv = self.invite()
        await self.assert_paired(inv.relay_code)
        key = KeyStore(self.joiner_home).key(self.inviter_id)
        # The long-term key is a fresh one, not anything in the code.
        self.assertNotEqual(key, inv.link_psk)
        self.assertEqual(self.invites.get(inv.id).state, "used")

    async def test_word_phrase_typed_with_spaces(self) -> None:
        inv = self.invite()
        await self.assert_paired(inv.word_phrase.replace("-", " ").upper())

    async def test_pair_code_with_address(self) -> None:
        inv = self.invite()
        await self.assert_paired(f"{inv.pair_code} 127.0.0.1:{self.port}")

    async def test_code_is_single_use(self) -> None:
        inv = self.invite()
        await self.assert_paired(inv.relay_code)
        KeyStore(self.joiner_home).forget(self.inviter_id)
        KeyStore(self.inviter.home).forget(self.joiner_id)
        with self.assertRaises(JoinFailed) as cm:
            await self.join(inv.relay_code)
        self.assertIn("(used)", str(cm.exception))
        with self.assertRaises(JoinFailed) as cm:
            await self.join(inv.link)
        self.assertIn("(used)", str(cm.exception))

    async def test_wrong_code_burns_invite(self) -> None:
        inv = self.invite()
        # A mistyped code that still names this invite (same selector).
        wrong = wrong_password_naming(inv.code_password)
        target = dataclasses.replace(decode_join(inv.relay_code), pake_password=wrong)
        with self.assertRaises(JoinFailed) as cm:
            await join_peer(reactor, self.joiner_home, Config(), target)
        self.assertIn("denied (wrong_code)", str(cm.exception))
        self.assertEqual(self.invites.get(inv.id).state, "burned")
        # Even the right code does not work any more.
        with self.assertRaises(JoinFailed) as cm:
            await self.join(inv.relay_code)
        self.assertIn("(burned)", str(cm.exception))
        self.assertIsNone(KeyStore(self.joiner_home).key(self.inviter_id))

    async def test_expired_invite(self) -> None:
        inv = self.invites.create(self.inviter_id, "127.0.0.1", self.port, 1, time.time() - 10)
        with self.assertRaises(JoinFailed) as cm:
            await self.join(inv.relay_code)
        self.assertIn("(expired)", str(cm.exception))
        with self.assertRaises(JoinFailed) as cm:
            await self.join(inv.link)
        self.assertIn("(expired)", str(cm.exception))

    async def test_link_naming_another_identity_is_refused(self) -> None:
        inv = self.invite()
        link = inv.link.replace(f"cctl://{self.inviter_id}@", "cctl://someone-else@")
        with self.assertRaises(JoinFailed) as cm:
            await self.join(link)
        self.assertIn("mismatch", str(cm.exception))
        self.assertIsNone(KeyStore(self.joiner_home).key(self.inviter_id))

    async def test_join_through_running_service_keeps_link(self) -> None:
        joiner = RunningService(self.joiner_home)
        joiner.start()
        self.addCleanup(joiner.stop)
        inv = self.invite()
        result = await self.join(inv.word_phrase)
        self.assertTrue(result.kept_by_service)
        await wait_for(lambda: self.inviter.node.mesh.is_connected(self.joiner_id))
        self.assertIn(self.inviter_id, joiner.node.dialers)


class KeyTakeoverTests(TestCase):
    """An invite must not let its giver take over a peer we already trust."""

    timeout = 60

    async def test_invite_from_an_impostor_cannot_replace_a_key(self) -> None:
        port = free_code_port()
        evil = RunningService(temp_home(self), f"tcp:{port}:interface=127.0.0.1")
        # The impostor calls itself like a peer the joiner trusts.
        evil.home.relay.mkdir(parents=True)
        evil.home.identity_file.write_text("trusted-peer")
        evil.start()
        self.addCleanup(evil.stop)
        joiner = temp_home(self)
        KeyStore(joiner).ensure_identity()
        honest = b"\x07" * 32
        KeyStore(joiner).save_key("trusted-peer", honest)
        forms = (
            lambda i: i.relay_code,
            lambda i: f"{i.pair_code} 127.0.0.1:{port}",
            lambda i: i.link,
        )
        for form in forms:
            inv = InviteStore(evil.home).create(
                "trusted-peer", "127.0.0.1", port, 3600, time.time()
            )
            text = form(inv)
            with self.assertRaises(JoinFailed) as cm:
                await join_peer(reactor, joiner, Config(), decode_join(text))
            self.assertIn("already paired with trusted-peer", str(cm.exception))
            self.assertEqual(KeyStore(joiner).key("trusted-peer"), honest)
            # (The impostor's side did pair; start it afresh for the next format.)
            for peer in KeyStore(evil.home).known_peers():
                KeyStore(evil.home).forget(peer)
