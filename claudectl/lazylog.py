# -*- test-case-name: tests.test_hooks_entry -*-
"""
A :class:`twisted.logger.Logger` made on first use.

Modules that the Claude Code hooks import (:mod:`claudectl.hooks`) must not
import Twisted: a hook runs on every tool call and starts a fresh Python
each time.  ``log = LazyLogger(__name__)`` behaves like ``log = Logger()``
at module level (same namespace, same events) but imports
:mod:`twisted.logger` only when something is logged.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """Stands in for a module-level ``Logger()``; the real one is built lazily."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._logger: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._logger is None:
            from twisted.logger import Logger

            self._logger = Logger(namespace=self._namespace)
        return getattr(self._logger, name)
