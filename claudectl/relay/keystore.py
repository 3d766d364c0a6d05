# -*- test-case-name: tests.test_keystore -*-
"""
Identity and per-peer files under ``~/.claudectl/relay/`` (docs/protocol.md;
the key files: docs/pairing.md).

* ``identity``: the peer id, no trailing newline.
* ``peers/<id>.key``: the 32-byte PSK as 64 lowercase hex, no newline, 0600.
* ``peers/_pending.key``: a key waiting to be claimed by the first peer that
  proves it (claudectl's single pending slot).
* ``peers/<id>.meta``: ``{"addr": …, "last_seen": <ms>}``, pretty JSON with a
  2-space indent and no trailing newline.
* ``peers/<id>.mutual``: our own marker -- this peer once proved the key in
  both directions, so a later one-way handshake from it is a downgrade.
* ``peers/<id>.tls``: our own marker -- this peer once authenticated over
  TLS, so a later plaintext handshake under its identity is a downgrade.

All writes are atomic and key files are always 0600 (defect W14).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from claudectl.atomic import atomic_write, locked
from claudectl.home import Home
from claudectl.relay.crypto import key_from_hex, key_to_hex

PENDING = "_pending"
#: Keys kept in memory by :meth:`KeyStore.key` (cleared when full).
_KEY_CACHE_MAX = 8192
#: Used with fullmatch: ``$`` alone would also accept a trailing newline.
_PEER_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def is_valid_peer_id(peer_id: object) -> bool:
    """1-128 ASCII letters, digits, ``-`` or ``_`` (``_pending`` passes here)."""
    return isinstance(peer_id, str) and bool(_PEER_ID.fullmatch(peer_id))


def is_remote_peer_id(peer_id: object) -> bool:
    """A valid id that a remote peer may claim (not the reserved ``_pending``)."""
    return is_valid_peer_id(peer_id) and peer_id != PENDING


def host_label(
    environ: Mapping[str, str] | None = None, hostname: Callable[[], str] = socket.gethostname
) -> str:
    """The host part of a new identity, sanitised as claudectl does."""
    env = os.environ if environ is None else environ
    if "HOSTNAME" in env:
        host = env["HOSTNAME"]
    else:
        try:
            host = hostname().strip()
        except OSError:
            host = "unknown"
    host = host.split(".", 1)[0].lower()
    host = "".join(c if (c.isascii() and (c.isalnum() or c in "-_")) else "-" for c in host)
    host = host.strip("-")
    return host or "unknown"


@dataclass(frozen=True)
class PeerMeta:
    addr: str
    last_seen: int  # ms

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"addr": self.addr, "last_seen": self.last_seen}, indent=2, ensure_ascii=False
        ).encode("utf-8")


def _read_meta(path: str) -> PeerMeta | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read())
        addr, last_seen = data["addr"], data.get("last_seen", 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(addr, str) or not isinstance(last_seen, int):
        return None
    return PeerMeta(addr, last_seen)


class DamagedIdentity(ValueError):
    """The identity file holds no valid identity (left as it is)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"{path} is damaged: {why}. Fix it (your peers know this machine by the id "
            f"it held) or move it away to make a new identity (then pair again)"
        )


