# -*- test-case-name: tests.test_tap -*-
"""
``twistd claudectl-relay``: the options and the one ``makeService`` that both
twistd and ``claudectl relay serve`` use.

The service tree::

    RelayService (MultiService)
    ├── listener     StreamServerEndpointService(--listen, RelayFactory)
    ├── control      StreamServerEndpointService(unix:…/ctl.sock:mode=600, AMP)
    ├── dialer:<id>  ClientService per peer we dial (added at start)
    ├── announcer    LAN discovery beacons (when [relay] lan_discovery)
    └── …            the hive gossip and delegation layers

``makeService`` reads configuration and builds objects; nothing listens or
connects before ``startService``.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from claudectl.config import Config, ConfigError, load_config
from claudectl.home import Home
from claudectl.relay.address import AddressError, format_address, listen_endpoint_string
from claudectl.relay.node import RelayFactory, RelayNode
from claudectl.relay.runinfo import remove_runinfo, write_runinfo

log = Logger()

#: Layers attached to every node, by module name; each has ``attach(node, parent)``.
SUBSYSTEMS = (
    "claudectl.hive.gossip",
    "claudectl.delegation.service",
    "claudectl.control.events",  # after the layers it reports on
)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the claudectl relay: accept authenticated peers, keep links to "
                "paired peers up, gossip hive knowledge and run delegated tasks.")
    optParameters = [
        ["home", None, None,
         "Home directory (data in HOME/.claudectl, config in HOME/.config/claudectl). "
         "Default: $CLAUDECTL_HOME, else ~."],
        ["listen", None, None,
         "Endpoint to listen on, e.g. tcp:9847:interface=0.0.0.0 "
         "(default: from [relay] listen_addr / listen_port)."],
        ["port", "p", None, "TCP port to listen on (overrides [relay] listen_port)."],
    ]
    optFlags = [
        ["no-discovery", None, "Do not announce this instance on the LAN."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["config"] = []

    def opt_config(self, path: str) -> None:
        """Extra TOML config file (may be repeated)."""
        if not Path(path).exists():
            raise usage.UsageError(f"config file not found: {path}")
        self["config"].append(path)

    def postOptions(self) -> None:
        if self["port"] is not None:
            try:
                port = int(self["port"])
            except ValueError:
                raise usage.UsageError("--port must be an integer") from None
            if not 0 <= port <= 65535:
                raise usage.UsageError("--port must be 0-65535")
            self["port"] = port
        if self["listen"] is not None and self["port"] is not None:
            raise usage.UsageError("give --listen or --port, not both")


class RelayService(MultiService):
    """The top of the tree; starts the dialers once the children run."""

    def __init__(self, node: RelayNode) -> None:
        super().__init__()
        self.node = node

    def startService(self) -> None:
        super().startService()
        if self.node.tls is not None:
            # Make (or load) the TLS key and certificate now, not during the
            # first peer's handshake.  A failure is logged, not fatal: links
            # that need TLS then fail their handshake with the reason.
            try:
                self.node.tls.server()
            except Exception as e:
                log.error("TLS key and certificate unavailable ({error}); encrypted links "
                          "cannot be accepted", error=f"{type(e).__name__}: {e}")
        targets = self.node.auto_connect_targets()
        for peer, address in targets:
            log.info("keeping a link to {peer_id} at {address}", peer_id=peer, address=address)
            self.node.ensure_dialer(peer, address, self)
        # Under twistd, startService runs before the reactor (and its signal
        # handlers): say "ready" only once it really runs.
        self.node.reactor.callWhenRunning(
            log.info, "claudectl relay {identity} ready ({count} outbound link(s) to keep)",
            identity=self.node.identity, count=len(targets))

    def stopService(self) -> Any:
        # Children first (listeners stop accepting, dialers stop redialing),
        # then close the links that are still open.
        remove_runinfo(self.node.home)
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: self.node.close_all())
        return d


class _ListeningService(StreamServerEndpointService):
    """Logs the bound address and records the port on the node."""

    def __init__(self, node: RelayNode, endpoint: Any, factory: Any, what: str) -> None:
        super().__init__(endpoint, factory)
        self.node = node
        self.what = what
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        addr = port.getHost()
        if self.what == "relay":
            self.node.listening_ports.append(port)
            log.info("claudectl relay {identity} listening on {address}",
                     identity=self.node.identity,
                     address=format_address(addr.host, addr.port))
            write_runinfo(self.node.home, self.node.identity,
                          [p.getHost().port for p in self.node.listening_ports])
            for cb in list(self.node.on_listening):
                cb(addr.port)
        else:
            log.info("control socket at {path}", path=getattr(addr, "name", addr))
        return port


def resolve_config(options: Any) -> tuple[Home, Config]:
    home = Home.resolve(options.get("home"))
    try:
        config = load_config(home, Path.cwd(), options.get("config") or [])
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    relay = config.relay
    if options.get("port") is not None:
        relay = dataclasses.replace(relay, listen_port=options["port"])
    if options.get("no-discovery"):
        relay = dataclasses.replace(relay, lan_discovery=False)
    return home, dataclasses.replace(config, relay=relay)


def makeService(options: Any, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    home, config = resolve_config(options)
    listen = options.get("listen")
    if listen is None:
        try:
            listen = listen_endpoint_string(config.relay.listen_addr, config.relay.listen_port)
        except AddressError as e:
            raise usage.UsageError(str(e)) from None
    node = RelayNode(home, config, reactor)
    top = RelayService(node)

    listener = _ListeningService(node, serverFromString(reactor, listen), RelayFactory(node),
                                 "relay")
    listener.setName("listener")
    listener.setServiceParent(top)

    from claudectl.control.server import control_service

    control_service(node).setServiceParent(top)

    for name in SUBSYSTEMS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that layer is not part of this build
            raise
        module.attach(node, top)

    if config.relay.lan_discovery:
        _attach_announcer(node, top)
    return top


def _attach_announcer(node: RelayNode, parent: MultiService) -> None:
    try:
        from claudectl.discovery.protocol import announcer_service
    except ImportError:
        return

    def start(port: int) -> None:
        svc = announcer_service(node.config.relay, node.identity, port, node.reactor)
        svc.setName("announcer")
        svc.setServiceParent(parent)

    node.on_listening.append(start)
