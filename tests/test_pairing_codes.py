"""Tests for claudectl.pairing.codes and .wordlist: the claudectl 0.64 vectors
and round-trips of the link, the relay code and the word phrase."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.pairing import codes
from claudectl.pairing.codes import (
    LinkError,
    NotCarriedError,
    RelayCodeError,
    WordPhraseError,
)
from claudectl.pairing.wordlist import INDEX, WORDS
from claudectl.relay.crypto import (
    CodeError,
    canonical_psk,
    format_pair_code,
    parse_pair_code,
    proof,
    psk_from_code,
)
from tests.common import vector, vectors

PAIRING = vectors("pairing")

#: Ports a relay code can carry.
CODE_PORTS = st.integers(9847, 10102).filter(lambda p: p != 9975)
IPV4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
IPV6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
SECRET = st.binary(min_size=4, max_size=4)


class PairCodeVectors(SynchronousTestCase):
    """pairing.psk.*: parse and format pair codes (claudectl.relay.crypto)."""

    def test_canonical_psks(self) -> None:
        names = [
            n
            for n in PAIRING
            if n.startswith("pairing.psk.")
            and "pair_code" in PAIRING[n]["input"]
            and "psk_hex" in PAIRING[n]["expected"]
        ]
        self.assertEqual(len(names), 6)
        for name in names:
            v = PAIRING[name]
            self.assertEqual(
                psk_from_code(v["input"]["pair_code"]).hex(), v["expected"]["psk_hex"], name
            )

    def test_format(self) -> None:
        v = vector("pairing.psk.format")
        code = format_pair_code(bytes.fromhex(v["input"]["psk_hex"]))
        self.assertEqual(code, v["expected"]["pair_code"])
        self.assertEqual(len(code), v["expected"]["length"])

    def test_rejects(self) -> None:
        for code in vector("pairing.psk.reject_bad_length")["input"]["pair_codes"]:
            self.assertRaises(CodeError, parse_pair_code, code)
        v = vector("pairing.psk.reject_docs_example")
        e = self.assertRaises(CodeError, parse_pair_code, v["input"]["pair_code"])
        self.assertEqual(str(e), v["expected"]["error"])


class LinkVectors(SynchronousTestCase):
    def test_build(self) -> None:
        v = vector("pairing.invite_link.build")
        host, port = v["input"]["addr"].rsplit(":", 1)
        link = codes.build_link(
            v["input"]["identity"], host, int(port), bytes.fromhex(v["input"]["psk_hex"])
        )
        self.assertEqual(link, v["expected"]["link"])

    def test_parse(self) -> None:
        for name in ("pairing.invite_link.parse_lower", "pairing.invite_link.parse_upper_key"):
            v = vector(name)
            link = codes.parse_link(v["input"]["link"])
            self.assertEqual(link.identity, v["expected"]["identity"])
            self.assertEqual(str(link.address), v["expected"]["addr"])
            self.assertEqual(link.psk.hex(), v["expected"]["psk_hex"])

    def test_parse_errors(self) -> None:
        for text in vector("pairing.invite_link.parse_errors")["input"]["links"]:
            self.assertRaises(LinkError, codes.parse_link, text)
        messages = {
            "http://example.com": "invite link must start with cctl://",
            "cctl://no-k-segment": "missing /k/ in invite link",
            "cctl://no-at-sign/k/abcd1234abcd1234": "missing @ in invite link",
        }
        for text, message in messages.items():
            self.assertEqual(str(self.assertRaises(LinkError, codes.parse_link, text)), message)

    def test_exact_error_messages(self) -> None:
        for name in (
            "reject_hostname",
            "reject_leading_zero_octet",
            "reject_dashed_key",
            "reject_uppercase_scheme",
        ):
            v = vector(f"pairing.invite_link.{name}")
            e = self.assertRaises(LinkError, codes.parse_link, v["input"]["link"])
            self.assertEqual(str(e), v["expected"]["error"], name)

    def test_ipv6_in_brackets(self) -> None:
        psk = psk_from_code("a3f2-9b1c-d4e5-f678")
        link = codes.build_link("me-1", "fe80::1", 9847, psk)
        self.assertEqual(link, "cctl://me-1@[fe80::1]:9847/k/a3f29b1cd4e5f678")
        parsed = codes.parse_link(link)
        self.assertEqual((parsed.address.host, parsed.address.port), ("fe80::1", 9847))
        scoped = codes.parse_link("cctl://x@[fe80::1%2]:1/k/a3f29b1cd4e5f678")
        self.assertEqual(scoped.address.host, "fe80::1%2")
        mapped = codes.parse_link("cctl://x@[::ffff:10.0.0.1]:1/k/a3f29b1cd4e5f678")
        self.assertEqual(mapped.address.host, "::ffff:10.0.0.1")

    def test_address_syntax(self) -> None:
        ok = {
            "1.2.3.4:0": ("1.2.3.4", 0),
            "0.0.0.0:00009847": ("0.0.0.0", 9847),
            "255.255.255.255:65535": ("255.255.255.255", 65535),
        }
        for text, expected in ok.items():
            a = codes.parse_socket_address(text)
            self.assertEqual((a.host, a.port), expected)
        for bad in (
            "1.2.3.4",
            "1.2.3.4:",
            "1.2.3.4:+1",
            "1.2.3.4:65536",
            "256.1.1.1:1",
            "1.2.3:1",
            "::1:9847",
            "[::1]",
            "[::1%eth0]:1",
            "[zz::1]:1",
            "1.2.3.4:１",
            "host.local:9847",
            " 1.2.3.4:1",
        ):
            e = self.assertRaises(LinkError, codes.parse_socket_address, bad)
            self.assertEqual(str(e), f"invalid address '{bad}': invalid socket address syntax")

    def test_identity_not_validated(self) -> None:
        # As in claudectl the link's identity is only compared after connecting.
        link = codes.parse_link("cctl://@1.2.3.4:1/k/a3f29b1cd4e5f678")
        self.assertEqual(link.identity, "")

    def test_non_ascii_key_rejected(self) -> None:
        """Defect P13: claudectl crashes on a non-ASCII key; we refuse it."""
        for key in ("a3f29b1cd4e5f6é", "a3f29b1cd4e5f67８", "ａ3f29b1cd4e5f678"):
            e = self.assertRaises(LinkError, codes.parse_link, f"cctl://x@1.2.3.4:1/k/{key}")
            self.assertIn("ASCII", str(e))

    def test_key_trimmed_then_exactly_16(self) -> None:
        self.assertEqual(
            codes.parse_link("cctl://x@1.2.3.4:1/k/ a3f29b1cd4e5f678 \n").psk,
            psk_from_code("a3f29b1cd4e5f678"),
        )
        e = self.assertRaises(LinkError, codes.parse_link, "cctl://x@1.2.3.4:1/k/a3f29b1cd4e5f678/")
        self.assertEqual(str(e), "invalid PSK code length: expected 16, got 17")
        e = self.assertRaises(LinkError, codes.parse_link, "cctl://x@1.2.3.4:1/k/a3f29b1cd4e5f6zz")
        self.assertEqual(str(e), "invalid PSK code: expected 16 hex chars, got 14")

    @given(
        identity=st.from_regex(r"[A-Za-z0-9_-]{0,40}", fullmatch=True),
        host=st.one_of(IPV4, IPV6),
        port=st.integers(0, 65535),
        raw=st.binary(min_size=8, max_size=8),
    )
    def test_link_roundtrip(self, identity: str, host: str, port: int, raw: bytes) -> None:
        psk = canonical_psk(raw)
        link = codes.parse_link(codes.build_link(identity, host, port, psk))
        self.assertEqual(
            (link.identity, link.address.host, link.address.port, link.psk),
            (identity, host, port, psk),
        )

    @given(st.text(max_size=80))
    def test_parse_link_only_raises_link_error(self, text: str) -> None:
        for candidate in (text, "cctl://" + text, "cctl://x@1.2.3.4:5/k/" + text):
            try:
                codes.parse_link(candidate)
            except LinkError:
                pass


class Base32Vectors(SynchronousTestCase):
    def test_known_value(self) -> None:
        v = vector("pairing.base32.known_value")
        self.assertEqual(
            codes.base32_encode(v["input"]["data_utf8"].encode()), v["expected"]["base32"]
        )

    def test_roundtrip(self) -> None:
        v = vector("pairing.base32.roundtrip")
        data = bytes.fromhex(v["input"]["bytes_hex"])
        self.assertEqual(codes.base32_encode(data), v["expected"]["base32"])
        self.assertEqual(codes.relay_code_bytes(v["expected"]["base32"]), data)

    def test_group3(self) -> None:
        v = vector("pairing.base32.group3")
        self.assertEqual([codes.group3(t) for t in v["input"]["texts"]], v["expected"]["grouped"])

    @given(st.binary(max_size=40))
    def test_matches_rfc4648(self, data: bytes) -> None:
        import base64

        self.assertEqual(codes.base32_encode(data), base64.b32encode(data).decode().rstrip("="))


class RelayCodeVectors(SynchronousTestCase):
    def test_payload_bytes(self) -> None:
        v = vector("pairing.relay_code.payload_bytes")
        host, port = v["input"]["addr"].rsplit(":", 1)
        secret = bytes.fromhex(v["input"]["psk_hex"])[:4]
        self.assertEqual(
            codes.encode_payload(host, int(port), secret).hex(), v["expected"]["payload_hex"]
        )

    def test_codes_and_phrases(self) -> None:
        names = [
            n
            for n, v in PAIRING.items()
            if n.startswith("pairing.relay_code.")
            and v["kind"] == "COMPAT"
            and "relay_code" in v["expected"]
        ]
        self.assertEqual(len(names), 5)
        for name in names:
            v = PAIRING[name]
            i, e = v["input"], v["expected"]
            secret = bytes.fromhex(i["psk_first4_hex"])
            self.assertEqual(codes.relay_code(i["ip"], i["port"], secret), e["relay_code"], name)
            self.assertEqual(codes.word_phrase(i["ip"], i["port"], secret), e["word_phrase"], name)
            for decoded in (
                codes.decode_relay_code(e["relay_code"]),
                codes.decode_word_phrase(e["word_phrase"]),
            ):
                self.assertEqual(
                    (decoded.ip, decoded.port),
                    (e["decodes_to"]["ip"], e["decodes_to"]["port"]),
                    name,
                )
                self.assertEqual(decoded.secret, secret, name)

    def test_lenient_decoding(self) -> None:
        for name in (
            "decode_lowercase",
            "decode_nonzero_pad_bits",
            "decode_extra_chars",
            "decode_spaces",
        ):
            v = vector(f"pairing.relay_code.{name}")
            p = codes.decode_relay_code(v["input"]["relay_code"])
            self.assertEqual(
                (p.ip, p.port, p.secret.hex()),
                (v["expected"]["ip"], v["expected"]["port"], v["expected"]["seed_hex"]),
                name,
            )

    def test_decode_errors(self) -> None:
        for name in ("decode_bad_char", "docs_example_too_short"):
            v = vector(f"pairing.relay_code.{name}")
            e = self.assertRaises(RelayCodeError, codes.decode_relay_code, v["input"]["relay_code"])
            self.assertEqual(str(e), v["expected"]["error"], name)
        for c in "0189":
            e = self.assertRaises(RelayCodeError, codes.decode_relay_code, "YCUACMUAUPZJWH" + c)
            self.assertEqual(str(e), f"invalid base32 character: '{c}'")

    def test_address_loss_refused(self) -> None:
        """Defect P3: claudectl silently encodes these to another address; we refuse."""
        for name in (
            "port_9975_collides",
            "port_below_range",
            "port_above_range",
            "ipv6_becomes_loopback4",
        ):
            v = vector(f"pairing.relay_code.{name}")
            i = v["input"]
            secret = bytes.fromhex(i["psk_first4_hex"])
            e = self.assertRaises(NotCarriedError, codes.relay_code, i["ip"], i["port"], secret)
            self.assertIn("invite link", str(e))
            self.assertRaises(NotCarriedError, codes.word_phrase, i["ip"], i["port"], secret)
            self.assertIsNotNone(codes.not_carried_reason(i["ip"], i["port"]))
            # What claudectl produced still decodes as claudectl decodes it.
            decoded = codes.decode_relay_code(v["expected"]["relay_code"])
            want = v["expected"]["claudectl_decodes_to"]
            self.assertEqual((decoded.ip, decoded.port), (want["ip"], want["port"]), name)
            self.assertEqual(codes.decode_word_phrase(v["expected"]["word_phrase"]), decoded)
        for name in ("port_roundtrip_9000", "port_roundtrip_10200"):
            v = vector(f"pairing.relay_code.{name}")
            self.assertRaises(
                NotCarriedError,
                codes.encode_payload,
                v["input"]["ip"],
                v["input"]["port"],
                bytes(4),
            )

    def test_9975_message_says_why(self) -> None:
        e = self.assertRaises(NotCarriedError, codes.port_byte, 9975)
        self.assertIn("9847", str(e))

    def test_host_name_refused(self) -> None:
        self.assertRaises(NotCarriedError, codes.encode_payload, "host.local", 9847, bytes(4))

    def test_claudectl_seed_key_is_not_ours(self) -> None:
        """Defect P1: claudectl derives a key from the 4 seed bytes; it never
        matches the inviter's key.  We never derive a key from a code."""
        for name in (
            "pairing.relay_code.claudectl_derived_key",
            "pairing.relay_code.claudectl_derived_key_fixture",
        ):
            v = vector(name)
            code = v["input"].get("relay_code")
            seed = (
                codes.decode_relay_code(code).secret
                if code
                else bytes.fromhex(v["input"]["seed_hex"])
            )
            import hashlib

            claudectl_key = seed + hashlib.sha256(seed).digest()[4:]
            self.assertEqual(claudectl_key.hex(), v["expected"]["claudectl_key_hex"])
            if "canonical_psk_hex" in v["expected"]:
                self.assertNotEqual(claudectl_key.hex(), v["expected"]["canonical_psk_hex"])
        v = vector("pairing.proof.seed_key_zerononce")
        self.assertEqual(
            proof(bytes.fromhex(v["input"]["psk_hex"]), v["input"]["nonce"]), v["expected"]["proof"]
        )
        self.assertEqual(
            proof(psk_from_code("a3f2-9b1c-d4e5-f678"), v["input"]["nonce"]),
            v["expected"]["differs_from_canonical_proof"],
        )

    @given(ip=IPV4, port=CODE_PORTS, secret=SECRET)
    def test_code_and_phrase_roundtrip(self, ip: str, port: int, secret: bytes) -> None:
        code = codes.relay_code(ip, port, secret)
        self.assertRegex(code, r"^[A-Z2-7]{3}(-[A-Z2-7]{3}){4}$")
        self.assertIn(code[-1], "AIQY")
        phrase = codes.word_phrase(ip, port, secret)
        self.assertEqual(len(phrase.split("-")), 9)
        want = codes.CodePayload(ip, port, secret)
        self.assertEqual(codes.decode_relay_code(code), want)
        self.assertEqual(codes.decode_relay_code(code.lower().replace("-", " ")), want)
        self.assertEqual(codes.decode_word_phrase(phrase), want)
        self.assertEqual(codes.decode_word_phrase(phrase.upper()), want)

    @given(st.integers(0, 65535))
    def test_port_byte_is_exact_or_refused(self, port: int) -> None:
        try:
            b = codes.port_byte(port)
        except NotCarriedError:
            self.assertTrue(port < 9847 or port > 10102 or port == 9975)
        else:
            self.assertEqual(codes.port_from_byte(b), port)

    @given(st.text(max_size=40))
    def test_decoders_raise_only_code_errors(self, text: str) -> None:
        for decode in (codes.decode_relay_code, codes.decode_word_phrase):
            try:
                decode(text)
            except codes.InviteCodeError:
                pass


