"""
``claudectl relay invite | join | discover`` as a user meets them: commands
run in temporary homes (in-process through click where no reactor is needed,
as real ``python -m claudectl`` processes otherwise).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Any

import click
from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from claudectl.cli.pairing_cmds import parse_ttl
from claudectl.discovery.beacon import encode_beacon
from claudectl.home import Home
from claudectl.pairing import codes
from claudectl.pairing.detect import RELAY_CODE, WORD_PHRASE, decode_join, detect_join_format
from claudectl.pairing.hosts import invite_host, qr_text
from claudectl.pairing.invites import InviteStore
from claudectl.relay.keystore import KeyStore
from tests.cli_harness import run_command, run_now
from tests.common import ServeProcess, run_cli, temp_home, wrong_password_naming
from tests.test_services import RunningService


def invoke(home: Home, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process: ``(exit code, stdout, stderr)`` as ``main`` reports them."""
    r = run_now(home, *args)
    return r.code, r.out, r.err


def write_config(home: Home, **relay: Any) -> None:
    lines = ["[relay]"] + [f"{k} = {json.dumps(v)}" for k, v in relay.items()]
    home.config_file.parent.mkdir(parents=True, exist_ok=True)
    home.config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")


class InviteCommand(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        write_config(self.home, listen_addr="192.168.1.50", listen_port=9900)

    def test_text_layout(self) -> None:
        code, out, err = invoke(self.home, "relay", "invite", "--words")
        self.assertEqual(code, 0, err)
        [inv] = InviteStore(self.home).list(time.time())
        ident = KeyStore(self.home).identity()
        expected = [
            f"Your identity: {ident}",
            "",
            f"  RELAY CODE:  {inv.relay_code}",
            "",
            f"  WORD PHRASE: {inv.word_phrase}",
            "",
            f"  INVITE LINK: {inv.link}",
            "",
            "Share any of the above with your peer. They run:",
            "",
            f"  claudectl relay join {inv.relay_code}",
            f"  claudectl relay join {inv.word_phrase}",
            f"  claudectl relay join {inv.link}",
            "",
        ]
        self.assertEqual(out.splitlines()[: len(expected)], expected)
        self.assertIn(f"Invite {inv.id}: single use, expires in 24h", out)
        self.assertTrue(inv.link.startswith(f"cctl://{ident}@192.168.1.50:9900/k/"))
        # Every printed form decodes to this invite.
        for text in (inv.relay_code, inv.word_phrase, inv.link):
            self.assertEqual(decode_join(text).address, "192.168.1.50:9900")

    def test_without_words_no_phrase(self) -> None:
        code, out, _ = invoke(self.home, "relay", "invite")
        self.assertEqual(code, 0)
        self.assertNotIn("WORD PHRASE", out)
        self.assertEqual(sum(1 for line in out.splitlines() if "claudectl relay join" in line), 2)

    def test_json_saves_like_text(self) -> None:
        """Defect P4: claudectl's --json saved nothing; ours is a real invite."""
        for args in (("--json", "relay", "invite"), ("relay", "invite", "--json")):
            code, out, err = invoke(self.home, *args)
            self.assertEqual(code, 0, err)
            data = json.loads(out)
            self.assertTrue(
                {"identity", "invite_link", "relay_code", "word_phrase", "addr"} <= set(data)
            )
            self.assertEqual(data["addr"], "192.168.1.50:9900")
            inv = InviteStore(self.home).get(data["invite_id"])
            self.assertEqual(inv.link, data["invite_link"])
            self.assertEqual(inv.relay_code, data["relay_code"])
            self.assertEqual(detect_join_format(data["relay_code"]), RELAY_CODE)
            self.assertEqual(detect_join_format(data["word_phrase"]), WORD_PHRASE)
            self.assertEqual(KeyStore(self.home).pending_key(), inv.link_psk)
            self.assertEqual(stat.S_IMODE(os.stat(self.home.peers / "_pending.key").st_mode), 0o600)

    def test_ttl_and_host(self) -> None:
        code, out, err = invoke(
            self.home, "relay", "invite", "--ttl", "30m", "--host", "10.1.2.3", "--json"
        )
        self.assertEqual(code, 0, err)
        data = json.loads(out)
        self.assertEqual(data["addr"], "10.1.2.3:9900")
        self.assertLess(abs(data["expires_at"] - (time.time() + 1800)), 60)

    def test_bad_host_and_ttl(self) -> None:
        code, _, err = invoke(self.home, "relay", "invite", "--host", "desk.lan")
        self.assertEqual(code, 1)
        self.assertIn("--host must be an IP address", err)
        code, _, err = invoke(self.home, "relay", "invite", "--ttl", "soon")
        self.assertEqual(code, 2)
        self.assertIn("30m, 24h or 7d", err)
        self.assertEqual(InviteStore(self.home).list(time.time()), [])

    def test_port_a_code_cannot_carry(self) -> None:
        write_config(self.home, listen_addr="192.168.1.50", listen_port=12345)
        code, out, err = invoke(self.home, "relay", "invite", "--words")
        self.assertEqual(code, 0, err)
        self.assertIn("RELAY CODE:  (none: port 12345 cannot be carried", out)
        self.assertIn("share the invite link instead", out)
        self.assertNotIn("WORD PHRASE", out)
        self.assertEqual(
            [line for line in out.splitlines() if "relay join" in line],
            [f"  claudectl relay join {InviteStore(self.home).list(time.time())[0].link}"],
        )
        code, out, _ = invoke(self.home, "relay", "invite", "--json")
        data = json.loads(out)
        self.assertIsNone(data["relay_code"])
        self.assertIn("12345", data["code_unavailable"])

    def test_ipv6_host(self) -> None:
        code, out, err = invoke(self.home, "relay", "invite", "--host", "fe80::5")
        self.assertEqual(code, 0, err)
        self.assertIn("IPv6", out)
        self.assertIn("@[fe80::5]:9900/k/", out)

    def test_qr(self) -> None:
        code, out, err = invoke(self.home, "relay", "invite", "--qr")
        self.assertEqual(code, 0, err)
        self.assertIn("QR Code (scan to join):", out)
        link = InviteStore(self.home).list(time.time())[0].link
        self.assertIn(qr_text(link), out)
        self.assertTrue(any(c in out for c in "█▀▄"))

    def test_list_and_revoke(self) -> None:
        code, out, _ = invoke(self.home, "relay", "invite", "--list")
        self.assertIn("No invites", out)
        invoke(self.home, "relay", "invite")
        invoke(self.home, "relay", "invite")
        a, b = InviteStore(self.home).list(time.time())
        code, out, err = invoke(self.home, "relay", "invite", "--revoke", a.id)
        self.assertEqual(code, 0, err)
        self.assertIn(f"Invite {a.id} revoked.", out)
        code, out, _ = invoke(self.home, "relay", "invite", "--list")
        rows = [line.split() for line in out.splitlines()[2:]]
        self.assertEqual([(r[0], r[1]) for r in rows], [(a.id, "revoked"), (b.id, "open")])
        code, out, _ = invoke(self.home, "--json", "relay", "invite", "--list")
        listed = json.loads(out)
        self.assertEqual(
            [(i["id"], i["state"]) for i in listed], [(a.id, "revoked"), (b.id, "open")]
        )
        self.assertNotIn(b.link_psk.hex()[:16], out)
        code, _, err = invoke(self.home, "relay", "invite", "--revoke", a.id)
        self.assertEqual(code, 1)
        self.assertIn("already revoked", err)
        code, _, err = invoke(self.home, "relay", "invite", "--revoke", "nope")
        self.assertIn("no invite with id 'nope'", err)

    def test_damaged_store_is_a_clear_error(self) -> None:
        invoke(self.home, "relay", "invite")
        store = InviteStore(self.home)
        store.path.write_text("garbage")
        code, _, err = invoke(self.home, "relay", "invite")
        self.assertEqual(code, 1)
        self.assertIn("damaged", err)
        self.assertEqual(store.path.read_text(), "garbage")


class InviteAddress(SynchronousTestCase):
    def test_choice(self) -> None:
        self.assertEqual(invite_host("0.0.0.0", None, lambda: "192.168.7.7"), ("192.168.7.7", None))
        self.assertEqual(invite_host("::", None, lambda: "10.0.0.2"), ("10.0.0.2", None))
        self.assertEqual(invite_host("10.9.9.9", None, lambda: "192.168.7.7"), ("10.9.9.9", None))
        self.assertEqual(
            invite_host("0.0.0.0", "172.16.0.4", lambda: "192.168.7.7"), ("172.16.0.4", None)
        )
        host, warning = invite_host("0.0.0.0", None, lambda: None)
        self.assertEqual(host, "127.0.0.1")
        self.assertIn("--host", warning)

    def test_primary_ipv4_sends_nothing(self) -> None:
        from claudectl.pairing.hosts import primary_ipv4

        addr = primary_ipv4()
        if addr is not None:
            self.assertEqual(len(addr.split(".")), 4)
            self.assertFalse(addr.startswith("127."))

    def test_parse_ttl(self) -> None:
        self.assertEqual(parse_ttl("24h"), 86400)
        self.assertEqual(parse_ttl("30m"), 1800)
        self.assertEqual(parse_ttl("7d"), 7 * 86400)
        self.assertEqual(parse_ttl("2"), 7200)
        for bad in ("0h", "-1h", "1y", "", "400d"):
            self.assertRaises(click.BadParameter, parse_ttl, bad)


class JoinCommand(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)

    def test_check_every_format(self) -> None:
        cases = {
            ("YCU", "ACM", "UAU", "PZJ", "WHA"): "relay code",
            ("ycuacmuaupzjwha",): "relay code",
            ("nut", "may", "act", "dub", "jag", "mad", "ray", "let", "cap"): "word phrase",
            ("CCTL://laptop-a3f2@192.168.1.50:9847/k/a3f29b1cd4e5f678",): "link",
            ("a3f2-9b1c-d4e5-f678", "192.168.1.50:9847"): "pair code",
        }
        for args, kind in cases.items():
            code, out, err = invoke(self.home, "relay", "join", "--check", *args)
            self.assertEqual(code, 0, err)
            self.assertIn(f"Format:   {kind}", out)
            self.assertIn("Address:  192.168.1.50:9847", out)
        code, out, _ = invoke(
            self.home,
            "--json",
            "relay",
            "join",
            "--check",
            "cctl://laptop-a3f2@192.168.1.50:9847/k/a3f29b1cd4e5f678",
        )
        self.assertEqual(
            json.loads(out),
            {"format": "link", "addr": "192.168.1.50:9847", "expected_identity": "laptop-a3f2"},
        )

    def test_mistyped_code_fails_clearly(self) -> None:
        code, _, err = invoke(self.home, "relay", "join", "YCU-ACM-UAU-PZJ-WH1")
        self.assertEqual((code, err), (1, "Error: invalid base32 character: '1'\n"))
        code, _, err = invoke(self.home, "relay", "join", "nut-may-act-dub-jag-mad-ray-let-zzz")
        self.assertEqual((code, err), (1, "Error: unknown word: 'zzz'\n"))
        code, _, err = invoke(self.home, "relay", "join", "hello", "world")
        self.assertEqual(code, 1)
        for form in ("invite link", "relay code", "word phrase", "pair code"):
            self.assertIn(form, err)

    def test_failure_messages(self) -> None:
        from claudectl.cli.pairing_cmds import join_failure_message

        code = decode_join("YCU-ACM-UAU-PZJ-WHA")
        link = decode_join("cctl://x-1@1.2.3.4:9847/k/a3f29b1cd4e5f678")
        self.assertIn(
            "ask for a new invite", join_failure_message(code, "handshake denied: denied")
        )
        self.assertIn("expired", join_failure_message(code, "handshake denied: expired"))
        self.assertEqual(
            join_failure_message(link, "Connection refused"),
            "connection failed: Connection refused",
        )
        # A key the peer does not have: it says only "denied" (review 14).
        self.assertIn(
            "The peer has no key that matches this machine's",
            join_failure_message(link, "handshake denied: denied"),
        )

    def test_needs_an_argument(self) -> None:
        code, _, err = invoke(self.home, "relay", "join")
        self.assertEqual(code, 2)


def _free_code_port() -> int:
    """A free TCP port on 127.0.0.1 that a relay code can carry."""
    import random

    ports = [p for p in range(9848, 10103) if p != 9975]
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the relay-code range")


class JoinEndToEnd(SynchronousTestCase):
    """Two homes on loopback: invite on A, `relay serve` on A, `relay join` from B."""

    def pair(self, pick: Any) -> None:
        ha, hb = temp_home(self), temp_home(self)
        port = _free_code_port()
        write_config(ha, listen_addr="127.0.0.1", listen_port=port)
        data = json.loads(run_cli(ha, "--json", "relay", "invite", "--words").stdout)
        a = ServeProcess.serve(ha)
        self.addCleanup(a.stop)
        a.port()
        result = run_cli(hb, "relay", "join", *pick(data).split(" "), timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        ida = KeyStore(ha).identity()
        idb = KeyStore(hb).identity()
        self.assertIn(f"Paired with {ida}", result.stdout)
        key_b = KeyStore(hb).key(ida)
        self.assertIsNotNone(key_b)
        deadline = time.monotonic() + 10
        while KeyStore(ha).key(idb) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(KeyStore(ha).key(idb), key_b)
        self.assertEqual(InviteStore(ha).get(data["invite_id"]).state, "used")

    def test_relay_code(self) -> None:
        """The story: real `relay serve` and `relay join` processes."""
        self.pair(lambda d: d["relay_code"])


class JoinInProcess(TestCase):
    """The other invite forms and a wrong code: the same two homes, A's service
    and B's `relay join` in this process (tests.cli_harness)."""

    timeout = 60

    async def serve(self, home: Home, port: int) -> None:
        service = RunningService(home, listen=f"tcp:{port}:interface=127.0.0.1")
        service.start()
        self.addCleanup(service.stop)

    async def pair(self, pick: Any) -> None:
        ha, hb = temp_home(self), temp_home(self)
        port = _free_code_port()
        write_config(ha, listen_addr="127.0.0.1", listen_port=port)
        data = run_now(ha, "--json", "relay", "invite", "--words").json()
        await self.serve(ha, port)
        result = await run_command(hb, "relay", "join", *pick(data).split(" "))
        self.assertEqual(result.code, 0, result.out + result.err)
        ida = KeyStore(ha).identity()
        idb = KeyStore(hb).identity()
        self.assertIn(f"Paired with {ida}", result.out)
        key_b = KeyStore(hb).key(ida)
        self.assertIsNotNone(key_b)
        for _ in range(100):
            if KeyStore(ha).key(idb) is not None:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(KeyStore(ha).key(idb), key_b)
        self.assertEqual(InviteStore(ha).get(data["invite_id"]).state, "used")

    async def test_wrong_code_fails_clearly_and_burns(self) -> None:
        ha, hb = temp_home(self), temp_home(self)
        port = _free_code_port()
        write_config(ha, listen_addr="127.0.0.1", listen_port=port)
        data = run_now(ha, "--json", "relay", "invite").json()
        good = codes.decode_relay_code(data["relay_code"])
        # A mistyped code that still names the invite (the same selector) burns it.
        wrong = codes.relay_code(
            good.ip, good.port, wrong_password_naming(good.secret, good.ip, good.port)
        )
        await self.serve(ha, port)
        result = await run_command(hb, "relay", "join", wrong)
        self.assertEqual(result.code, 1, result.out)
        self.assertIn("Error: connection failed", result.err)
        self.assertEqual(InviteStore(ha).get(data["invite_id"]).state, "burned")
        self.assertEqual(KeyStore(hb).known_peers(), [])
        # The right code cannot be tried any more.
        result = await run_command(hb, "relay", "join", data["relay_code"])
        self.assertEqual(result.code, 1, result.out)

    async def test_word_phrase_with_spaces(self) -> None:
        await self.pair(lambda d: d["word_phrase"].replace("-", " "))

    async def test_link(self) -> None:
        await self.pair(lambda d: d["invite_link"])


class DiscoverCommand(TestCase):
    """`relay discover` (in-process), hearing beacons sent on loopback."""

    timeout = 30

    def setUp(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.home = temp_home(self)
        write_config(
            self.home, lan_broadcast_port=self.port, lan_broadcast_addr="127.255.255.255"
        )  # queries stay on loopback
        KeyStore(self.home).save_key("desk-1", bytes(32))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.addCleanup(self.sock.close)

    def beacons(self) -> None:
        for ident, port in (("desk-1", 9847), ("lab-2", 9900)):
            self.sock.sendto(encode_beacon(ident, port, "0.64.0"), ("127.255.255.255", self.port))

    def run_discover(self, *args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        loop = LoopingCall(self.beacons)
        loop.start(0.1)
        d = run_command(self.home, "relay", "discover", "--timeout", "1.5", *args)
        d.addCallback(lambda r: (r.out.encode("utf-8"), r.err.encode("utf-8"), r.code))
        return d.addBoth(lambda r: (loop.stop(), r)[1])

    @defer.inlineCallbacks
    def test_table(self) -> Any:
        out, err, code = yield self.run_discover()
        self.assertEqual(code, 0, err)
        lines = out.decode("utf-8").splitlines()
        self.assertEqual(
            lines[:4],
            [
                "Scanning LAN for claudectl instances (1.5 seconds)...",
                "",
                "Found 2 instance(s):",
                "",
            ],
        )
        self.assertEqual(lines[4], "  IDENTITY            ADDRESS                 VERSION")
        self.assertEqual(lines[5], "  " + "─" * 56)
        self.assertEqual(
            lines[6:],
            [
                "  desk-1              127.0.0.1:9847          v0.64.0 (paired)",
                "  lab-2               127.0.0.1:9900          v0.64.0",
            ],
        )

    @defer.inlineCallbacks
    def test_json_is_pure(self) -> Any:
        """Defect P10: nothing but JSON on stdout."""
        out, err, code = yield self.run_discover("--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out.decode("utf-8")),
            [
                {
                    "identity": "desk-1",
                    "addr": "127.0.0.1:9847",
                    "version": "0.64.0",
                    "paired": True,
                },
                {
                    "identity": "lab-2",
                    "addr": "127.0.0.1:9900",
                    "version": "0.64.0",
                    "paired": False,
                },
            ],
        )
