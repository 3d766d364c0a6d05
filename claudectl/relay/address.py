# -*- test-case-name: tests.test_address -*-
"""``host:port`` / ``[v6]:port`` addresses and the endpoint strings made from them."""

from __future__ import annotations

import ipaddress

from twisted.internet.endpoints import quoteStringArgument

CONNECT_TIMEOUT_SECS = 10


class AddressError(ValueError):
    pass


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"`` (or a bare host with ``default_port``)."""
    text = text.strip()
    if not text:
        raise AddressError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"invalid address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest.startswith(":"):
            port_text = rest[1:]
        elif not rest and default_port is not None:
            port_text = str(default_port)
        else:
            raise AddressError(f"invalid address {text!r}: expected [host]:port")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" not in text and default_port is not None:
        host, port_text = text, str(default_port)
    elif text.count(":") > 1:
        raise AddressError(f"invalid address {text!r}: write IPv6 addresses as [addr]:port")
    else:
        raise AddressError(f"invalid address {text!r}: expected host:port")
    if not host:
        raise AddressError(f"invalid address {text!r}: missing host")
    # isdigit() alone admits "²" and Arabic-Indic digits; int() of a very long
    # string raises ValueError: only short ASCII decimals get that far.
    if (
        not (port_text.isascii() and port_text.isdigit())
        or len(port_text.lstrip("0")) > 5
        or not 0 < int(port_text) < 65536
    ):
        raise AddressError(f"invalid address {text!r}: port must be 1-65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_endpoint_string(host: str, port: int) -> str:
    return f"tcp:host={quoteStringArgument(host)}:port={port}:timeout={CONNECT_TIMEOUT_SECS}"


def listen_endpoint_string(addr: str, port: int) -> str:
    """The server endpoint for ``[relay] listen_addr`` / ``listen_port``."""
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        raise AddressError(f"listen_addr {addr!r} is not an IP address") from None
    return f"tcp:{port}:interface={quoteStringArgument(str(ip))}"
