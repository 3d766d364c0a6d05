"""
The repository's copy of the claudectl 0.64 test vectors is the shared one.

Every test reads the in-repo copy (``tests/data/vectors.json``), so the suite
runs the same on any clone.  Its SHA-256 is recorded beside it: that check
always runs; the byte comparison with the shared spec's copy runs
too when that folder exists (it does not in a user's clone), instead of a
skip.
"""

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from tests.common import SHARED_VECTORS_FILE, VECTORS_FILE, vectors

DIGEST_FILE = VECTORS_FILE.with_name(VECTORS_FILE.name + ".sha256")


class VectorsCopyTests(SynchronousTestCase):
    def test_copy_is_the_recorded_one(self) -> None:
        recorded = DIGEST_FILE.read_text().split()[0]
        self.assertEqual(hashlib.sha256(VECTORS_FILE.read_bytes()).hexdigest(), recorded)

    def test_copy_matches_shared_when_present(self) -> None:
        # Not a skip: without ../shared the recorded digest above is the check.
        if SHARED_VECTORS_FILE.exists():
            self.assertEqual(VECTORS_FILE.read_bytes(), SHARED_VECTORS_FILE.read_bytes())

    def test_all_areas_present(self) -> None:
        areas = {v["area"] for v in vectors().values()}
        self.assertEqual(areas, {"wire", "pairing", "hive", "delegation"})
