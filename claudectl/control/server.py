# -*- test-case-name: tests.test_control -*-
"""
The control socket: ``unix:<run dir>/ctl.sock:mode=600:lockfile=1`` serving
AMP.  The directory is created 0700 first (the mode is applied after bind).
Responders wrap the node; the layers' locators are consulted in turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from claudectl import __version__
from claudectl.control import commands as C
from claudectl.control.paths import control_socket_path, ensure_socket_dir, remove_fallback_dir
from claudectl.relay.handshake import HandshakeFailed, KeyAuth, PakeAuth
from claudectl.relay.node import NotPaired, RelayNode
from claudectl.relay.peers_view import peer_rows

log = Logger()


class ControlRegistry:
    """
    What the layers above the relay add to the control socket: their AMP
    locators, their fields in ``relay status`` / ``relay peers``, and the
    trust level shown per peer.  The composition root fills it with explicit
    registration calls; nothing else changes it.
    """

    def __init__(self, trust_of: Callable[[str], float] | None = None) -> None:
        #: ``trust_of(peer_id) -> float`` for ``relay peers`` (the hive's trust book).
        self.trust_of = trust_of
        #: AMP ``CommandLocator``s of the layers (delegation, …).
        self.locators: list[amp.CommandLocator] = []
        #: ``make(amp_protocol) -> CommandLocator``: locators that need their connection.
        self.connection_locators: list[Callable[[amp.AMP], amp.CommandLocator]] = []
        #: Extra fields for ``relay status`` and per peer for ``relay peers``.
        self.status_providers: list[Callable[[], dict[str, Any]]] = []
        self.peer_info_providers: list[Callable[[str], dict[str, Any]]] = []

    def add_locator(self, locator: amp.CommandLocator) -> None:
        self.locators.append(locator)

    def add_connection_locator(self, make: Callable[[amp.AMP], amp.CommandLocator]) -> None:
        self.connection_locators.append(make)

    def add_status(self, provider: Callable[[], dict[str, Any]]) -> None:
        self.status_providers.append(provider)

    def add_peer_info(self, provider: Callable[[str], dict[str, Any]]) -> None:
        self.peer_info_providers.append(provider)


class RelayLocator(amp.CommandLocator):
    def __init__(
        self, node: RelayNode, parent: Any = None, registry: ControlRegistry | None = None
    ) -> None:
        super().__init__()
        self.node = node
        self.parent = parent
        self.registry = registry if registry is not None else ControlRegistry()
        #: The JSON text of a paged answer, per command, while it is read.
        self._paged: dict[str, str] = {}

    def _page(self, key: str, offset: int | None, make: Any) -> dict[str, Any]:
        """One page of a JSON answer; offset 0 (or none) takes a new snapshot."""
        if not offset or key not in self._paged:
            self._paged[key] = json.dumps(make())
            offset = 0
        text = self._paged[key]
        if offset < 0 or offset > len(text):
            raise C.BadRequest(f"offset {offset} is outside the answer")
        end = min(len(text), offset + C.PAGE_CHARS)
        out: dict[str, Any] = {key: text[offset:end]}
        if end < len(text):
            out["next_offset"] = end
        else:
            del self._paged[key]
        return out

    @C.Status.responder
    def status(self, offset: int | None = None) -> dict[str, Any]:
        return self._page("status_json", offset, self._status)

    def _status(self) -> dict[str, Any]:
        node = self.node
        ports = []
        for p in node.listening_ports:
            h = p.getHost()
            ports.append(f"{h.host}:{h.port}")
        data = {
            "identity": node.identity,
            "version": __version__,
            "listening": ports,
            "uptime_secs": int(node.clock.seconds() - node.started_at),
            "connected": node.mesh.connected_peers(),
            "dialing": sorted(node.dialers),
            "rejections": dict(node.admission.rejections),
            "home": str(node.home.root),
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "peer": w.peer_id,
                    "sessions": w.sessions,
                    "updated_at": int(w.updated_at),
                }
                for w in node.workers.current()
            ],
        }
        for provider in self.registry.status_providers:
            try:
                data.update(provider())
            except Exception:
                log.failure("status provider failed")
        return data

    @C.Peers.responder
    def peers(self, offset: int | None = None) -> dict[str, Any]:
        return self._page(
            "peers_json",
            offset,
            lambda: peer_rows(
                self.node.keystore,
                self.node.mesh,
                self.registry.trust_of,
                self.registry.peer_info_providers,
            ),
        )

    @C.Connect.responder
    async def connect(self, address: str, peer: str | None = None) -> dict[str, Any]:
        node = self.node
        try:
            outcome = await node.connect(address, peer, self.parent)
        except NotPaired as e:
            raise C.NotPairedError(str(e)) from None
        except ValueError as e:
            raise C.BadRequest(str(e)) from None
        except HandshakeFailed as e:
            raise C.LinkFailed(f"auth failed: {_sentence(e)}{_kept(node, peer)}") from None
        except Exception as e:
            raise C.LinkFailed(f"connect to {address}: {_sentence(e)}{_kept(node, peer)}") from None
        return {
            "peer": outcome.peer,
            "mode": outcome.mode,
            "already": outcome.already,
            "address": outcome.address,
            "previous": outcome.previous or "",
        }

    @C.Join.responder
    async def join(
        self, address: str, kind: str, secret_hex: str, expected_peer: str | None = None
    ) -> dict[str, Any]:
        node = self.node
        try:
            secret = bytes.fromhex(secret_hex)
        except ValueError:
            raise C.BadRequest("secret must be hex") from None
        auth: KeyAuth | PakeAuth
        if kind == "key":
            auth = KeyAuth(secret, expected_peer or None)
        elif kind == "pake":
            from claudectl.pairing.pake import PakeInitiator

            auth = PakeAuth(PakeInitiator(secret))
        else:
            raise C.BadRequest(f"unknown join kind {kind!r}")
        try:
            proto = await node.open_link(address, auth)
        except HandshakeFailed as e:
            raise C.LinkFailed(str(e)) from None
        except Exception as e:
            raise C.LinkFailed(f"connect to {address}: {e}") from None
        assert proto.result is not None
        peer_id = proto.result.peer_id
        node.ensure_dialer(peer_id, address, self.parent)
        return {"peer": peer_id, "mode": proto.result.mode}

    @C.Disconnect.responder
    async def disconnect(self, peer: str) -> dict[str, Any]:
        # Look before acting: stopping a dialer drops the link it holds.
        linked = self.node.mesh.is_connected(peer)
        dialed = peer in self.node.dialers
        await self.node.remove_dialer(peer)
        self.node.mesh.disconnect(peer)
        return {"was_connected": linked, "dropped_link": linked, "stopped_dialer": dialed}

    @C.Forgotten.responder
    async def forgotten(self, peer: str) -> dict[str, Any]:
        await self.node.remove_dialer(peer)
        self.node.mesh.disconnect(peer, "peer forgotten")
        if not self.node.mesh.is_connected(peer):
            self.node.mesh.states.pop(peer, None)
        return {}


def _sentence(e: Exception) -> str:
    return str(e).strip().rstrip(".") or type(e).__name__


def _kept(node: RelayNode, peer: str | None) -> str:
    """What a failed ``relay connect`` left as it was (for the error text)."""
    if peer is None:
        return ""
    where = node.dial_address(peer)
    if node.mesh.is_connected(peer):
        return f". Nothing changed: the link to {peer} stays up" + (
            f" and the service keeps dialing {where}" if where else ""
        )
    if peer in node.dialers and where:
        return f". Nothing changed: the service keeps dialing {peer} at {where}"
    return ""


class _Locators:
    """Tries the relay locator, then each layer's."""

    def __init__(self, locators: list[Any]) -> None:
        self.locators = locators

    def locateResponder(self, name: bytes) -> Any:
        for loc in self.locators:
            responder = loc.locateResponder(name)
            if responder is not None:
                return responder
        return None


