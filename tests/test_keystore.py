"""Tests for claudectl.relay.keystore: identity and peer files (wire.md 6)."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay.crypto import psk_from_code
from claudectl.relay.keystore import (
    PENDING,
    KeyStore,
    PeerMeta,
    host_label,
    is_remote_peer_id,
    is_valid_peer_id,
)
from tests.common import temp_home, vector

PSK = bytes.fromhex(vector("wire.key_file")["input"]["psk_hex"])
OTHER = psk_from_code("0123-4567-89ab-cdef")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PeerIdTests(SynchronousTestCase):
    def test_vector(self) -> None:
        v = vector("wire.peer_id.validation")
        for pid in v["input"]["valid"]:
            self.assertTrue(is_valid_peer_id(pid), pid)
        for pid in v["input"]["invalid"]:
            self.assertFalse(is_valid_peer_id(pid), pid)
            self.assertFalse(is_remote_peer_id(pid), pid)
        # _pending is valid but reserved: refused as a remote id.
        self.assertFalse(is_remote_peer_id(PENDING))
        self.assertTrue(is_remote_peer_id("peer-abc_123"))

    def test_lengths_and_charset(self) -> None:
        self.assertTrue(is_remote_peer_id("a" * 128))
        self.assertFalse(is_valid_peer_id("a" * 129))
        for bad in (
            "peer.key",
            "peer key",
            "peer\n",
            "péer",
            "peer\x00",
            ".",
            "..",
            "a" * 127 + "é",
            None,
            5,
            b"peer",
        ):
            self.assertFalse(is_valid_peer_id(bad), repr(bad))
        # Case-sensitive, and other cases of _pending are ordinary ids.
        self.assertTrue(is_remote_peer_id("_Pending"))

    def test_trailing_newline_not_accepted(self) -> None:
        """A regex with ``$`` would accept ``"peer\\n"``."""
        self.assertFalse(is_valid_peer_id("peer\n"))
        self.assertFalse(is_remote_peer_id("_pending\n"))


class HostLabelTests(SynchronousTestCase):
    def test_rules(self) -> None:
        cases = {
            "laptop": "laptop",
            "Laptop.local": "laptop",
            "My Laptop!.lan": "my-laptop",
            "--box--": "box",
            "ci_runner-9": "ci_runner-9",
            "": "unknown",
            "...": "unknown",
            "héllo": "h-llo",
        }
        for host, expected in cases.items():
            self.assertEqual(host_label({"HOSTNAME": host}), expected, host)

    def test_hostname_when_env_unset(self) -> None:
        self.assertEqual(host_label({}, hostname=lambda: "  Desk.example.com\n"), "desk")

        def broken() -> str:
            raise OSError

        self.assertEqual(host_label({}, hostname=broken), "unknown")

    def test_empty_hostname_env_wins(self) -> None:
        self.assertEqual(host_label({"HOSTNAME": ""}, hostname=lambda: "desk"), "unknown")


class IdentityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.ks = KeyStore(self.home)

    def test_generated_once(self) -> None:
        self.assertIsNone(self.ks.identity())
        ident = self.ks.ensure_identity(
            random=lambda n: b"\xa3\xf2\x9b\x1c"[:n], environ={"HOSTNAME": "Laptop.local"}
        )
        self.assertEqual(ident, "laptop-a3f29b1c")
        self.assertEqual(self.home.identity_file.read_bytes(), b"laptop-a3f29b1c")
        again = self.ks.ensure_identity(random=lambda n: b"\x00" * n, environ={"HOSTNAME": "other"})
        self.assertEqual(again, ident)

    def test_existing_identity_read_trimmed_verbatim(self) -> None:
        self.home.relay.mkdir(parents=True)
        self.home.identity_file.write_text("  Some Odd.ID \n")
        self.assertEqual(self.ks.identity(), "Some Odd.ID")
        self.assertEqual(self.ks.ensure_identity(), "Some Odd.ID")

    def test_a_damaged_identity_is_never_replaced(self) -> None:
        """Review 14: a non-UTF-8 identity file was silently replaced by a new
        identity, ending every pairing without a word."""
        from claudectl.relay.keystore import DamagedIdentity

        self.home.relay.mkdir(parents=True)
        self.home.identity_file.write_bytes(b"\x00\xffnot json{{{\n")
        with self.assertRaises(DamagedIdentity) as caught:
            self.ks.ensure_identity()
        self.assertIn("is not UTF-8", str(caught.exception))
        self.assertIn("move it away", str(caught.exception))
        self.assertEqual(self.home.identity_file.read_bytes(), b"\x00\xffnot json{{{\n")

    def test_only_ids_peers_accept_are_handed_out(self) -> None:
        from claudectl.relay.keystore import DamagedIdentity

        self.home.relay.mkdir(parents=True)
        for bad in ("bad id/with {{ spaces", "_pending", "x" * 129):
            self.home.identity_file.write_text(bad)
            self.assertEqual(self.ks.identity(), bad)  # read verbatim, as claudectl
            with self.assertRaises(DamagedIdentity):
                self.ks.shareable_identity()
        self.home.identity_file.write_text("desk-9f8e7d6c")
        self.assertEqual(self.ks.shareable_identity(), "desk-9f8e7d6c")

    def test_blank_identity_regenerated(self) -> None:
        self.home.relay.mkdir(parents=True)
        self.home.identity_file.write_text("  \n")
        self.assertIsNone(self.ks.identity())
        ident = self.ks.ensure_identity(environ={"HOSTNAME": "box"})
        self.assertRegex(ident, r"^box-[0-9a-f]{8}$")


class KeyCacheTests(SynchronousTestCase):
    """Keys are read once and again only when their file changes."""

    def test_rewritten_key_is_read_again(self) -> None:
        home = temp_home(self)
        ks, other = KeyStore(home), KeyStore(home)  # e.g. the service and the CLI
        other.save_key("peer-1", b"a" * 32)
        self.assertEqual(ks.key("peer-1"), b"a" * 32)
        other.save_key("peer-1", b"b" * 32)
        self.assertEqual(ks.key("peer-1"), b"b" * 32)
        other.forget("peer-1")
        self.assertIsNone(ks.key("peer-1"))

    def test_unchanged_file_is_not_read_again(self) -> None:
        home = temp_home(self)
        ks = KeyStore(home)
        ks.save_key("peer-1", b"a" * 32)
        self.assertEqual(ks.key("peer-1"), b"a" * 32)
        reads = []
        real_open = open

        def counting_open(*args, **kwargs):  # type: ignore[no-untyped-def]
            reads.append(args[0])
            return real_open(*args, **kwargs)

        import builtins

        self.patch(builtins, "open", counting_open)
        for _ in range(3):
            self.assertEqual(ks.key("peer-1"), b"a" * 32)
        self.assertEqual(reads, [])


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.ks = KeyStore(self.home)

    def test_key_file_vector(self) -> None:
        v = vector("wire.key_file")
        self.ks.save_key("desk-9f8e7d6c", PSK)
        path = self.home.peers / "desk-9f8e7d6c.key"
        self.assertEqual(path.read_bytes(), v["expected"]["file_bytes"].encode("ascii"))
        self.assertEqual(_mode(path), int(v["expected"]["mode"], 8))
        self.assertEqual(self.ks.key("desk-9f8e7d6c"), PSK)

    def test_pending_key_is_0600(self) -> None:
        """Defect W14: every key file is 0600."""
        old = os.umask(0o022)
        try:
            self.ks.save_pending_key(PSK)
        finally:
            os.umask(old)
        self.assertEqual(_mode(self.home.peers / "_pending.key"), 0o600)
        self.assertEqual(self.ks.pending_key(), PSK)

    def test_reads_claudectl_files_any_case_trimmed(self) -> None:
        self.home.peers.mkdir(parents=True)
        (self.home.peers / "a.key").write_text(PSK.hex().upper() + "\n")
        self.assertEqual(self.ks.key("a"), PSK)

    def test_malformed_key_counts_as_absent(self) -> None:
        self.home.peers.mkdir(parents=True)
        for name, text in {"short": "abcd", "junk": "zz" * 32, "long": PSK.hex() + "00"}.items():
            (self.home.peers / f"{name}.key").write_text(text)
            self.assertIsNone(self.ks.key(name), name)
        (self.home.peers / "bin.key").write_bytes(b"\xff\xfe" * 32)
        self.assertIsNone(self.ks.key("bin"))
        self.assertEqual(self.ks.known_peers(), [])

    def test_invalid_ids(self) -> None:
        self.assertIsNone(self.ks.key("../identity"))
        self.assertRaises(ValueError, self.ks.save_key, "../evil", PSK)
        self.assertRaises(ValueError, self.ks.save_meta, "a/b", PeerMeta("h:1", 0))
        self.assertIsNone(self.ks.meta("../x"))
        self.assertFalse(self.home.relay.exists() and any(self.home.relay.glob("evil*")))

    def test_known_peers(self) -> None:
        self.assertEqual(self.ks.known_peers(), [])
        self.ks.save_key("zed", PSK)
        self.ks.save_key("alpha", OTHER)
        self.ks.save_pending_key(PSK)
        (self.home.peers / "bad name.key").write_text(PSK.hex())
        (self.home.peers / "alpha.meta").write_text("{}")
        self.assertEqual(self.ks.known_peers(), ["alpha", "zed"])

    def test_forget(self) -> None:
        self.ks.save_key("desk", PSK)
        self.ks.save_meta("desk", PeerMeta("10.0.0.1:9847", 5))
        self.ks.mark_mutual("desk")
        self.assertTrue(self.ks.forget("desk"))
        self.assertEqual(
            sorted(p.name for p in self.home.peers.iterdir() if not p.name.endswith(".lock")), []
        )
        self.assertFalse(self.ks.forget("desk"))

    def test_forget_meta_only_reports_false(self) -> None:
        self.ks.save_meta("desk", PeerMeta("10.0.0.1:9847", 5))
        self.assertFalse(self.ks.forget("desk"))
        self.assertFalse((self.home.peers / "desk.meta").exists())

    def test_forget_refuses_path_tricks(self) -> None:
        """An invalid id never reaches the filesystem."""
        self.home.peers.mkdir(parents=True)
        victim = self.home.relay / "victim.key"
        victim.write_text(PSK.hex())
        self.assertFalse(self.ks.forget("../victim"))
        self.assertTrue(victim.exists())


class PendingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.ks = KeyStore(self.home)

    def test_claim_once(self) -> None:
        self.ks.save_pending_key(PSK)
        (self.home.peers / "_pending.meta").write_text("{}")
        self.assertTrue(self.ks.claim_pending("laptop-1", PSK))
        self.assertEqual(self.ks.key("laptop-1"), PSK)
        self.assertEqual(_mode(self.home.peers / "laptop-1.key"), 0o600)
        self.assertIsNone(self.ks.pending_key())
        self.assertFalse((self.home.peers / "_pending.meta").exists())
        # The second claimer loses.
        self.assertFalse(self.ks.claim_pending("laptop-2", PSK))
        self.assertIsNone(self.ks.key("laptop-2"))

    def test_claim_with_other_key_fails(self) -> None:
        self.ks.save_pending_key(PSK)
        self.assertFalse(self.ks.claim_pending("laptop-1", OTHER))
        self.assertEqual(self.ks.pending_key(), PSK)

    def test_claim_does_not_overwrite_stored_key(self) -> None:
        self.ks.save_pending_key(PSK)
        self.ks.save_key("laptop-1", OTHER)
        self.assertFalse(self.ks.claim_pending("laptop-1", PSK))
        self.assertEqual(self.ks.key("laptop-1"), OTHER)
        self.assertEqual(self.ks.pending_key(), PSK)

    def test_pending_overwritten(self) -> None:
        self.ks.save_pending_key(PSK)
        self.ks.save_pending_key(OTHER)
        self.assertEqual(self.ks.pending_key(), OTHER)

    def test_clear_pending_without_files(self) -> None:
        self.ks.clear_pending()
        self.ks.save_pending_key(PSK)
        self.ks.clear_pending()
        self.assertIsNone(self.ks.pending_key())


class MetaTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = temp_home(self)
        self.ks = KeyStore(self.home)

    def test_meta_file_vector(self) -> None:
        v = vector("wire.meta_file")
        self.ks.save_meta("desk", PeerMeta(v["input"]["addr"], v["input"]["last_seen"]))
        self.assertEqual(
            (self.home.peers / "desk.meta").read_bytes(),
            v["expected"]["file_bytes"].encode("utf-8"),
        )
        self.assertEqual(
            self.ks.meta("desk"), PeerMeta(v["input"]["addr"], v["input"]["last_seen"])
        )

    def test_meta_is_read_once_while_the_file_is_unchanged(self) -> None:
        """Issue 16: no meta read per link-down; anyone's rewrite is seen."""
        reads: list[str] = []
        from claudectl.relay import keystore

        real = keystore._read_meta

        def counting(path: str) -> PeerMeta | None:
            reads.append(path)
            return real(path)

        self.patch(keystore, "_read_meta", counting)
        self.ks.save_meta("desk", PeerMeta("10.0.0.1:9847", 1))
        for _ in range(3):
            self.assertEqual(self.ks.meta("desk"), PeerMeta("10.0.0.1:9847", 1))
        self.assertEqual(len(reads), 1)
        # Another process (the CLI, claudectl) rewrites it: read again.
        KeyStore(self.home).save_meta("desk", PeerMeta("10.0.0.2:9847", 2))
        self.assertEqual(self.ks.meta("desk"), PeerMeta("10.0.0.2:9847", 2))
        # Our own write, and a removal.
        self.ks.save_meta("desk", PeerMeta("10.0.0.3:9847", 3))
        self.assertEqual(self.ks.meta("desk"), PeerMeta("10.0.0.3:9847", 3))
        (self.home.peers / "desk.meta").unlink()
        self.assertIsNone(self.ks.meta("desk"))
        self.assertEqual(len(reads), 3)

    def test_ipv6_meta(self) -> None:
        self.ks.save_meta("v6", PeerMeta("[::1]:9847", 1))
        self.assertEqual(self.ks.meta("v6"), PeerMeta("[::1]:9847", 1))

    def test_reads_claudectl_meta_any_key_order(self) -> None:
        self.home.peers.mkdir(parents=True)
        (self.home.peers / "x.meta").write_text('{"last_seen": 7, "addr": "1.2.3.4:1", "z": 1}')
        self.assertEqual(self.ks.meta("x"), PeerMeta("1.2.3.4:1", 7))

    def test_bad_meta_is_none(self) -> None:
        self.home.peers.mkdir(parents=True)
        for name, text in {
            "a": "not json",
            "b": "[]",
            "c": '{"addr": 5}',
            "d": '{"last_seen": 5}',
            "e": '{"addr": "h:1", "last_seen": "x"}',
        }.items():
            (self.home.peers / f"{name}.meta").write_text(text)
            self.assertIsNone(self.ks.meta(name), name)
        self.assertIsNone(self.ks.meta("missing"))


