"""Scheduling a task file across local and remote tasks."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import runner as R
from claudectl.delegation import taskfile as TF


class RunnerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.lines = []
        self.calls = []
        self.pending = {}

    def attempt(self, where):
        def run(task, prompt, progress):
            self.calls.append((where, task.name, prompt))
            d = Deferred()
            self.pending.setdefault(task.name, []).append(d)
            return d

        return run

    def runner(self, data, parallel=False):
        tf = TF.parse(data)
        r = R.TaskFileRunner(
            tf,
            self.attempt("local"),
            self.attempt("remote"),
            self.clock,
            self.lines.append,
            parallel,
        )
        return r, r.run()

    def finish(self, name, ok=True, output="", message="m"):
        self.pending[name].pop(0).callback(R.AttemptResult(ok, output, message))

    def test_dependency_across_local_and_remote(self):
        r, d = self.runner(
            {
                "tasks": [
                    {"name": "analyze", "prompt": "find issues", "peer": "ci-1"},
                    {
                        "name": "fix",
                        "prompt": "Fix these:\n{{analyze.stdout}}",
                        "depends_on": ["analyze"],
                    },
                ]
            }
        )
        self.assertEqual(self.calls, [("remote", "analyze", "find issues")])
        self.finish("analyze", output="issue 1\nissue 2\n")
        self.assertEqual(self.calls[1], ("local", "fix", "Fix these:\nissue 1\nissue 2"))
        self.finish("fix")
        states = self.successResultOf(d)
        self.assertTrue(r.all_completed)
        self.assertEqual(states["fix"].status, "completed")
        self.assertTrue(any("started on ci-1" in ln for ln in self.lines))

    def test_sequential_vs_parallel(self):
        data = {"tasks": [{"name": "a", "prompt": "1"}, {"name": "b", "prompt": "2", "peer": "p"}]}
        self.runner(data)
        self.assertEqual(len(self.calls), 1)
        self.calls.clear()
        self.runner(data, parallel=True)
        self.assertEqual(len(self.calls), 2)

    def test_retry_then_fail_and_skip_dependents(self):
        r, d = self.runner(
            {
                "retries": 1,
                "tasks": [
                    {"name": "a", "prompt": "x"},
                    {"name": "b", "prompt": "y", "depends_on": ["a"]},
                    {"name": "c", "prompt": "z", "depends_on": ["b"]},
                ],
            }
        )
        self.finish("a", ok=False, message="boom")
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.calls), 2)
        self.finish("a", ok=False, message="boom again")
        states = self.successResultOf(d)
        self.assertEqual([states[n].status for n in "abc"], ["failed", "skipped", "skipped"])
        self.assertEqual(states["b"].message, "dependency failed: a")
        self.assertEqual(states["a"].attempts, 2)
        self.assertFalse(r.all_completed)

    def test_tasks_that_end_at_once_fire_the_result_once(self):
        """Issue 12 item 1: a task that cannot start ends synchronously; the
        next one starts from inside that ending, and the run ends once."""
        from twisted.internet.defer import succeed

        def cannot_start(task, prompt, progress):
            self.calls.append(task.name)
            return succeed(R.AttemptResult(False, "", "could not start Claude Code"))

        for parallel in (False, True):
            self.calls.clear()
            tf = TF.parse(
                {
                    "tasks": [
                        {"name": "t1", "prompt": "a"},
                        {"name": "t2", "prompt": "b"},
                        {"name": "t3", "prompt": "c", "depends_on": ["t1"]},
                    ]
                }
            )
            lines = []
            r = R.TaskFileRunner(tf, cannot_start, cannot_start, self.clock, lines.append, parallel)
            states = self.successResultOf(r.run())
            self.assertEqual(self.calls, ["t1", "t2"])
            self.assertEqual(
                [states[n].status for n in ("t1", "t2", "t3")], ["failed", "failed", "skipped"]
            )
            self.assertEqual([ln for ln in lines if "failed:" in ln and "[t1]" in ln], [])
            self.assertEqual(self.flushLoggedErrors(), [])
