# -*- test-case-name: tests.test_hub -*-
"""
``twistd claudectl-hub`` (and ``claudectl relay hub``): the options and the
one ``makeService``.  The hub holds no key and reads no config file: all it
needs is on the command line (docs/hub.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from claudectl.hub import wire
from claudectl.hub.server import Hub, HubFactory, HubLimits

log = Logger()

DEFAULT_LISTEN = f"tcp:{wire.DEFAULT_HUB_PORT}"
#: The hub logs its counters this often (when they changed).
STATUS_LOG_INTERVAL_SECS = 600.0


def _positive_int(name: str, text: str, low: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be an integer") from None
    if value < low:
        raise usage.UsageError(f"--{name} must be at least {low}")
    return value


def read_token_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise usage.UsageError(f"cannot read the token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise usage.UsageError(f"the token file {path} is not UTF-8 text") from None
    return text


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a claudectl NAT hub: peers register outbound and the hub splices "
        "their links, forwarding bytes it cannot read (TLS runs end to end)."
    )
    optParameters = [
        ["listen", None, DEFAULT_LISTEN, "Endpoint to listen on (e.g. tcp:9849:interface=::)."],
        ["token", None, None, "Access token peers must present to register (or --token-file)."],
        ["token-file", None, None, "File holding the access token (first line)."],
        ["max-registrations", None, "10000", "Registered identities at most."],
        ["max-channels", None, "64", "Channels (open and waiting) per registered identity."],
        [
            "rate",
            None,
            str(128 * 1024 * 1024),
            "Bytes per second per registered identity, all its channels (0: no limit).",
        ],
        ["channel-idle", None, "600", "Seconds before a silent spliced channel is closed."],
        ["capture-dir", None, None, "Debugging: write each channel's bytes to files here."],
    ]

    def postOptions(self) -> None:
        if self["token"] is not None and self["token-file"] is not None:
            raise usage.UsageError("give --token or --token-file, not both")
        token = self["token"]
        if self["token-file"] is not None:
            token = read_token_file(self["token-file"])
        if token is not None and len(token) > wire.MAX_TOKEN_CHARS:
            raise usage.UsageError(f"the token is longer than {wire.MAX_TOKEN_CHARS} characters")
        self["token"] = token or ""
        self.limits = HubLimits(
            max_registrations=_positive_int("max-registrations", self["max-registrations"], 1),
            max_channels_per_registration=_positive_int("max-channels", self["max-channels"], 1),
            bytes_per_sec_per_registration=_positive_int("rate", self["rate"]),
            channel_idle_secs=float(_positive_int("channel-idle", self["channel-idle"], 1)),
        )
        try:
            serverFromString(None, self["listen"])
        except Exception as e:
            raise usage.UsageError(
                f"--listen {self['listen']!r} is not a usable endpoint: {e} (e.g. {DEFAULT_LISTEN})"
            ) from None
        if self["capture-dir"] is not None and not Path(self["capture-dir"]).is_dir():
            raise usage.UsageError(f"--capture-dir {self['capture-dir']} is not a directory")


class _HubListener(StreamServerEndpointService):
    def __init__(self, endpoint: Any, factory: Any, hub: Hub) -> None:
        super().__init__(endpoint, factory)
        self.hub = hub
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        addr = port.getHost()
        log.info(
            "claudectl hub listening on {host}:{port}",
            host=getattr(addr, "host", "?"),
            port=getattr(addr, "port", "?"),
        )
        if not self.hub.token:
            log.warn("no --token: anyone who can reach this hub may register an identity")
        return port


def makeService(options: Any, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    limits = getattr(options, "limits", None) or HubLimits()
    capture = options.get("capture-dir")
    hub = Hub(
        reactor, options.get("token") or "", limits, capture_dir=Path(capture) if capture else None
    )
    top = MultiService()
    listener = _HubListener(serverFromString(reactor, options["listen"]), HubFactory(hub), hub)
    listener.setName("listener")
    listener.setServiceParent(top)
    last: list[dict[str, Any]] = [{}]

    def log_status() -> None:
        try:
            status = hub.status()
            if status != last[0]:
                last[0] = status
                log.info(
                    "hub status: {registrations} registration(s), {channels} channel(s), "
                    "{pending} waiting, {bytes_forwarded} bytes forwarded, refused {refused}",
                    **status,
                )
        except Exception:  # the LoopingCall under TimerService stops at the first error
            log.failure("hub status log failed")

    timer = TimerService(STATUS_LOG_INTERVAL_SECS, log_status)
    timer.clock = reactor
    timer.setName("status-log")
    timer.setServiceParent(top)
    top.hub = hub  # type: ignore[attr-defined]
    return top
