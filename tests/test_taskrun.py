"""The TaskRun model: outcomes decided from events, not from exit 0 alone."""

from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import taskrun as T
from tests.test_delegation_streamjson import NOT_LOGGED_IN

INIT = '{"type":"system","subtype":"init","session_id":"s"}'
OK = '{"type":"result","is_error":false,"result":"All good","total_cost_usd":0.5,"usage":{"input_tokens":3,"output_tokens":4}}'


class FakeTime:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class TaskRunTests(SynchronousTestCase):
    def setUp(self):
        self.time = FakeTime()
        self.run = T.TaskRun("t1", self.time)

    def outcome(self):
        return self.successResultOf(self.run.result)

    def test_success(self):
        self.assertEqual(self.run.state, T.QUEUED)
        self.run.started()
        self.assertEqual(self.run.state, T.RUNNING)
        self.run.line_received(INIT)
        self.run.line_received(OK)
        self.time.now += 42
        self.assertNoResult(self.run.result)
        self.run.ended(0, None)
        o = self.outcome()
        self.assertEqual(
            (o.state, o.summary, o.cost_usd, o.tokens, o.duration_secs),
            ("completed", "All good", 0.5, 7, 42),
        )
        self.assertEqual(o.wire_state, "completed")
        self.assertEqual(o.result_text, "All good")
        self.assertIsNone(self.run.ended(1, None))  # only once

    def test_is_error_with_exit_zero_fails_with_its_message(self):
        self.run.started()
        for line in NOT_LOGGED_IN:
            self.run.line_received(line)
        self.run.ended(0, None)
        o = self.outcome()
        self.assertEqual((o.state, o.summary), ("failed", "Not logged in · Please run /login"))
        self.assertEqual(o.wire_state, "failed")

    def test_missing_result_fails(self):
        self.run.started()
        self.run.line_received(INIT)
        self.run.ended(0, None)
        self.assertEqual(self.outcome().summary, "Claude Code exited without a result")

    def test_nonzero_exit_with_stderr(self):
        self.run.started()
        self.run.stderr_received(b"warming up\nfatal: bad thing\n")
        self.run.line_received(OK)
        self.run.ended(3, None)
        self.assertEqual(
            self.outcome().summary, "Claude Code exited with status 3: fatal: bad thing"
        )

    def test_signal(self):
        self.run.started()
        self.run.ended(None, 9)
        self.assertEqual(self.outcome().summary, "Claude Code was killed by SIGKILL")

    def test_spawn_error_from_trampoline(self):
        self.run.started()
        self.run.stderr_received(b"claudectl-spawn-error: claude: No such file or directory\n")
        self.run.ended(127, None)
        self.assertEqual(
            self.outcome().summary, "could not start Claude Code: claude: No such file or directory"
        )

    def test_stop(self):
        self.run.started()
        self.run.request_stop("no longer needed")
        self.run.ended(None, 15)
        o = self.outcome()
        self.assertEqual(
            (o.state, o.summary, o.wire_state),
            ("stopped", "Stopped by controller: no longer needed", "failed"),
        )

    def test_stop_without_reason_is_claudectls_text(self):
        self.assertEqual(self.run.cancel("").summary, "Stopped by controller")
        self.assertEqual(self.run.state, T.STOPPED)

    def test_timeout(self):
        self.run.started()
        self.run.fail_with("timed out after 5 s")
        self.run.ended(None, 15)
        self.assertEqual(self.outcome().summary, "timed out after 5 s")

    def test_stats_and_notes(self):
        self.assertEqual(self.run.stats().last_activity, "queued")
        self.run.started()
        self.time.now += 5
        self.run.line_received(OK)
        v = self.run.version
        self.run.set_note("nudge delivered: hi")
        self.assertGreater(self.run.version, v)
        s = self.run.stats()
        self.assertEqual(
            (s.elapsed_secs, s.tokens_used, s.cost_usd, s.last_activity),
            (5, 7, 0.5, "nudge delivered: hi"),
        )

    def test_long_summary_is_cut(self):
        self.run.started()
        self.run.line_received('{"type":"result","is_error":false,"result":"%s"}' % ("é" * 40000))
        self.run.ended(0, None)
        self.assertLessEqual(len(self.outcome().summary.encode()), T.MAX_SUMMARY_BYTES)
