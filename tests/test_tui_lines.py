"""The dashboard's line texts and the cleaner of peer-supplied text (no terminal)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from claudectl.tui import lines as L
from claudectl.tui.clean import clean

ROW = {
    "identity": "laptop-a3f2",
    "state": "connected",
    "trust": 0.8,
    "bytes_up": 12 * 1024,
    "bytes_down": 8 * 1024,
    "transport": "tls1.3",
    "last_seen": 95,
    "address": "127.0.0.1:9847",
}


class CleanTests(SynchronousTestCase):
    def test_escape_sequences_removed_whole(self) -> None:
        self.assertEqual(clean("a\x1b[2Jb\x1b]0;pwned\x07c\x1b]52;c;ZXZpbA==\x1b\\d"), "abcd")
        self.assertEqual(clean("x\x9b31my"), "xy")  # 8-bit CSI

    def test_controls_and_bidi_overrides_dropped(self) -> None:
        # The project's one cleaner (claudectl.text.clean_line) drops them.
        self.assertEqual(clean("ab\u202edc\x00e\x7f"), "abdce")
        self.assertEqual(clean("one\ntwo\tthree\r"), "one two three")

    def test_bounded(self) -> None:
        out = clean("x" * 10_000, 50)
        self.assertEqual(len(out), 50)
        self.assertTrue(out.endswith("…"))
        self.assertEqual(clean(None), "")


class PeerLineTests(SynchronousTestCase):
    def test_the_missions_line(self) -> None:
        attr, text = L.peer_line(ROW, 100, 200, 11)
        self.assertEqual(attr, "good")
        self.assertEqual(
            text.split(),
            [
                "●",
                "laptop-a3f2",
                "connected",
                "trust:0.8",
                "↑12",
                "↓8",
                "kb",
                "TLS",
                "1.3",
                "seen",
                "5s",
                "ago",
                "127.0.0.1:9847",
            ],
        )

    def test_states_read_without_colour(self) -> None:
        for state, glyph, word in (
            ("connected", "●", "connected"),
            ("connecting", "◐", "connecting"),
            ("disconnected", "○", "offline"),
        ):
            _, text = L.peer_line(dict(ROW, state=state), 100, 80, 11)
            self.assertTrue(text.startswith(f"{glyph} laptop-a3f2 {word}"), text)

    def test_narrow_drops_whole_fields(self) -> None:
        full = L.peer_line(ROW, 100, 500, 11)[1]
        for width in range(45, 90):
            _, text = L.peer_line(ROW, 100, width, 11)
            self.assertLessEqual(len(text), width)
            self.assertTrue(full.startswith(text), (width, text))
            self.assertTrue(text.endswith(("kb", "1.3", "ago", "9847")), (width, text))

    def test_peer_text_is_cleaned(self) -> None:
        row = dict(ROW, identity="evil\x1b[2J-host", address="\x1b]0;x\x07 1.2.3.4:5")
        _, text = L.peer_line(row, 100, 200, 20)
        self.assertNotIn("\x1b", text)
        self.assertIn("evil-host", text)

    def test_numbers(self) -> None:
        self.assertEqual(L.kb(600), "0.6")
        self.assertEqual(L.kb(42 * 1024), "42")
        self.assertEqual(L.trust_text(0.5), "trust:0.5")
        self.assertEqual(L.trust_text(0.75), "trust:0.75")
        self.assertEqual(L.trust_text(None), "trust:-")
        self.assertEqual(L.ago(40, 100), "1m ago")
        self.assertEqual(L.ago(0, 100), "never")


class TaskAndHiveLineTests(SynchronousTestCase):
    def test_task_line(self) -> None:
        row = {
            "dir": "out",
            "state": "running",
            "peer": "ci-runner-9d1e",
            "elapsed": 65,
            "tokens": 12_345,
            "cost": 0.041,
            "summary": "Fixing\x1b[31m the tests",
        }
        attr, text = L.task_line(row, 80, 14)
        self.assertEqual(attr, "good")
        self.assertEqual(
            text.split()[:8],
            ["→", "running", "ci-runner-9d1e", "1m05s", "12.3k", "tok", "$0.04", "Fixing"],
        )
        self.assertNotIn("\x1b", text)
        _, narrow = L.task_line(row, 60, 14)
        self.assertLessEqual(len(narrow), 60)

    def test_hive_lines(self) -> None:
        panel = {
            "units": 12,
            "local_units": 8,
            "rows": [
                {"origin": "me-1", "local": True, "units": 8},
                {
                    "origin": "laptop-a3f2",
                    "local": False,
                    "tier": "Confirmed",
                    "trust": 0.8,
                    "units": 4,
                },
            ],
            "last_sync": [{"peer": "laptop-a3f2", "last_sync": 70}],
            "recent": [
                {
                    "kind": "conflict",
                    "ts": 90,
                    "key": "tool:Bash:npm test",
                    "peer": "laptop-a3f2",
                    "other": "me-1",
                }
            ],
        }
        texts = [t for _, t in L.hive_lines(panel, 100, 80)]
        self.assertEqual(texts[0], "12 units: 8 local, 4 from 1 peer(s)")
        self.assertIn("local", texts[1])
        self.assertEqual(texts[2].split(), ["laptop-a3f2", "Confirmed", "0.8", "4", "units"])
        self.assertEqual(texts[3], "last sync: laptop-a3f2 30s ago")
        self.assertTrue(texts[4].startswith("⚠ conflict"), texts[4])
        self.assertTrue(all(len(t) <= 80 for t in texts))


class TaskDetailTailTests(SynchronousTestCase):
    def test_recent_activity_block_newest_lines_cleaned(self) -> None:
        import time

        at = time.mktime((2026, 12, 7, 3, 4, 5, 0, 0, -1))
        tail = [{"at": at, "text": f"line {i}"} for i in range(60)]
        tail.append({"at": "later", "text": "Bash: \x1b]0;x\x07ls"})
        out = L.task_detail_lines({"dir": "out", "task_id": "t", "tail": tail}, 0)
        start = out.index("Recent activity:")
        block = out[start + 1 : out.index("", start)]
        self.assertEqual(len(block), L.DETAIL_TAIL_LINES)
        self.assertEqual(block[0], "  03:04:05  line 21")
        self.assertEqual(block[-1], "  --:--:--  Bash: ls")

    def test_no_block_without_a_tail(self) -> None:
        out = L.task_detail_lines({"dir": "in", "task_id": "t"}, 0)
        self.assertNotIn("Recent activity:", out)
