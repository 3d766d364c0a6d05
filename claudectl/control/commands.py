# -*- test-case-name: tests.test_control -*-
"""
AMP commands of the relay core's control channel (``claudectl relay …`` ↔
the running service).  Structured results travel as JSON text in a
``Unicode`` value.  AMP caps a value at 65,535 bytes, so the answers that
grow with the number of peers (``Status``, ``Peers``) are paged: the first
call (``offset`` 0 or absent) takes a snapshot of the whole JSON text on
that connection and returns its first :data:`PAGE_CHARS` characters; while
``next_offset`` is present, the caller asks again with it and concatenates
(:func:`claudectl.control.client.call_paged`).

Layers define their own commands next to their code (for example
:mod:`claudectl.delegation.commands`) and register a locator on the node.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.protocols import amp

#: Characters of JSON text per paged answer (json.dumps writes ASCII only,
#: so this is also its size in bytes, under AMP's 65,535).
PAGE_CHARS = 60_000


class NotPairedError(Exception):
    pass


class LinkFailed(Exception):
    pass


class NoSuchPeer(Exception):
    pass


class BadRequest(Exception):
    pass


ERRORS: dict[type[Exception], bytes] = {
    NotPairedError: b"NOT_PAIRED",
    LinkFailed: b"LINK_FAILED",
    NoSuchPeer: b"NO_SUCH_PEER",
    BadRequest: b"BAD_REQUEST",
}


class Status(amp.Command):
    """The node: identity, listening addresses, uptime, counters (JSON)."""

    arguments = [(b"offset", amp.Integer(optional=True))]
    response = [(b"status_json", amp.Unicode()), (b"next_offset", amp.Integer(optional=True))]
    errors = ERRORS


class Peers(amp.Command):
    """Every known peer with its live state (JSON array)."""

    arguments = [(b"offset", amp.Integer(optional=True))]
    response = [(b"peers_json", amp.Unicode()), (b"next_offset", amp.Integer(optional=True))]
    errors = ERRORS


class Connect(amp.Command):
    """Authenticate to ``address`` and keep the link up (a dialer)."""

    arguments = [(b"address", amp.Unicode()), (b"peer", amp.Unicode(optional=True))]
    response = [
        (b"peer", amp.Unicode()),
        (b"mode", amp.Unicode()),
        (b"already", amp.Boolean()),
        # The address the service dials from now on, and the one a
        # confirmed new address replaced ("" if none).
        (b"address", amp.Unicode(optional=True)),
        (b"previous", amp.Unicode(optional=True)),
    ]
    errors = ERRORS


class Join(amp.Command):
    """
    First contact with an inviter: ``kind`` is ``key`` (invite link or pair
    code: ``secret_hex`` is the PSK) or ``pake`` (relay code or word phrase:
    ``secret_hex`` is the one-time password).  On success the key and the
    address are stored and the link is kept up.
    """

    arguments = [
        (b"address", amp.Unicode()),
        (b"kind", amp.Unicode()),
        (b"secret_hex", amp.Unicode()),
        (b"expected_peer", amp.Unicode(optional=True)),
    ]
    response = [(b"peer", amp.Unicode()), (b"mode", amp.Unicode())]
    errors = ERRORS


class Disconnect(amp.Command):
    """Drop the link to a peer and stop redialing it (the pairing stays)."""

    arguments = [(b"peer", amp.Unicode())]
    response = [
        (b"was_connected", amp.Boolean()),
        # What the service did: dropped a link, stopped a dialer.
        (b"dropped_link", amp.Boolean(optional=True)),
        (b"stopped_dialer", amp.Boolean(optional=True)),
    ]
    errors = ERRORS


class Forgotten(amp.Command):
    """The CLI removed a peer's key: drop its link and dialer."""

    arguments = [(b"peer", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = ERRORS


class StateChanged(amp.Command):
    """
    The CLI changed state files (``hive import``, ``hive distill --force``,
    ``hive trust``…): the service reads them again now instead of waiting
    for the change notice (:mod:`claudectl.control.notice`).
    """

    arguments = [(b"names", amp.ListOf(amp.Unicode()))]
    response = [(b"watched", amp.Integer())]
    errors = ERRORS


class ReactorLag(amp.Command):
    """
    The service's event-loop lag since the last reset, as JSON (``max_ms``,
    ``p99_ms``, ``p50_ms``, ``samples``); only when the service runs with
    ``CLAUDECTL_LAG_PROBE=1`` (see :mod:`claudectl.control.lagprobe`).
    """

    arguments = [(b"reset", amp.Boolean(optional=True))]
    response = [(b"lag_json", amp.Unicode())]
    errors = ERRORS
