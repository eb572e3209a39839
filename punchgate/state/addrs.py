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


def direct_transport(addr: str) -> str | None:
    """"tcp" or "quic" for a direct address a tunnel stream can ride (``/ip4|ip6|dns*/H/tcp/N``
    or ``/ip4|ip6/H/udp/N/quic-v1``), None for anything else (websockets, circuits, old QUIC)."""
    parts = without_p2p(addr).split("/")
    if len(parts) < 5 or parts[0] != "" or not parts[4].isdigit():
        return None
    if len(parts) == 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[3] == "tcp":
        return "tcp"
    if len(parts) == 6 and parts[1] in ("ip4", "ip6") and parts[3] == "udp" and parts[5] == "quic-v1":
        return "quic"
    return None


def classify(addrs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """(direct addresses, ((relay ID, relay addresses), ...)) found in ``addrs``: the TCP
    addresses first, then the QUIC ones (a direct dial tries TCP first: see
    docs/ARCHITECTURE.md, "Which direct path"), each kind in the order given."""
    direct: list[str] = []
    quic: list[str] = []
    relays: dict[str, list[str]] = {}
    for addr in addrs:
        found = circuit_relay(addr)
        if found is not None:
            relay, relay_addr = found
            known = relays.setdefault(relay, [])
            if relay_addr and relay_addr not in known:
                known.append(relay_addr)
        else:
            kind = direct_transport(addr)
            bare = without_p2p(addr)
            found_in = direct if kind == "tcp" else quic if kind == "quic" else None
            if found_in is not None and bare not in found_in:
                found_in.append(bare)
    return (*direct, *quic), tuple((relay, tuple(found)) for relay, found in relays.items())
