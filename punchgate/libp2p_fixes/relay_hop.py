"""Circuit relay v2 hop: the relay's data path cuts unrelated circuits, stalls and slows them.

Defects (libp2p 0.8.1, ``libp2p/relay/circuit_v2/protocol.py``, ``CircuitV2Protocol``):

* ``_relay_data`` (~810-932) cleans up in its ``finally`` (~926-932) by closing the
  streams stored in ``self._active_relays[peer_id]``. That table is keyed by peer ID
  and the CONNECT handler (``_handle_connect``, ~625-808) overwrites ``[source]``
  (~672) and ``[destination]`` (~722) for every new circuit. With two circuits to one
  destination (two clients relayed to one provider, or a client that reconnected),
  the end of one circuit closes the *other* circuit's streams: a live relayed
  connection is cut when an unrelated one ends.
* Every relayed write runs under ``trio.fail_after(self.write_timeout)`` (15 s, ~914): a
  destination that applies back-pressure for 15 s has its circuit torn down.
* Reads go through ``_read_stream_with_retry`` (~222-305) for at most ``MAX_READ_LEN``
  (65,535 B): each read becomes a full Yamux frame plus a 28 B one on the other
  connection (our frames carry 65,507 B), each its own Noise message. That helper
  recognises only mplex EOF/reset: a Yamux stream's ``StreamEOF``/``StreamReset`` is
  "unexpected", logged as an error and retried after sleeping 0.2 s and 0.4 s, so every
  circuit end waits 0.6 s per direction before it is acted on.
* No half-close across the relay: the source's EOF closes only the source's stream
  (its entry holds no destination stream), so the destination is never told and its
  next write back fails; the destination's EOF closes both streams.
* The duration limit is checked only when a read returns: an idle circuit, or one
  blocked on a write, outlives it.
* With ``limits.data == 0`` (unlimited, as the spec reads it) the handler passes no
  shared budget and ``_relay_data`` falls back to the reservation's counter, whose
  limit is that 0: a circuit dies on the first byte its destination sends.

Adjustment: :class:`RelayHop` overrides ``_relay_data`` only; the CONNECT handler
(reservation checks, STOP handshake, connection-slot accounting) stays the library's.
That handler starts ``_relay_data`` twice in one nursery, once per direction, with the
same two streams swapped; the first of the pair to run relays the whole circuit, the
other returns at once. For each circuit:

* both directions run in one nursery under one cancel scope: each reads whatever is
  buffered, up to eight full frames (one sender batch of ``transports/yamux.py``), and writes it
  with no deadline of its own (back-pressure waits);
* EOF in one direction becomes ``close_write`` on the other stream, and the circuit
  ends cleanly (both streams closed) once both directions have; if either fails, the
  other is cancelled and both streams are reset. Only this circuit's two streams are
  ever touched; the library's ``_active_relays`` entries that point at them are dropped;
* the duration limit is the scope's deadline, so it also ends idle and blocked
  circuits; the shared circuit-wide data budget is debited per read as before. On
  either limit the library's ``RESOURCE_LIMIT_EXCEEDED`` status goes out (to the
  stream the over-budget read came from; for the deadline, to the source's hop
  stream), then both streams are reset. No budget (``data == 0``) means unlimited.

Reservation defects (same file, ``_handle_reserve`` ~504-623 and
``resources.py`` ``RelayResourceManager``):

* the reservation is made for the peer ID named in the RESERVE message (``msg.peer``)
  when there is one, not for the peer on the connection: one connection can reserve
  for any number of made-up peer IDs and fill every slot;
* a reservation counts against ``max_reservations`` until its TTL (1 h) ends even when
  its peer has disconnected (the spec ends it with the connection), so peers that
  reserve and leave hold the relay full for an hour;
* there is no cap per remote IP.

Adjustment: :meth:`RelayHop._handle_reserve` first forgets reservations whose peer has
no connection left, then admits the request against ``max_reservations`` (total) and
``max_reservations_per_ip`` (counted by the IP of each holder's connection), refusing
with ``RESOURCE_LIMIT_EXCEEDED`` (logged at most once per 10 s, with the count held
back), and hands the library a copy of the message without ``peer``, so the slot is
always the requesting connection's own peer's. A renewal by a peer that holds a slot
is always admitted.

Hop streams (``_handle_hop_stream`` ~306-395): the handler reads messages in a loop
until the peer's EOF or an error, answers that, and returns without closing the stream.
The stream stays registered on the connection until the connection ends: one leaked
stream per reservation (renewals included) and per malformed request, which a peer can
repeat until the muxer's cap. :meth:`RelayHop._handle_hop_stream` closes it (or resets
it, bounded) when the library's handler returns; a circuit's streams are finished by
then (the CONNECT handler returns when its circuit has ended).

``runtime/relay.py`` builds ``RelayHop``; no library name is rebound.
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import write_delimited_msg

from punchgate.limits import LogThrottle
from punchgate.logs import get_logger
from punchgate.transports import BATCH_BYTES

logger = logging.getLogger(__name__)
events = get_logger("punchgate.relay")
DEFAULT_RESERVATIONS_PER_IP = 8

RELAY_READ = BATCH_BYTES  # one read fills one Yamux sender batch (punchgate.transports, rule 4)
STATUS_TIMEOUT = 2.0  # the limit status is a courtesy before the reset
FINISH_TIMEOUT = 5.0  # closing or resetting one stream at the end of a circuit


class _Circuit:
    """One relayed connection while it runs: how its directions ended, and why it failed."""

    __slots__ = ("done", "eofs", "failure", "partner_seen", "scope", "status_to")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.partner_seen = False  # the other direction's call arrived (and returned)
        self.done = False
        self.eofs = 0  # directions that ended with EOF (passed on as close_write)
        self.failure: str | None = None
        self.status_to: INetStream | None = None  # gets RESOURCE_LIMIT_EXCEEDED

    def fail(self, why: str, status_to: INetStream | None = None) -> None:
        """End the circuit: the first reason wins, both directions stop."""
        if self.failure is None:
            self.failure = why
            self.status_to = status_to
        self.scope.cancel()


class RelayHop(CircuitV2Protocol):
    """``CircuitV2Protocol`` whose circuits relay both ways independently of each other."""

    def __init__(self, *args: object, max_reservations_per_ip: int = DEFAULT_RESERVATIONS_PER_IP, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Circuits by their two streams (either order), until both calls of the pair came.
        self._circuits: dict[frozenset[int], _Circuit] = {}
        self.max_reservations_per_ip = max_reservations_per_ip
        self._reservation_ips: dict[ID, str] = {}  # the IP each slot holder reserved from
        self._throttle = LogThrottle()
        self.refused_reservations = 0

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        try:
            await super()._handle_hop_stream(stream)
        finally:
            with trio.CancelScope(shield=True):
                await self._finish(stream, clean=True)

    # -- reservations -----------------------------------------------------------

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        ip = _remote_ip(stream)
        reason = self._admit_reservation(peer, ip)
        if reason is not None:
            self.refused_reservations += 1
            held_back = self._throttle.allow("reservation refused", trio.current_time())
            if held_back is not None:
                events.warning("relay reservation refused", peer=str(peer), ip=ip, reason=reason, not_logged_since=held_back)
            with trio.move_on_after(STATUS_TIMEOUT):
                try:
                    await write_delimited_msg(
                        stream,
                        HopMessage(type=HopMessage.STATUS, status=to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)),
                    )
                except Exception as error:  # the requester is gone: refused either way
                    logger.debug("relay: refusing a reservation: %r", error)
            return
        own = HopMessage()
        own.CopyFrom(msg)
        own.ClearField("peer")  # the slot is always the requesting peer's own
        # Counted against its IP from now: the library answers, then waits 0.1 s before
        # returning, and the next request from the same address may come meanwhile.
        self._reservation_ips[peer] = ip
        try:
            await super()._handle_reserve(stream, own)
        finally:
            if self.resource_manager.get_reservation(peer) is None:
                self._reservation_ips.pop(peer, None)

    def _admit_reservation(self, peer: ID, ip: str) -> str | None:
        """None if ``peer`` (connected from ``ip``) may hold a slot; else why not."""
        self._forget_departed()
        held = self.resource_manager._reservations
        if peer in held:
            return None  # a renewal
        if len(held) >= self.limits.max_reservations:
            return f"relay full ({self.limits.max_reservations} reservations)"
        if sum(1 for other in self._reservation_ips.values() if other == ip) >= self.max_reservations_per_ip:
            return f"too many reservations from {ip} ({self.max_reservations_per_ip})"
        return None

    def _forget_departed(self) -> None:
        """End the reservations of peers that have no connection to us any more (the
        spec ties a reservation to its connection) and of expired ones."""
        network = self.host.get_network()
        held = self.resource_manager._reservations
        now = time.time()
        for peer in list(held):
            if now > held[peer].expires_at or not network.get_connections(peer):
                del held[peer]
        for peer in [p for p in self._reservation_ips if p not in held]:
            del self._reservation_ips[peer]

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        key = frozenset((id(src_stream), id(dst_stream)))
        circuit = self._circuits.get(key)
        if circuit is not None:  # the call for the other direction relays both
            if circuit.done:
                del self._circuits[key]
            else:
                circuit.partner_seen = True
            return
        # No await since the lookup: the other call of the pair will find this entry.
        circuit = self._circuits[key] = _Circuit()
        try:
            await self._relay_circuit(circuit, src_stream, dst_stream, peer_id, deadline, circuit_data_limit)
        finally:
            circuit.done = True
            if circuit.partner_seen:
                del self._circuits[key]
            self._forget_active_relay(src_stream, dst_stream)

    async def _relay_circuit(
        self,
        circuit: _Circuit,
        a: INetStream,
        b: INetStream,
        peer_id: ID,
        deadline: float | None,
        budget: list[int] | None,
    ) -> None:
        """Relay ``a`` <-> ``b`` until both directions ended or one failed, then finish both."""
        scope = circuit.scope
        if deadline is not None:  # the handler's deadline is on time.monotonic()
            scope.deadline = trio.current_time() + max(0.0, deadline - time.monotonic())
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._forward, circuit, a, b, budget)
                    nursery.start_soon(self._forward, circuit, b, a, budget)
            if scope.cancelled_caught and circuit.failure is None:
                hop_side = a if a.get_protocol() == HOP_PROTOCOL_ID else b
                circuit.fail("circuit duration limit exceeded", status_to=hop_side)
        finally:
            with trio.CancelScope(shield=True):
                if circuit.eofs == 2:
                    logger.debug("relay circuit (%s) closed by both ends", peer_id)
                    await self._finish(a, clean=True)
                    await self._finish(b, clean=True)
                else:
                    logger.debug("relay circuit (%s) ends: %s", peer_id, circuit.failure or "cancelled")
                    if circuit.status_to is not None:
                        logger.warning("relay circuit (%s): %s", peer_id, circuit.failure)
                        with trio.move_on_after(STATUS_TIMEOUT):
                            await self._send_status(
                                circuit.status_to, StatusCode.RESOURCE_LIMIT_EXCEEDED, str(circuit.failure)
                            )
                    await self._finish(a, clean=False)
                    await self._finish(b, clean=False)

    async def _forward(
        self, circuit: _Circuit, src: INetStream, dst: INetStream, budget: list[int] | None
    ) -> None:
        """One direction: ``src`` -> ``dst`` until EOF, then half-close ``dst``."""
        try:
            while True:
                try:
                    data = await src.read(RELAY_READ)
                except StreamEOF:
                    break
                if not data:
                    break
                if budget is not None:
                    if len(data) > budget[0]:
                        circuit.fail("circuit data limit exceeded", status_to=src)
                        return
                    budget[0] -= len(data)
                await dst.write(data)
            await dst.close_write()  # type: ignore[attr-defined]  # NetStream has it; the interface does not say
            circuit.eofs += 1
        except Exception as error:
            circuit.fail(f"{type(error).__name__}: {error}")

    async def _finish(self, stream: INetStream, *, clean: bool) -> None:
        """Close (both directions already ended) or else reset one stream, each bounded."""
        if clean:
            with trio.move_on_after(FINISH_TIMEOUT):
                try:
                    await stream.close()
                    return
                except Exception as error:
                    logger.debug("relay: closing a circuit stream failed: %r", error)
        with trio.move_on_after(FINISH_TIMEOUT):
            try:
                await stream.reset()
            except Exception as error:
                logger.debug("relay: resetting a circuit stream failed: %r", error)

    def _forget_active_relay(self, a: INetStream, b: INetStream) -> None:
        """Drop the library's per-peer entries that still name this circuit's streams."""
        for peer, streams in list(self._active_relays.items()):
            if any(s is a or s is b for s in streams if s is not None):
                del self._active_relays[peer]


def _remote_ip(stream: INetStream) -> str:
    try:
        remote = stream.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
    except Exception:  # no address known: one bucket for all such
        remote = None
    return str(remote[0]) if remote else "unknown"
