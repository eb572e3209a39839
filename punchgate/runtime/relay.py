"""Circuit relay v2: serving as a relay, reserving slots, dialling through relays.

Every node runs py-libp2p's ``CircuitV2Protocol`` (as our ``RelayHop``, whose data path
keeps circuits apart: ``libp2p_fixes/relay_hop.py``) with hop enabled and resource limits
(:data:`RELAY_LIMITS`), which it announces in every reservation and connection as the
protocol provides; a node nobody can reach simply never gets hop requests.

The two client exchanges are ours, one hop stream each (:func:`reserve`,
:func:`dial_through`): the library's versions drop the limit the relay announces, and
its dial first tries every circuit address in the peerstore in turn. When to reserve,
renew, or give a slot up is decided by the state machine; :class:`Relays` only does it.
"""

from __future__ import annotations

import time

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import CircuitV2Transport, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.relay_hop import RelayHop
from punchgate.limits import Limits
from punchgate.runtime.addresses import is_unhelpful_addr, is_unspecified_addr
from punchgate.runtime.host import dial_direct, known_addrs
from punchgate.specs import transport_of, without_peer_id
from punchgate.state.model import Limit


def relay_limits(limits: Limits) -> RelayLimits:
    """The library's relay limits from ours (defaults: README, "Access control")."""
    return RelayLimits(
        duration=limits.relay_circuit_seconds,  # seconds one relayed connection (circuit) may last
        data=limits.relay_circuit_bytes,  # bytes one circuit may carry, both directions together
        max_circuit_conns=limits.relay_circuits_per_peer,  # circuits to one reserved peer at once
        max_reservations=limits.relay_reservations,  # peers holding a slot at once
        reservation_ttl=3600,
    )


RELAY_LIMITS = relay_limits(Limits())
EXCHANGE_TIMEOUT = 10.0

STATUS_NAMES = {value: name for name, value in Status.items()}


class RelayRefused(Exception):
    """The relay answered with a status other than OK."""


class Relays:
    def __init__(self, host: IHost, limits: Limits | None = None) -> None:
        self.host = host
        limits = limits or Limits()
        self.protocol = RelayHop(
            host, limits=relay_limits(limits), allow_hop=True, max_reservations_per_ip=limits.relay_reservations_per_ip
        )
        # Accepts circuits to us (the STOP side); our own dials do not go through it.
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol):
            task_status.started()
            await trio.sleep_forever()

    async def reserve(self, relay_id: ID) -> tuple[float, Limit | None]:
        """Reserve (or renew) a slot on a connected relay: (seconds until it expires, its limit)."""
        with trio.fail_after(EXCHANGE_TIMEOUT):
            stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL_ID])
            try:
                request = HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=self.host.get_id().to_bytes()))
                await write_delimited_msg(stream, request)
                answer = await read_delimited_msg(stream, HopMessage)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await stream.close()
        _check_status(answer, "reservation")
        expires_in = 3600.0
        if answer.HasField("reservation") and answer.reservation.expire:
            expires_in = max(1.0, answer.reservation.expire - time.time())
        return expires_in, _limit(answer)

    async def dial_through(self, relay_id: ID, relay_addrs: list[multiaddr.Multiaddr], peer_id: ID) -> tuple[INetConn, Limit | None]:
        """A relayed connection to ``peer_id`` through ``relay_id`` (connected to first, at
        ``relay_addrs`` or the addresses we know, if need be), and the relay's limit on it."""
        network = self.host.get_network()
        if not network.get_connections(relay_id):
            known = relay_addrs or [a for a in known_addrs(self.host, relay_id) if transport_of(a) is not None]
            await dial_direct(self.host, relay_id, [without_peer_id(a) for a in known])
        stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL_ID])
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=peer_id.to_bytes())))
                answer = await read_delimited_msg(stream, HopMessage)
            _check_status(answer, "connection")
            circuit = multiaddr.Multiaddr(f"/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}")
            raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[circuit])
            conn = await self.host.upgrade_outbound_connection(raw, peer_id)
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.reset()
            raise
        return conn, _limit(answer)

    def circuit_addrs(self, relay_id: ID) -> list[multiaddr.Multiaddr]:
        """``<relay's address>/p2p/<relay>/p2p-circuit`` for each TCP and QUIC address others
        can reach it at, TCP first (the relay's loopback and link-local addresses only if it
        has no other)."""
        known = [without_peer_id(a) for a in known_addrs(self.host, relay_id)]
        direct = sorted((a for a in known if transport_of(a) is not None), key=lambda a: transport_of(a) != "tcp")
        useful = [a for a in direct if not is_unhelpful_addr(a)]
        result = []
        for addr in useful or [a for a in direct if not is_unspecified_addr(a)]:
            circuit = multiaddr.Multiaddr(f"{addr}/p2p/{relay_id}/p2p-circuit")
            if circuit not in result:
                result.append(circuit)
        return result


def _check_status(answer: HopMessage, what: str) -> None:
    status = answer.status if answer.HasField("status") else Status.OK
    if status != Status.OK:
        raise RelayRefused(f"relay refused the {what}: {STATUS_NAMES.get(status, status)}")


def _limit(answer: HopMessage) -> Limit | None:
    if not answer.HasField("limit"):
        return None
    return Limit(duration_s=int(answer.limit.duration), data_bytes=int(answer.limit.data))
