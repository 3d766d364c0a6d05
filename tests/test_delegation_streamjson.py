"""Claude Code stream-json into progress (delegation.md 6.2)."""

import json

from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation.streamjson import StreamProgress, shorten

#: The real transcript of Claude Code 2.1.197 without a login (delegation.md 6.2).
NOT_LOGGED_IN = [
    '{"type":"system","subtype":"init","cwd":"/home/me/proj","session_id":"c45e5c55-46e9-46e9-bb72-a334a19c85ae","tools":["Task","Bash","Edit","Read","Write"],"mcp_servers":[],"model":"claude-opus-4-8[1m]","permissionMode":"default","apiKeySource":"none","claude_code_version":"2.1.197","uuid":"02ea8f61-cc1b-4fbc-8ba8-570d501a6277"}',
    '{"type":"assistant","message":{"id":"c32076d8-c68f-442a-96d6-e866848cdc92","model":"<synthetic>","role":"assistant","stop_reason":"stop_sequence","type":"message","usage":{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0},"content":[{"type":"text","text":"Not logged in \u00b7 Please run /login"}]},"parent_tool_use_id":null,"session_id":"c45e5c55-46e9-46e9-bb72-a334a19c85ae","uuid":"bac406d3-8e3f-4bbf-98ce-924f7a413856","error":"authentication_failed"}',
    '{"type":"result","subtype":"success","is_error":true,"duration_ms":129,"duration_api_ms":0,"num_turns":1,"result":"Not logged in \u00b7 Please run /login","stop_reason":"stop_sequence","session_id":"c45e5c55-46e9-46e9-bb72-a334a19c85ae","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0},"permission_denials":[],"terminal_reason":"completed","uuid":"cdfc98ee-e991-4441-ba38-4a52b2838683"}',
]


def assistant(msg_id, content, usage=(10, 5, 0, 0)):
    return json.dumps(
        {
            "type": "assistant",
            "session_id": "s1",
            "message": {
                "id": msg_id,
                "role": "assistant",
                "content": content,
                "usage": dict(
                    zip(
                        (
                            "input_tokens",
                            "output_tokens",
                            "cache_creation_input_tokens",
                            "cache_read_input_tokens",
                        ),
                        usage,
                        strict=True,
                    )
                ),
            },
        }
    )


