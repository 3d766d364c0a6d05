# -*- test-case-name: tests.test_relay_cli -*-
"""The rows of ``claudectl relay peers``: from the files, plus live state when a node runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from claudectl.relay.keystore import KeyStore
from claudectl.relay.mesh import DISCONNECTED, Mesh


def peer_rows(
    keystore: KeyStore,
    mesh: Mesh | None = None,
    trust_of: Callable[[str], float] | None = None,
    extra: list[Callable[[str], dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """One dict per known peer, sorted by identity."""
    peers = set(keystore.known_peers())
    if mesh is not None:
        peers.update(mesh.links)
    rows = []
    for peer in sorted(peers):
        meta = keystore.meta(peer)
        row: dict[str, Any] = {
            "identity": peer,
            "state": mesh.peer_status(peer) if mesh is not None else DISCONNECTED,
            "address": meta.addr if meta is not None else None,
            "last_seen": (meta.last_seen // 1000) if meta is not None and meta.last_seen else 0,
            "has_psk": keystore.key(peer) is not None,
            "mode": "mutual" if keystore.is_mutual(peer) else None,
            #: "tls1.3" / "plaintext" for a live link, None when not connected.
            "transport": None,
            # Rounded: sums of drifts print as 0.3999999999999999 otherwise.
            "trust": round(trust_of(peer), 4) if trust_of is not None else None,
            "bytes_up": 0,
            "bytes_down": 0,
            #: The hub a live link is spliced through ("host:port"), None when direct.
            "via": None,
        }
        if mesh is not None and peer in mesh.states:
            st = mesh.states[peer]
            row["mode"] = st.mode or row["mode"]
            if peer in mesh.links:
                row["transport"] = st.transport
            if st.address:
                row["address"] = st.address
            if st.last_seen:
                row["last_seen"] = int(st.last_seen)
            row["bytes_up"] = st.counters.bytes_out
            row["bytes_down"] = st.counters.bytes_in
            row["frames_bad"] = st.counters.bad_frames
            row["last_error"] = st.last_error
        for provider in extra or []:
            try:
                row.update(provider(peer))
            except Exception:
                pass
        rows.append(row)
    return rows
