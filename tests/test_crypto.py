"""Tests for claudectl.relay.crypto: pair codes, canonical PSK, nonces, proofs."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay import crypto
from claudectl.relay.crypto import (
    CodeError,
    canonical_psk,
    format_pair_code,
    key_from_hex,
    key_to_hex,
    new_nonce,
    new_pair_code,
    parse_pair_code,
    proof,
    psk_from_code,
    verify_proof,
)
from tests.common import vector, vectors

WIRE = vectors("wire", "COMPAT")
PSK_VECTORS = {
    n: v for n, v in vectors("pairing", "COMPAT").items() if n.startswith("pairing.psk.")
}


def _bytes(inp: dict, prefix: str) -> bytes:
    if f"{prefix}_hex" in inp:
        return bytes.fromhex(inp[f"{prefix}_hex"])
    return inp[f"{prefix}_utf8"].encode("utf-8")


class PrimitiveVectorTests(SynchronousTestCase):
    """wire.sha256.*, wire.hmac.*, wire.hex.*: the primitives claudectl uses."""

    def test_sha256(self) -> None:
        names = [n for n in WIRE if n.startswith("wire.sha256.")]
        self.assertGreaterEqual(len(names), 10)
        for name in names:
            v = WIRE[name]
            self.assertEqual(
                hashlib.sha256(_bytes(v["input"], "data")).hexdigest(),
                v["expected"]["sha256_hex"],
                name,
            )

    def test_hmac(self) -> None:
        names = [n for n in WIRE if n.startswith("wire.hmac.")]
        self.assertEqual(len(names), 3)
        for name in names:
            v = WIRE[name]
            key, data = _bytes(v["input"], "key"), _bytes(v["input"], "data")
            expected = v["expected"]["hmac_sha256_hex"]
            self.assertEqual(hmac.new(key, data, hashlib.sha256).hexdigest(), expected, name)
            # Our proof helper is the same HMAC over the ASCII of a string.
            if "data_utf8" in v["input"]:
                self.assertEqual(proof(key, v["input"]["data_utf8"]), expected, name)
                self.assertTrue(verify_proof(key, v["input"]["data_utf8"], expected))

    def test_hex_roundtrip_lowercase(self) -> None:
        v = vector("wire.hex.roundtrip")
        raw = bytes.fromhex(v["input"]["bytes_hex"])
        self.assertEqual(key_to_hex(raw), v["expected"]["hex"])
        self.assertEqual(key_to_hex(b"\xde\xad\xbe\xef" * 8), "deadbeef" * 8)

    def test_hex_decode_errors(self) -> None:
        v = vector("wire.hex.decode_errors")
        self.assertTrue(v["expected"]["error"])
        for text in v["input"]["texts"]:
            self.assertIsNone(key_from_hex(text), text)
            self.assertIsNone(key_from_hex(text * 32), text)


class ProofVectorTests(SynchronousTestCase):
    def test_proofs(self) -> None:
        names = [n for n in WIRE if n.startswith("wire.proof.")]
        self.assertEqual(len(names), 3)
        for name in names:
            inp, exp = WIRE[name]["input"], WIRE[name]["expected"]
            psk = psk_from_code(inp["pair_code"])
            self.assertEqual(psk.hex(), inp["psk_hex"], name)
            self.assertEqual(proof(psk, inp["nonce"]), exp["proof"], name)
            self.assertTrue(verify_proof(psk, inp["nonce"], exp["proof"]), name)

    def test_uppercase_proof_refused(self) -> None:
        """claudectl compares strings: uppercase hex is a wrong proof."""
        inp = vector("wire.proof.0123_seqnonce")["input"]
        good = vector("wire.proof.0123_seqnonce")["expected"]["proof"]
        psk = bytes.fromhex(inp["psk_hex"])
        self.assertFalse(verify_proof(psk, inp["nonce"], good.upper()))

    def test_non_string_and_odd_candidates(self) -> None:
        inp = vector("wire.proof.0123_seqnonce")["input"]
        psk = bytes.fromhex(inp["psk_hex"])
        good = vector("wire.proof.0123_seqnonce")["expected"]["proof"]
        for bad in (
            None,
            5,
            [good],
            {"p": good},
            b"",
            "",
            good[:-1],
            good + "0",
            "é" * 64,
            good[:-1] + "\u0660",
        ):
            self.assertFalse(verify_proof(psk, inp["nonce"], bad), repr(bad))

    def test_wrong_key_or_nonce(self) -> None:
        inp = vector("wire.proof.a3f2_ffnonce")["input"]
        good = vector("wire.proof.a3f2_ffnonce")["expected"]["proof"]
        psk = bytes.fromhex(inp["psk_hex"])
        self.assertFalse(verify_proof(psk_from_code("0123-4567-89ab-cdef"), inp["nonce"], good))
        self.assertFalse(verify_proof(psk, "0" * 64, good))
        # The nonce is HMACed as a string: its hex is not decoded.
        self.assertNotEqual(
            proof(psk, inp["nonce"]),
            hmac.new(psk, bytes.fromhex(inp["nonce"]), "sha256").hexdigest(),
        )


class PairCodeVectorTests(SynchronousTestCase):
    """pairing.psk.*: canonical PSK, code formats, rejections."""

    def test_vectors_present(self) -> None:
        self.assertEqual(len(PSK_VECTORS), 9)

    def test_canonical_psk(self) -> None:
        for name, v in PSK_VECTORS.items():
            if "pair_code" in v["input"] and "psk_hex" in v["expected"]:
                self.assertEqual(
                    psk_from_code(v["input"]["pair_code"]).hex(), v["expected"]["psk_hex"], name
                )

    def test_format(self) -> None:
        v = PSK_VECTORS["pairing.psk.format"]
        code = format_pair_code(bytes.fromhex(v["input"]["psk_hex"]))
        self.assertEqual(code, v["expected"]["pair_code"])
        self.assertEqual(len(code), v["expected"]["length"])
        # Formatting a canonical key gives back the code that makes it.
        self.assertEqual(psk_from_code(code).hex(), v["input"]["psk_hex"])

    def test_reject_bad_length(self) -> None:
        for code in PSK_VECTORS["pairing.psk.reject_bad_length"]["input"]["pair_codes"]:
            self.assertRaises(CodeError, psk_from_code, code)

    def test_reject_docs_example(self) -> None:
        v = PSK_VECTORS["pairing.psk.reject_docs_example"]
        with self.assertRaises(CodeError) as cm:
            psk_from_code(v["input"]["pair_code"])
        self.assertEqual(str(cm.exception), v["expected"]["error"])

    def test_spaces_and_colons(self) -> None:
        ref = psk_from_code("0123-4567-89ab-cdef")
        for code in (
            "0123456789abcdef",
            "0123 4567 89ab cdef",
            "0123:4567:89ab:cdef",
            "0123-4567-89AB-CDEF",
            "  0123-4567-89ab-cdef\n",
        ):
            self.assertEqual(psk_from_code(code), ref, code)

    def test_canonical_psk_needs_8_bytes(self) -> None:
        self.assertRaises(CodeError, canonical_psk, b"1234567")
        self.assertRaises(CodeError, canonical_psk, b"123456789")
        p = b"\x01" * 8
        self.assertEqual(canonical_psk(p), p + hashlib.sha256(p).digest()[8:])
        self.assertEqual(len(canonical_psk(p)), 32)

    def test_new_pair_code_uses_injected_random(self) -> None:
        calls = []

        def rnd(n: int) -> bytes:
            calls.append(n)
            return bytes(range(n))

        code, psk = new_pair_code(rnd)
        self.assertEqual(calls, [8])
        self.assertEqual(code, "0001-0203-0405-0607")
        self.assertEqual(psk, psk_from_code(code))

    def test_new_pair_code_random(self) -> None:
        self.assertNotEqual(new_pair_code()[0], new_pair_code()[0])


class NonceTests(SynchronousTestCase):
    def test_vector_nonce_from_injected_random(self) -> None:
        nonce = new_nonce(lambda n: bytes(range(n)))
        self.assertEqual(nonce, vector("wire.proof.0123_seqnonce")["input"]["nonce"])

    def test_shape(self) -> None:
        n = new_nonce()
        self.assertEqual(len(n), 64)
        self.assertEqual(n, n.lower())
        bytes.fromhex(n)
        self.assertNotEqual(n, new_nonce())

    def test_short_random_fails_instead_of_weak_nonce(self) -> None:
        """Defect W16: never fall back to a weak nonce."""
        self.assertRaises(RuntimeError, new_nonce, lambda n: b"\x00" * (n - 1))

    def test_random_failure_propagates(self) -> None:
        def broken(n: int) -> bytes:
            raise OSError("no entropy")

        self.assertRaises(OSError, new_nonce, broken)


class KeyHexTests(SynchronousTestCase):
    def test_stored_key_any_case_trimmed(self) -> None:
        h = vector("wire.key_file")["input"]["psk_hex"]
        raw = bytes.fromhex(h)
        self.assertEqual(key_from_hex(h), raw)
        self.assertEqual(key_from_hex(h.upper()), raw)
        self.assertEqual(key_from_hex(f"  {h}\n"), raw)

    def test_not_32_bytes_is_not_a_key(self) -> None:
        h = vector("wire.key_file")["input"]["psk_hex"]
        for text in ("", h[:-2], h + "00", h[:16], "zz" * 32, h[:-1] + "g"):
            self.assertIsNone(key_from_hex(text), text)

    def test_inner_whitespace_is_not_a_key(self) -> None:
        """claudectl's hex decoder refuses spaces inside the key: 'not paired'."""
        h = vector("wire.key_file")["input"]["psk_hex"]
        self.assertIsNone(key_from_hex(h[:32] + " " + h[32:]))
        self.assertIsNone(key_from_hex(" ".join(h[i : i + 2] for i in range(0, 64, 2))))


