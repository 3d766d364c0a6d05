"""claudectl.logbudget: how many log lines bad input may cause."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from claudectl.logbudget import OTHERS, LogBudget


class LogBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(120)  # the start of a minute
        self.exhausted: list[str] = []
        self.budget = LogBudget(self.clock.seconds, 3, self.exhausted.append, max_keys=2)

    def test_per_key_per_minute(self) -> None:
        verdicts = [self.budget.allow("a") for _ in range(6)]
        self.assertEqual(verdicts, [True, True, True, False, False, False])
        self.assertEqual(self.exhausted, ["a"])  # said once, not per refusal
        self.assertTrue(self.budget.allow("b"))  # another key has its own budget
        self.clock.advance(60)  # a new minute: everyone starts again
        self.assertTrue(self.budget.allow("a"))
        self.assertEqual(self.exhausted, ["a"])

    def test_many_keys_share_one_budget(self) -> None:
        """A flood from many addresses cannot buy a budget (and memory) per address."""
        self.assertTrue(self.budget.allow("a"))
        self.assertTrue(self.budget.allow("b"))
        verdicts = [self.budget.allow(f"addr{i}") for i in range(10)]
        self.assertEqual(verdicts, [True] * 3 + [False] * 7)
        self.assertEqual(self.exhausted, [OTHERS])
