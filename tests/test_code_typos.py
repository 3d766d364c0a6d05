"""
What a typo in a relay code or word phrase does (docs/pairing.md, "What a
typo does"; issue 12 item 13): the formats have no checksum, so the docs
state exactly which typos decoding catches and which it cannot.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from claudectl.pairing import codes
from claudectl.pairing.codes import BASE32_ALPHABET, RelayCodeError, WordPhraseError
from claudectl.pairing.wordlist import WORDS

CODE = "YCU-ACM-UAU-PZJ-WHA"  # 192.168.1.50:9847, secret a3f29b1c
PHRASE = "nut-may-act-dub-jag-mad-ray-let-cap"


class TypoReachTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.good = codes.decode_relay_code(CODE)

    def test_last_character_unused_bits_pair_anyway(self) -> None:
        same = [c for c in BASE32_ALPHABET if codes.decode_relay_code(CODE[:-1] + c) == self.good]
        self.assertEqual("".join(same), "ABCDEFGH")
        self.assertEqual(CODE[-1], "A")

    def test_address_part_and_secret_part(self) -> None:
        chars = CODE.replace("-", "")
        for i in range(15):
            other = "B" if chars[i] != "B" else "C"
            typo = codes.decode_relay_code(chars[:i] + other + chars[i + 1 :])
            if i < 8:  # characters 1-8: address and port
                self.assertNotEqual((typo.ip, typo.port), (self.good.ip, self.good.port), i)
                self.assertEqual(typo.secret, self.good.secret, i)
            elif i < 14:  # characters 9-14: the secret
                self.assertEqual((typo.ip, typo.port), (self.good.ip, self.good.port), i)
                self.assertNotEqual(typo.secret, self.good.secret, i)
        words = PHRASE.split("-")
        for i in range(9):
            changed = list(words)
            changed[i] = WORDS[(WORDS.index(words[i]) + 1) % 256]
            typo = codes.decode_word_phrase("-".join(changed))
            address_changed = (typo.ip, typo.port) != (self.good.ip, self.good.port)
            self.assertEqual(address_changed, i < 5, i)
            self.assertEqual(typo.secret != self.good.secret, i >= 5, i)

    def test_what_decoding_refuses_and_ignores(self) -> None:
        for c in "0189":
            self.assertRaises(RelayCodeError, codes.decode_relay_code, CODE[:-1] + c)
        self.assertRaises(RelayCodeError, codes.decode_relay_code, CODE[:-4])
        self.assertRaises(WordPhraseError, codes.decode_word_phrase, PHRASE.replace("cap", "zzz"))
        self.assertRaises(WordPhraseError, codes.decode_word_phrase, PHRASE.rsplit("-", 1)[0])
        self.assertEqual(codes.decode_relay_code(CODE + "-ABC"), self.good)
        self.assertEqual(codes.decode_word_phrase(PHRASE + "-ace"), self.good)
