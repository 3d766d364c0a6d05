"""The service's own event-loop lag probe (claudectl.control.lagprobe)."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.control.lagprobe import LagLocator, LagProbe, LagProbeService


class LagProbeTests(SynchronousTestCase):
    def test_service_measures_late_ticks_and_the_locator_reports_and_resets(self) -> None:
        clock = Clock()
        probe = LagProbe(clock, interval=0.001)
        service = LagProbeService(probe)
        service.startService()
        self.assertTrue(service.running)
        clock.advance(0.001)  # on time
        clock.advance(0.051)  # a tick 50 ms late: the reactor was held
        clock.advance(0.001)
        locator = LagLocator(probe)
        report = json.loads(locator.lag(reset=False)["lag_json"])
        self.assertEqual(report["samples"], 3)
        self.assertAlmostEqual(report["max_ms"], 50.0, places=3)
        self.assertAlmostEqual(report["p50_ms"], 0.0, places=3)
        again = json.loads(locator.lag(reset=True)["lag_json"])
        self.assertEqual(again, report)
        self.assertEqual(json.loads(locator.lag()["lag_json"])["samples"], 0)
        # After a reset the first tick is not counted as lag (no time base).
        clock.advance(0.2)
        self.assertEqual(json.loads(locator.lag()["lag_json"])["max_ms"], 0.0)
        service.stopService()
        self.assertFalse(service.running)
        clock.advance(1.0)
        self.assertEqual(len(probe.samples), 0)  # stopped: no more ticks

    def test_empty_report(self) -> None:
        self.assertEqual(
            LagProbe(Clock()).report(), {"max_ms": 0.0, "p99_ms": 0.0, "p50_ms": 0.0, "samples": 0}
        )
