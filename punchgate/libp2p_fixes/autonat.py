"""AutoNAT as shipped confirms any address: its dial-back reuses the connection it came on.

Defect (``libp2p/host/autonat/autonat.py`` ~373, ``AutoNATService._try_dial``): the
server "dials back" with ``host.connect()``, which returns the connection the request
arrived on when one exists, as it always does. Every requester is told OK: a node
behind a NAT believes it is publicly reachable.

Fix: :class:`FreshDialAutoNAT` dials each address with ``swarm.dial_addr``, which
always opens a new connection (authenticated by Noise as the requester, so a wrong
peer at that address fails), bounded by :data:`DIAL_TIMEOUT`, and closes that new
connection again. Everything else (the observed-IP gate, refusing relayed requests,
the message format) is the library's. Used by ``runtime/reachability.py``.
"""

from __future__ import annotations

import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.peer.id import ID
from multiaddr import Multiaddr

DIAL_TIMEOUT = 3.0


class FreshDialAutoNAT(AutoNATService):
    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network = self.host.get_network()
        for raw in addrs:
            with trio.move_on_after(DIAL_TIMEOUT):
                try:
                    conn = await network.dial_addr(Multiaddr(raw), peer_id)
                except Exception:  # refused, unreachable, another peer
                    continue
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await conn.close()
                return bytes(raw)
        return None
