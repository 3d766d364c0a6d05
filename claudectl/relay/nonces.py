# -*- test-case-name: tests.test_tls -*-
"""
The nonces this node issued lately (listener challenges, connector
cnonces).  A node asked to answer one of them is being used as an oracle
for itself -- a reflection attack -- and refuses (protocol.md, "Refusing
your own challenge").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class IssuedNonces:
    """A bounded, expiring set of nonces."""

    def __init__(
        self, now: Callable[[], float], ttl: float = 65.0, max_entries: int = 65536
    ) -> None:
        self._now = now
        self._ttl = ttl
        self._max = max_entries
        self._issued: OrderedDict[str, float] = OrderedDict()

    def add(self, nonce: str) -> None:
        now = self._now()
        self._expire(now)
        self._issued[nonce] = now + self._ttl
        self._issued.move_to_end(nonce)
        while len(self._issued) > self._max:
            self._issued.popitem(last=False)

    def issued(self, nonce: str) -> bool:
        expiry = self._issued.get(nonce)
        return expiry is not None and expiry >= self._now()

    def _expire(self, now: float) -> None:
        while self._issued:
            nonce, expiry = next(iter(self._issued.items()))
            if expiry >= now:
                return
            del self._issued[nonce]

    def __len__(self) -> int:
        return len(self._issued)
