"""Reading multiaddr strings without the multiaddr library: which are direct, which go
through a relay, and which relay. Pure string work, so the machine can decide on it."""

from __future__ import annotations


def without_p2p(addr: str) -> str:
    """``addr`` without a trailing ``/p2p/<id>``."""
    parts = addr.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == "p2p":
        return "/".join(parts[:-2])
    return addr.rstrip("/")


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


def circuit_relay(addr: str) -> tuple[str, str] | None:
    """For ``<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<peer>]``: (relay ID, relay addr)."""
    if not is_circuit(addr):
        return None
    head = addr.split("/p2p-circuit", 1)[0]
    parts = head.split("/")
    if len(parts) < 3 or parts[-2] != "p2p" or not parts[-1]:
        return None
    relay_addr = "/".join(parts[:-2])
    return parts[-1], relay_addr


def is_tunnel_transport(addr: str) -> bool:
    """A direct address a tunnel stream can ride: plain TCP (no QUIC, websockets, circuits)."""
    parts = without_p2p(addr).split("/")
    return (
        len(parts) == 5
        and parts[0] == ""
        and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6")
        and parts[3] == "tcp"
        and parts[4].isdigit()
    )


def classify(addrs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """(direct TCP addresses, ((relay ID, relay addresses), ...)) found in ``addrs``, in order."""
    direct: list[str] = []
    relays: dict[str, list[str]] = {}
    for addr in addrs:
        found = circuit_relay(addr)
        if found is not None:
            relay, relay_addr = found
            known = relays.setdefault(relay, [])
            if relay_addr and relay_addr not in known:
                known.append(relay_addr)
        elif is_tunnel_transport(addr):
            bare = without_p2p(addr)
            if bare not in direct:
                direct.append(bare)
    return tuple(direct), tuple((relay, tuple(found)) for relay, found in relays.items())
