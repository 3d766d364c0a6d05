# -*- test-case-name: tests.test_statestore -*-
"""
The service measures its own event-loop lag (issue 13's stall budget).

With ``CLAUDECTL_LAG_PROBE=1`` in its environment, ``relay serve`` runs a
:class:`LagProbe`: a :class:`~twisted.internet.task.LoopingCall` every
:data:`PROBE_SECS` that records how much later than asked each call ran.
Anything that holds the reactor (a blocking ``flock``, an ``fsync``, a long
merge) shows as lag.  ``scripts/bench_stall.py`` reads and resets the
figures over the control socket (:class:`~claudectl.control.commands.ReactorLag`).
Off by default: a 1 ms timer costs CPU.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.protocols import amp

from claudectl.control.commands import ReactorLag

ENV_VAR = "CLAUDECTL_LAG_PROBE"
PROBE_SECS = 0.001
#: Lag samples kept between resets (about 100 s of a quiet loop).
MAX_SAMPLES = 100_000


class LagProbe:
    def __init__(self, clock: Any, interval: float = PROBE_SECS) -> None:
        self.clock = clock
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=MAX_SAMPLES)
        self.max_lag = 0.0
        self._last: float | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        self._last = self.clock.seconds()
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now = self.clock.seconds()
        if self._last is not None:
            lag = max(0.0, now - self._last - self.interval)
            self.samples.append(lag)
            self.max_lag = max(self.max_lag, lag)
        self._last = now

    def reset(self) -> None:
        self.samples.clear()
        self.max_lag = 0.0
        # The time spent reporting is not the next period's lag.
        self._last = None

    def report(self) -> dict[str, Any]:
        ordered = sorted(self.samples)

        def pct(p: float) -> float:
            if not ordered:
                return 0.0
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

        return {
            "max_ms": round(self.max_lag * 1000, 3),
            "p99_ms": round(pct(0.99), 3),
            "p50_ms": round(pct(0.50), 3),
            "samples": len(ordered),
        }


class LagProbeService(Service):
    name = "lag-probe"  # type: ignore[assignment]  # Service declares name as None

    def __init__(self, probe: LagProbe) -> None:
        self.probe = probe

    def startService(self) -> None:
        super().startService()
        self.probe.start()

    def stopService(self) -> Any:
        self.probe.stop()
        return super().stopService()


class LagLocator(amp.CommandLocator):
    def __init__(self, probe: LagProbe) -> None:
        self.probe = probe

    @ReactorLag.responder
    def lag(self, reset: bool | None = None) -> dict[str, Any]:
        text = json.dumps(self.probe.report())
        if reset:
            self.probe.reset()
        return {"lag_json": text}