# --- property tests -----------------------------------------------------------


class PropertyTests(SynchronousTestCase):
    @given(st.binary(min_size=8, max_size=8))
    def test_code_roundtrip(self, raw: bytes) -> None:
        code = format_pair_code(raw)
        self.assertRegex(code, r"^[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}$")
        self.assertEqual(parse_pair_code(code), raw)
        self.assertEqual(parse_pair_code(code.upper().replace("-", " ")), raw)
        psk = canonical_psk(raw)
        self.assertEqual(format_pair_code(psk), code)
        self.assertEqual(psk_from_code(code), psk)

    @given(st.text(max_size=40))
    def test_parse_raises_only_code_error(self, text: str) -> None:
        try:
            raw = parse_pair_code(text)
        except CodeError:
            return
        self.assertEqual(len(raw), 8)

    @given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.data())
    def test_flipping_any_char_fails(
        self, psk: bytes, nonce_raw: bytes, data: st.DataObject
    ) -> None:
        nonce = nonce_raw.hex()
        good = proof(psk, nonce)
        self.assertTrue(verify_proof(psk, nonce, good))
        i = data.draw(st.integers(0, len(good) - 1))
        c = data.draw(st.characters().filter(lambda ch: ch != good[i]))
        self.assertFalse(verify_proof(psk, nonce, good[:i] + c + good[i + 1 :]))

    @given(st.binary(min_size=32, max_size=32))
    def test_key_hex_roundtrip(self, psk: bytes) -> None:
        self.assertEqual(key_from_hex(key_to_hex(psk)), psk)
        self.assertEqual(key_to_hex(psk), key_to_hex(psk).lower())

    @given(st.text(max_size=80))
    def test_key_from_hex_never_raises(self, text: str) -> None:
        result = key_from_hex(text)
        self.assertTrue(result is None or len(result) == crypto.PSK_BYTES)
