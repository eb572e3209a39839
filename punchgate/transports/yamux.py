"""Yamux over one Noise session: one frame per Noise message, credit per half window, one writer.

Defects (py-libp2p 0.8.1, ``libp2p/stream_muxer/yamux/yamux.py``):

- The 5-second reset: ``YamuxStream.write`` (~229-292), when the peer's receive window
  is used up, polls every 10 ms inside ``move_on_after(5.0)`` and then raises an error
  surfaced as ``StreamReset``; no RST goes on the wire, so the peer's reader hangs with
  what it got. Any tunnel whose far-end client stops reading for 5 s is destroyed.
- Frame size: DATA frames carry up to 65,524 B (``MAX_MESSAGE_SIZE`` - header), 5 B
  more than one Noise message holds, so each frame becomes a full Noise message plus
  a 17 B one.
- Window: every stream starts with a 256 KiB receive window that autotuning grows only
  slowly, and ``YamuxStream.read`` (~529, ~581) sends a WINDOW_UPDATE (its own Noise
  message) for nearly every read.
- Receive path: ``Yamux.handle_incoming`` (~1186-1693) reads each header and body with
  ``read_exactly`` (copies) under a ``fail_after`` per body, takes ``streams_lock`` and
  the stream's ``window_lock`` per frame, formats debug strings per frame, and buffers
  bodies in a ``bytearray`` from which every read copies again.
- Writers: every writer (the frame reader included, to acknowledge a SYN or answer a
  ping) takes the connection's write lock and writes itself. Two ends whose writers
  are stuck in full sockets then stop reading and deadlock (seen with 50 concurrent
  tunnel connections, about one run in four), and a writer cancelled inside its socket
  send leaves half a Noise message on the wire, which breaks the connection.

:class:`FlowYamux` and :class:`FlowYamuxStream` follow the package's rules
(``punchgate.transports``):

- a DATA payload is at most ``FRAME_PAYLOAD`` bytes: header + payload = one Noise message;
- each stream announces a ``RECEIVE_WINDOW`` window when it opens (the SYN or ACK
  WINDOW_UPDATE carries the delta over the spec's 256 KiB, as go-yamux does) and
  credits the peer in ``CREDIT_STEP`` steps of bytes read;
- a writer waits on an event for window space, with no deadline of its own: woken by
  window updates, the peer's FIN or RST, a local close or reset, the connection's end;
- one task per connection, the sender, is the only writer of the Noise session. A
  stream write queues batches of at most ``WRITE_BATCH`` frames, one at a time per
  stream (the next waits until the sender has written the previous one, which carries
  back-pressure); control frames are queued without waiting. The sender writes what is
  queued, several batches per call into the session (``NoiseSession.write_many``: one
  socket write per batch), in queue order, so streams take turns. A queued batch is
  written whole or the connection is torn down; a cancelled waiter only stops waiting;
- the frame reader dispatches without locks (trio runs it between awaits, which is all
  the library's locks protected), takes bodies that are already decrypted as zero-copy
  views (``NoiseSession.read_exact``), applies the body timeout only when it has to
  wait, and queues bodies per stream (:class:`ChunkBuffer`), handed to readers without
  a copy when a read takes a whole body;
- inbound streams are capped per connection (``max_inbound_streams``, set per host
  from ``Limits.inbound_streams_per_conn`` by ``libp2p_fixes/inbound.py``): a SYN
  beyond the cap is answered with RST before the stream is registered, as go-yamux
  does past ``MaxIncomingStreams`` (the library accepts any number, each with a task
  negotiating its protocol for up to 10 s);
- any failure of the frame reader tears the connection down through the library's
  ``_cleanup_on_error``, which resets every stream.

The wire protocol is plain Yamux 1.0.0: unpatched peers interoperate.
``libp2p/stream_muxer/muxer_multistream.py`` builds the muxer by the module-global name
``Yamux`` (~143); :func:`yamux_for` is bound there: ``FlowYamux`` over our
``NoiseSession``, the library's ``Yamux`` over any other session (a host built with
other security protocols, as some tests do).
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from types import TracebackType
from typing import Any, cast

import trio
from libp2p.io.exceptions import IOException
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.exceptions import (
    MuxedStreamEOF,
    MuxedStreamError,
    MuxedStreamReset,
)
from libp2p.stream_muxer.yamux.yamux import (
    DEFAULT_WINDOW_SIZE,
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER_SIZE,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)

from punchgate.transports import CREDIT_STEP, FRAME_PAYLOAD, RECEIVE_WINDOW, WRITE_BATCH, YAMUX_HEADER
from punchgate.transports.noise import NoiseSession

LIBRARY_YAMUX = muxer_multistream.Yamux  # what muxer negotiation builds as shipped

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
assert _HEADER.size == HEADER_SIZE == YAMUX_HEADER
# A write's last few bytes ride in the same batch: a Noise session relayed over a stream
# writes 8 x 65,537 B at a time, which would otherwise leave a 240 B batch of its own.
SMALL_TAIL = 4096
SEND_COALESCE = 8  # frames per call into the secure session: 8 full Noise messages fill its buffer
MAX_QUEUED_PING_REPLIES = 4096  # a peer that pings but never reads gets no more answers
BODY_READ_TIMEOUT = 60.0  # as the library's default for a DATA body that is slow to arrive
# Ways the transport reports that the connection is over (logged quietly).
_CONNECTION_GONE = (IOException, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def yamux_for(secured_conn: Any, peer_id: Any, **kwargs: Any) -> Yamux:
    """The muxer for a negotiated ``/yamux/1.0.0``: ours over our Noise session."""
    if isinstance(secured_conn, NoiseSession):
        return FlowYamux(secured_conn, peer_id, **kwargs)
    return LIBRARY_YAMUX(secured_conn, peer_id, **kwargs)


class InnerLock:
    """``trio.Lock`` semantics, but taking it when free is not a checkpoint (a scheduler
    pass, ~8 us here). Used only where the same path also reaches an I/O call that
    yields (the socket send), so other tasks still get their turn once per write."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


