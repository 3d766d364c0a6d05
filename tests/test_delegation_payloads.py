"""The delegation payloads against claudectl 0.64's vectors (delegation.md 2)."""

import json

from twisted.trial.unittest import SynchronousTestCase

from claudectl.delegation import payloads as P
from claudectl.relay.codec import Envelope, decode, encode
from tests.common import vector, vectors


def dumps(payload):
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


class VectorTests(SynchronousTestCase):
    def test_every_compat_vector_is_covered(self):
        covered = {
            "delegation.frame.delegate_task",
            "delegation.payload.delegate_task_cwd_gitref",
            "delegation.frame.task_status_initial",
            "delegation.payload.handoff_completed",
            "delegation.payload.handoff_failed",
            "delegation.payload.handoff_stopped",
            "delegation.payload.handoff_failure_builder",
            "delegation.payload.handoff_builder",
            "delegation.payload.task_interrupt",
            "delegation.task_id_from_msg_id",
            "delegation.relevant_files_cap",
            "delegation.relevant_files_oversized",
            "delegation.context_defaults",
            "delegation.orchestrator.attempts",
            "delegation.orchestrator.template",
            "delegation.orchestrator.reject_unknown_key",
            "delegation.orchestrator.slug",
        }
        self.assertEqual(set(vectors("delegation", "COMPAT")), covered)

    def test_delegate_task_frame(self):
        v = vector("delegation.frame.delegate_task")
        inp = v["input"]
        p = inp["payload"]
        payload = P.build_delegate_task(p["task_id"], p["prompt"], p["cwd"])
        env = Envelope(inp["id"], inp["msg_type"], inp["from_peer"], inp["timestamp"], payload)
        self.assertEqual(encode(env).decode("utf-8"), v["expected"]["line"])
        parsed = P.parse_delegate_task(decode(encode(env)).payload)
        self.assertEqual(parsed, P.DelegateTask(p["task_id"], p["prompt"], None))

    def test_delegate_task_cwd_gitref(self):
        v = vector("delegation.payload.delegate_task_cwd_gitref")
        p = v["input"]["payload"]
        payload = P.build_delegate_task(
            p["task_id"], p["prompt"], p["cwd"], P.TaskContext(git_ref="feat/auth")
        )
        self.assertEqual(dumps(payload), v["expected"]["payload_json"])
        self.assertEqual(P.parse_delegate_task(p).context.git_ref, "feat/auth")

    def test_full_context_roundtrip(self):
        text = (
            '{"brain_context":{"project_preferences":"prefers small diffs","recent_insights":'
            '["error loops in auth"]},"dependency_graph":{"blocked_by":[],"blocks":'
            '["deploy-staging"]},"git_commit":"abc123","git_ref":"feat/auth-rewrite",'
            '"git_remote":"git@github.com:team/project.git","relevant_files":'
            '{"src/auth/middleware.rs":"fn check() {}"}}'
        )
        ctx = P.parse_context(json.loads(text))
        self.assertEqual(ctx.git_remote, "git@github.com:team/project.git")
        self.assertEqual(ctx.brain_context.recent_insights, ("error loops in auth",))
        self.assertEqual(dumps(ctx.to_payload()), text)

    def test_task_status_frame(self):
        v = vector("delegation.frame.task_status_initial")
        inp = v["input"]
        stats = P.TaskStats(elapsed_secs=0)
        payload = P.build_task_status(inp["payload"]["task_id"], "running", stats)
        env = Envelope(inp["id"], inp["msg_type"], inp["from_peer"], inp["timestamp"], payload)
        self.assertEqual(encode(env).decode("utf-8"), v["expected"]["line"])
        parsed = P.parse_task_status(inp["payload"])
        self.assertEqual(parsed.stats, stats)
        self.assertEqual(parsed.state, "running")

    def test_stats_omit_unknown_and_decode_all_or_nothing(self):
        self.assertNotIn("elapsed_secs", P.TaskStats().to_payload())
        self.assertNotIn("last_activity", P.TaskStats().to_payload())
        full = P.TaskStats(5, 0.5, 12, ("a.py",), 3, "Edit a.py")
        self.assertEqual(P.parse_stats(full.to_payload()), full)
        bad = dict(full.to_payload(), tokens_used="many")
        self.assertEqual(P.parse_stats(bad), P.TaskStats())

    def test_handoff_completed_failed_stopped(self):
        tid = "task_1745539200123_0"
        self.assertEqual(
            dumps(P.build_handoff(tid, P.SUMMARY_COMPLETED)),
            vector("delegation.payload.handoff_completed")["expected"]["payload_json"],
        )
        self.assertEqual(
            dumps(P.build_failure(tid, P.SUMMARY_NONZERO)),
            vector("delegation.payload.handoff_failed")["expected"]["payload_json"],
        )
        self.assertEqual(
            dumps(P.build_failure(tid, P.SUMMARY_STOPPED)),
            vector("delegation.payload.handoff_stopped")["expected"]["payload_json"],
        )

    def test_handoff_builders(self):
        v = vector("delegation.payload.handoff_failure_builder")["input"]
        self.assertEqual(
            dumps(
                P.build_failure(v["task_id"], v["reason"], v["total_cost_usd"], v["total_tokens"])
            ),
            vector("delegation.payload.handoff_failure_builder")["expected"]["payload_json"],
        )
        v = vector("delegation.payload.handoff_builder")["input"]
        h = P.TaskHandoff(
            v["task_id"],
            "completed",
            v["summary"],
            tuple(v["artifacts"]),
            v["git_ref"],
            v["total_cost_usd"],
            v["total_tokens"],
        )
        expected = vector("delegation.payload.handoff_builder")["expected"]["payload_json"]
        self.assertEqual(dumps(h.to_payload()), expected)
        self.assertEqual(P.parse_handoff(json.loads(expected)), h)

    def test_failed_handoff_has_no_git_ref_even_if_set(self):
        h = P.TaskHandoff("t", "failed", "boom", git_ref="abc")
        self.assertNotIn("git_ref", h.to_payload())

    def test_interrupt(self):
        v = vector("delegation.payload.task_interrupt")
        p = v["input"]["payload"]
        self.assertEqual(
            dumps(P.build_interrupt(p["task_id"], p["interrupt_type"], p["reason"])),
            v["expected"]["payload_json"],
        )
        self.assertEqual(
            P.parse_interrupt({"task_id": "t", "interrupt_type": "nudge"}),
            P.TaskInterrupt("t", "nudge", ""),
        )
        self.assertRaises(P.PayloadError, P.parse_interrupt, {"task_id": "t"})

    def test_task_id_from_msg_id(self):
        v = vector("delegation.task_id_from_msg_id")
        self.assertEqual(P.task_id_from_msg_id(v["input"]["msg_id"]), v["expected"]["task_id"])

    def test_relevant_files_cap(self):
        v = vector("delegation.relevant_files_cap")
        for n, accepted in zip(
            v["input"]["relevant_files_content_bytes"], v["expected"]["sender_accepts"], strict=True
        ):
            ctx = P.TaskContext(relevant_files={"a.txt": "x" * (n - 1), "b": "y"})
            if accepted:
                P.build_delegate_task("t", "p", None, ctx)
            else:
                e = self.assertRaises(P.PayloadError, P.build_delegate_task, "t", "p", None, ctx)
                self.assertEqual(str(e), v["expected"]["error_template"].replace("<n>", str(n)))

    def test_relevant_files_oversized(self):
        ctx = P.TaskContext(relevant_files={"big.txt": "x" * 60000})
        self.assertFalse(
            vector("delegation.relevant_files_oversized")["expected"]["sender_accepts"]
        )
        self.assertRaises(P.PayloadError, P.build_delegate_task, "t", "p", None, ctx)

    def test_multibyte_content_counts_bytes(self):
        ctx = P.TaskContext(relevant_files={"a": "é" * 25_601})  # 51,202 bytes
        self.assertRaises(P.PayloadError, P.build_delegate_task, "t", "p", None, ctx)

    def test_context_decodes_all_or_nothing(self):
        v = vector("delegation.context_defaults")
        self.assertEqual(P.parse_context(json.loads(v["input"]["context_json"])), P.TaskContext())
        self.assertEqual(P.parse_context({"brain_context": {}, "git_ref": "x"}), P.TaskContext())
        self.assertEqual(P.parse_context(None), P.TaskContext())

    def test_delegate_task_parsing(self):
        self.assertRaises(P.PayloadError, P.parse_delegate_task, {"prompt": "x"})
        self.assertRaises(P.PayloadError, P.parse_delegate_task, {"task_id": "t"})
        self.assertRaises(P.PayloadError, P.parse_delegate_task, [])
        t = P.parse_delegate_task({"task_id": "t", "prompt": "", "cwd": 5})
        self.assertEqual((t.prompt, t.cwd), ("", None))

    def test_ack(self):
        self.assertEqual(P.parse_ack(P.build_ack("task_1")), "task_1")
        self.assertRaises(P.PayloadError, P.parse_ack, {"ack_id": 3})
