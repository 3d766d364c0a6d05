"""Session-carrying heartbeats (claudectl's worker state)."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.relay.workers import WorkerTable
from tests.common import vector


class WorkerTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = WorkerTable(self.clock.seconds, 30)

    def test_vector_stores_worker_state(self) -> None:
        v = vector("wire.heartbeat.stores_worker_state")
        state = self.table.heartbeat("link-id", v["input"]["payload"])
        assert state is not None
        self.assertEqual(state.worker_id, v["expected"]["worker_id"])
        self.assertEqual(len(state.sessions), v["expected"]["session_count"])

    def test_vector_empty_payload_is_liveness_only(self) -> None:
        v = vector("wire.heartbeat.empty_payload_liveness_only")
        self.assertIsNone(self.table.heartbeat("link-id", v["input"]["payload"]))
        self.assertEqual(self.table.current(), [])

    def test_worker_id_defaults_to_link_id_and_expires(self) -> None:
        self.table.heartbeat(
            "peer-a", {"sessions": [{"pid": 1, "project": "x", "status": "Bogus"}, "junk"]}
        )
        [w] = self.table.current()
        self.assertEqual((w.worker_id, w.peer_id), ("peer-a", "peer-a"))
        self.assertEqual(w.sessions, [{"pid": 1, "project": "x", "status": "Idle"}])
        self.clock.advance(91)
        self.assertEqual(self.table.current(), [])

    def test_peers_cannot_overwrite_each_other_and_are_bounded(self) -> None:
        from claudectl.relay.workers import MAX_WORKERS_PER_PEER

        self.table.heartbeat(
            "honest",
            {"worker_id": "w1", "sessions": [{"pid": 1, "project": "a", "status": "Idle"}]},
        )
        self.table.heartbeat("evil", {"worker_id": "w1", "sessions": []})
        mine = [w for w in self.table.current() if w.peer_id == "honest"]
        self.assertEqual(len(mine[0].sessions), 1)
        for i in range(MAX_WORKERS_PER_PEER + 10):
            self.table.heartbeat("evil", {"worker_id": f"x{i}", "sessions": []})
        evil = [w for w in self.table.current() if w.peer_id == "evil"]
        self.assertEqual(len(evil), MAX_WORKERS_PER_PEER)
