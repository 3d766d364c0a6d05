"""
Tests for claudectl.relay.node.reconnect_policy: the reconnect schedule.

claudectl 0.64 computes ``min(60, 5 * 2**min(attempts, 4))`` after
incrementing ``attempts``, so it never waits 5 s and ignores
``reconnect_max_secs`` (defect W5; vector wire.backoff.delay_table).  The
mission asks for 5 -> 10 -> 20 -> 40 -> 60 s capped by ``reconnect_max_secs``.
"""

from __future__ import annotations

from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.config import RelayConfig
from claudectl.relay.node import FIRST_RETRY_SECS, reconnect_policy
from tests.common import vector


def claudectl_delay(attempts: int) -> int:
    """claudectl 0.64's formula (for the vector only; we do not use it)."""
    return min(60, 5 * 2 ** min(attempts, 4))


class PolicyTests(SynchronousTestCase):
    def test_claudectl_vector_is_what_claudectl_does(self) -> None:
        v = vector("wire.backoff.delay_table")
        self.assertEqual(
            [claudectl_delay(a) for a in v["input"]["attempts"]], v["expected"]["delay_secs"]
        )

    def test_mission_schedule(self) -> None:
        """Ours, for ClientService's failure counts 1..6 (defect W5 fixed)."""
        policy = reconnect_policy(RelayConfig().reconnect_max_secs, jitter=lambda: 0)
        self.assertEqual([policy(n) for n in range(1, 7)], [5, 10, 20, 40, 60, 60])
        self.assertEqual(FIRST_RETRY_SECS, 5)

    def test_first_retry_differs_from_claudectl(self) -> None:
        policy = reconnect_policy(60, jitter=lambda: 0)
        v = vector("wire.backoff.delay_table")
        # claudectl's first real retry (attempts=1 after increment) waits 10 s; ours 5 s.
        self.assertEqual(v["expected"]["delay_secs"][1], 10)
        self.assertEqual(policy(1), 5)

    def test_cap_follows_reconnect_max_secs(self) -> None:
        cases = {
            30: [5, 10, 20, 30, 30, 30],
            120: [5, 10, 20, 40, 80, 120, 120],
            300: [5, 10, 20, 40, 80, 160, 300],
            7: [5, 7, 7],
            1: [1, 1, 1],
        }
        for max_secs, expected in cases.items():
            policy = reconnect_policy(max_secs, jitter=lambda: 0)
            self.assertEqual([policy(n) for n in range(1, len(expected) + 1)], expected, max_secs)

    def test_huge_attempt_counts(self) -> None:
        policy = reconnect_policy(60, jitter=lambda: 0)
        self.assertEqual(policy(10_000), 60)
        self.assertEqual(policy(0), 5)  # defensive: treated as the first retry

    def test_jitter_added(self) -> None:
        policy = reconnect_policy(60, jitter=lambda: 0.25)
        self.assertEqual([policy(n) for n in (1, 5)], [5.25, 60.25])

    def test_default_jitter_small(self) -> None:
        policy = reconnect_policy(60)
        for n in range(1, 8):
            base = min(5 * 2 ** (n - 1), 60)
            self.assertTrue(base <= policy(n) <= base + 1, n)


class _Refused:
    """A client endpoint that always fails, recording when it was tried."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []

    def connect(self, factory: Factory) -> defer.Deferred:
        self.attempts.append(self.clock.seconds())
        return defer.fail(ConnectionRefusedError())


class ClientServiceScheduleTests(SynchronousTestCase):
    """The policy in the real ClientService: attempt times after the first failure."""

    def schedule(self, max_secs: int, until: float) -> list[float]:
        clock = Clock()
        endpoint = _Refused(clock)
        service = ClientService(
            endpoint,
            Factory.forProtocol(Protocol),
            retryPolicy=reconnect_policy(max_secs, jitter=lambda: 0),
            clock=clock,
        )
        service.startService()
        while clock.seconds() < until:
            clock.advance(1)
        self.successResultOf(service.stopService())
        return endpoint.attempts

    def test_schedule_default(self) -> None:
        # Gaps: 5, 10, 20, 40, 60, 60 ...
        self.assertEqual(self.schedule(60, 300), [0, 5, 15, 35, 75, 135, 195, 255])

    def test_schedule_capped(self) -> None:
        self.assertEqual(self.schedule(15, 60), [0, 5, 15, 30, 45, 60])
