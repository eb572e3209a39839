"""DCUtR (hole punching) as shipped wastes seconds, can hang, and kills relayed streams.

Defects (``libp2p/relay/circuit_v2/dcutr.py``):

* "step 0" (``_try_unilateral_upgrade``, ~488-525) dials every non-circuit address of
  the peer before punching, including wildcard and private LAN addresses that cannot
  work across NATs: 0.7-10 s lost (DEFAULT_DIAL_TIMEOUT is 10 s) per attempt.
* with a QUIC address of the peer known, a failed punch never returns: the UDP "spam"
  tasks (``_spam_udp_for_hole_punch``) wait for a stop event that is set only after
  the task group they run in has exited (~795-829).
* ``_auto_drive_loop`` punches every relayed peer every 2 s on its own schedule; we
  decide when to punch (when a tunnel needs the peer), so it is turned off.
* after a successful punch the relayed connection is closed 60 s later
  (``_schedule_relay_close``), resetting tunnel streams still on it. We close it only
  once no stream uses it.

* the addresses it punches with (``_get_observed_addrs``, ~1093) and the port it
  dials from (``_perform_hole_punch``, ~767) are read from ``host.get_addrs()``: what
  the host *advertises*. A node behind NAT advertises only its circuit address (its
  own are not worth telling before a check says they work), which left DCUtR with no
  listen port: it sent no address and dialled from a random port (measured: every
  punch between two nodes started together "gave up" in 20 ms).
* after three attempts with a peer (``MAX_HOLE_PUNCH_ATTEMPTS``) it never tries that
  peer again, however much later; when to try again is our state machine's decision.
* ``initiate_hole_punch`` answers "direct" at once for a peer it once punched through
  to (``_have_direct_connection`` trusts its ``_direct_connections`` cache, ~1080),
  even after that connection and the peer's process are long gone: the first punch
  with a restarted peer did nothing.
* it dials, besides the addresses the peer just sent in its CONNECT message, every
  address of the peer in the peerstore (~744), including the ones an earlier punch
  stored there for 10 minutes. After the peer restarted on another port the old
  address is dialled too, and the old flow's NAT entry answers it with a reset
  (measured: the first punch after such a restart failed in 0.2 s).

Fix: :class:`BoundedDCUtR` overrides those methods, runs the protocol on a view of
the host whose ``get_addrs()`` gives the host's own listen addresses (wildcards
expanded), and before each attempt we ask for forgets the attempt count, the cached
"direct" verdict and the peer's direct addresses in the peerstore (they are hints;
the CONNECT message brings the current ones). Callers
still bound each punch with their own cancel scope (``runtime/holepunch.py``).
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from multiaddr import Multiaddr

from punchgate.runtime.addresses import advertised, interface_ips

RELAY_IDLE_CHECK = 5.0
RELAY_IDLE_CHECKS = 720  # give up watching after an hour
KEPT_ADDRS_TTL = 600  # circuit addresses kept across a punch


class _OwnAddresses:
    """The host, except that ``get_addrs()`` gives its own listen addresses, not what it advertises."""

    def __init__(self, host: IHost) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def get_addrs(self) -> list[Multiaddr]:
        me = Multiaddr(f"/p2p/{self._host.get_id()}")
        return [a.encapsulate(me) for a in advertised(self._host.get_transport_addrs(), interface_ips())]


class BoundedDCUtR(DCUtRProtocol):
    def __init__(self, host: IHost, **kwargs: Any) -> None:
        super().__init__(_OwnAddresses(host), **kwargs)  # type: ignore[arg-type]

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        self._hole_punch_attempts.pop(peer_id, None)  # we decide when to try again
        self._direct_connections.discard(peer_id)  # whether one exists, the swarm says
        peerstore = self.host.get_peerstore()
        keep = [a for a in peerstore.addrs(peer_id) if "/p2p-circuit" in str(a)]
        peerstore.clear_addrs(peer_id)
        if keep:
            peerstore.add_addrs(peer_id, keep, KEPT_ADDRS_TTL)
        return await super().initiate_hole_punch(peer_id)

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()

    async def _spam_udp_for_hole_punch(self, addr: Multiaddr, stop: trio.Event) -> None:
        return

    def _schedule_relay_close(self, peer_id: ID) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._close_relayed_when_unused, peer_id)

    async def _close_relayed_when_unused(self, peer_id: ID) -> None:
        network = self.host.get_network()
        for _ in range(RELAY_IDLE_CHECKS):
            await trio.sleep(RELAY_IDLE_CHECK)
            relayed = [
                c
                for c in network.get_connections(peer_id)
                if not c.is_closed and c.get_connection_type() is ConnectionType.RELAYED
            ]
            if not relayed:
                return
            if not await self._verify_direct_connection(peer_id):
                return  # no direct path any more: keep the relay
            for conn in relayed:
                if not conn.get_streams():
                    await conn.close()
