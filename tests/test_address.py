"""Tests for claudectl.relay.address: host:port parsing and endpoint strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay.address import (
    AddressError,
    client_endpoint_string,
    format_address,
    listen_endpoint_string,
    parse_address,
)


class ParseTests(SynchronousTestCase):
    def test_valid(self) -> None:
        cases = {
            "192.168.1.50:9847": ("192.168.1.50", 9847),
            " relay.lan:1 ": ("relay.lan", 1),
            "[::1]:9847": ("::1", 9847),
            "[fe80::1%eth0]:65535": ("fe80::1%eth0", 65535),
            "host:009847": ("host", 9847),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_address(text), expected, text)

    def test_default_port(self) -> None:
        self.assertEqual(parse_address("relay.lan", 9847), ("relay.lan", 9847))
        self.assertEqual(parse_address("[::1]", 9847), ("::1", 9847))
        self.assertRaises(AddressError, parse_address, "relay.lan")
        self.assertRaises(AddressError, parse_address, "[::1]")

    def test_invalid(self) -> None:
        for text in (
            "",
            "   ",
            ":9847",
            "host:",
            "host:0",
            "host:65536",
            "host:-1",
            "host:+1",
            "host:x",
            "::1:9847",
            "[::1:9847",
            "[::1]9847",
            "[]:9847",
            "a:b:c",
            "host:٩٨٤٧",
            "host:²",
            "host:" + "9" * 5000,
            "host: 1",
        ):
            with self.subTest(text):
                self.assertRaises(AddressError, parse_address, text)

    def test_error_message_names_input(self) -> None:
        with self.assertRaises(AddressError) as cm:
            parse_address("::1:9847")
        self.assertIn("[addr]:port", str(cm.exception))
        with self.assertRaises(AddressError) as cm:
            parse_address("host:99999")
        self.assertIn("1-65535", str(cm.exception))

    @given(st.text(max_size=40))
    def test_only_address_error(self, text: str) -> None:
        try:
            host, port = parse_address(text)
        except AddressError:
            return
        self.assertTrue(host)
        self.assertTrue(0 < port < 65536)

    @given(st.text(max_size=20), st.integers(1, 65535))
    def test_only_address_error_with_default(self, text: str, port: int) -> None:
        try:
            parse_address(text, port)
        except AddressError:
            pass


class FormatTests(SynchronousTestCase):
    def test_format(self) -> None:
        self.assertEqual(format_address("192.168.1.50", 9847), "192.168.1.50:9847")
        self.assertEqual(format_address("::1", 9847), "[::1]:9847")

    def test_roundtrip(self) -> None:
        for host, port in (("10.0.0.1", 1), ("::", 9847), ("relay.lan", 80)):
            self.assertEqual(parse_address(format_address(host, port)), (host, port))


class EndpointTests(SynchronousTestCase):
    def test_client_string(self) -> None:
        s = client_endpoint_string("relay.lan", 9847)
        self.assertEqual(s, "tcp:host=relay.lan:port=9847:timeout=10")
        ep = clientFromString(MemoryReactor(), s)
        self.assertEqual((ep._host, ep._port, ep._timeout), ("relay.lan", 9847, 10))

    def test_client_ipv6_escaped(self) -> None:
        s = client_endpoint_string("::1", 9847)
        ep = clientFromString(MemoryReactor(), s)
        self.assertEqual((ep._host, ep._port), ("::1", 9847))

    def test_listen_strings(self) -> None:
        self.assertEqual(listen_endpoint_string("0.0.0.0", 9847), "tcp:9847:interface=0.0.0.0")
        for addr in ("::", "[::]", "::1"):
            s = listen_endpoint_string(addr, 9847)
            ep = serverFromString(MemoryReactor(), s)
            self.assertEqual(ep._interface, addr.strip("[]"))
            self.assertEqual(ep._port, 9847)
        self.assertEqual(
            serverFromString(MemoryReactor(), listen_endpoint_string("127.0.0.1", 0))._port, 0
        )

    def test_listen_addr_must_be_ip(self) -> None:
        for addr in ("localhost", "", "1.2.3", "0.0.0.0:9847"):
            self.assertRaises(AddressError, listen_endpoint_string, addr, 9847)
