"""The repository's copy of the claudectl 0.64 test vectors is the shared one."""

from twisted.trial.unittest import SynchronousTestCase

from tests.common import SHARED_VECTORS_FILE, VECTORS_FILE, vectors


class VectorsCopyTests(SynchronousTestCase):
    def test_copy_matches_shared(self) -> None:
        if not SHARED_VECTORS_FILE.exists():
            raise self.skipTest(f"{SHARED_VECTORS_FILE} is not present")
        self.assertEqual(VECTORS_FILE.read_bytes(), SHARED_VECTORS_FILE.read_bytes())

    def test_all_areas_present(self) -> None:
        areas = {v["area"] for v in vectors().values()}
        self.assertEqual(areas, {"wire", "pairing", "hive", "delegation"})
