"""
The push channel (``events.subscribe`` / ``events.update``): the hub's
coalescing and watch on a fake clock, and the real control-socket factory
talking to the dashboard's FeedProtocol over an in-memory connection.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from claudectl.control import events as E
from claudectl.control import panels as P
from claudectl.tui.feed import FeedProtocol
from tests.common import control_with_events, make_node, temp_home


class HubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.data = {"peers": {"n": 0}, "tasks": {"n": 0}, "hive": {"n": 0}}
        self.sig = {"peers": 0}
        self.sent: list[tuple[float, str, dict[str, Any]]] = []
        self.hub = E.EventHub(
            self.clock,
            {p: (lambda p=p: json.dumps(self.data[p])) for p in self.data},
            {"peers": lambda: self.sig["peers"]},
        )

    def sink(self, panel: str, data: str, seq: int) -> None:
        self.sent.append((self.clock.seconds(), panel, json.loads(data)))

    def test_initial_state_after_subscribe(self) -> None:
        self.hub.subscribe(self.sink, ["peers", "hive"])
        self.assertEqual(self.sent, [])  # the Subscribe answer goes first
        self.clock.advance(0)
        self.assertEqual([p for _, p, _ in self.sent], ["peers", "hive"])

    def test_unknown_panel_refused(self) -> None:
        self.assertRaises(E.BadPanel, self.hub.subscribe, self.sink, ["nope"])

    def test_coalesced_at_most_one_per_interval(self) -> None:
        self.hub.subscribe(self.sink, ["peers"])
        self.clock.advance(1)
        self.sent.clear()
        self.data["peers"]["n"] = 1
        self.hub.changed("peers")
        self.clock.advance(0)  # the first change after a quiet time: at once
        self.assertEqual([(t, d["n"]) for t, _, d in self.sent], [(1.0, 1)])
        for i, step in enumerate((0.03, 0.03, 0.02)):  # three more changes within 100 ms
            self.clock.advance(step)
            self.data["peers"]["n"] = 2 + i
            self.hub.changed("peers")
        self.clock.advance(0.019)
        self.assertEqual(len(self.sent), 1)
        self.clock.advance(0.002)  # 100 ms after the first push: one push, the latest data
        self.assertEqual([d["n"] for _, _, d in self.sent], [1, 4])
        self.assertAlmostEqual(self.sent[1][0] - self.sent[0][0], 0.1, places=2)

    def test_unchanged_data_not_sent_again(self) -> None:
        self.hub.subscribe(self.sink, ["peers"])
        self.clock.advance(1)
        self.hub.changed("peers")
        self.clock.advance(1)
        self.assertEqual(len(self.sent), 1)

    def test_signature_watch(self) -> None:
        self.hub.subscribe(self.sink, ["peers"])
        self.clock.advance(1)
        self.data["peers"]["n"] = 7
        self.sig["peers"] = 1
        self.clock.advance(E.WATCH_SECS)
        self.clock.advance(0)
        self.assertEqual(self.sent[-1][2], {"n": 7})

    def test_dead_subscription_dropped_and_watch_stopped(self) -> None:
        alive = [True]
        sub = self.hub.subscribe(self.sink, ["peers"], lambda: alive[0])
        self.clock.advance(0)
        self.assertIsNotNone(self.hub._watch)
        alive[0] = False
        self.clock.advance(E.WATCH_SECS)
        self.assertNotIn(sub, self.hub.subscriptions)
        self.assertIsNone(self.hub._watch)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_paused_subscription_gets_the_latest_state_once_drained(self) -> None:
        sub = self.hub.subscribe(self.sink, ["peers", "hive"])
        self.clock.advance(1)
        self.sent.clear()
        self.hub.pause(sub)
        for n in range(1, 6):
            self.data["peers"]["n"] = n
            self.hub.changed("peers")
            self.clock.advance(0.2)
        self.assertEqual(self.sent, [])
        self.assertEqual(sub.owed, {"peers"})
        self.hub.resume(sub)
        self.assertEqual([(p, d["n"]) for _, p, d in self.sent], [("peers", 5)])

    def test_bounded_number_of_dashboards(self) -> None:
        for _ in range(E.MAX_SUBSCRIPTIONS):
            self.hub.subscribe(self.sink, ["peers"])
        self.assertRaises(E.TooManyDashboards, self.hub.subscribe, self.sink, ["peers"])

    def test_failing_sink_dropped(self) -> None:
        def broken(panel: str, data: str, seq: int) -> None:
            raise ConnectionError("gone")

        self.hub.subscribe(broken, ["peers"])
        self.clock.advance(0)
        self.assertEqual(self.hub.subscriptions, [])

    def test_failing_builder_logged(self) -> None:
        def boom() -> str:
            raise RuntimeError("bad")

        self.hub.builders["hive"] = boom
        self.hub.subscribe(self.sink, ["peers", "hive"])
        self.clock.advance(0)
        self.assertEqual([p for _, p, _ in self.sent], ["peers"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class BoundsTests(SynchronousTestCase):
    def test_panel_json_fits_one_amp_value(self) -> None:
        rows = [{"identity": f"peer-{i:08x}", "summary": "x" * 2000} for i in range(500)]
        text = P.bounded({"rows": rows, "total": len(rows)})
        self.assertLessEqual(len(text.encode("utf-8")), P.MAX_PANEL_BYTES)
        data = json.loads(text)
        self.assertEqual(data["total"], 500)
        self.assertLess(len(data["rows"]), 500)
        self.assertGreater(len(data["rows"]), 0)

    def test_task_detail_with_a_long_tail_fits_one_amp_value(self) -> None:
        tail = [{"at": 1.0 * i, "text": f"{i} " + "é\x1b" * 400} for i in range(500)]
        text = P.bounded_detail({"task_id": "t", "prompt": "p", "files": [], "tail": tail})
        self.assertLessEqual(len(text.encode("utf-8")), P.MAX_PANEL_BYTES)
        data = json.loads(text)
        self.assertGreater(len(data["tail"]), 20)
        self.assertLessEqual(len(data["tail"]), P.MAX_ROWS)
        self.assertTrue(data["tail"][-1]["text"].startswith("499 "))  # the newest kept
        self.assertLessEqual(max(len(t["text"]) for t in data["tail"]), 300)


class ControlSocketTests(SynchronousTestCase):
    """The real control factory of a node with the events layer attached."""

    def setUp(self) -> None:
        self.node = make_node(self, "me-00000001")
        self.clock = self.node.reactor
        self.hub, factory = control_with_events(self.node)
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.client, self.server, self.pump = connectedServerAndClient(
            ServerClass=lambda: factory.buildProtocol(None),
            ClientClass=lambda: FeedProtocol(lambda p, d: self.updates.append((p, d))),
        )

    def settle(self, secs: float = 0.0) -> None:
        self.pump.flush()
        self.clock.advance(secs)
        self.pump.flush()

    def subscribe(self) -> dict[str, Any]:
        d = self.client.callRemote(E.Subscribe, panels=["peers", "tasks", "hive"])
        self.settle()
        return self.successResultOf(d)

    def test_subscribe_then_pushed_on_change(self) -> None:
        self.assertEqual(self.subscribe(), {"identity": "me-00000001"})
        self.settle()
        self.assertEqual(sorted(p for p, _ in self.updates), ["hive", "peers", "tasks"])
        peers = dict(self.updates)["peers"]
        self.assertEqual(
            (peers["identity"], peers["rows"], peers["live"]), ("me-00000001", [], True)
        )
        self.updates.clear()
        # A peer is paired (another process wrote its key), then a dialer starts.
        self.node.keystore.save_key("laptop-a3f29b1c", b"k" * 32)
        self.settle(E.WATCH_SECS)
        self.settle(E.PUSH_INTERVAL_SECS)
        self.assertEqual(
            [(r["identity"], r["state"]) for r in self.updates[-1][1]["rows"]],
            [("laptop-a3f29b1c", "disconnected")],
        )
        self.node.mesh.dialing["laptop-a3f29b1c"] = "127.0.0.1:9847"
        self.settle(E.WATCH_SECS)
        self.settle(E.PUSH_INTERVAL_SECS)
        self.assertEqual(self.updates[-1][1]["rows"][0]["state"], "connecting")
        self.assertEqual({p for p, _ in self.updates}, {"peers"})

    def test_link_observer_pushes_without_the_watch(self) -> None:
        self.node.keystore.save_key("laptop-a3f29b1c", b"k" * 32)
        self.subscribe()
        self.settle(1)
        self.updates.clear()
        self.node.mesh.dialing["laptop-a3f29b1c"] = "127.0.0.1:9847"
        for cb in self.node.mesh._up:  # what Mesh.link_ready calls
            cb("laptop-a3f29b1c")
        self.settle(0)  # no watch period: the observer scheduled the push itself
        self.assertEqual(
            [(p, d["rows"][0]["state"]) for p, d in self.updates], [("peers", "connecting")]
        )

    def test_subscribing_again_replaces_and_registers_backpressure(self) -> None:
        self.subscribe()
        self.subscribe()
        self.assertEqual(len(self.hub.subscriptions), 1)
        producer = self.server.transport.producer
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        self.assertTrue(self.hub.subscriptions[0].paused)
        producer.resumeProducing()
        self.assertFalse(self.hub.subscriptions[0].paused)

    def test_status_counts_dashboards(self) -> None:
        from claudectl.control import commands as C

        self.subscribe()
        d = self.client.callRemote(C.Status)
        self.settle()
        self.assertEqual(json.loads(self.successResultOf(d)["status_json"])["dashboards"], 1)

    def test_closed_connection_unsubscribes(self) -> None:
        self.subscribe()
        self.settle()
        self.assertEqual(len(self.hub.subscriptions), 1)
        self.client.transport.loseConnection()
        self.settle(E.WATCH_SECS)
        self.assertEqual(self.hub.subscriptions, [])

    def test_task_detail_without_delegation(self) -> None:
        d = self.client.callRemote(E.TaskDetail, direction="out", key="task_1")
        errors: list[Any] = []
        d.addErrback(errors.append)
        self.settle()
        self.assertEqual(len(errors), 1)
        errors[0].trap(E.NoSuchTask)


class HivePanelTests(SynchronousTestCase):
    def test_empty_home(self) -> None:
        home = temp_home(self)
        panel = P.hive_panel(home, "me-00000001")
        self.assertEqual((panel["units"], panel["rows"], panel["recent"]), (0, [], []))
