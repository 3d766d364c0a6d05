# -*- test-case-name: tests.test_tap -*-
"""
The composition root: ``twistd claudectl-relay``'s options and the one
``makeService`` that both twistd and ``claudectl relay serve`` use.

It sits above every layer it wires and only composes: it builds the relay
node, hands it the pairing layer's invite store and PAKE responder, builds
the hive gossip, delegation, LAN discovery and control socket, gives each
the narrow collaborators it needs in its constructor, and registers what
they add to the control socket.  The service tree::

    RelayService (MultiService)
    ├── listener         StreamServerEndpointService(--listen, RelayFactory)
    ├── control          StreamServerEndpointService(unix:…/ctl.sock:mode=600, AMP)
    ├── hive             MultiService: gossip, gossip-poll, hive-distill
    ├── delegation       DelegationService (worker and controller)
    ├── events           EventsService (the dashboard's push channel)
    ├── dialer:<id>      ClientService per peer we dial (added at start)
    └── announcer        LAN discovery beacons, once the listener is bound
                         (when [relay] lan_discovery)

``makeService`` reads configuration and builds objects; nothing listens or
connects before ``startService``.  See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from claudectl.atomic import sweep_temp_files
from claudectl.changes import ChangeWatcher, ChangeWatcherService
from claudectl.config import Config, ConfigError, load_config, risky_settings
from claudectl.control import lagprobe
from claudectl.control.events import TaskAccess, events_service
from claudectl.control.notice import NoticeLocator
from claudectl.control.server import ControlRegistry, control_service
from claudectl.delegation.service import delegation_service
from claudectl.discovery.protocol import announcer_service
from claudectl.hive.gossip import Gossip, hive_service
from claudectl.home import Home
from claudectl.hub.peer import attach as attach_hubs
from claudectl.hub.peer import client_endpoint as hub_client_endpoint
from claudectl.pairing.invites import InviteStore
from claudectl.pairing.pake import PakeResponder
from claudectl.relay.address import AddressError, format_address, listen_endpoint_string
from claudectl.relay.admission import with_listen_backlog
from claudectl.relay.keystore import DamagedIdentity, KeyStore
from claudectl.relay.node import RelayFactory, RelayNode
from claudectl.relay.runinfo import remove_runinfo, write_runinfo
from claudectl.statestore import StateWriter, StateWriterService, freeze_startup_heap

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the claudectl relay: accept authenticated peers, keep links to "
        "paired peers up, gossip hive knowledge and run delegated tasks."
    )
    optParameters = [
        [
            "home",
            None,
            None,
            "Home directory (data in HOME/.claudectl, config in HOME/.config/claudectl). "
            "Default: $CLAUDECTL_HOME, else ~.",
        ],
        [
            "listen",
            None,
            None,
            "Endpoint to listen on, e.g. tcp:9847:interface=0.0.0.0 "
            "(default: from [relay] listen_addr / listen_port).",
        ],
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
        # Every ordinary mistake (home, config, listen endpoint) is a usage
        # error here, before twistd starts anything: twistd prints it as one
        # line instead of a traceback from makeService.
        home, config = resolve_config(self)
        self.resolved = (home, config, listen_string(self, config))


def check_home(home: Home) -> None:
    """Refuse a home that is a file, or whose data directory cannot be created or written."""
    import os

    if home.root.exists() and not home.root.is_dir():
        raise usage.UsageError(
            f"home {home.root} is not a directory (check --home / CLAUDECTL_HOME)"
        )
    path = home.relay
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise usage.UsageError(f"{path} is not a directory, so {home.data} cannot be used")
    if not os.access(path, os.W_OK | os.X_OK):
        raise usage.UsageError(f"{path} is not writable: claudectl keeps its data in {home.data}")


def listen_string(options: Any, config: Config) -> str:
    """The endpoint to listen on (--listen, else the config), checked by parsing it."""
    listen = options.get("listen")
    what = "--listen"
    if listen is None:
        what = "[relay] listen_addr / listen_port"
        try:
            listen = listen_endpoint_string(config.relay.listen_addr, config.relay.listen_port)
        except AddressError as e:
            where = ", ".join(config.sources) or "config"
            raise usage.UsageError(
                f'{where}: [relay] {e}; use an IP address such as "0.0.0.0" or "::"'
            ) from None
    try:
        # Parsing builds the endpoint without listening (ssl: reads its files).
        serverFromString(None, listen)
    except ImportError as e:
        raise usage.UsageError(
            f"{what} {listen!r} needs a module that is not installed "
            f"({e.name or e}); for ssl: install pyOpenSSL"
        ) from None
    except Exception as e:  # each endpoint parser has its own errors
        detail = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) else str(e)
        raise usage.UsageError(
            f"{what} {listen!r} is not a usable endpoint: {detail} "
            f"(e.g. tcp:9847:interface=0.0.0.0)"
        ) from None
    return listen


class RelayService(MultiService):
    """The top of the tree; starts the dialers once the children run."""

    def __init__(self, node: RelayNode) -> None:
        super().__init__()
        self.node = node

    def startService(self) -> None:
        # (not a "warning" field: the legacy observers take that for a Python warning)
        for problem in self.node.config.warnings:
            log.warn("{problem}", problem=problem)
        for problem in risky_settings(self.node.config, self.node.home.root):
            log.warn("{problem}", problem=problem)
        # Temporary files of writes a kill -9 interrupted (none of a live writer).
        for path in sweep_temp_files(self.node.home.state_dirs()):
            log.info("removed {path}, left by an interrupted write", path=str(path))
        super().startService()
        if self.node.tls is not None:
            # Make (or load) the TLS key and certificate now, not during the
            # first peer's handshake.  A failure is logged, not fatal: links
            # that need TLS then fail their handshake with the reason.
            try:
                self.node.tls.server()
            except Exception as e:
                log.error(
                    "TLS key and certificate unavailable ({error}); encrypted links "
                    "cannot be accepted",
                    error=f"{type(e).__name__}: {e}",
                )
        targets = self.node.auto_connect_targets()
        for peer, address in targets:
            if peer is None:
                log.info(
                    "auto_connect {address}: dialing; the key is chosen by the identity "
                    "the listener announces",
                    address=address,
                )
            else:
                log.info("keeping a link to {peer_id} at {address}", peer_id=peer, address=address)
            self.node.ensure_dialer(peer, address, self)
        # What start-up built (modules, classes, configuration) lives as long
        # as the service: out of the collector's walks (issue 13's stall budget).
        self.node.reactor.callWhenRunning(freeze_startup_heap)
        # Under twistd, startService runs before the reactor (and its signal
        # handlers): say "ready" only once it really runs.
        self.node.reactor.callWhenRunning(
            log.info,
            "claudectl relay {identity} ready ({count} outbound link(s) to keep)",
            identity=self.node.identity,
            count=len(targets),
        )

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
        #: Called with the bound TCP port once the listener is up.
        self.on_bound: list[Callable[[int], None]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        addr = port.getHost()
        if self.what == "relay" and not hasattr(addr, "port"):
            # A UNIX socket (no TCP listener): peers reach us through a hub only.
            log.info(
                "claudectl relay {identity} listening on {address} (no TCP port)",
                identity=self.node.identity,
                address=str(getattr(addr, "name", addr)),
            )
            return port
        if self.what == "relay":
            self.node.listening_ports.append(port)
            log.info(
                "claudectl relay {identity} listening on {address}",
                identity=self.node.identity,
                address=format_address(addr.host, addr.port),
            )
            write_runinfo(
                self.node.home,
                self.node.identity,
                [p.getHost().port for p in self.node.listening_ports],
            )
            if addr.host in ("0.0.0.0", "::") and not self.node.config.relay.require_encryption:
                log.warn(
                    "listening on every interface ({address}) while [relay] "
                    "require_encryption is off: anyone who can reach this port may try "
                    "to connect, and links to peers without TLS are not encrypted. Set "
                    "[relay] require_encryption = true, or listen_addr to one address "
                    '(e.g. "127.0.0.1")',
                    address=format_address(addr.host, addr.port),
                )
            for cb in list(self.on_bound):
                cb(addr.port)
        else:
            log.info("control socket at {path}", path=getattr(addr, "name", addr))
        return port


def resolve_config(options: Any) -> tuple[Home, Config]:
    home = Home.resolve(options.get("home"))
    check_home(home)
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
    resolved = getattr(options, "resolved", None)
    if resolved is None:  # options built by hand, not parsed
        home, config = resolve_config(options)
        resolved = (home, config, listen_string(options, config))
    home, config, listen = resolved
    _create_private_logfile(options)

    # The relay core, with the pairing layer's invites over the same keys.
    keystore = KeyStore(home)
    invites = InviteStore(home, keystore)
    try:
        node = RelayNode(
            home,
            config,
            reactor,
            keystore=keystore,
            invites=invites,
            pake=PakeResponder(invites, reactor),
            dial_via=hub_client_endpoint,
        )
    except DamagedIdentity as e:
        raise usage.UsageError(str(e)) from None
    top = RelayService(node)
    # The state files' writer thread and change notices (issue 13): first
    # children, so they stop last -- the writer waits for what the layers
    # queue while they stop.
    writer = StateWriter(reactor)
    changes = ChangeWatcher(reactor, reactor)
    StateWriterService(writer).setServiceParent(top)
    ChangeWatcherService(changes).setServiceParent(top)

    factory = RelayFactory(node)
    factory.noisy = False  # no "Starting factory" / "Stopping factory" lines
    listener = _ListeningService(
        node, serverFromString(reactor, with_listen_backlog(listen)), factory, "relay"
    )
    listener.setName("listener")
    listener.setServiceParent(top)

    # What the layers add to the control socket, registered below.
    registry = ControlRegistry()
    registry.add_locator(NoticeLocator(changes))
    if os.environ.get(lagprobe.ENV_VAR) == "1":  # scripts/bench_stall.py
        probe = lagprobe.LagProbe(reactor)
        lagprobe.LagProbeService(probe).setServiceParent(top)
        registry.add_locator(lagprobe.LagLocator(probe))
    control_service(node, registry).setServiceParent(top)
    compose_layers(node, registry, top, writer, changes)

    attach_hubs(node, registry, top)  # registrations at [relay] hubs; `via` in relay peers
    if config.relay.lan_discovery:
        listener.on_bound.append(_announcer_starter(node, top))
    return top


def compose_layers(
    node: RelayNode,
    registry: ControlRegistry,
    parent: MultiService,
    writer: StateWriter | None = None,
    changes: ChangeWatcher | None = None,
) -> None:
    """
    The layers above the relay core, over ``node``'s mesh, under ``parent``:
    hive gossip, delegation and the dashboard's push channel.  Each
    registers with ``registry`` what it adds to the control socket.  Their
    file work goes through ``writer`` (one writer thread), and ``changes``
    tells the hive what other processes changed; the trust level delegation
    and ``relay peers`` see is the hive's copy of trust.json
    (``registry.trust_of`` when the caller set one).
    """
    home, config, reactor = node.home, node.config, node.reactor
    gossip = Gossip(
        home,
        config,
        node.mesh,
        node.identity,
        reactor.seconds,
        reactor.callLater,
        writer=writer,
    )
    gossip.register()
    hive_service(gossip, reactor, changes).setServiceParent(parent)
    registry.add_peer_info(gossip.peer_info)
    registry.add_status(lambda: {"hive": dict(gossip.counters)})
    if registry.trust_of is None:
        registry.trust_of = gossip.trust_level
    trust_of = registry.trust_of

    delegation = delegation_service(
        home, config.delegation, node.mesh, node.identity, reactor, trust_of, writer
    )
    delegation.setServiceParent(parent)
    registry.add_locator(delegation.locator)
    registry.add_status(delegation.status)

    # After the layers it reports on: its frame handlers run after theirs.
    events = events_service(node, registry, TaskAccess(delegation.controller, delegation.worker))
    events.setServiceParent(parent)
    registry.add_connection_locator(events.locator_for)
    registry.add_status(events.status)


def _create_private_logfile(options: Any) -> None:
    """
    Create twistd's ``--logfile`` with mode 0600 if it does not exist yet.

    twistd opens the log before it applies its daemon umask (0077), so the
    file would be created 0644; makeService runs before that, and files made by
    rotation later are created under the umask.
    """
    import os

    parent = getattr(options, "parent", None)
    if parent is None or not hasattr(parent, "get") or parent.get("syslog"):
        return
    name = parent.get("logfile")
    if not name and not parent.get("nodaemon"):
        name = "twistd.log"  # twistd's default for a daemon
    if not name or name == "-":
        return
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as e:
        raise usage.UsageError(f"cannot create the log file {name}: {e.strerror}") from None


def _announcer_starter(node: RelayNode, parent: MultiService) -> Callable[[int], None]:
    """LAN discovery beacons for ``node``, started once its listener knows its port."""

    def start(port: int) -> None:
        svc = announcer_service(node.config.relay, node.identity, port, node.reactor)
        svc.setName("announcer")
        svc.setServiceParent(parent)

    return start