class _WakesWriter:
    """A plain instance field whose every assignment wakes a blocked writer. The library's
    frame handling and ``Yamux.close``/``_cleanup_on_error`` assign ``send_window``,
    ``closed``, ``send_closed``, ``reset_received`` directly: the only points at which a
    writer waiting for window space can be told that something changed."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__[self.slot]

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.slot] = value
        instance._wake_writer()


class ChunkBuffer:
    """A stream's received bytes: frame bodies queued as they arrived.

    Stands in for the library's per-stream ``bytearray`` in
    ``Yamux.stream_buffers``; the library only uses ``len``/truth and ``clear``
    on it once reads go through ``FlowYamuxStream.read``.
    """

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, data: bytes | memoryview) -> None:
        if len(data):
            self._chunks.append(data)
            self._size += len(data)

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` bytes (all with ``n < 0``)."""
        if n < 0 or n > self._size:
            n = self._size
        self._size -= n
        first = self._chunks[0]
        if len(first) == n:
            self._chunks.popleft()
            return first if isinstance(first, bytes) else bytes(first)
        if len(first) > n:
            view = memoryview(first)
            self._chunks[0] = view[n:]
            return bytes(view[:n])
        parts = []
        while n:
            first = self._chunks[0]
            if len(first) <= n:
                parts.append(self._chunks.popleft())
                n -= len(first)
            else:
                view = memoryview(first)
                parts.append(view[:n])
                self._chunks[0] = view[n:]
                n = 0
        return b"".join(parts)


def typ_of(header: bytes | memoryview) -> int:
    """The type field of a packed Yamux header."""
    return header[1]


class _Queued:
    """Frames waiting for the sender; ``sent`` is set once written (None: nobody waits)."""

    __slots__ = ("failed", "frames", "sent")

    def __init__(self, frames: list[tuple[bytes, bytes | memoryview]], sent: trio.Event | None) -> None:
        self.frames = frames
        self.sent = sent
        self.failed: str | None = None  # why the frames were not sent

    async def written(self) -> None:
        """Return once the sender wrote these frames; raise if it never will."""
        if self.sent is not None and not self.sent.is_set():
            await self.sent.wait()
        if self.failed is not None:
            raise MuxedStreamError(f"connection lost: {self.failed}")