class StreamProgressTests(SynchronousTestCase):
    def test_not_logged_in_is_a_failure_despite_subtype_success(self):
        p = StreamProgress()
        for line in NOT_LOGGED_IN:
            self.assertTrue(p.feed(line.encode()))
        self.assertEqual(p.session_id, "c45e5c55-46e9-46e9-bb72-a334a19c85ae")
        self.assertEqual(p.model, "claude-opus-4-8[1m]")
        self.assertTrue(p.has_result)
        self.assertTrue(p.is_error)
        self.assertFalse(p.succeeded)
        self.assertEqual(p.result_text, "Not logged in · Please run /login")
        self.assertEqual(p.error, "authentication_failed")
        self.assertEqual((p.cost_usd, p.tokens_used, p.num_turns), (0.0, 0, 1))
        self.assertIsInstance(p.cost_usd, float)

    def test_success_counts_tokens_files_and_text(self):
        p = StreamProgress()
        p.feed(assistant("m1", [{"type": "text", "text": "Looking"}]))
        # The same message again (verbose mode): counted once, latest usage wins.
        p.feed(
            assistant(
                "m1",
                [{"type": "tool_use", "name": "Edit", "input": {"file_path": "/p/a.py"}}],
                (10, 7, 0, 0),
            )
        )
        p.feed(
            assistant(
                "m2",
                [
                    {"type": "tool_use", "name": "Write", "input": {"file_path": "/p/b.py"}},
                    {"type": "tool_use", "name": "Edit", "input": {"file_path": "/p/a.py"}},
                    {"type": "tool_use", "name": "Bash", "input": {"command": "ls"}},
                ],
                (100, 1, 20, 30),
            )
        )
        self.assertEqual(p.tokens_used, 17 + 151)
        self.assertEqual(p.files_modified, ["/p/a.py", "/p/b.py"])
        self.assertEqual(p.last_activity, "using Bash")
        self.assertEqual(p.last_text, "Looking")
        self.assertFalse(p.has_result)
        self.assertFalse(p.succeeded)
        p.feed(
            json.dumps(
                {
                    "type": "result",
                    "is_error": False,
                    "result": "Fixed it",
                    "total_cost_usd": 0.25,
                    "num_turns": 3,
                    "duration_ms": 900,
                    "usage": {
                        "input_tokens": 1000,
                        "output_tokens": 50,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                }
            )
        )
        self.assertTrue(p.succeeded)
        self.assertEqual((p.tokens_used, p.cost_usd, p.num_turns), (1050, 0.25, 3))
        self.assertEqual(p.last_activity, "Fixed it")

    def test_context_percentage(self):
        p = StreamProgress()
        p.feed(assistant("m", [], (50_000, 0, 0, 50_000)))
        self.assertEqual(p.context_pct, 50)

    def test_garbage_is_counted_not_fatal(self):
        p = StreamProgress()
        self.assertFalse(p.feed(b"not json"))
        self.assertFalse(p.feed(b"[1,2]"))
        self.assertFalse(p.feed(b"\xff\xfe"))
        self.assertFalse(p.feed(b"   "))
        self.assertFalse(p.feed('{"type":"assistant","message":"x"}'))
        self.assertFalse(p.feed('{"type":"user","message":{}}'))
        self.assertEqual(p.bad_lines, 3)

    def test_result_without_is_error_is_an_error(self):
        p = StreamProgress()
        p.feed('{"type":"result","subtype":"error_max_turns"}')
        self.assertTrue(p.is_error)
        self.assertEqual(p.result_text, "error_max_turns")

    def test_shorten(self):
        self.assertEqual(shorten("a\n  b"), "a b")
        self.assertEqual(len(shorten("x" * 500)), 200)


class ActivityLineTests(SynchronousTestCase):
    def test_activity_lines_name_what_claude_does(self):
        p = StreamProgress()
        p.feed(json.dumps({"type": "system", "subtype": "init", "session_id": "s"}))
        p.feed(
            assistant(
                "m1",
                [
                    {"type": "text", "text": "Let me look\nat the tests"},
                    {"type": "tool_use", "name": "Bash", "input": {"command": "pytest -q"}},
                    {"type": "tool_use", "name": "Read", "input": {"file_path": "/p/a.py"}},
                    {"type": "tool_use", "name": "Edit", "input": {"file_path": "/p/b.py"}},
                    {"type": "tool_use", "name": "TodoWrite", "input": {"todos": []}},
                    {"type": "tool_use", "name": "Grep", "input": {"pattern": "x" * 500}},
                ],
            )
        )
        p.feed(json.dumps({"type": "result", "is_error": False, "result": "All green"}))
        lines = list(p.activity)
        self.assertEqual(
            lines[:6],
            [
                "session started",
                "Let me look at the tests",
                "Bash: pytest -q",
                "Read: /p/a.py",
                "Edit: /p/b.py",
                "using TodoWrite",
            ],
        )
        self.assertTrue(lines[6].startswith("Grep: xxx"))
        self.assertEqual(len(lines[6]), 200)
        self.assertEqual(lines[7], "done: All green")
        self.assertEqual(p.activity_count, 8)
        # last_activity keeps its old, shorter form.
        self.assertEqual(p.last_activity, "All green")

    def test_the_queue_is_bounded(self):
        p = StreamProgress()
        for i in range(120):
            p.feed(assistant(f"m{i}", [{"type": "text", "text": f"line {i}"}]))
        self.assertEqual(p.activity_count, 120)
        self.assertEqual(len(p.activity), 50)
        self.assertEqual(p.activity[-1], "line 119")
