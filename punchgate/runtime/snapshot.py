"""``Node.status()``: the live status of a node as a plain, JSON-ready dict.

This module is the one place that knows where each figure lives in the runtime (state
machine, host, relays, pinger, tunnel counters). The control socket and the renderer in
``punchgate/status.py`` only see the dict; its fields are documented in
docs/ARCHITECTURE.md ("Control socket") and must keep their names and meaning.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from punchgate import __version__
from punchgate.runtime.host import connection_transport, quic_transport

if TYPE_CHECKING:
    from punchgate.runtime.node import Node

# Preference when a peer has several connections: the transport tunnels would use.
_TRANSPORT_ORDER = ("tcp", "quic", "relay")


def node_status(node: Node) -> dict[str, Any]:
    return {
        "peer_id": str(node.peer_id),
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - node.started_at, 1),
        "phase": node.state.phase.value,
        "nat": _nat(node),
        "port_mapping": _port_mapping(node),
        "listen_addrs": _listen_addrs(node),
        "advertised_addrs": [str(a) for a in node.host.get_addrs()],
        "relays": _relays(node),
        "peers": _peers(node),
        "services": _services(node),
        "tunnels": _tunnels(node),
        "refused": _refused(node),
    }


def _refused(node: Node) -> dict[str, int]:
    """What the limits and the access rules turned away since start (the log says why,
    at most once per 10 s per kind)."""
    gate = getattr(node.host.get_network(), "inbound_gate", None)
    quic = quic_transport(node.host)
    return {
        # connections closed at accept over a cap (TCP), plus QUIC Initial packets dropped over one
        "inbound_connections": (gate.refused if gate is not None else 0)
        + (sum(e.refused for e in quic.endpoints()) if quic is not None else 0),
        # connections whose handshake missed its deadline, TCP and QUIC
        "handshakes_timed_out": (gate.timed_out if gate is not None else 0)
        + (sum(e.timed_out for e in quic.endpoints()) if quic is not None else 0),
        "tunnel_streams": node.service.refused,  # not allowed, unknown name, over a limit, bad request
        "relay_reservations": node.relays.protocol.refused_reservations,
    }


def _nat(node: Node) -> dict[str, Any]:
    nat = node.state.nat
    return {
        "status": nat.status.value,
        # how it was learnt: "dialback" (a peer dialled the address it sees us at, on a
        # fresh connection), "autonat", or None while no check has answered
        "learnt_by": nat.learnt_by,
        # False: our NAT maps each flow to a new port (symmetric), so no hole punch is tried
        "port_preserving": nat.port_preserving,
    }


def _port_mapping(node: Node) -> dict[str, Any] | None:
    if not node.state.settings.port_mapping or not node.state.bootstrap:
        return None  # --no-port-mapping, no bootstrap peers, or listening on loopback only
    pm = node.state.portmap
    return {
        "status": pm.status.value,  # idle, mapping, mapped, failed
        "method": pm.method,  # natpmp, upnp, or None
        "addresses": list(pm.external),  # what the router forwards to us
        "confirmed": pm.confirmed,  # a dial-back got through it: advertised
    }


def _listen_addrs(node: Node) -> list[str]:
    addrs: list[str] = []
    for listener in list(node.host.get_network().listeners.values()):
        try:
            addrs.extend(str(a) for a in listener.get_addrs())
        except Exception:  # a listener closing under us
            continue
    return addrs


def _relays(node: Node) -> list[dict[str, Any]]:
    relay = node.state.relay
    if relay.relay_peer_id is None:
        return []
    expires = node.relay_expires.get(relay.relay_peer_id) if relay.status.value == "reserved" else None
    return [
        {
            "relay": relay.relay_peer_id,
            "status": relay.status.value,
            "expires_in_s": None if expires is None else max(0, int(expires - time.time())),
            "limit": relay.limit.describe() if relay.limit else None,  # what the relay allows a circuit
        }
    ]


def _peers(node: Node) -> list[dict[str, Any]]:
    rows = []
    rtts = node.pinger.rtt_ms
    for peer_id, conns in list(node.host.get_network().get_connections_map().items()):
        kinds = {connection_transport(c) for c in conns if not c.is_closed}
        if not kinds:
            continue
        ordered = [k for k in _TRANSPORT_ORDER if k in kinds]
        rows.append(
            {
                "peer": str(peer_id),
                "transport": ordered[0],
                "transports": ordered,
                "path": "relayed" if ordered == ["relay"] else "direct",
                "connections": sum(1 for c in conns if not c.is_closed),
                "rtt_ms": rtts.get(str(peer_id)),
            }
        )
    return sorted(rows, key=lambda r: r["peer"])


def _services(node: Node) -> list[dict[str, Any]]:
    rows = []
    for name, target in node.service.services.items():
        stats = node.service.stats[name].snapshot()
        rows.append(
            {
                "name": name,
                "target": str(target),
                "connections": stats["connections"],
                "total_connections": stats["total_connections"],
                "bytes_in": stats["bytes_from_remote"],  # from peers, written to the service
                "bytes_out": stats["bytes_to_remote"],  # read from the service, sent to peers
                "oldest_age_s": stats["oldest_age_s"],
                "transport": node.service.transports.get(name, "tcp"),
                **_datagrams(stats, "datagrams_in", "datagrams_out"),
            }
        )
    return rows


def _datagrams(stats: dict[str, Any], from_remote: str, to_remote: str) -> dict[str, Any]:
    """UDP rows only: datagrams each way (under the row's names) and those dropped (queue
    overflow, too long, refused by the local socket)."""
    if "dropped" not in stats:
        return {}
    return {
        from_remote: stats["datagrams_from_remote"],
        to_remote: stats["datagrams_to_remote"],
        "dropped": stats["dropped"],
    }


def _tunnels(node: Node) -> list[dict[str, Any]]:
    rows = []
    entries: list[Any] = list(node.clients)
    if node.connects.stats.opened:  # `punchgate connect` sessions: a row once there has been one
        entries.append(node.connects)
    for client in entries:
        stats = client.stats.snapshot()
        rows.append(
            {
                "bind": str(client.bind),
                "service": client.service,
                "peer": client.fixed_peer or (stats["peers"][0] if stats["peers"] else None),
                "by_name": client.fixed_peer is None,
                "path": "+".join(stats["paths"]) or None,
                "connections": stats["connections"],
                "total_connections": stats["total_connections"],
                "bytes_to_remote": stats["bytes_to_remote"],
                "bytes_from_remote": stats["bytes_from_remote"],
                "oldest_age_s": stats["oldest_age_s"],
                "transport": getattr(client, "transport", "tcp"),
                "kind": getattr(client, "kind", "tunnel"),  # "tunnel", "proxy" or "connect"
                **_datagrams(stats, "datagrams_from_remote", "datagrams_to_remote"),
            }
        )
    return rows