class WordPhraseVectors(SynchronousTestCase):
    def test_word_list(self) -> None:
        v = vector("pairing.word_list")
        self.assertEqual(list(WORDS), v["expected"]["words"])
        self.assertEqual(len(set(WORDS)), v["expected"]["count"])
        self.assertEqual(INDEX["rum"], 255)

    def test_decode_upper_extra(self) -> None:
        v = vector("pairing.word_phrase.decode_upper_extra")
        p = codes.decode_word_phrase(v["input"]["word_phrase"])
        self.assertEqual(
            (p.ip, p.port, p.secret.hex()),
            (v["expected"]["ip"], v["expected"]["port"], v["expected"]["seed_hex"]),
        )

    def test_errors(self) -> None:
        for name in (
            "reject_too_short_8",
            "reject_unknown_zzz",
            "reject_too_short_3",
            "reject_unknown_zzzzz",
        ):
            v = vector(f"pairing.word_phrase.{name}")
            e = self.assertRaises(
                WordPhraseError, codes.decode_word_phrase, v["input"]["word_phrase"]
            )
            self.assertEqual(str(e), v["expected"]["error"], name)

    def test_unknown_word_as_typed(self) -> None:
        e = self.assertRaises(
            WordPhraseError, codes.decode_word_phrase, "nut-may-act-dub-jag-mad-ray-let-Zzz"
        )
        self.assertEqual(str(e), "unknown word: 'Zzz'")
        # Pieces are not trimmed, as in claudectl.
        e = self.assertRaises(
            WordPhraseError, codes.decode_word_phrase, "nut-may-act-dub-jag-mad-ray-let- cap"
        )
        self.assertEqual(str(e), "unknown word: ' cap'")

    def test_docs_example(self) -> None:
        """The claudectl docs' phrase decodes, but to an address unrelated to its link (P12)."""
        v = vector("pairing.word_phrase.docs_example")
        p = codes.decode_word_phrase(v["input"]["word_phrase"])
        self.assertEqual(
            [INDEX[w] for w in v["input"]["word_phrase"].split("-")], v["expected"]["indices"]
        )
        self.assertEqual(
            (p.ip, p.port, p.secret.hex()),
            (v["expected"]["ip"], v["expected"]["port"], v["expected"]["seed_hex"]),
        )