class FlowYamuxStream(YamuxStream):
    """Stream of a ``FlowYamux``: big window, credit per half window, batched writes,
    a writer that waits for window space as long as its caller lets it."""

    send_window = _WakesWriter()
    closed = _WakesWriter()
    send_closed = _WakesWriter()
    reset_received = _WakesWriter()
    conn: FlowYamux

    def __init__(self, stream_id: int, conn: Any, is_initiator: bool) -> None:
        # Must exist before the base __init__ assigns the watched fields.
        self._writer_wakeup = trio.Event()
        self._writer_lock = InnerLock()  # one write's frames are not interleaved with another's
        super().__init__(stream_id, conn, is_initiator)
        # What we have granted the peer (the spec's 256 KiB + the delta we announce).
        self.recv_window = RECEIVE_WINDOW
        self.target_recv_window = RECEIVE_WINDOW
        self._uncredited = 0  # consumed by the application, not yet granted again
        self._in_flight: _Queued | None = None  # our last batch handed to the sender

    async def write(self, data: bytes) -> None:
        """Queue ``data`` for the sender and return; at most one batch is in flight.

        The last batch may still be on its way when this returns (like a socket
        send that returned once the kernel took the bytes): the next ``write`` or
        the ``close`` behind it waits for it, and reports a connection lost meanwhile.
        """
        self._check_writable()
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer once we return
        view = memoryview(data)
        total = len(view)
        sent = 0
        conn = self.conn
        async with self._writer_lock:
            while sent < total:
                await self._previous_batch_sent()
                await self._wait_for_send_window()
                # No await from here to the queueing: the window is debited
                # exactly for the frames the sender will write.
                frames: list[tuple[bytes, bytes | memoryview]] = []
                while sent < total and self.send_window > 0 and (
                    len(frames) < WRITE_BATCH or total - sent <= SMALL_TAIL
                ):
                    size = min(self.send_window, FRAME_PAYLOAD, total - sent)
                    self.send_window -= size
                    header = _HEADER.pack(0, TYPE_DATA, 0, self.stream_id, size)
                    frames.append((header, view[sent : sent + size]))
                    sent += size
                self._in_flight = await conn._send_pipelined(frames)

    def _wake_writer(self) -> None:
        """Release whoever waits on the current event; later waiters get a new one."""
        self._writer_wakeup.set()
        self._writer_wakeup = trio.Event()

    def _check_writable(self) -> None:
        # The library's messages, hence its NetStream mapping (StreamReset).
        if self.send_closed:
            raise MuxedStreamError("Stream is closed for sending")
        if self.closed:
            raise MuxedStreamError("Stream is closed")
        if self.conn.event_shutting_down.is_set():
            raise MuxedStreamError("Connection is shutting down")

    async def _wait_for_send_window(self) -> None:
        """Return once the peer granted window space; raise if the stream died."""
        while True:
            self._check_writable()
            if self.send_window > 0:
                return
            self._zero_window_waits += 1
            await self._writer_wakeup.wait()

    async def _previous_batch_sent(self) -> None:
        """Wait until our last queued batch is written; raise if it never will be."""
        queued = self._in_flight
        if queued is not None:
            await queued.written()
            self._in_flight = None

    async def read(self, n: int | None = -1) -> bytes:
        if n is None:
            n = -1
        if n == 0:
            return b""
        conn = self.conn
        while True:
            buffer = cast(ChunkBuffer | None, conn.stream_buffers.get(self.stream_id))
            if buffer:
                # Nothing below awaits: a cancelled read never loses taken bytes.
                data = buffer.take(n)
                if self.closed and not buffer:
                    conn._finalize_stream_locked(self, fully_closed=True)
                else:
                    self._credit_peer(len(data))
                return data
            if self.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if self.recv_closed or buffer is None:
                raise MuxedStreamEOF("Stream is closed for receiving")
            if conn.event_shutting_down.is_set():
                raise MuxedStreamEOF("Connection shut down")
            event = conn.stream_events.get(self.stream_id)
            if event is None:
                raise MuxedStreamEOF("Stream was removed during read")
            await event.wait()
            if conn.stream_events.get(self.stream_id) is event:
                conn.stream_events[self.stream_id] = trio.Event()

    def _credit_peer(self, consumed: int) -> None:
        """Grant consumed bytes back to the peer, but only half a window at a time."""
        self._uncredited += consumed
        if self._uncredited < CREDIT_STEP or self.recv_closed:
            return
        increment, self._uncredited = self._uncredited, 0
        self.recv_window += increment
        self.conn._send_soon(_HEADER.pack(0, TYPE_WINDOW_UPDATE, 0, self.stream_id, increment))


