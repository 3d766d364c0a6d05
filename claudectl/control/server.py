# -*- test-case-name: tests.test_control -*-
"""
The control socket: ``unix:<run dir>/ctl.sock:mode=600:lockfile=1`` serving
AMP.  The directory is created 0700 first (the mode is applied after bind).
Responders wrap the node; the layers' locators are consulted in turn.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from claudectl import __version__
from claudectl.control import commands as C
from claudectl.control.paths import control_socket_path, ensure_socket_dir, remove_fallback_dir
from claudectl.relay.handshake import HandshakeFailed, KeyAuth, PakeAuth
from claudectl.relay.node import NotPaired, RelayNode
from claudectl.relay.peers_view import peer_rows

log = Logger()


class RelayLocator(amp.CommandLocator):
    def __init__(self, node: RelayNode, parent: Any = None) -> None:
        super().__init__()
        self.node = node
        self.parent = parent

    @C.Status.responder
    def status(self) -> dict[str, Any]:
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
            "workers": [{"worker_id": w.worker_id, "peer": w.peer_id,
                         "sessions": w.sessions, "updated_at": int(w.updated_at)}
                        for w in node.workers.current()],
        }
        for provider in node.status_providers:
            try:
                data.update(provider())
            except Exception:
                log.failure("status provider failed")
        return {"status_json": json.dumps(data)}

    @C.Peers.responder
    def peers(self) -> dict[str, Any]:
        rows = peer_rows(self.node.keystore, self.node.mesh, self.node.trust_of,
                         self.node.peer_info_providers)
        return {"peers_json": json.dumps(rows)}

    @C.Connect.responder
    async def connect(self, address: str, peer: str | None = None) -> dict[str, Any]:
        node = self.node
        try:
            peer_id = node.choose_peer_for(address, peer)
        except NotPaired as e:
            raise C.NotPairedError(str(e)) from None
        except ValueError as e:
            raise C.BadRequest(str(e)) from None
        if node.mesh.is_connected(peer_id):
            node.ensure_dialer(peer_id, address, self.parent)
            return {"peer": peer_id, "mode": node.mesh.peer_mode(peer_id) or "",
                    "already": True}
        psk = node.keystore.key(peer_id)
        assert psk is not None
        try:
            proto = await node.open_link(address, KeyAuth(psk, peer_id))
        except HandshakeFailed as e:
            raise C.LinkFailed(f"auth failed: {e}") from None
        except Exception as e:
            raise C.LinkFailed(f"connect to {address}: {e}") from None
        node.ensure_dialer(peer_id, address, self.parent)
        assert proto.result is not None
        return {"peer": peer_id, "mode": proto.result.mode, "already": False}

    @C.Join.responder
    async def join(self, address: str, kind: str, secret_hex: str,
                   expected_peer: str | None = None) -> dict[str, Any]:
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
        await self.node.remove_dialer(peer)
        was = self.node.mesh.disconnect(peer)
        return {"was_connected": was}

    @C.Forgotten.responder
    async def forgotten(self, peer: str) -> dict[str, Any]:
        await self.node.remove_dialer(peer)
        self.node.mesh.disconnect(peer, "peer forgotten")
        if not self.node.mesh.is_connected(peer):
            self.node.mesh.states.pop(peer, None)
        return {}


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


class ControlFactory(Factory):
    def __init__(self, node: RelayNode, parent: Any = None) -> None:
        self.node = node
        self.parent = parent

    def buildProtocol(self, addr: Any) -> amp.AMP:
        locators = [RelayLocator(self.node, self.parent), *self.node.control_locators]
        proto = amp.AMP(locator=_Locators(locators))
        locators.extend(make(proto) for make in self.node.connection_locators)
        return proto


class _ControlService(StreamServerEndpointService):
    def __init__(self, node: RelayNode) -> None:
        self.node = node
        self.path = control_socket_path(node.home)
        endpoint = serverFromString(node.reactor, f"unix:{self.path}:mode=600:lockfile=1")
        super().__init__(endpoint, ControlFactory(node))
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
        d.addBoth(lambda r: (remove_fallback_dir(self.node.home), r)[1])
        return d


def control_service(node: RelayNode) -> IService:
    svc = _ControlService(node)
    svc.setName("control")
    return svc
