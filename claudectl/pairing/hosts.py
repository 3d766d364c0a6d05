"""
Where an invite says this relay is: the host an invite link and relay code
carry (``--host``, else a specific ``listen_addr``, else this machine's
primary IPv4), and the QR code of a link.  Used by ``relay invite`` and the
dashboard's invite action.
"""

from __future__ import annotations

import io
import ipaddress
import socket
from collections.abc import Callable

from claudectl.pairing import codes

#: Where the "UDP connect" trick points to learn the primary address (no
#: packet is sent by connecting a UDP socket).
_ROUTE_PROBE = ("8.8.8.8", 80)
_UNSPECIFIED = {"0.0.0.0", "::", "[::]", ""}


class InviteHostError(ValueError):
    """The host given for an invite is not an IP address."""


def primary_ipv4(probe: tuple[str, int] = _ROUTE_PROBE) -> str | None:
    """This machine's primary non-loopback IPv4 address, found without sending a packet."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(probe)
            addr = s.getsockname()[0]
    except OSError:
        return None
    ip = ipaddress.IPv4Address(addr)
    return None if ip.is_loopback or ip.is_unspecified else addr


def invite_host(
    listen_addr: str, explicit: str | None, find_primary: Callable[[], str | None] = primary_ipv4
) -> tuple[str, str | None]:
    """``(host, warning)``: ``--host``, else a specific ``listen_addr``, else the primary IPv4."""
    if explicit is not None:
        try:
            return codes.parse_ip(explicit), None
        except ValueError:
            raise InviteHostError(
                f"--host must be an IP address (an invite link cannot carry host "
                f"names), not {explicit!r}"
            ) from None
    if listen_addr.strip() not in _UNSPECIFIED:
        try:
            return codes.parse_ip(listen_addr.strip()), None
        except ValueError:
            pass
    primary = find_primary()
    if primary is None:
        return "127.0.0.1", (
            "no non-loopback IPv4 address found; the invite uses 127.0.0.1, "
            "which only this machine can reach (use --host ADDR)"
        )
    return primary, None


def qr_text(data: str) -> str:
    """A QR code of ``data`` drawn with half-block characters (no external program)."""
    import qrcode

    qr = qrcode.QRCode(border=1)
    qr.add_data(data)
    qr.make(fit=True)
    buf = io.StringIO()
    qr.print_ascii(out=buf, invert=True)
    return buf.getvalue().rstrip("\n")