class _QuietAMP(amp.AMP):
    """AMP without its two info lines per connection: every CLI command is one
    connection, and "AMP connection established/lost" filled the service log."""

    def makeConnection(self, transport: Any) -> None:
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ControlProtocol(_QuietAMP):
    """
    AMP that survives malformed frames: one log line and the connection is
    closed, instead of an exception escaping ``dataReceived`` (which the
    reactor logs as a critical traceback).
    """

    _log = Logger()
    _broken = False

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            super().dataReceived(data)
        except Exception as e:
            self._bad_frame(f"{type(e).__name__}: {str(e)[:200]}")

    def lengthLimitExceeded(self, length: int) -> None:
        self._bad_frame(f"a value of {length} bytes")

    def _bad_frame(self, what: str) -> None:
        if self._broken:
            return
        self._broken = True
        self._log.warn(
            "malformed control frame ({what}): closing that control connection", what=what
        )
        if self.transport is not None:
            self.transport.loseConnection()


class ControlFactory(Factory):
    noisy = False  # no "Starting factory" / "Stopping factory" lines

    def __init__(
        self, node: RelayNode, parent: Any = None, registry: ControlRegistry | None = None
    ) -> None:
        self.node = node
        self.parent = parent
        self.registry = registry if registry is not None else ControlRegistry()

    def buildProtocol(self, addr: Any) -> amp.AMP:
        registry = self.registry
        locators = [RelayLocator(self.node, self.parent, registry), *registry.locators]
        proto = ControlProtocol(locator=_Locators(locators))
        locators.extend(make(proto) for make in registry.connection_locators)
        return proto


class _ControlService(StreamServerEndpointService):
    def __init__(self, node: RelayNode, registry: ControlRegistry) -> None:
        self.node = node
        self.path = control_socket_path(node.home)
        endpoint = serverFromString(node.reactor, f"unix:{self.path}:mode=600:lockfile=1")
        super().__init__(endpoint, ControlFactory(node, registry=registry))
        self._raiseSynchronously = True

    def setServiceParent(self, parent: Any) -> Any:
        assert isinstance(self.factory, ControlFactory)
        self.factory.parent = parent
        return super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        ensure_socket_dir(self.path)
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        log.info("control socket at {path}", path=str(self.path))
        return port

    def stopService(self) -> Any:
        d = defer.maybeDeferred(super().stopService)

        def cleanup(result: Any) -> Any:
            remove_fallback_dir(self.node.home)
            return result

        d.addBoth(cleanup)
        return d


def control_service(node: RelayNode, registry: ControlRegistry) -> IService:
    svc = _ControlService(node, registry)
    svc.setName("control")
    return svc
