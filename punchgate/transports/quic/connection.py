"""One QUIC connection as py-libp2p sees it: a muxed connection whose streams are QUIC streams.

aioquic (``aioquic.quic.connection.QuicConnection``) does the protocol without I/O:
datagrams and the time go in, events and datagrams come out. :class:`QuicConn` drives
one such object (:class:`Engine`) for py-libp2p's swarm (``IMuxedConn``), and
:class:`QuicStream` is one bidirectional QUIC stream (``IMuxedStream``).

Who does what:

* the endpoint (``endpoint.py``) owns the UDP socket; it hands this connection the
  datagrams addressed to it (:meth:`QuicConn.datagram_received`) and, after each batch
  read from the socket, calls :meth:`QuicConn.flush` once: events are handled, blocked
  writers woken, and whatever aioquic wants to send goes out;
* one task per connection (:meth:`QuicConn.run`) sleeps until aioquic's next timer
  (loss detection, ACK delay, pacing, idle), the next keep-alive, or a request to send;
* a stream's ``write`` puts bytes into aioquic's send buffer and asks that task to send
  (:meth:`QuicConn.transmit_soon`), as do reads that free credit, FINs and resets: all
  that the tasks of one scheduling round queued goes out in one pass over aioquic
  (``datagrams_to_send`` walks every open stream for every packet it builds, so a pass
  per write made 1,000 concurrent streams quadratic); ``read`` takes bytes that the
  endpoint's task queued on the stream.

Flow control follows the application (the credit policy shared with TCP, see
``punchgate.transports``): aioquic as shipped raises its windows as packets *arrive*
(doubling MAX_STREAM_DATA whenever half of it has been received, and MAX_DATA alike),
so a reader that stops is not felt by the sender and buffers grow without bound.
:class:`Engine` grants credit only for bytes the application has *read*: each stream may
hold ``RECEIVE_WINDOW`` unread bytes and the connection ``2 * RECEIVE_WINDOW``, and
credit goes out in half-window steps. Writers wait while ``SEND_BUFFER`` bytes of
theirs are unacknowledged in aioquic, so back-pressure reaches the writing task; a
stalled reader therefore holds the sender with bounded memory on both ends.

Other departures from aioquic's defaults, each for a measured reason:

* packets may exceed 1,200 bytes once the handshake is done and only on loopback
  (``LOOPBACK_DATAGRAM``, capped by the peer's ``max_udp_payload_size``): per-packet
  Python work is what limits throughput (``scripts/bench_quic_raw.py``); other paths
  keep QUIC's guaranteed 1,200 bytes (no path MTU discovery here);
* the pacer may release bursts worth ``PACING_BURST`` seconds, and does not pace at all
  when the round trip is shorter than that: trio's timers (epoll) have a 1 ms
  granularity, and a pacer that wants to wait microseconds between packets otherwise
  waits a millisecond each time (measured: 4 MB/s instead of 25 at 1,200 B);
* ACKs ride with the next packet we send; aioquic as shipped holds them for its delay
  (1 ms) even when data goes out meanwhile, so a request and its answer cost four
  packets instead of two. After a batch of two or more packets the ACK goes at once
  (a bulk sender needs it); after a single one, it waits up to ``ACK_DELAY`` for the
  answer to carry it;
* a PING goes out when nothing was heard from the peer for ``KEEP_ALIVE`` seconds
  (``KEEP_ALIVE_IDLE`` while no stream is open): it keeps NAT mappings and the idle
  timer alive, and a dead peer's host answers it with ICMP port unreachable, which the
  endpoint reports (:meth:`QuicConn.unreachable`): a tunnel whose peer was killed is
  closed within seconds, as a TCP one is by the peer host's RST;
* the server asks for the client's certificate (libp2p authenticates both ends), and
  after the handshake both ends check the libp2p certificate extension
  (``certificate.py``) before the connection is handed to anyone.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from aioquic.buffer import Buffer, size_uint_var
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicConnectionState,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, pull_quic_transport_parameters
from aioquic.quic.recovery import QuicPacketPacer
from libp2p.abc import IMuxedConn, IMuxedStream
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamReset,
)

from punchgate.transports import RECEIVE_WINDOW
from punchgate.transports.quic.certificate import ALPN, CertificateError, peer_id_of

if TYPE_CHECKING:
    from punchgate.transports.quic.endpoint import Endpoint

STREAM_WINDOW = RECEIVE_WINDOW  # unread bytes one stream may hold
CONNECTION_WINDOW = 2 * RECEIVE_WINDOW  # unread bytes all streams of a connection may hold
SEND_BUFFER = 2 * 1024 * 1024  # a writer waits while this much of its stream is unacknowledged
MAX_INCOMING_STREAMS = 1024  # streams a peer may have open towards us at once
MIN_DATAGRAM = 1200  # QUIC's guaranteed packet size: used until the handshake is done, and off loopback
LOOPBACK_DATAGRAM = 65000  # a loopback UDP datagram holds up to 65,507 B (IPv4; MTU 65,536)
PACING_BURST = 0.002  # seconds of packets the pacer may release at once (trio's timers: 1 ms)
ACK_DELAY = 0.001  # the longest an ACK waits for a packet of ours to ride with (aioquic's default)
KEEP_ALIVE = 3.0  # seconds without a packet from the peer before we send a PING (streams open)
KEEP_ALIVE_IDLE = 15.0  # the same with no stream open: NAT mappings last 30 s or more
IDLE_TIMEOUT = 30.0  # the connection ends after this long without a packet (keep-alives included)
UNREACHABLE_LIMIT = 2  # ICMP port unreachable this many times in a row, nothing heard between: peer gone
APP_ERROR_RESET = 0  # the error code of our stream resets (libp2p defines none)


class _BurstPacer(QuicPacketPacer):
    """aioquic's pacer, allowing bursts worth :data:`PACING_BURST` seconds, and off on
    paths whose round trip is shorter than that (a pacing wait there costs more than the
    whole round trip: a sleep lasts at least one timer tick)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        if smoothed_rtt < PACING_BURST:
            self.packet_time = None
            return
        super().update_rate(congestion_window, smoothed_rtt)
        if self.bucket_max < PACING_BURST:
            self.bucket_max = PACING_BURST