class MutualMarkerTests(SynchronousTestCase):
    def test_mark(self) -> None:
        home = temp_home(self)
        ks = KeyStore(home)
        self.assertFalse(ks.is_mutual("desk"))
        ks.mark_mutual("desk")
        ks.mark_mutual("desk")
        self.assertTrue(ks.is_mutual("desk"))
        self.assertEqual(_mode(home.peers / "desk.mutual"), 0o600)
        self.assertFalse(ks.is_mutual("../desk"))
        # The marker is not a key: the peer is not "known" because of it.
        self.assertEqual(ks.known_peers(), [])


class MarkerCacheTests(SynchronousTestCase):
    """Markers seen are remembered while the peer's key file is unchanged."""

    def setUp(self) -> None:
        self.home = temp_home(self)
        self.ks, self.cli = KeyStore(self.home), KeyStore(self.home)  # the service, the CLI
        self.cli.save_key("peer-1", b"a" * 32)
        self.assertEqual(self.ks.key("peer-1"), b"a" * 32)

    def count_stats(self) -> list[str]:
        import os

        calls: list[str] = []
        real = os.path.exists

        def exists(path: str) -> bool:
            calls.append(path)
            return real(path)

        self.patch(os.path, "exists", exists)
        return calls

    def test_seen_marker_costs_no_stat(self) -> None:
        self.ks.mark_tls("peer-1")
        self.ks.mark_mutual("peer-1")
        calls = self.count_stats()
        for _ in range(3):
            self.assertEqual(self.ks.key("peer-1"), b"a" * 32)
            self.assertTrue(self.ks.is_tls("peer-1"))
            self.assertTrue(self.ks.is_mutual("peer-1"))
        self.assertEqual(calls, [])

    def test_absent_marker_is_looked_up_each_time(self) -> None:
        # Another process (the CLI's `relay connect`) may write one meanwhile.
        self.assertFalse(self.ks.is_tls("peer-1"))
        self.cli.mark_tls("peer-1")
        self.assertTrue(self.ks.is_tls("peer-1"))

    def test_pairing_again_drops_what_was_seen(self) -> None:
        """`relay forget` then pairing again (a new key file): the markers are gone."""
        self.ks.mark_tls("peer-1")
        self.ks.mark_mutual("peer-1")
        self.assertTrue(self.ks.is_tls("peer-1"))
        self.cli.forget("peer-1")
        self.cli.save_key("peer-1", b"b" * 32)  # relay accept / a claimed code
        self.assertEqual(self.ks.key("peer-1"), b"b" * 32)  # every handshake asks first
        self.assertFalse(self.ks.is_tls("peer-1"))
        self.assertFalse(self.ks.is_mutual("peer-1"))

    def test_key_rewritten_with_markers_kept(self) -> None:
        # claudectl's `relay accept` over an existing key leaves our markers:
        # they still count (as before the cache).
        self.ks.mark_tls("peer-1")
        self.cli.save_key("peer-1", b"c" * 32)
        self.assertEqual(self.ks.key("peer-1"), b"c" * 32)
        self.assertTrue(self.ks.is_tls("peer-1"))

    def test_forget_in_this_process(self) -> None:
        self.ks.mark_tls("peer-1")
        self.ks.forget("peer-1")
        self.assertFalse(self.ks.is_tls("peer-1"))
        self.assertIsNone(self.ks.key("peer-1"))