class FlowYamux(Yamux):
    """``Yamux`` with our streams, flow control and a lean frame reader."""

    stream_class = FlowYamuxStream
    secured_conn: NoiseSession
    max_inbound_streams = 2048  # streams the peer may have open on this connection at once

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused_streams = 0  # SYNs answered with RST for being over the cap
        # Only the sender writes (or a writer before the sender exists), and its
        # socket send yields: taking the lock need not be a scheduler pass too.
        self._write_lock = InnerLock()  # type: ignore[assignment]  # the same interface, no scheduler pass
        self._outbox: deque[_Queued] = deque()
        self._outbox_ready = trio.Event()
        self._queued_ping_replies = 0
        self._sender_started = False
        self._sender_gone: str | None = None  # why the sender stopped, once it has

    # -- sending: every frame goes through the outbox to the sender task ---------

    async def _write_frame(self, data: bytes) -> None:
        """Send one frame (the library's path for SYN, FIN, RST, GO_AWAY, pings)."""
        await self._send_and_wait([(data[:HEADER_SIZE], data[HEADER_SIZE:])])

    async def _send_and_wait(self, frames: list[tuple[bytes, bytes | memoryview]]) -> None:
        """Queue frames and return once the sender has written them.

        Cancelled while waiting, the frames are still sent (or the connection
        torn down): what a stream debited from its window always reaches the peer.
        """
        queued = await self._send_pipelined(frames)
        if queued is not None:
            await queued.written()

    async def _send_pipelined(self, frames: list[tuple[bytes, bytes | memoryview]]) -> _Queued | None:
        """Queue frames for the sender without waiting; returns what to wait on later."""
        if not self._start_sender():
            async with self._write_lock:  # no connection nursery (yet): write directly
                await self._send_frames(frames)
            return None
        queued = _Queued(frames, trio.Event())
        self._outbox.append(queued)
        self._outbox_ready.set()
        return queued

    def _send_soon(self, frame: bytes) -> None:
        """Queue a control frame without waiting (safe from the frame reader)."""
        if self._sender_gone is not None or self.event_shutting_down.is_set():
            return
        if not self._start_sender():
            return
        self._outbox.append(_Queued([(frame, b"")], None))
        self._outbox_ready.set()

    def _start_sender(self) -> bool:
        """Make sure the sender runs; False if frames cannot be queued."""
        if self._sender_gone is not None:
            raise MuxedStreamError(f"connection lost: {self._sender_gone}")
        if self._sender_started:
            return True
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(self._sender)
        except RuntimeError:
            return False  # the connection's nursery is closing
        self._sender_started = True
        return True

    async def _sender(self) -> None:
        """The connection's only writer: write queued frames in order until it ends."""
        outbox = self._outbox
        done: list[_Queued] = []
        try:
            while True:
                if not outbox:
                    self._outbox_ready = trio.Event()
                    await self._outbox_ready.wait()
                    continue
                frames: list[tuple[bytes, bytes | memoryview]] = []
                while outbox and len(frames) < SEND_COALESCE:
                    queued = outbox.popleft()
                    frames.extend(queued.frames)
                    if queued.sent is not None:
                        done.append(queued)
                    elif typ_of(queued.frames[0][0]) == TYPE_PING:
                        self._queued_ping_replies -= 1
                async with self._write_lock:
                    await self._send_frames(frames)
                for queued in done:
                    queued.sent.set()  # type: ignore[union-attr]
                done.clear()
        except Exception as error:
            self._sender_gone = repr(error)
            level = logging.DEBUG if isinstance(error, _CONNECTION_GONE) else logging.WARNING
            logger.log(level, "yamux: sending to %s failed: %r", self.peer_id, error)
            # Closing the session ends the frame reader, whose cleanup resets every stream.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.secured_conn.close()
                except Exception as close_error:
                    logger.debug("yamux: closing %s: %r", self.peer_id, close_error)
        finally:
            if self._sender_gone is None:
                self._sender_gone = "connection closed"
            for queued in (*done, *outbox):
                if queued.sent is not None:
                    queued.failed = self._sender_gone
                    queued.sent.set()
            outbox.clear()

    async def _send_frames(self, frames: list[tuple[bytes, bytes | memoryview]]) -> None:
        """Write (header, payload) frames in one secure-session call that makes each
        frame one Noise message. Only the sender calls this (or a writer holding
        ``_write_lock`` before the sender exists)."""
        await self.secured_conn.write_many(frames)

    def _register(self, stream_id: int, is_initiator: bool) -> FlowYamuxStream:
        stream = self.stream_class(stream_id, self, is_initiator)
        self.streams[stream_id] = stream
        self.stream_buffers[stream_id] = ChunkBuffer()  # type: ignore[assignment]
        self.stream_events[stream_id] = trio.Event()
        return stream

    def _unregister(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.stream_buffers.pop(stream_id, None)
        self.stream_events.pop(stream_id, None)

    async def open_stream(self) -> FlowYamuxStream:
        await self.stream_backlog_semaphore.acquire()
        if self.event_shutting_down.is_set():
            self.stream_backlog_semaphore.release()
            raise MuxedStreamError("Connection is shutting down")
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        stream = self._register(stream_id, True)
        stream._owns_backlog_slot = True
        syn = _HEADER.pack(
            0, TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, RECEIVE_WINDOW - DEFAULT_WINDOW_SIZE
        )
        try:
            await self._write_frame(syn)
        except Exception as error:
            stream._backlog_slot_released = True
            self.stream_backlog_semaphore.release()
            self._unregister(stream_id)
            raise MuxedStreamError(f"Failed to send SYN: {error}") from error
        return stream

    # -- frame reader --------------------------------------------------------

    async def handle_incoming(self) -> None:
        session = self.secured_conn
        read_exact, buffered = session.read_exact, session.plaintext_buffered
        try:
            while not self.event_shutting_down.is_set():
                header = await read_exact(HEADER_SIZE)
                version, typ, flags, stream_id, length = _HEADER.unpack(header)
                if version != 0:
                    raise MuxedStreamError(f"unsupported yamux version {version}")
                if typ in (TYPE_DATA, TYPE_WINDOW_UPDATE):
                    body: bytes | memoryview = b""
                    if typ == TYPE_DATA and length:
                        if length > RECEIVE_WINDOW:
                            raise MuxedStreamError(f"DATA frame of {length} B exceeds any window")
                        if buffered() >= length:
                            body = await read_exact(length)
                        else:
                            with trio.fail_after(BODY_READ_TIMEOUT):
                                body = await read_exact(length)
                    await self._on_stream_frame(typ, flags, stream_id, length, body)
                elif typ == TYPE_PING:
                    await self._on_ping(flags, length)
                elif typ == TYPE_GO_AWAY:
                    logger.debug("yamux: GO_AWAY (code %d) from %s", length, self.peer_id)
                    break
                else:
                    raise MuxedStreamError(f"unknown yamux frame type {typ}")
        except _CONNECTION_GONE as error:
            logger.debug("yamux: connection to %s ends: %r", self.peer_id, error)
        except Exception as error:
            level = logging.DEBUG if self.event_shutting_down.is_set() else logging.WARNING
            logger.log(level, "yamux: closing connection to %s: %r", self.peer_id, error)
        await self._cleanup_on_error()

    async def _on_stream_frame(
        self, typ: int, flags: int, stream_id: int, length: int, body: bytes | memoryview
    ) -> None:
        accepted = None
        if flags & FLAG_SYN:
            if stream_id in self.streams or self._inbound_streams() >= self.max_inbound_streams:
                if stream_id not in self.streams:
                    self.refused_streams += 1
                self._send_soon(_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))
                return
            stream = accepted = self._register(stream_id, False)
        else:
            found = self.streams.get(stream_id)
            if found is None:
                return  # late frame for a stream we already dropped
            stream = cast(FlowYamuxStream, found)
        if typ == TYPE_DATA:
            if body and not stream.recv_closed:
                if isinstance(body, memoryview) and 2 * len(body) < len(body.obj):  # type: ignore[arg-type]  # bytes or bytearray
                    # A small body would pin its whole decrypted message while queued.
                    body = bytes(body)
                self.stream_buffers[stream_id].extend(body)
                stream.recv_window -= len(body)
                if stream.recv_window < 0:
                    logger.warning(
                        "yamux stream %d: peer exceeded its window by %d B",
                        stream_id,
                        -stream.recv_window,
                    )
                    stream.recv_window = 0
                self.stream_events[stream_id].set()
        elif length:
            stream.send_window += length
        if flags & FLAG_FIN:
            stream.recv_closed = True
            if stream.send_closed:
                stream.closed = True
            self.stream_events[stream_id].set()
        if flags & FLAG_RST:
            stream.closed = True
            stream.reset_received = True
            self.stream_events[stream_id].set()
        if stream.closed:
            self._finalize_stream_locked(stream, fully_closed=True)
        if accepted is not None:
            if not flags & FLAG_RST:
                delta = RECEIVE_WINDOW - DEFAULT_WINDOW_SIZE
                self._send_soon(_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, delta))
            await self.new_stream_send_channel.send(accepted)

    def _inbound_streams(self) -> int:
        """Streams the peer opened that are still registered (their IDs have its parity)."""
        ours = self.next_stream_id & 1
        return sum(1 for stream_id in self.streams if stream_id & 1 != ours)

    async def _on_ping(self, flags: int, opaque: int) -> None:
        if flags & FLAG_SYN:
            if self._queued_ping_replies < MAX_QUEUED_PING_REPLIES:
                self._queued_ping_replies += 1
                self._send_soon(_HEADER.pack(0, TYPE_PING, FLAG_ACK, 0, opaque))
        elif flags & FLAG_ACK and opaque == self._ping_id:
            sample = trio.current_time() - self._ping_sent_time
            self._rtt = sample if self._rtt == 0.0 else (self._rtt + sample) / 2
            self._ping_event.set()
