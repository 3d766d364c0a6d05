"""Task files: claudectl's JSON format (delegation.md 5), YAML and TOML."""

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import taskfile as TF
from claudectl.delegation.text import cut_utf8
from tests.common import vector

MISSION = {
    "tasks": [
        {
            "name": "fix-tests",
            "prompt": "Fix the failing auth tests",
            "cwd": "/path/to/project",
            "peer": "ci-runner-9d1e",
        },
        {"name": "update-docs", "prompt": "Update the API docs", "cwd": "/path/to/project"},
    ]
}


class TaskFileTests(SynchronousTestCase):
    def test_vectors_attempts(self):
        v = vector("delegation.orchestrator.attempts")
        got = [TF.max_attempts(f, t) for f, t in v["input"]["file_retries_task_retries"]]
        self.assertEqual(got, v["expected"]["attempts"])

    def test_vector_template(self):
        v = vector("delegation.orchestrator.template")["input"]
        self.assertEqual(
            TF.expand_template(v["prompt"], {"analyze": v["analyze_stdout"]}),
            vector("delegation.orchestrator.template")["expected"]["expanded"],
        )
        self.assertEqual(TF.expand_template("a {{ x.stdout }} b", {"x": " y "}), "a y b")

    def test_vector_unknown_key(self):
        v = vector("delegation.orchestrator.reject_unknown_key")
        e = self.assertRaises(TF.TaskFileError, TF.parse, json.loads(v["input"]["task_file"]))
        self.assertIn(v["expected"]["error_mentions"], str(e))
        self.assertRaises(TF.TaskFileError, TF.parse, {"tasks": [], "budget": 1})

    def test_vector_slug(self):
        v = vector("delegation.orchestrator.slug")
        self.assertEqual([TF.slug(n) for n in v["input"]["names"]], v["expected"]["slugs"])

    def test_template_cut_on_character_boundary(self):
        out = "é" * 20_000  # 40,000 bytes; byte 32,768 is not a boundary... check both
        text = TF.expand_template("{{a.stdout}}", {"a": "x" + out})
        self.assertTrue(text.endswith("(truncated, output exceeded 32KB)"))
        body = text[: -len(TF.TRUNCATION_NOTE)]
        self.assertLessEqual(len(body.encode()), 32_768)
        self.assertEqual(cut_utf8("aé", 2), ("a", True))

    def test_mission_file_and_paired_check(self):
        tf = TF.parse(MISSION, is_paired=lambda p: p == "ci-runner-9d1e")
        self.assertEqual([t.peer for t in tf.tasks], ["ci-runner-9d1e", None])
        e = self.assertRaises(TF.TaskFileError, TF.parse, MISSION, is_paired=lambda p: False)
        self.assertIn("peer 'ci-runner-9d1e' is not paired", str(e))

    def test_errors(self):
        def err(tasks):
            return str(self.assertRaises(TF.TaskFileError, TF.parse, {"tasks": tasks}))

        self.assertEqual(
            err([{"name": "a", "prompt": ""}, {"name": "a", "prompt": ""}]),
            "Duplicate task name: 'a'",
        )
        self.assertEqual(
            err([{"name": "a", "prompt": "", "depends_on": ["z"]}]),
            "Task 'a' depends on 'z' which doesn't exist",
        )
        self.assertEqual(
            err(
                [
                    {"name": "a", "prompt": "", "depends_on": ["b"]},
                    {"name": "b", "prompt": "", "depends_on": ["a"]},
                ]
            ),
            "Task dependencies contain a cycle: a -> b -> a",
        )
        self.assertIn(
            "not in its depends_on",
            err([{"name": "a", "prompt": "{{b.stdout}}"}, {"name": "b", "prompt": ""}]),
        )
        self.assertIn(
            "not supported",
            err(
                [
                    {"name": "a", "prompt": "{{b.stderr}}", "depends_on": ["b"]},
                    {"name": "b", "prompt": ""},
                ]
            ),
        )
        self.assertIn("retries", err([{"name": "a", "prompt": "", "retries": -1}]))

    def test_yaml_and_toml(self):
        d = Path(self.mktemp())
        d.mkdir()
        (d / "t.yaml").write_text(
            "retries: 1\ntasks:\n  - name: a\n    prompt: hi\n"
            "  - name: b\n    prompt: '{{a.stdout}}'\n    depends_on: [a]\n"
        )
        (d / "t.toml").write_text(
            'retries = 1\n[[tasks]]\nname = "a"\nprompt = "hi"\n'
            '[[tasks]]\nname = "b"\nprompt = "{{a.stdout}}"\n'
            'depends_on = ["a"]\n'
        )
        (d / "t.json").write_text(
            json.dumps(
                {
                    "retries": 1,
                    "tasks": [
                        {"name": "a", "prompt": "hi"},
                        {"name": "b", "prompt": "{{a.stdout}}", "depends_on": ["a"]},
                    ],
                }
            )
        )
        loaded = [TF.load(d / n) for n in ("t.yaml", "t.toml", "t.json")]
        self.assertEqual(loaded[0].tasks, loaded[1].tasks)
        self.assertEqual(loaded[1].tasks, loaded[2].tasks)
        self.assertEqual(loaded[0].attempts(loaded[0].tasks[0]), 2)
        (d / "bad.yaml").write_text("tasks: [")
        e = self.assertRaises(TF.TaskFileError, TF.load, d / "bad.yaml")
        # One line, with where the problem is (review 14).
        self.assertEqual(
            str(e),
            f"{d / 'bad.yaml'}: cannot parse: expected the node content, but found "
            "'<stream end>' (line 1, column 9)",
        )
        e = self.assertRaises(TF.TaskFileError, TF.load, d / "missing.yaml")
        self.assertEqual(str(e), f"{d / 'missing.yaml'}: cannot read: No such file or directory")

    def test_empty_task_file_is_an_error(self):
        """Issue 12 item 14: not a silent exit 0."""
        e = self.assertRaises(TF.TaskFileError, TF.parse, {"tasks": []}, "t.json")
        self.assertEqual(str(e), "t.json: the 'tasks' list is empty: nothing to run")
        d = Path(self.mktemp())
        d.mkdir()
        for name in ("e.json", "e.yaml", "e.toml"):
            (d / name).write_text(" \n")
            e = self.assertRaises(TF.TaskFileError, TF.load, d / name)
            self.assertEqual(str(e), f"{d / name}: the file is empty: nothing to run")
        (d / "t.yaml").write_text("tasks: []\n")
        self.assertIn("empty", str(self.assertRaises(TF.TaskFileError, TF.load, d / "t.yaml")))
