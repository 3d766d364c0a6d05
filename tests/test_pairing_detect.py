"""Tests for claudectl.pairing.detect: telling the four join formats apart."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.pairing import codes
from claudectl.pairing.codes import InviteCodeError
from claudectl.pairing.detect import (
    EXAMPLE_LINK,
    EXAMPLE_PAIR_CODE,
    EXAMPLE_RELAY_CODE,
    EXAMPLE_WORD_PHRASE,
    LINK,
    PAIR_CODE,
    RELAY_CODE,
    WORD_PHRASE,
    JoinFormatError,
    decode_join,
    detect_join_format,
    relay_code_is_ambiguous,
)
from claudectl.relay.crypto import psk_from_code
from tests.common import vector, vectors

#: claudectl's names for the formats -> ours.
CLAUDECTL_FORMAT = {"link": LINK, "words": WORD_PHRASE, "relay_code": RELAY_CODE}


class Detection(SynchronousTestCase):
    def test_compat_vectors(self) -> None:
        """Where claudectl detects correctly, we agree."""
        names = [
            n
            for n, v in vectors("pairing", "COMPAT").items()
            if n.startswith("pairing.join_detect.")
        ]
        self.assertEqual(len(names), 4)
        for name in names:
            v = vector(name)
            self.assertEqual(
                detect_join_format(v["input"]["input"]),
                CLAUDECTL_FORMAT[v["expected"]["claudectl_format"]],
                name,
            )

    def test_defect_vectors_detected_correctly(self) -> None:
        """Defect P6: claudectl misroutes these; we do not."""
        right = {
            "pairing.join_detect.all_letter_code_misread": RELAY_CODE,
            "pairing.join_detect.phrase_with_spaces_misread": WORD_PHRASE,
            "pairing.join_detect.uppercase_scheme_misread": LINK,
        }
        for name, fmt in right.items():
            v = vector(name)
            self.assertNotEqual(CLAUDECTL_FORMAT[v["expected"]["claudectl_format"]], fmt)
            self.assertEqual(detect_join_format(v["input"]["input"]), fmt, name)

    def test_pair_codes(self) -> None:
        for text in (
            "a3f2-9b1c-d4e5-f678",
            "A3F2:9B1C:D4E5:F678",
            "a3f29b1cd4e5f678",
            "a3f2 9b1c d4e5 f678",
            "abcdef23abcdef23",
        ):
            self.assertEqual(detect_join_format(text), PAIR_CODE, text)

    def test_relay_code_spellings(self) -> None:
        for text in (
            "YCU-ACM-UAU-PZJ-WHA",
            "ycu-acm-uau-pzj-wha",
            "ycuacmuaupzjwha",
            "YCU ACM UAU PZJ WHA",
            "  YCU-ACM-UAU-PZJ-WHA\n",
            "YCU-ACM-UAU-PZJ-WHA-AAA",
            "YCU-ACM-UAU-PZJ-WH1",
        ):
            self.assertEqual(detect_join_format(text), RELAY_CODE, text)

    def test_phrase_spellings(self) -> None:
        for text in (
            "nut-may-act-dub-jag-mad-ray-let-cap",
            "NUT MAY ACT DUB JAG MAD RAY LET CAP",
            "nut - may - act dub jag mad ray let cap",
            "nut-may-act-dub-jag-mad-ray-let",
            "nut-may-act-dub-jag-mad-ray-let-zzz",
            "ace-act-age",
        ):
            self.assertEqual(detect_join_format(text), WORD_PHRASE, text)

    def test_other_text_names_all_four_forms(self) -> None:
        for text in (
            "hello",
            "",
            "   ",
            "http://example.com",
            "1.2.3.4:9847",
            "YCU-ACM",
            "x" * 40,
            "ÄÖÜ-ÄÖÜ-ÄÖÜ-ÄÖÜ-ÄÖÜ",
        ):
            e = self.assertRaises(JoinFormatError, detect_join_format, text)
            for example in (
                EXAMPLE_LINK,
                EXAMPLE_RELAY_CODE,
                EXAMPLE_WORD_PHRASE,
                EXAMPLE_PAIR_CODE,
            ):
                self.assertIn(example, str(e), text)

    def test_examples_are_real(self) -> None:
        """Defect P12: the examples we show decode, to the same address."""
        link = decode_join(EXAMPLE_LINK)
        code = decode_join(EXAMPLE_RELAY_CODE)
        phrase = decode_join(EXAMPLE_WORD_PHRASE)
        pair = decode_join(EXAMPLE_PAIR_CODE)
        self.assertEqual({t.address for t in (link, code, phrase, pair)}, {"192.168.1.50:9847"})
        self.assertEqual(link.psk, pair.psk)
        self.assertEqual(code.pake_password, phrase.pake_password)

    @given(
        ip=st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
        port=st.integers(9848, 10102).filter(lambda p: p != 9975),
        secret=st.binary(min_size=4, max_size=4),
    )
    def test_every_unambiguous_code_is_detected(self, ip: str, port: int, secret: bytes) -> None:
        code = codes.relay_code(ip, port, secret)
        phrase = codes.word_phrase(ip, port, secret)
        if not relay_code_is_ambiguous(code):
            for text in (code, code.lower(), code.replace("-", ""), code.replace("-", " ")):
                self.assertEqual(detect_join_format(text), RELAY_CODE)
        for text in (phrase, phrase.upper(), phrase.replace("-", " ")):
            self.assertEqual(detect_join_format(text), WORD_PHRASE)

    @given(st.text(max_size=60))
    def test_detect_raises_only_format_errors(self, text: str) -> None:
        try:
            self.assertIn(detect_join_format(text), (LINK, RELAY_CODE, WORD_PHRASE, PAIR_CODE))
        except JoinFormatError:
            pass

    @given(st.text(max_size=60))
    def test_decode_join_raises_only_code_errors(self, text: str) -> None:
        try:
            decode_join(text)
        except InviteCodeError:
            pass


class Decoding(SynchronousTestCase):
    def test_link(self) -> None:
        t = decode_join("cctl://laptop-a3f2@192.168.1.50:9847/k/a3f29b1cd4e5f678")
        self.assertEqual(
            (t.kind, t.host, t.port, t.expected_identity),
            (LINK, "192.168.1.50", 9847, "laptop-a3f2"),
        )
        self.assertEqual(t.psk, psk_from_code("a3f2-9b1c-d4e5-f678"))
        self.assertIsNone(t.pake_password)

    def test_link_with_uppercase_scheme(self) -> None:
        t = decode_join("CCTL://x-1@[::1]:9900/k/A3F29B1CD4E5F678")
        self.assertEqual((t.kind, t.host, t.port, t.address), (LINK, "::1", 9900, "[::1]:9900"))

    def test_link_errors_are_claudectls(self) -> None:
        e = self.assertRaises(
            InviteCodeError, decode_join, "cctl://x@host.local:9847/k/a3f29b1cd4e5f678"
        )
        self.assertEqual(str(e), "invalid address 'host.local:9847': invalid socket address syntax")

    def test_link_with_empty_identity_expects_none(self) -> None:
        self.assertIsNone(decode_join("cctl://@1.2.3.4:1/k/a3f29b1cd4e5f678").expected_identity)

    def test_link_with_invalid_identity(self) -> None:
        e = self.assertRaises(
            InviteCodeError, decode_join, "cctl://a/b@1.2.3.4:1/k/a3f29b1cd4e5f678"
        )
        self.assertIn("invalid identity", str(e))

    def test_relay_code_and_phrase(self) -> None:
        for text in ("YCU-ACM-UAU-PZJ-WHA", "nut may act dub jag mad ray let cap"):
            t = decode_join(text)
            self.assertEqual(
                (t.host, t.port, t.pake_password), ("192.168.1.50", 9847, bytes.fromhex("a3f29b1c"))
            )
            self.assertIsNone(t.psk)
            self.assertIsNone(t.expected_identity)

    def test_code_errors_are_specific(self) -> None:
        e = self.assertRaises(InviteCodeError, decode_join, "YCU-ACM-UAU-PZJ-WH1")
        self.assertEqual(str(e), "invalid base32 character: '1'")
        e = self.assertRaises(InviteCodeError, decode_join, "nut-may-act-dub-jag-mad-ray-let")
        self.assertEqual(str(e), "word phrase too short: 8 words, need 9")
        e = self.assertRaises(InviteCodeError, decode_join, "nut may act dub jag mad ray let zzz")
        self.assertEqual(str(e), "unknown word: 'zzz'")

    def test_pair_code_needs_an_address(self) -> None:
        e = self.assertRaises(JoinFormatError, decode_join, "a3f2-9b1c-d4e5-f678")
        self.assertIn("carries no address", str(e))
        t = decode_join("a3f2-9b1c-d4e5-f678 10.0.0.7:9850")
        self.assertEqual(
            (t.kind, t.address, t.psk),
            (PAIR_CODE, "10.0.0.7:9850", psk_from_code("a3f2-9b1c-d4e5-f678")),
        )
        t = decode_join("A3F2 9B1C D4E5 F678 [fe80::2]:9847")
        self.assertEqual(t.address, "[fe80::2]:9847")
        t = decode_join("a3f29b1cd4e5f678 desk.lan:9847")
        self.assertEqual((t.host, t.port), ("desk.lan", 9847))

    def test_address_only_after_a_pair_code(self) -> None:
        e = self.assertRaises(JoinFormatError, decode_join, "YCU-ACM-UAU-PZJ-WHA 10.0.0.1:9847")
        self.assertIn("only a pair code", str(e))

    def test_repr_hides_secrets(self) -> None:
        t = decode_join("cctl://x@1.2.3.4:1/k/a3f29b1cd4e5f678")
        self.assertNotIn("a3f2", repr(t))
        self.assertNotIn(t.psk.hex()[:8], repr(t))
