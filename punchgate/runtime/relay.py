"""Circuit relay v2: serving as a relay, holding reservations, dialing through relays.

Every node runs py-libp2p's ``CircuitV2Protocol`` (as our ``RelayHop``, whose data path
keeps circuits apart: ``libp2p_fixes/relay_hop.py``) with hop enabled and resource limits
(:data:`RELAY_LIMITS`); a node nobody can reach simply never gets hop requests. A node
that finds itself PRIVATE reserves a slot on a connected bootstrap peer
(:meth:`Relays.reserve`), renews it before it expires and, while it holds one,
advertises ``<relay addr>/p2p/<relay>/p2p-circuit`` so that others can reach it.

We renew reservations ourselves rather than with the library's refresher task: ours
logs each renewal, tells the state machine when a renewal fails (so it reserves again,
for example after the relay restarted) and lives in a cancel scope we own, which the
library's worker does not (it must be cancelled by hand or shutdown hangs).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import CircuitV2Transport, RelayLimits
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service

from punchgate.libp2p_fixes.relay_hop import RelayHop
from punchgate.logs import get_logger
from punchgate.runtime.addresses import AddressBook
from punchgate.specs import transport_of, without_peer_id
from punchgate.state import events as ev

RELAY_LIMITS = RelayLimits(
    duration=2 * 3600,  # seconds one relayed connection (circuit) may last
    data=8 << 30,  # bytes one circuit may carry, both directions together
    max_circuit_conns=128,  # circuits to one reserved peer at once
    max_reservations=128,  # peers holding a slot at once
    reservation_ttl=3600,
)
RENEW_MARGIN = 300.0  # renew this long before a reservation expires
RESERVE_TIMEOUT = 15.0
DIAL_TIMEOUT = 15.0

log = get_logger("punchgate.relay")


class Relays:
    def __init__(self, host: IHost, address_book: AddressBook, post: Callable[[ev.Event], None]) -> None:
        self.host = host
        self.address_book = address_book
        self.post = post
        self.protocol = RelayHop(host, limits=RELAY_LIMITS, allow_hop=True)
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self._renewals: dict[ID, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def reserve(self, relay_id: ID) -> None:
        """Reserve a slot on ``relay_id`` (connected already); report the outcome as an event."""
        started = time.monotonic()
        try:
            expires = await self._make_reservation(relay_id)
        except Exception as exc:  # stream, protocol or refusal
            log.warning("relay reservation failed", relay=str(relay_id), reason=str(exc))
            self.post(ev.RelayReservationFailed(str(relay_id), str(exc)))
            return
        circuit = self._circuit_addrs(relay_id)
        self.address_book.relay_addrs = circuit
        log.info(
            "relay reservation accepted",
            relay=str(relay_id),
            expires_in_s=int(expires - time.time()),
            addresses=[str(a) for a in circuit],
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        self.post(ev.RelayReserved(str(relay_id)))
        self.post(ev.AddressesChanged(tuple(str(a) for a in self.host.get_addrs())))
        assert self._nursery is not None
        self._stop_renewing(relay_id)
        scope = trio.CancelScope()
        self._renewals[relay_id] = scope
        self._nursery.start_soon(self._renew_until_lost, relay_id, expires, scope)

    def forget(self, relay_id: ID) -> None:
        """The relay is gone (disconnected): stop renewing and stop advertising it."""
        self._stop_renewing(relay_id)
        self.address_book.relay_addrs = [
            a for a in self.address_book.relay_addrs if a.value_for_protocol("p2p") != str(relay_id)
        ]

    def _stop_renewing(self, relay_id: ID) -> None:
        scope = self._renewals.pop(relay_id, None)
        if scope is not None:
            scope.cancel()

    async def _renew_until_lost(self, relay_id: ID, expires: float, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(max(1.0, expires - time.time() - RENEW_MARGIN))
                try:
                    expires = await self._make_reservation(relay_id)
                except Exception as exc:
                    log.warning("relay reservation renewal failed", relay=str(relay_id), reason=str(exc))
                    self.forget(relay_id)
                    self.post(ev.RelayReservationLost(str(relay_id)))
                    self.post(ev.AddressesChanged(tuple(str(a) for a in self.host.get_addrs())))
                    return
                log.info("relay reservation renewed", relay=str(relay_id), expires_in_s=int(expires - time.time()))

    async def _make_reservation(self, relay_id: ID) -> float:
        """One RESERVE exchange on a fresh hop stream; returns the expiry (Unix time)."""
        with trio.fail_after(RESERVE_TIMEOUT):
            stream = await self.host.new_stream(relay_id, [HOP_PROTOCOL_ID])
            try:
                # The library's exchange; public reserve() would also start its own refresher.
                ok = await self.transport._make_reservation(stream, relay_id)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await stream.close()
        if not ok:
            raise ConnectionRefusedError("relay refused the reservation")
        return float(self.transport._reservations.get(relay_id, time.time() + 3600))

    def _circuit_addrs(self, relay_id: ID) -> list[multiaddr.Multiaddr]:
        """``<relay's public TCP address>/p2p/<relay>/p2p-circuit`` for each such address."""
        result = []
        for addr in self._relay_tcp_addrs(relay_id):
            circuit = multiaddr.Multiaddr(f"{addr}/p2p/{relay_id}/p2p-circuit")
            if circuit not in result:
                result.append(circuit)
        return result

    def _relay_tcp_addrs(self, relay_id: ID) -> list[multiaddr.Multiaddr]:
        return [
            without_peer_id(a)
            for a in self.host.get_peerstore().addrs(relay_id)
            if transport_of(a) == "tcp" and not str(a).startswith("/ip4/0.0.0.0/")
        ]

    async def dial_through(self, relay_id: ID, peer_id: ID) -> INetConn:
        """A relayed connection to ``peer_id`` through ``relay_id``."""
        relay_addrs = self._relay_tcp_addrs(relay_id)
        if not relay_addrs:
            raise ConnectionError(f"no TCP address known for relay {relay_id}")
        target = multiaddr.Multiaddr(f"{relay_addrs[0]}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}")
        with trio.fail_after(DIAL_TIMEOUT):
            return await self.transport.dial(target)
