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
  buffered, up to eight full frames (one sender batch of ``yamux_flow``), and writes it
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

``runtime/relay.py`` builds ``RelayHop``; no library name is rebound.
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from punchgate.transports import BATCH_BYTES

logger = logging.getLogger(__name__)

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

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Circuits by their two streams (either order), until both calls of the pair came.
        self._circuits: dict[frozenset[int], _Circuit] = {}

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