class KeyStore:
    """Reads and writes one home's identity and peer key files."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._peers_dir = str(home.peers)
        #: peer -> ((inode, size, mtime_ns), key) of keys read (see :meth:`key`).
        self._key_cache: dict[str, tuple[tuple[int, int, int], bytes]] = {}
        #: peer -> ((inode, size, mtime_ns), meta) of meta files read (see :meth:`meta`).
        self._meta_cache: dict[str, tuple[tuple[int, int, int], PeerMeta | None]] = {}
        #: (peer, marker suffix) -> the key file's signature when the marker
        #: was seen (see :meth:`_marked`).
        self._marks: dict[tuple[str, str], tuple[int, int, int]] = {}

    # --- identity ---------------------------------------------------------------
    def identity(self) -> str | None:
        """
        This machine's identity; None before it has one.  A file that holds
        something else raises :class:`DamagedIdentity`: making a new identity
        over it would silently end every pairing (peers know the old one).
        """
        path = self.home.identity_file
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise DamagedIdentity(path, "it is not UTF-8 text") from None
        # Any other text is the identity, verbatim, as claudectl reads it
        # (what peers accept is checked where it is handed out:
        # :meth:`shareable_identity`).
        return text or None

    def shareable_identity(self) -> str:
        """
        :meth:`ensure_identity`, when it is an id peers accept -- for the
        commands that give it to a peer (``relay pair``, ``relay accept``,
        ``relay invite``): a hand-edited one would only fail on their side.
        """
        ident = self.ensure_identity()
        if not is_remote_peer_id(ident):
            shown = ident if len(ident) <= 60 else ident[:60] + "..."
            raise DamagedIdentity(
                self.home.identity_file,
                f"{shown!r} is not an id peers accept (1-128 letters, digits, '-' or '_')",
            )
        return ident

    def ensure_identity(
        self, random: Callable[[int], bytes] = os.urandom, environ: Mapping[str, str] | None = None
    ) -> str:
        """The identity, generated as ``<host>-<8 hex>`` the first time."""
        with locked(self.home.identity_file):
            existing = self.identity()
            if existing:
                return existing
            ident = f"{host_label(environ)}-{random(4).hex()}"
            atomic_write(self.home.identity_file, ident, mode=0o644)
            return ident

    # --- keys ---------------------------------------------------------------------
    def _key_path(self, peer_id: str) -> Path:
        if not is_valid_peer_id(peer_id):
            raise ValueError(f"invalid peer id {peer_id!r}")
        return self.home.peers / f"{peer_id}.key"

    def key(self, peer_id: str) -> bytes | None:
        """
        The peer's key.  Read once and kept while the file is unchanged
        (same inode, size and mtime): a handshake costs one ``stat``, and a
        key the CLI (or claudectl) rewrites is read again.
        """
        if not is_valid_peer_id(peer_id):
            return None
        path = self._file(peer_id, ".key")
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._key_cache.pop(peer_id, None)
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._key_cache.get(peer_id)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            with open(path, encoding="ascii") as f:
                psk = key_from_hex(f.read())
        except (FileNotFoundError, UnicodeDecodeError, ValueError):
            psk = None
        if psk is None:
            self._key_cache.pop(peer_id, None)
            return None
        if len(self._key_cache) >= _KEY_CACHE_MAX:
            self._key_cache.clear()
        self._key_cache[peer_id] = (sig, psk)
        return psk

    def _file(self, peer_id: str, suffix: str) -> str:
        """``peers/<id><suffix>`` as a string (the id is checked first)."""
        if not is_valid_peer_id(peer_id):
            raise ValueError(f"invalid peer id {peer_id!r}")
        return f"{self._peers_dir}/{peer_id}{suffix}"

    def save_key(self, peer_id: str, psk: bytes) -> None:
        atomic_write(self._key_path(peer_id), key_to_hex(psk), mode=0o600)

    def pending_key(self) -> bytes | None:
        return self.key(PENDING)

    def save_pending_key(self, psk: bytes) -> None:
        self.save_key(PENDING, psk)

    def clear_pending(self) -> None:
        for suffix in (".key", ".meta"):
            with contextlib.suppress(FileNotFoundError):
                (self.home.peers / f"{PENDING}{suffix}").unlink()

    def claim_pending(self, peer_id: str, psk: bytes) -> bool:
        """
        Move the pending key to ``<peer_id>.key`` if it is still ``psk``.
        Only the first valid claimer wins.
        """
        with locked(self.home.peers / f"{PENDING}.key"):
            if self.pending_key() != psk or self.key(peer_id) is not None:
                return False
            self.save_key(peer_id, psk)
            self.clear_pending()
            return True

    def _key_files(self) -> list[str]:
        """The peer ids of the ``<id>.key`` files (valid ids, ``_pending`` excluded)."""
        try:
            names = os.listdir(self.home.peers)
        except FileNotFoundError:
            return []
        return [n[:-4] for n in names if n.endswith(".key") and is_remote_peer_id(n[:-4])]

    def known_peers(self) -> list[str]:
        """Every ``<id>.key`` with a valid id and a key, ``_pending`` excluded, sorted."""
        return sorted(pid for pid in self._key_files() if self.key(pid) is not None)

    def damaged_keys(self) -> list[str]:
        """Peers whose ``<id>.key`` holds no key (not 32 bytes of hex): not paired now."""
        return sorted(pid for pid in self._key_files() if self.key(pid) is None)

    def forget(self, peer_id: str) -> bool:
        """Remove the key, meta and marker files; True if a key was removed."""
        if not is_valid_peer_id(peer_id):
            return False  # never build a path from "../x"
        self._key_cache.pop(peer_id, None)
        self._meta_cache.pop(peer_id, None)
        for suffix in (".mutual", ".tls"):
            self._marks.pop((peer_id, suffix), None)
        removed = False
        for suffix in (".key", ".meta", ".mutual", ".tls"):
            try:
                (self.home.peers / f"{peer_id}{suffix}").unlink()
                removed = removed or suffix == ".key"
            except FileNotFoundError:
                pass
        return removed

    # --- meta ---------------------------------------------------------------------
    def meta(self, peer_id: str) -> PeerMeta | None:
        """
        The peer's meta file.  Like :meth:`key`, kept in memory while the
        file is unchanged (one ``stat`` per call; read again after our own
        writes and anyone else's).
        """
        if not is_valid_peer_id(peer_id):
            return None
        path = self._file(peer_id, ".meta")
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._meta_cache.pop(peer_id, None)
            return None
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._meta_cache.get(peer_id)
        if cached is not None and cached[0] == sig:
            return cached[1]
        meta = _read_meta(path)
        if len(self._meta_cache) >= _KEY_CACHE_MAX:
            self._meta_cache.clear()
        self._meta_cache[peer_id] = (sig, meta)
        return meta

    def save_meta(self, peer_id: str, meta: PeerMeta, durable: bool = True) -> None:
        """
        ``durable=False``: no fsync (still atomic).  For a ``last_seen``
        update alone, which a crash may only set back to the previous one.
        """
        if not is_valid_peer_id(peer_id):
            raise ValueError(f"invalid peer id {peer_id!r}")
        self._meta_cache.pop(peer_id, None)
        atomic_write(
            self.home.peers / f"{peer_id}.meta", meta.to_bytes(), mode=0o644, durable=durable
        )

    # --- markers ----------------------------------------------------------------------
    def _marked(self, peer_id: str, suffix: str) -> bool:
        """
        Whether ``peers/<id><suffix>`` exists.  A marker seen (or written by
        us) is remembered with the signature :meth:`key` last saw of the
        peer's key file: while that key is unchanged, no ``stat``.  Markers
        are only ever added while a key stays (``relay forget`` removes the
        key with them, and pairing again writes a new key file), so a key
        that changed -- or any doubt -- means a look at the disk.  An absent
        marker is always looked up (another process may write one).
        """
        if not is_valid_peer_id(peer_id):
            return False
        key = self._key_cache.get(peer_id)
        seen = self._marks.get((peer_id, suffix))
        if seen is not None and key is not None and key[0] == seen:
            return True
        if not os.path.exists(self._file(peer_id, suffix)):
            self._marks.pop((peer_id, suffix), None)
            return False
        self._remember_mark(peer_id, suffix)
        return True

    def _remember_mark(self, peer_id: str, suffix: str) -> None:
        key = self._key_cache.get(peer_id)
        if key is not None:
            if len(self._marks) >= 2 * _KEY_CACHE_MAX:
                self._marks.clear()
            self._marks[(peer_id, suffix)] = key[0]

    def _mark(self, peer_id: str, suffix: str) -> None:
        if not self._marked(peer_id, suffix):
            atomic_write(self.home.peers / f"{peer_id}{suffix}", b"1", mode=0o600)
            self._remember_mark(peer_id, suffix)

    # --- mutual-auth marker -------------------------------------------------------
    def is_mutual(self, peer_id: str) -> bool:
        return self._marked(peer_id, ".mutual")

    def mark_mutual(self, peer_id: str) -> None:
        self._mark(peer_id, ".mutual")

    # --- TLS marker -------------------------------------------------------------------
    def is_tls(self, peer_id: str) -> bool:
        return self._marked(peer_id, ".tls")

    def mark_tls(self, peer_id: str) -> None:
        self._mark(peer_id, ".tls")
