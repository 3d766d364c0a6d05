# -*- test-case-name: tests.test_tls -*-
"""
TLS 1.3 for links between two instances of this project (protocol.md,
"Encrypted links").

No certificate authority and no pinning: each instance makes one long-lived
ECDSA P-256 key and a self-signed certificate the first time it listens
(``~/.claudectl/relay/tls_key.pem`` and ``tls_cert.pem``, mode 0600).  The
certificate only lets the TLS handshake run; who is at the other end is
proved by the pairing key, with HMACs over the connection's TLS exporter
value (RFC 9266 ``tls-exporter``: label ``EXPORTER-Channel-Binding``, empty
context, 32 bytes).  A proof made on one connection is worthless on any
other, so a proof cannot be reflected or relayed, and a man-in-the-middle
that terminates TLS on both sides sees two different exporter values.

This module makes and loads the files and builds the OpenSSL contexts; the
proofs are :mod:`claudectl.relay.binding`'s.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet._newtls import ConnectionMixin, _BypassTLS
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import directlyProvides, implementer

from claudectl.atomic import atomic_write, locked
from claudectl.home import Home
from claudectl.relay.binding import EXPORTER_BYTES, EXPORTER_LABEL

log = Logger()

KEY_FILE = "tls_key.pem"
CERT_FILE = "tls_cert.pem"


def exporter_of(connection: Any) -> bytes:
    """The RFC 9266 exporter value of an established pyOpenSSL connection."""
    value: bytes = connection.export_keying_material(EXPORTER_LABEL, EXPORTER_BYTES, None)
    return value


def is_tls13(connection: Any) -> bool:
    try:
        return bool(connection.get_protocol_version_name() == "TLSv1.3")
    except Exception:
        return False


# --- key and certificate ------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    key_pem: bytes
    cert_pem: bytes

    def fingerprint(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return cert.fingerprint(hashes.SHA256()).hex()


def make_credentials(common_name: str) -> Credentials:
    """A fresh P-256 key and a self-signed certificate valid for 100 years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "claudectl")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=36500))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Credentials(key_pem, cert.public_bytes(serialization.Encoding.PEM))


def _load(key_path: Path, cert_path: Path) -> Credentials:
    creds = Credentials(key_path.read_bytes(), cert_path.read_bytes())
    # Both must parse and belong together, or the files are re-made.
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, creds.key_pem)
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, creds.cert_pem)
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_privatekey(key)
    ctx.use_certificate(cert)
    ctx.check_privatekey()
    return creds


def ensure_credentials(home: Home, common_name: str) -> Credentials:
    """
    This instance's TLS key and certificate, made on first use.  A missing,
    unreadable or mismatched pair is made again (and logged): the pairing
    key, not the certificate, authenticates a peer, so nothing is lost.
    """
    key_path, cert_path = home.relay / KEY_FILE, home.relay / CERT_FILE
    with locked(key_path):
        try:
            return _load(key_path, cert_path)
        except FileNotFoundError:
            if key_path.exists() or cert_path.exists():
                log.warn(
                    "TLS key or certificate missing under {dir}: making a new pair",
                    dir=str(home.relay),
                )
        except Exception as e:
            log.warn(
                "TLS key or certificate under {dir} unusable ({error}): making a new pair",
                dir=str(home.relay),
                error=type(e).__name__,
            )
        creds = make_credentials(common_name)
        # Certificate first: a crash in between leaves a key that does not
        # match, which the next start detects and replaces.
        atomic_write(cert_path, creds.cert_pem, mode=0o600)
        atomic_write(key_path, creds.key_pem, mode=0o600)
        return creds


# --- OpenSSL contexts -----------------------------------------------------------------


def _base_context() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # Idle links give their read/write buffers back (memory per idle link).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # No resumption: every link runs the full handshake (and no tickets).
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class _ContextFactory:
    """What ``ITLSTransport.startTLS`` takes: makes one connection per link."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context
        #: client? -> the TLSMemoryBIOFactory every link of that side shares.
        self._factories: dict[bool, TLSMemoryBIOFactory] = {}

    def tls_factory(self, client: bool) -> TLSMemoryBIOFactory:
        factory = self._factories.get(client)
        if factory is None:
            factory = self._factories[client] = TLSMemoryBIOFactory(self, client, None)  # type: ignore[arg-type]
            factory.protocol = LinkTLS
        return factory

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


# --- starting TLS on a link ----------------------------------------------------------


@implementer()
class _Bypass(_BypassTLS):
    """
    Twisted's pass-through transport for the TLS layer, declaring no
    interfaces of its own.  ``TLSMemoryBIOProtocol.makeConnection`` copies
    the interfaces of its transport one ``directlyProvides`` call at a time
    (ten for a TCP connection, each replacing the one before, so only the
    last survived anyway): nothing reads them on a link's TLS layer (our
    protocol keeps the TCP transport), and they cost about a tenth of a
    millisecond per link.
    """


class LinkTLS(BufferingTLSTransport):
    """The TLS layer of one link (Twisted's, with a way to send at once)."""

    def flush_now(self) -> None:
        """
        Encrypt what the link wrote so far now, not on the next reactor turn
        (the layer gathers small writes on a ``callLater(0)``): the
        connector's proof then leaves in the same TCP write as its TLS
        Finished, and the listener's ``handshake_ack`` before the link-up
        work runs.
        """
        self._aggregator.flush()


#: The longest plaintext line read ahead of TLS (a challenge is ~300 bytes).
MAX_PREFACE_BYTES = 4096


class _Preface:
    """
    Stands in front of a link's TLS layer until one plaintext line has come
    (the listener's challenge, when the connector started TLS before it:
    ``ConnectorHandshake.early_tls``): that line goes to ``on_line``, every
    byte after it to TLS.  ``on_line(None)``: no line within
    :data:`MAX_PREFACE_BYTES`.
    """

    def __init__(self, conn: Any, tls: LinkTLS, on_line: Callable[[bytes | None], None]) -> None:
        self._conn = conn
        self._tls = tls
        self._on_line = on_line
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data
        nl = buf.find(b"\n")
        if nl < 0:
            self._buf = buf
            if len(buf) > MAX_PREFACE_BYTES:
                self._buf = b""
                self._conn.protocol = self._tls
                self._on_line(None)
            return
        self._buf = b""
        self._conn.protocol = self._tls
        self._on_line(buf[:nl])
        rest = buf[nl + 1 :]
        if rest and self._conn.connected and not self._conn.disconnecting:
            self._tls.dataReceived(rest)

    def drop(self) -> None:
        self._conn.protocol = self._tls

    def connectionLost(self, reason: Any) -> None:
        self._conn.protocol = self._tls
        self._tls.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tls, name)


