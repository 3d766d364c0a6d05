"""The live tail of a task: bounded, cleaned lines (claudectl/delegation/tail.py)."""

import json

from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import tail as T
from claudectl.delegation.taskrun import TaskRun

NOW = 1_700_000_000.0


class ParseTailTests(SynchronousTestCase):
    def test_lines_are_cleaned_and_cut(self):
        lines, dropped = T.parse_tail(
            [
                {"at": NOW - 1, "text": "\x1b[2J\x1b]0;pwned\x07Bash: ls\u202e -la\nrm"},
                {"at": NOW, "text": "y" * 5000},
            ],
            NOW,
        )
        self.assertEqual(dropped, 0)
        self.assertEqual(lines[0], (NOW - 1, "Bash: ls -la rm"))
        self.assertEqual(len(lines[1][1]), T.TAIL_LINE_CHARS)
        self.assertTrue(lines[1][1].endswith("…"))

    def test_hostile_shapes_are_dropped_and_counted(self):
        self.assertEqual(T.parse_tail("lines", NOW), ([], 1))
        self.assertEqual(T.parse_tail({"text": "x"}, NOW), ([], 1))
        lines, dropped = T.parse_tail(
            [
                "text",
                None,
                {"text": 5},
                {"text": "\x1b[31m\x07"},  # nothing left once cleaned
                {"at": "soon", "text": "a"},
                {"at": float("nan"), "text": "b"},
                {"at": 1e300, "text": "c"},
                {"at": True, "text": "d"},
            ],
            NOW,
        )
        self.assertEqual(dropped, 4)
        self.assertEqual(lines, [(NOW, "a"), (NOW, "b"), (NOW, "c"), (NOW, "d")])

    def test_at_most_one_frame_of_lines(self):
        lines, dropped = T.parse_tail([{"text": str(i)} for i in range(500)], NOW)
        self.assertEqual(len(lines), T.TAIL_FRAME_LINES)
        self.assertEqual(dropped, 500 - T.TAIL_FRAME_LINES)


class TailTests(SynchronousTestCase):
    def test_keeps_the_last_lines_with_sequence_numbers(self):
        t = T.Tail()
        for i in range(250):
            t.add(NOW + i, f"line {i}")
        self.assertEqual(t.seq, 250)
        self.assertEqual(len(t.lines), T.TAIL_KEEP)
        self.assertEqual(t.view()[0], {"at": NOW + 50, "text": "line 50"})
        self.assertEqual([s for s, _, _ in t.since(245)], [246, 247, 248, 249, 250])
        self.assertEqual(len(t.since(0, 20)), 20)
        self.assertFalse(t.add(NOW, "\x07"))
        self.assertEqual(t.seq, 250)

    def test_bounded_keeps_the_newest(self):
        lines = [{"at": NOW, "text": "é" * 200} for _ in range(200)]
        out = T.bounded(lines, 10_000)
        self.assertLessEqual(len(json.dumps(out, ensure_ascii=False).encode()), 10_000)
        self.assertTrue(out)
        self.assertEqual(T.bounded(lines, -5), [])


class TaskRunTailTests(SynchronousTestCase):
    def test_stream_lines_and_notes_reach_the_tail(self):
        now = [NOW]
        run = TaskRun("t", lambda: now[0])
        calls = []
        run.on_tail = lambda: calls.append(run.tail.seq)
        run.started()
        run.line_received(b'{"type":"system","subtype":"init","session_id":"s"}')
        now[0] += 2
        run.line_received(
            json.dumps(
                {
                    "type": "assistant",
                    "message": {
                        "id": "m",
                        "content": [
                            {"type": "text", "text": "Plan"},
                            {"type": "tool_use", "name": "Bash", "input": {"command": "make"}},
                        ],
                    },
                }
            )
        )
        run.set_note("nudge delivered: hurry")
        self.assertEqual(
            run.tail.view(),
            [
                {"at": NOW, "text": "session started"},
                {"at": NOW + 2, "text": "Plan"},
                {"at": NOW + 2, "text": "Bash: make"},
                {"at": NOW + 2, "text": "nudge delivered: hurry"},
            ],
        )
        self.assertEqual(calls, [1, 3, 4])
