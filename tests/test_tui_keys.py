"""
The dashboard's keys and layout without a terminal: urwid widgets rendered
to canvases, a fake backend recording what the keys asked for.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from claudectl.tui.app import Dashboard

PEERS = {
    "identity": "me-00000001",
    "live": True,
    "total": 2,
    "rows": [
        {
            "identity": "laptop-a3f2",
            "state": "connected",
            "trust": 0.8,
            "bytes_up": 12288,
            "bytes_down": 8192,
            "transport": "tls1.3",
            "last_seen": 95,
            "address": "10.0.0.2:9847",
        },
        {
            "identity": "ci-runner-9d1e",
            "state": "connecting",
            "trust": 0.5,
            "bytes_up": 43008,
            "bytes_down": 0,
            "transport": None,
            "last_seen": 0,
            "address": "10.0.0.3:9847",
        },
    ],
}
TASKS = {
    "total": 1,
    "rows": [
        {
            "dir": "out",
            "key": "task_1",
            "task_id": "task_1",
            "peer": "laptop-a3f2",
            "state": "running",
            "elapsed": 65,
            "tokens": 12345,
            "cost": 0.04,
            "summary": "Running the tests",
            "version": 3,
        }
    ],
}
HIVE = {
    "units": 3,
    "local_units": 2,
    "rows": [
        {"origin": "me-00000001", "local": True, "units": 2},
        {"origin": "laptop-a3f2", "local": False, "tier": "Confirmed", "trust": 0.8, "units": 1},
    ],
    "last_sync": [],
    "recent": [],
}


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            if name == "disconnect" and args == ("boom",):
                raise RuntimeError("kaboom")
            self.calls.append((name, *args))

        return record


class DashboardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend()
        self.ui = Dashboard(self.backend, now=lambda: 100.0)
        self.ui.apply("peers", PEERS)
        self.ui.apply("tasks", TASKS)
        self.ui.apply("hive", HIVE)

    def screen(self, cols: int = 80, rows: int = 24) -> list[str]:
        canvas = self.ui.top.render((cols, rows), focus=True)
        return [line.decode("utf-8") for line in canvas.text]

    def key(self, *keys: str) -> None:
        for k in keys:
            self.ui.top.keypress((80, 24), k)

    def test_all_three_panels_at_80x24(self) -> None:
        text = "\n".join(self.screen())
        self.assertIn("Peers (1/2 connected)", text)
        self.assertIn("● laptop-a3f2    connected  trust:0.8  ↑12 ↓8 kb", text)
        self.assertIn("◐ ci-runner-9d1e connecting trust:0.5  ↑42 ↓0 kb", text)
        self.assertIn("→ running   laptop-a3f2", text)
        self.assertIn("Hive (3 units)", text)

    def test_toggle_keys(self) -> None:
        self.key("p")
        self.assertNotIn("Peers", "\n".join(self.screen()))
        self.key("t", "h")
        self.assertIn("All panels are hidden", "\n".join(self.screen()))
        self.key("p")
        self.assertIn("Peers (1/2 connected)", "\n".join(self.screen()))

    def test_destructive_peer_actions_ask_first(self) -> None:
        self.key("d")
        self.assertEqual(self.backend.calls, [])
        self.assertIn("Disconnect from laptop-a3f2?", "\n".join(self.screen()))
        self.key("n")
        self.assertIsNone(self.ui.dialog)
        self.assertEqual(self.backend.calls, [])
        self.key("j", "f", "y")  # the second peer
        self.assertEqual(self.backend.calls, [("forget", "ci-runner-9d1e")])

    def test_connect_trust_and_invite(self) -> None:
        self.key("c")
        self.key("T", "0", ".", "7", "enter")
        self.key("i")
        self.assertEqual(
            self.backend.calls,
            [
                ("connect", "laptop-a3f2", "10.0.0.2:9847"),
                ("set_trust", "laptop-a3f2", "0.7"),
                ("make_invite",),
            ],
        )

    def test_task_keys(self) -> None:
        self.key("tab", "enter")
        self.key("s")
        self.assertEqual(self.backend.calls, [("open_task", "out", "task_1")])
        self.key("y")
        self.key("n", *"hurry", "enter")
        self.assertEqual(
            self.backend.calls[1:],
            [
                ("task_action", "out", "task_1", "stop", "stopped from the dashboard"),
                ("task_action", "out", "task_1", "nudge", "hurry"),
            ],
        )

    def test_an_error_goes_to_the_status_line(self) -> None:
        self.ui.apply("peers", {"rows": [dict(PEERS["rows"][0], identity="boom")], "total": 1})
        self.key("d", "y")
        self.assertIn("error: RuntimeError: kaboom", "\n".join(self.screen()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bad_data_does_not_break_the_screen(self) -> None:
        self.ui.apply("peers", {"rows": "not a list", "total": "x"})
        self.ui.apply("tasks", {"rows": [{"dir": 1, "state": None, "tokens": "many"}]})
        text = "\n".join(self.screen())
        self.assertIn("Remote tasks", text)

    def test_quit(self) -> None:
        self.key("q")
        self.assertTrue(self.ui.done.called)
