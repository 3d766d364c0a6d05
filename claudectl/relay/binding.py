# -*- test-case-name: tests.test_tls -*-
"""
Channel-bound proofs for TLS links (protocol.md, "Encrypted links"), sans I/O.

On a TLS link both sides prove the pairing key with an HMAC over the
connection's TLS exporter value (RFC 9266 ``tls-exporter``: label
``EXPORTER-Channel-Binding``, empty context, 32 bytes), both nonces, both
identities and their role.  A proof made on one connection is worthless on
any other: it cannot be reflected back at its maker nor relayed to a third
party, and a man-in-the-middle that terminates TLS on both sides sees two
different exporter values.

The OpenSSL side (certificates, contexts) is :mod:`claudectl.relay.tls`.
"""

from __future__ import annotations

import hashlib
import hmac

#: The capability a listener offers and a connector asks for.
CAP_TLS = "tls-v1"
#: What ``relay peers`` shows for each kind of link.
TLS13 = "tls1.3"
PLAINTEXT = "plaintext"

#: RFC 9266 tls-exporter channel binding.
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_BYTES = 32

_PROOF_LABEL = "claudectl-tls-v1"
CONNECTOR_ROLE = "connector"
LISTENER_ROLE = "listener"


def channel_proof(
    psk: bytes,
    role: str,
    exporter: bytes,
    nonce: str,
    cnonce: str,
    connector_id: str,
    listener_id: str,
) -> str:
    """
    ``hex(HMAC-SHA256(psk, "claudectl-tls-v1|<role>|<hex exporter>|<nonce>|
    <cnonce>|<connector id>|<listener id>"))``: one side's proof on one TLS
    connection.  ``role`` is ``connector`` or ``listener``, so neither proof
    can stand in for the other.
    """
    msg = "|".join(
        (_PROOF_LABEL, role, exporter.hex(), nonce, cnonce, connector_id, listener_id)
    ).encode("ascii")
    return hmac.new(psk, msg, hashlib.sha256).hexdigest()