class Engine(QuicConnection):
    """aioquic's connection with our credit policy, client certificates and packet size.

    Overrides private methods of aioquic 1.7.2 (pinned in pyproject.toml):
    ``_initialize``, ``_parse_transport_parameters``, ``_write_connection_limits``,
    ``_write_stream_limits``, ``_write_stream_frame``; and sets ``_loss._pacer``,
    ``_max_datagram_size``, ``_ack_delay``."""

    def __init__(self, *, configuration: QuicConfiguration, **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        for limit, value in ((self._local_max_streams_bidi, MAX_INCOMING_STREAMS), (self._local_max_streams_uni, 0)):
            limit.value = limit.sent = value  # libp2p uses no unidirectional streams
        self._loss._pacer = _BurstPacer(max_datagram_size=self._max_datagram_size)
        self._ack_delay = ACK_DELAY
        self.read_total = 0  # bytes the application has consumed, on every stream
        self.read_offsets: dict[int, int] = {}  # per stream: bytes consumed (or given up)
        self.credit_pending: set[int] = set()  # streams whose reads call for MAX_STREAM_DATA
        self.peer_max_udp_payload = 65527  # the transport parameter's default

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True  # libp2p authenticates clients too

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        size = pull_quic_transport_parameters(Buffer(data=data)).max_udp_payload_size
        if size is not None:
            self.peer_max_udp_payload = size

    def ack_now(self, now: float) -> None:
        """Send pending ACKs with the next packet. aioquic writes an ACK only once its time
        is strictly past, and lets the pacer hold it otherwise: "now" would not do on a
        clock that has not moved (trio's mock clock): a timer due at once, woken in a loop."""
        for space in self._spaces.values():
            if space.ack_at is not None and space.ack_at >= now:
                space.ack_at = now - 1e-9

    def use_datagram_size(self, size: int) -> None:
        """Send packets of up to ``size`` bytes from now on."""
        self._max_datagram_size = size
        self._loss._pacer._max_datagram_size = size
        cc = self._loss._cc
        cc._max_datagram_size = size  # type: ignore[attr-defined]  # reno and cubic have it
        cc.congestion_window = max(cc.congestion_window, 10 * size)

    # -- credit follows the application's reads --------------------------------

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        data = self._local_max_data
        wanted = self.read_total + CONNECTION_WINDOW
        if wanted - data.value >= CONNECTION_WINDOW // 2:
            data.value = wanted
        for limit in (data, self._local_max_streams_bidi, self._local_max_streams_uni):
            if limit is not data and limit.sent - limit.used >= limit.value - limit.sent:
                continue  # as aioquic: announce more streams only when the peer runs short
            if limit.value != limit.sent:
                buf = builder.start_frame(
                    limit.frame_type,
                    capacity=CONNECTION_LIMIT_FRAME_CAPACITY,
                    handler=self._on_connection_limit_delivery,
                    handler_args=(limit,),
                )
                buf.push_uint_var(limit.value)
                limit.sent = limit.value

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        # Called for every open stream for every packet: the common case returns at once.
        if stream.stream_id in self.credit_pending:
            self.credit_pending.discard(stream.stream_id)
            local = stream.max_stream_data_local
            if local and not stream.receiver.is_finished:
                wanted = self.read_offsets.get(stream.stream_id, 0) + STREAM_WINDOW
                if wanted - local >= STREAM_WINDOW // 2:
                    stream.max_stream_data_local = wanted
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_stream_frame(self, builder: Any, space: Any, stream: Any, max_offset: int) -> int:
        """aioquic's, except that the frame's length may take 4 bytes: aioquic writes it
        in 2, so a STREAM frame held at most 16,383 bytes and packets on loopback could
        not grow past ~16 KB (larger ones went out corrupt)."""
        sender = stream.sender
        overhead = 5 + size_uint_var(stream.stream_id) + (size_uint_var(sender.next_offset) if sender.next_offset else 0)
        before = sender.highest_offset
        frame = sender.get_frame(builder.remaining_flight_space - overhead, max_offset)
        if frame is None:
            return 0
        frame_type = QuicFrameType.STREAM_BASE | 2  # with a length
        if frame.offset:
            frame_type |= 4
        if frame.fin:
            frame_type |= 1
        buf = builder.start_frame(
            frame_type,
            capacity=overhead,
            handler=sender.on_data_delivery,
            handler_args=(frame.offset, frame.offset + len(frame.data), frame.fin),
        )
        buf.push_uint_var(stream.stream_id)
        if frame.offset:
            buf.push_uint_var(frame.offset)
        buf.push_uint_var(len(frame.data))
        buf.push_bytes(frame.data)
        return sender.highest_offset - before

    def consumed(self, stream_id: int, count: int) -> bool:
        """The application read ``count`` bytes of ``stream_id``; whether that calls for a
        MAX_DATA or MAX_STREAM_DATA now (half a window read since the last grant)."""
        self.read_total += count
        offset = self.read_offsets[stream_id] = self.read_offsets.get(stream_id, 0) + count
        due = self.read_total + CONNECTION_WINDOW - self._local_max_data.value >= CONNECTION_WINDOW // 2
        stream = self._streams.get(stream_id)
        limit = 0 if stream is None or stream.receiver.is_finished else stream.max_stream_data_local
        if limit and offset + STREAM_WINDOW - limit >= STREAM_WINDOW // 2:
            self.credit_pending.add(stream_id)
            due = True
        return due

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` written and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def received_up_to(self, stream_id: int) -> int:
        """The highest offset the peer has sent on ``stream_id`` (its final size after a reset)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.receiver.highest_offset


def configuration(is_client: bool, certificate: Any, private_key: Any) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        certificate=certificate,
        private_key=private_key,
        verify_mode=ssl.CERT_NONE,  # no CA: the libp2p extension is checked after the handshake
        idle_timeout=IDLE_TIMEOUT,
        max_data=CONNECTION_WINDOW,
        max_stream_data=STREAM_WINDOW,
        max_datagram_size=MIN_DATAGRAM,
    )


def _path_datagram_limit(ip: str) -> int:
    return LOOPBACK_DATAGRAM if ipaddress.ip_address(ip).is_loopback else MIN_DATAGRAM


class QuicConn(IMuxedConn):
    """A libp2p connection over one QUIC connection (``IMuxedConn``)."""

    def __init__(
        self,
        endpoint: Endpoint,
        engine: Engine,
        remote: tuple[Any, ...],
        is_initiator: bool,
        expected_peer: ID | None,
    ) -> None:
        self.endpoint = endpoint
        self.engine = engine
        self.remote = remote
        self._is_initiator = is_initiator
        self._expected_peer = expected_peer
        self.peer_id: ID = expected_peer  # type: ignore[assignment]  # the verified one once handshake_done
        self.event_started = trio.Event()
        self.handshake_done = trio.Event()  # set once verified, or failed (then ``error`` says why)
        self.error: str | None = None
        self.established = False
        self.closed = False
        self._streams: dict[int, QuicStream] = {}
        self._accept_in, self._accept_out = trio.open_memory_channel[QuicStream](math.inf)
        self._blocked_writers: set[QuicStream] = set()
        self._timer_at: float | None = None
        self._wake = trio.Event()  # set to make the connection's task send now
        self._task_scope: trio.CancelScope | None = None
        self._ping_ids = itertools.count(1)
        now = trio.current_time()
        self._last_heard = now
        self._last_ping = now
        self._unreachable = 0
        self._in_batch = False  # queued for the endpoint's flush after its current batch
        self._batch = 0  # datagrams received since the last flush
        self._wants_send = False  # transmit_soon was called
        self._sleep: trio.CancelScope | None = None  # while the connection's task waits: its scope
        self._gone = False  # the endpoint has forgotten this connection
        self.on_established: Callable[[QuicConn], None] = lambda conn: None

    # -- IMuxedConn -------------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        return self._is_initiator

    @property
    def is_established(self) -> bool:
        return self.established and not self.closed

    @property
    def is_closed(self) -> bool:
        return self.closed

    async def start(self) -> None:
        """Called by the swarm; the connection already runs (its timer task is the endpoint's)."""
        self.event_started.set()

    async def close(self) -> None:
        self.close_now("closed")
        await trio.lowlevel.checkpoint()

    async def open_stream(self) -> QuicStream:
        if self.closed:
            raise MuxedConnUnavailable(f"connection closed: {self.error}")
        stream_id = self.engine.get_next_available_stream_id()
        self.engine.send_stream_data(stream_id, b"")  # takes the ID; the first write opens it on the wire
        stream = self._streams[stream_id] = QuicStream(self, stream_id, True)
        await trio.lowlevel.checkpoint()
        return stream

    async def accept_stream(self) -> QuicStream:
        try:
            return await self._accept_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise MuxedConnUnavailable(f"connection closed: {self.error}") from None

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return [quic_multiaddr(self.remote[0], self.remote[1])]

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.DIRECT

    def get_remote_address(self) -> tuple[str, int]:
        return str(self.remote[0]), int(self.remote[1])

    def get_local_address(self) -> tuple[str, int]:
        return self.endpoint.local_address

    def __repr__(self) -> str:
        return f"<QuicConn {self.remote[0]}:{self.remote[1]} peer={self.peer_id} closed={self.closed}>"

    # -- driven by the endpoint -------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        self.engine.receive_datagram(data, addr, now)
        self._last_heard = now
        self._unreachable = 0
        self._batch += 1

    def flush(self) -> None:
        """Handle what aioquic has to say, wake writers, send what is due (ACKs at once
        after a batch of two or more packets)."""
        if self._batch >= 2:
            self.engine.ack_now(trio.current_time())
        self._batch = 0
        self._handle_events()
        if self._blocked_writers:
            for stream in list(self._blocked_writers):
                if stream.can_write_more():
                    self._blocked_writers.discard(stream)
                    stream.wake_writer()
        self.transmit()

    def transmit(self) -> None:
        """Send what aioquic has to send now, and note when its timer falls due."""
        engine = self.engine
        now = trio.current_time()
        send = self.endpoint.send
        for data, addr in engine.datagrams_to_send(now):
            send(data, addr)
        self._timer_at = timer = engine.get_timer()
        sleep = self._sleep
        if timer is not None and sleep is not None and timer < sleep.deadline:
            sleep.deadline = timer  # the connection's task wakes earlier than it planned

    def transmit_soon(self) -> None:
        """Have the connection's task send, once the current tasks have had their turn."""
        self._wants_send = True
        self._wake.set()

    def unreachable(self, now: float) -> None:
        """The peer's host said its port is closed (ICMP), in answer to a packet of ours."""
        self._unreachable += 1
        if self._unreachable >= UNREACHABLE_LIMIT:
            self.terminate("the peer's port is closed (ICMP port unreachable)")
            return
        self._ping(now)  # ask again at once: a second answer like this one ends the connection
        self.transmit_soon()

    async def run(self) -> None:
        """The connection's task: send when asked, handle aioquic's timer and the
        keep-alive when due, until the connection has ended (then the endpoint forgets it)."""
        with trio.CancelScope() as self._task_scope:
            try:
                while self.engine._state is not QuicConnectionState.TERMINATED:
                    if not self._wants_send:
                        with trio.move_on_at(self._deadline()) as self._sleep:
                            await self._wake.wait()
                        self._sleep = None
                    self._wake = trio.Event()
                    now = trio.current_time()
                    if self._wants_send:  # our own packets go out: ACKs ride with them
                        self._wants_send = False
                        self.engine.ack_now(now)
                    if self._timer_at is not None and now >= self._timer_at:
                        self.engine.handle_timer(now)
                    if self.established and not self.closed and now >= self._keepalive_at():
                        self._ping(now)
                    self.flush()
            finally:
                self.terminate(self.error or "connection ended")

    def _deadline(self) -> float:
        at = self._timer_at if self._timer_at is not None else math.inf
        if self.established and not self.closed:
            at = min(at, self._keepalive_at())
        return at

    def _keepalive_at(self) -> float:
        return max(self._last_heard, self._last_ping) + (KEEP_ALIVE if self._streams else KEEP_ALIVE_IDLE)

    def _ping(self, now: float) -> None:
        self._last_ping = now
        self.engine.send_ping(next(self._ping_ids))

    # -- aioquic's events ---------------------------------------------------------

    def _handle_events(self) -> None:
        engine = self.engine
        while (event := engine.next_event()) is not None:
            kind = type(event)
            if kind is events.StreamDataReceived:
                self._on_stream_data(event)  # type: ignore[arg-type]
            elif kind is events.StreamReset:
                stream = self._streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.on_reset_received()
            elif kind is events.StopSendingReceived:
                stream = self._streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    stream.on_stop_sending()
            elif kind is events.HandshakeCompleted:
                self._on_handshake_completed(event)  # type: ignore[arg-type]
            elif kind is events.ConnectionIdIssued:
                self.endpoint.route(event.connection_id, self)  # type: ignore[attr-defined]
            elif kind is events.ConnectionIdRetired:
                self.endpoint.unroute(event.connection_id)  # type: ignore[attr-defined]
            elif kind is events.ConnectionTerminated:
                reason = event.reason_phrase or f"error {event.error_code}"  # type: ignore[attr-defined]
                self.terminate(f"connection closed by the peer: {reason}" if not self.closed else self.error or reason)

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.closed or (stream_id & 1) == (0 if self._is_initiator else 1) or stream_id & 2:
                self._give_up_bytes(stream_id, len(event.data))  # a stream we are done with
                return
            stream = self._streams[stream_id] = QuicStream(self, stream_id, False)
            self._accept_in.send_nowait(stream)
        stream.on_data(event.data, event.end_stream)

    def _on_handshake_completed(self, event: events.HandshakeCompleted) -> None:
        try:
            if event.alpn_protocol != ALPN:
                raise CertificateError(f"the peer speaks {event.alpn_protocol!r}, not {ALPN!r}")
            certificate = self.engine.tls._peer_certificate
            if certificate is None:
                raise CertificateError("the peer sent no certificate")
            peer = peer_id_of(certificate)
            if self._expected_peer is not None and peer != self._expected_peer:
                raise CertificateError(f"the peer is {peer}, not {self._expected_peer}")
        except CertificateError as exc:
            # TLS alert 42 (bad_certificate) as a QUIC crypto error
            self.engine.close(error_code=QuicErrorCode.CRYPTO_ERROR | 42, reason_phrase=str(exc)[:100])
            self.transmit()
            self._end(f"handshake refused: {exc}")
            return
        self.peer_id = peer
        limit = min(_path_datagram_limit(str(self.remote[0])), self.engine.peer_max_udp_payload)
        if limit > MIN_DATAGRAM:
            self.engine.use_datagram_size(limit)
        self.established = True
        self.handshake_done.set()
        self.on_established(self)

    # -- streams and credit -------------------------------------------------------

    def consumed(self, stream: QuicStream, count: int) -> None:
        """The application read ``count`` bytes of ``stream``: credit them (in half windows)."""
        if not stream.settled and self.engine.consumed(stream.stream_id, count):
            self.transmit_soon()

    def settle(self, stream: QuicStream) -> None:
        """``stream`` will not be read any further: its bytes received or still due stop
        counting against the connection's window."""
        if stream.settled:
            return
        stream.settled = True
        engine = self.engine
        read = engine.read_offsets.pop(stream.stream_id, 0)
        engine.credit_pending.discard(stream.stream_id)
        engine.read_total += max(0, engine.received_up_to(stream.stream_id) - read)

    def _give_up_bytes(self, stream_id: int, count: int) -> None:
        self.engine.read_total += count

    def forget(self, stream: QuicStream) -> None:
        """Both directions of ``stream`` are over: drop it from the table."""
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
        self._blocked_writers.discard(stream)
        if not stream.settled and not stream.buffered:
            self.settle(stream)

    def wait_for_room(self, stream: QuicStream) -> None:
        self._blocked_writers.add(stream)

    # -- the end --------------------------------------------------------------------

    def close_now(self, reason: str) -> None:
        """Close the connection (CONNECTION_CLOSE to the peer); aioquic drains, then it ends."""
        if self.closed:
            return
        self.engine.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="")
        self.transmit()
        self._end(reason)

    def terminate(self, reason: str) -> None:
        """The connection is over (the peer closed it, it timed out, the peer is gone, its
        endpoint closed): nothing more is sent or received, and the endpoint forgets it."""
        self._end(reason)
        if self._gone:
            return
        self._gone = True
        engine = self.engine
        if engine._state is not QuicConnectionState.TERMINATED:
            engine._close_event = events.ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase=reason
            )
            engine._close_end()
        self.endpoint.connection_ended(self)
        if self._task_scope is not None:
            self._task_scope.cancel()

    def _end(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = reason
        self._accept_in.close()
        for stream in list(self._streams.values()):
            stream.on_connection_lost(reason)
        self._blocked_writers.clear()
        self.handshake_done.set()


class QuicStream(IMuxedStream):
    """One bidirectional QUIC stream (``IMuxedStream``).

    Reads return bytes the endpoint queued here (credit is granted as they are taken);
    ``write`` waits while :data:`SEND_BUFFER` bytes are unacknowledged, then hands the
    bytes to aioquic and transmits. ``close`` and ``close_write`` send FIN (a write
    half-close, as Yamux's ``close``); ``reset`` sends RESET_STREAM and STOP_SENDING.
    A peer's RESET_STREAM ends both directions (libp2p's reset); its STOP_SENDING ends
    our writing only."""

    muxed_conn: QuicConn

    def __init__(self, conn: QuicConn, stream_id: int, is_initiator: bool) -> None:
        self.muxed_conn = conn
        self.stream_id = stream_id
        self.is_initiator = is_initiator
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        self.settled = False  # no longer counted against the connection's window
        self._eof = False  # the peer's FIN arrived
        self._reset_received = False
        self._stopped = False  # the peer sent STOP_SENDING: we may not write
        self._fin_sent = False
        self._reset_sent = False
        self._lost: str | None = None  # the connection ended
        self._reader: trio.Event | None = None
        self._writer: trio.Event | None = None

    # -- reading ---------------------------------------------------------------

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        while True:
            if self._chunks:
                data = self._take(n)
                self.muxed_conn.consumed(self, len(data))
                return data
            if self._reset_received or self._reset_sent:
                raise MuxedStreamReset("stream reset")
            if self._eof:
                raise MuxedStreamEOF("stream closed by the peer")
            if self._lost is not None:
                raise MuxedStreamReset(f"connection lost: {self._lost}")
            event = self._reader = trio.Event()
            await event.wait()

    def _take(self, n: int | None) -> bytes:
        """Up to ``n`` queued bytes (all of them for ``n`` None or negative), joined."""
        chunks = self._chunks
        if n is None or n < 0:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
        elif len(chunks[0]) >= n:
            first = chunks[0]
            if len(first) == n:
                data = chunks.popleft()
            else:
                data, chunks[0] = first[:n], first[n:]
        else:
            parts: list[bytes] = []
            size = 0
            while chunks and size < n:
                part = chunks[0]
                room = n - size
                if len(part) <= room:
                    parts.append(chunks.popleft())
                    size += len(part)
                else:
                    parts.append(part[:room])
                    chunks[0] = part[room:]
                    size = n
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.buffered -= len(data)
        return data

    # -- writing ----------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        conn = self.muxed_conn
        self._check_writable()
        while not self.can_write_more():
            event = self._writer = trio.Event()
            conn.wait_for_room(self)
            await event.wait()
            self._check_writable()
        conn.engine.send_stream_data(self.stream_id, bytes(data))
        conn.transmit_soon()
        await trio.lowlevel.checkpoint()

    def can_write_more(self) -> bool:
        if self._lost is not None or self._stopped or self._reset_received or self._reset_sent:
            return True  # the writer must wake and fail
        return self.muxed_conn.engine.unacknowledged(self.stream_id) < SEND_BUFFER

    def _check_writable(self) -> None:
        if self._reset_received or self._reset_sent or self._stopped:
            raise MuxedStreamReset("stream reset")
        if self._lost is not None:
            raise MuxedStreamReset(f"connection lost: {self._lost}")
        if self._fin_sent:
            raise MuxedStreamClosed("stream closed for writing")

    async def close_write(self) -> None:
        if not (self._fin_sent or self._reset_sent or self._lost is not None or self._stopped):
            self._fin_sent = True
            conn = self.muxed_conn
            conn.engine.send_stream_data(self.stream_id, b"", end_stream=True)
            conn.transmit_soon()
            self._maybe_forget()
        await trio.lowlevel.checkpoint()

    async def close(self) -> None:
        await self.close_write()

    async def reset(self) -> None:
        if not (self._reset_sent or self._lost is not None):
            self._reset_sent = True
            conn = self.muxed_conn
            engine = conn.engine
            try:
                if not self._fin_sent or engine.unacknowledged(self.stream_id):
                    engine.reset_stream(self.stream_id, APP_ERROR_RESET)
                if not (self._eof or self._reset_received):
                    engine.stop_stream(self.stream_id, APP_ERROR_RESET)
            except ValueError:
                pass  # aioquic already dropped the stream: nothing left to tell the peer
            self._chunks.clear()
            self.buffered = 0
            conn.settle(self)
            self.wake_reader()
            self.wake_writer()
            conn.transmit_soon()
            self._maybe_forget()
        await trio.lowlevel.checkpoint()

    def set_deadline(self, ttl: int) -> None:
        raise NotImplementedError("QUIC streams have no deadlines; bound calls with a cancel scope")

    def get_remote_address(self) -> tuple[str, int]:
        return self.muxed_conn.get_remote_address()

    async def __aenter__(self) -> QuicStream:
        return self

    # -- told by the connection ---------------------------------------------------------

    def on_data(self, data: bytes, end_stream: bool) -> None:
        if self._reset_sent:
            self.muxed_conn._give_up_bytes(self.stream_id, len(data))
        elif data:
            self._chunks.append(data)
            self.buffered += len(data)
        if end_stream:
            self._eof = True
        self.wake_reader()
        if end_stream:
            self._maybe_forget()

    def on_reset_received(self) -> None:
        self._reset_received = True
        self._chunks.clear()
        self.buffered = 0
        conn = self.muxed_conn
        conn.settle(self)
        if not (self._fin_sent or self._reset_sent):
            try:
                conn.engine.reset_stream(self.stream_id, APP_ERROR_RESET)
            except ValueError:
                pass
        self.wake_reader()
        self.wake_writer()
        conn.forget(self)

    def on_stop_sending(self) -> None:
        self._stopped = True  # aioquic has reset our sending part already
        self.wake_writer()
        self._maybe_forget()

    def on_connection_lost(self, reason: str) -> None:
        self._lost = reason
        self.wake_reader()
        self.wake_writer()

    def wake_reader(self) -> None:
        event, self._reader = self._reader, None
        if event is not None:
            event.set()

    def wake_writer(self) -> None:
        event, self._writer = self._writer, None
        if event is not None:
            event.set()

    def _maybe_forget(self) -> None:
        sending_over = self._fin_sent or self._reset_sent or self._stopped
        receiving_over = self._eof or self._reset_received or self._reset_sent
        if sending_over and receiving_over:
            self.muxed_conn.forget(self)


def quic_multiaddr(ip: str, port: int) -> multiaddr.Multiaddr:
    family = "ip6" if ":" in ip else "ip4"
    return multiaddr.Multiaddr(f"/{family}/{ip}/udp/{port}/quic-v1")
