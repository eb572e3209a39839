"""Which connection a tunnel stream rides: direct TCP when possible, else a relay.

For a peer, in order:

1. an existing direct TCP connection;
2. if the peer advertises no relay circuit address (it is publicly reachable): a new
   direct TCP dial of its addresses;
3. otherwise (it sits behind NAT): an existing relayed connection or a new one through
   a relay (the relays named in its circuit addresses, then our own bootstrap peers),
   then a hole punch, waited for at most :data:`PUNCH_WAIT` seconds. If it yields a
   direct connection the stream goes there; if not, over the relay.

QUIC connections are never used for tunnel streams (see ``runtime/host.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from libp2p.abc import IHost, INetConn, INetStream
from libp2p.peer.id import ID

from punchgate.logs import get_logger
from punchgate.runtime.holepunch import HolePuncher
from punchgate.runtime.host import NoRouteError, dial_tcp, live_connection
from punchgate.runtime.multistream import open_stream_on
from punchgate.runtime.relay import Relays

PUNCH_WAIT = 3.0  # a punch through port-preserving NATs takes ~0.25 s

log = get_logger("punchgate.paths")


def circuit_relays(host: IHost, peer_id: ID) -> list[ID]:
    """Relays named in ``peer_id``'s known circuit addresses (``…/p2p/R/p2p-circuit…``)."""
    relays = []
    for addr in host.get_peerstore().addrs(peer_id):
        parts = str(addr).split("/")
        if "p2p-circuit" in parts:
            i = parts.index("p2p-circuit")
            if i >= 2 and parts[i - 2] == "p2p":
                relays.append(ID.from_base58(parts[i - 1]))
    return list(dict.fromkeys(relays))


class Paths:
    def __init__(
        self, host: IHost, relays: Relays, puncher: HolePuncher, our_relays: Callable[[], list[ID]]
    ) -> None:
        self.host = host
        self.relays = relays
        self.puncher = puncher
        self.our_relays = our_relays

    async def open_stream(
        self, peer_id: ID, protocol: str, request: bytes = b""
    ) -> tuple[INetStream, str, bytes]:
        """A stream for ``protocol`` with ``request`` sent along with the negotiation
        (see :func:`open_stream_on`); also the path and the bytes read past it."""
        conn, path = await self.connection(peer_id)
        stream, early = await open_stream_on(conn, protocol, request)
        return stream, path, early

    async def connection(self, peer_id: ID) -> tuple[INetConn, str]:
        direct = live_connection(self.host, peer_id, "tcp")
        if direct is not None:
            return direct, "direct"
        via = circuit_relays(self.host, peer_id)
        if not via:
            return await dial_tcp(self.host, peer_id), "direct"
        relayed = live_connection(self.host, peer_id, "relay") or await self._dial_relayed(peer_id, via)
        if await self.puncher.attempt(peer_id, wait=PUNCH_WAIT):
            direct = live_connection(self.host, peer_id, "tcp")
            if direct is not None:
                return direct, "direct"
        return relayed, "relayed"

    async def _dial_relayed(self, peer_id: ID, via: list[ID]) -> INetConn:
        errors = []
        for relay_id in [*via, *(r for r in self.our_relays() if r not in via)]:
            started = time.monotonic()
            try:
                conn = await self.relays.dial_through(relay_id, peer_id)
            except Exception as exc:  # relay unreachable, refused, no reservation, timeout
                errors.append(f"via {relay_id}: {type(exc).__name__}: {exc}")
                continue
            log.info(
                "relay connected",
                peer=str(peer_id),
                relay=str(relay_id),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return conn
        raise NoRouteError(f"cannot reach {peer_id} through any relay: {'; '.join(errors) or 'no relay known'}")
