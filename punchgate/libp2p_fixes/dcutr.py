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

QUIC (the spec: the side that sent SYNC sprays random UDP packets at the peer's QUIC
addresses, which opens its NAT for the peer's QUIC dial; the other side dials):

* the addresses sent in CONNECT are predicted for TCP only (``_get_observed_addrs``
  ~1093-1150: observed WAN IP + TCP listen port), so a node listening on QUIC never
  offered a QUIC address to punch towards;
* the UDP packets leave from a fresh socket (``_spam_udp_for_hole_punch`` ~910), so the
  NAT mapping they open is not the one of the QUIC listener, from which the connection
  must come; and they go on until an event set only after the task group they run in
  has exited: with a QUIC address and every round failed, the punch never returns;
* the spraying side also dials QUIC addresses "as responder", which the swarm refuses
  for QUIC (``dial_addr_as_responder`` ~1469): an error per address.

Fix: :class:`BoundedDCUtR` overrides those methods, runs the protocol on a view of
the host whose ``get_addrs()`` gives the host's own listen addresses (wildcards
expanded), and before each attempt we ask for forgets the attempt count, the cached
"direct" verdict and the peer's direct addresses in the peerstore (they are hints;
the CONNECT message brings the current ones). CONNECT carries, for every external IP
peers saw us at, our TCP *and* QUIC listen ports there; the spray leaves from our QUIC
listener (``QuicTransport.send_raw``) for at most :data:`SPRAY_SECONDS`, ending early
when a direct connection appears; the spraying side dials no QUIC address. Callers
still bound each punch with their own cancel scope (``runtime/holepunch.py``).
"""

from __future__ import annotations

import os
import random
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from multiaddr import Multiaddr

from punchgate.runtime.addresses import advertised, interface_ips
from punchgate.specs import transport_of
from punchgate.transports.quic.transport import QuicTransport, parse_quic_addr

RELAY_IDLE_CHECK = 5.0
RELAY_IDLE_CHECKS = 720  # give up watching after an hour
KEPT_ADDRS_TTL = 600  # circuit addresses kept across a punch
SPRAY_SECONDS = 8.0  # the longest a spray of UDP packets lasts (the peer's dial takes ~1 RTT)
SPRAY_GAP = (0.01, 0.2)  # seconds between two packets, at random (the spec's interval)
SPRAY_SIZE = 64
MAX_OBSERVED_ADDRS = 8


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
        self._quic = next(
            (t for t in host.get_network().transport_manager.get_transports() if isinstance(t, QuicTransport)),  # type: ignore[attr-defined]
            None,
        )

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        self._hole_punch_attempts.pop(peer_id, None)  # we decide when to try again
        self._direct_connections.discard(peer_id)  # whether one exists, the swarm says
        peerstore = self.host.get_peerstore()
        try:
            keep = [a for a in peerstore.addrs(peer_id) if "/p2p-circuit" in str(a)]
        except PeerStoreError:  # a peer known only by its relayed connection: nothing to forget
            keep = []
        peerstore.clear_addrs(peer_id)
        if keep:
            peerstore.add_addrs(peer_id, keep, KEPT_ADDRS_TTL)
        return await super().initiate_hole_punch(peer_id)

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False

    async def _auto_drive_loop(self) -> None:
        await trio.sleep_forever()

    async def _get_observed_addrs(self) -> list[bytes]:
        """Where the peer should punch towards: each external IP peers saw us at, with each
        of our TCP and QUIC listen ports; our own listen addresses when nobody saw us."""
        own = [Multiaddr(str(a).split("/p2p/", 1)[0]) for a in self.host.get_addrs()]
        ports = [(transport_of(a), _family(a), _port(a)) for a in own if transport_of(a) is not None]
        manager = getattr(self.host, "_observed_addr_manager", None)
        external: list[tuple[str, str]] = []
        if manager is not None:
            for seen in manager.addrs(min_observers=1):
                if "/p2p-circuit" not in str(seen) and (found := _ip_of(seen)) and found not in external:
                    external.append(found)
        predicted = [
            Multiaddr(f"/{family}/{ip}/tcp/{port}" if kind == "tcp" else f"/{family}/{ip}/udp/{port}/quic-v1")
            for family, ip in external
            for kind, own_family, port in ports
            if own_family == family
        ]
        return [a.to_bytes() for a in list(dict.fromkeys(predicted or own))[:MAX_OBSERVED_ADDRS]]

    async def _dial_peer(
        self, peer_id: ID, addr: Multiaddr, source: tuple[str, int] | None = None, as_responder: bool = False
    ) -> None:
        if as_responder and parse_quic_addr(addr) is not None:
            return  # over QUIC the spraying side does not dial: the peer's dial reaches it
        await super()._dial_peer(peer_id, addr, source, as_responder)

    async def _spam_udp_for_hole_punch(self, addr: Multiaddr, stop: trio.Event) -> None:
        """Random packets from our QUIC listener's port to ``addr``, until a direct
        connection appears, ``stop`` is set, or :data:`SPRAY_SECONDS` have passed."""
        parsed = parse_quic_addr(addr)
        if parsed is None or self._quic is None:
            return
        ip, port, _ = parsed
        with trio.move_on_after(SPRAY_SECONDS):
            while not stop.is_set():  # the library sets it once the direct connection is verified
                if not self._quic.send_raw(os.urandom(SPRAY_SIZE), ip, port):
                    return  # we do not listen on QUIC for that family: nothing to open
                await trio.sleep(random.uniform(*SPRAY_GAP))

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


def _ip_of(addr: Multiaddr) -> tuple[str, str] | None:
    """("ip4" or "ip6", the IP) of an address, if it has one."""
    for family in ("ip4", "ip6"):
        try:
            return family, addr.value_for_protocol(family)
        except Exception:  # multiaddr raises its own lookup error for a missing protocol
            continue
    return None


def _family(addr: Multiaddr) -> str | None:
    found = _ip_of(addr)
    return found[0] if found else None


def _port(addr: Multiaddr) -> int:
    return int(addr.value_for_protocol("tcp" if transport_of(addr) == "tcp" else "udp"))
