"""``--logfile FILE`` for relay serve and relay hub: info and up, cleaned."""

from __future__ import annotations

from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from claudectl.cli.relay_cmds import _clean_file_observer


class LogFileObserverTests(SynchronousTestCase):
    def test_debug_events_are_not_written_and_peer_text_is_cleaned(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        log = Logger(observer=_clean_file_observer(str(path)))
        for i in range(1000):  # a flood of refused connections
            log.debug("dropped connection from {ip}", ip=f"203.0.113.{i % 250}")
        log.info("peer said {text}", text="hi\x1b[2J\x1b]0;owned\x07")
        text = path.read_text()
        self.assertNotIn("dropped connection", text)
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertIn("peer said hi", text)
        self.assertNotIn("\x1b", text)

    def test_twistd_takes_the_observers_as_they_are(self) -> None:
        # Not wrapped as legacy observers (twistd does that to callables that
        # do not declare twisted.logger.ILogObserver: a cost per event).
        from twisted.logger import ILogObserver

        from claudectl.cli.relay_cmds import _clean_stdout_observer

        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        for observer in (_clean_file_observer(str(path)), _clean_stdout_observer()):
            self.assertTrue(ILogObserver.providedBy(observer))