def drop_preface(transport: Any) -> None:
    """The plaintext line came another way (see RelayProtocol.dataReceived): TLS reads now."""
    layer = getattr(transport, "protocol", None)
    if isinstance(layer, _Preface):
        layer.drop()


def can_preface(transport: Any) -> bool:
    """:func:`start_tls` can read a plaintext line ahead of TLS on ``transport``."""
    return isinstance(transport, ConnectionMixin) and isinstance(transport, FileDescriptor)


def start_tls(
    transport: Any,
    creator: _ContextFactory,
    client: bool,
    preface: Callable[[bytes | None], None] | None = None,
) -> None:
    """
    What ``transport.startTLS(creator)`` does on a TCP connection
    (``twisted.internet._newtls.startTLS``), with the per-link work it does
    again and again done once: one ``TLSMemoryBIOFactory`` per context and
    side, no interface copying (see :class:`_Bypass`).  Any other transport
    (not a Twisted TCP connection) goes through its own ``startTLS``.

    ``preface``: one plaintext line is still to come before the peer's TLS
    bytes; it is given to ``preface`` (see :class:`_Preface`).  Only on a
    TCP connection (``ValueError`` otherwise).
    """
    if not can_preface(transport):
        if preface is not None:
            raise ValueError("a plaintext preface needs a TCP connection")
        if client == bool(getattr(transport, "_tlsClientDefault", False)):
            transport.startTLS(creator)
        else:
            transport.startTLS(creator, False)
        return
    conn: Any = transport  # a tcp.Connection (its attributes are not typed)
    producer, streaming = transport.producer, transport.streamingProducer
    if producer is not None:
        transport.unregisterProducer()
    factory = creator.tls_factory(client)
    tls_protocol = factory.protocol(factory, conn.protocol, False)
    conn.protocol = tls_protocol
    conn.getHandle = tls_protocol.getHandle
    conn.getPeerCertificate = tls_protocol.getPeerCertificate
    directlyProvides(conn, ISSLTransport)
    conn.TLS = True
    tls_protocol.makeConnection(_Bypass(FileDescriptor, conn))
    if preface is not None and conn.protocol is tls_protocol:
        conn.protocol = _Preface(conn, tls_protocol, preface)
    if producer is not None:
        transport.registerProducer(producer, streaming)


def flush_tls(transport: Any) -> None:
    """Encrypt and queue a TLS link's pending writes now (see :meth:`LinkTLS.flush_now`)."""
    layer = getattr(transport, "protocol", None)
    if isinstance(layer, LinkTLS):
        layer.flush_now()


class TLSContexts:
    """One server and one client context per node, made once."""

    def __init__(self, credentials_source: Any) -> None:
        #: ``() -> Credentials``; called the first time we act as a TLS server.
        self._credentials_source = credentials_source
        self._server: _ContextFactory | None = None
        self._client: _ContextFactory | None = None

    def server(self) -> _ContextFactory:
        if self._server is None:
            creds: Credentials = self._credentials_source()
            ctx = _base_context()
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, creds.key_pem))
            ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, creds.cert_pem))
            ctx.check_privatekey()
            self._server = _ContextFactory(ctx)
        return self._server

    def client(self) -> _ContextFactory:
        if self._client is None:
            ctx = _base_context()
            # The certificate is not what authenticates the listener: its
            # proof over this connection's exporter value is (see above).
            ctx.set_verify(SSL.VERIFY_NONE, lambda *_a: True)
            self._client = _ContextFactory(ctx)
        return self._client


def remove_credentials(home: Home) -> None:
    """For tests and ``relay identity --reset``-style tools."""
    for name in (KEY_FILE, CERT_FILE):
        with contextlib.suppress(FileNotFoundError):
            (home.relay / name).unlink()
