"""UDP services through tunnel streams: one session per local source, datagrams framed on the stream.

Client side (:class:`UdpTunnelClient`, ``--tunnel …/udp``): one UDP socket at the bind
address. The first datagram from a source address (IP, port) starts a session for that
source (``local_session``: the machine chooses the peer and path as for TCP); its
datagrams wait in the session's queue meanwhile. Datagrams from the stream are sent back
from the same socket to that source, so the client sees its answers come from the address
it asked.

Serving side (:func:`serve_datagrams`, ``--expose …/udp``): a UDP socket connected to the
service for each session, so that the service sees one source per remote client, as it
would without the tunnel.

The data path of a session (:func:`datagram_pipe`), three tasks in one nursery:

* queue -> stream: datagrams are taken from the :class:`DatagramQueue` in batches (up to
  one Yamux write batch), each framed with its u16 length (``wire.frame_datagram``), and
  written; back-pressure from the stream holds this task, never the socket's reader;
* stream -> socket: ``wire.DatagramDecoder`` cuts what arrives back into datagrams, each
  sent on the UDP socket;
* idle: the session ends when no datagram has passed either way for ``idle`` seconds.

Bounds, as UDP would have them: the queue holds at most :data:`QUEUE_DATAGRAMS`
datagrams and :data:`QUEUE_BYTES` bytes; a datagram that does not fit pushes out the
oldest ones, which are counted as dropped. A datagram longer than ``wire.MAX_DATAGRAM``
(only an IPv6 jumbogram could be), or one the local socket refuses (EMSGSIZE, ECONNREFUSED
after an ICMP error, ENOBUFS), is dropped and counted; nothing ends a session but the idle
time, the stream's end or a stream error. A listener keeps at most :data:`MAX_FLOWS`
sources with a session at once; datagrams from further sources are dropped and counted.

The stream has no half-close for datagrams: its end of file (the other side closed)
ends the session, and a session that ends closes its stream.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from punchgate.logs import get_logger
from punchgate.runtime.counters import SessionStats
from punchgate.runtime.pipe import CHUNK, CLOSE_TIMEOUT, PipeResult
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.runtime.tunnel_client import Opened, SessionTable, local_session
from punchgate.specs import HostPort
from punchgate.state import events as ev
from punchgate.wire import MAX_DATAGRAM, DatagramDecoder

log = get_logger("punchgate.tunnel")

QUEUE_DATAGRAMS = 1024  # per session, waiting to go on the stream
QUEUE_BYTES = 4 << 20
MAX_FLOWS = 1024  # sources with a session at once, per UDP tunnel listener
SOCKET_BUFFER = 4 << 20  # SO_RCVBUF / SO_SNDBUF asked for (the kernel caps it at net.core.rmem_max)
RECEIVE_SIZE = MAX_DATAGRAM + 1  # one byte more than allowed: a longer datagram shows as too long
BURST = 256  # datagrams read from a socket per scheduler pass


@dataclass
class DatagramResult(PipeResult):
    """A UDP session's counts: bytes (payload only) as in :class:`PipeResult`, plus datagrams."""

    datagrams_to_remote: int = 0
    datagrams_from_remote: int = 0
    dropped: int = 0  # queue overflow (oldest first), too long, or refused by the local socket
    idle: bool = False  # ended by the idle time


class DatagramQueue:
    """Datagrams waiting for the stream: bounded in count and bytes, the oldest dropped first."""

    def __init__(
        self, result: DatagramResult, max_datagrams: int = QUEUE_DATAGRAMS, max_bytes: int = QUEUE_BYTES
    ) -> None:
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._result = result
        self._max_datagrams = max_datagrams
        self._max_bytes = max_bytes
        self._ready = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, datagram: bytes) -> None:
        self._items.append(datagram)
        self._bytes += len(datagram)
        while len(self._items) > self._max_datagrams or self._bytes > self._max_bytes:
            self._bytes -= len(self._items.popleft())
            self._result.dropped += 1
        self._ready.set()

    def discard(self) -> None:
        """Drop everything waiting (the session will not carry it), counting it."""
        self._result.dropped += len(self._items)
        self._items.clear()
        self._bytes = 0

    async def get_batch(self, max_bytes: int = CHUNK) -> tuple[bytes, int, int]:
        """Wait for at least one datagram; return (frames, datagrams, payload bytes) of up
        to ``max_bytes`` of frames (always at least one datagram)."""
        while not self._items:
            self._ready = trio.Event()
            await self._ready.wait()
        frames = bytearray()
        count = payload = 0
        while self._items and (not frames or len(frames) + 2 + len(self._items[0]) <= max_bytes):
            datagram = self._items.popleft()
            self._bytes -= len(datagram)
            frames += len(datagram).to_bytes(2, "big")  # wire.frame_datagram, without its copy
            frames += datagram
            count += 1
            payload += len(datagram)
        return bytes(frames), count, payload


async def datagram_pipe(
    stream: INetStream,
    queue: DatagramQueue,
    send: Callable[[bytes], Awaitable[object]],
    result: DatagramResult,
    idle: float,
    early: bytes = b"",
) -> None:
    """Carry datagrams between ``queue``/``send`` and ``stream`` until the stream ends, the
    session is idle for ``idle`` seconds, or something breaks; always closes the stream."""
    last = [trio.current_time()]
    decoder = DatagramDecoder()

    async def deliver(data: bytes) -> None:
        for datagram in decoder.feed(data):
            try:
                await send(datagram)
            except OSError:  # EMSGSIZE, ECONNREFUSED (ICMP), ENOBUFS: lost, as UDP loses it
                result.dropped += 1
                continue
            result.datagrams_from_remote += 1
            result.from_remote += len(datagram)
            last[0] = trio.current_time()

    async def to_remote() -> None:
        while True:
            frames, count, payload = await queue.get_batch()
            await stream.write(frames)
            result.datagrams_to_remote += count
            result.to_remote += payload
            last[0] = trio.current_time()

    async def from_remote() -> None:
        if early:
            await deliver(early)
        while True:
            try:
                data = await stream.read(CHUNK)
            except StreamEOF:
                return  # the other side closed: the session is over
            await deliver(data)

    async def watch_idle() -> None:
        while trio.current_time() < last[0] + idle:
            await trio.sleep_until(last[0] + idle)
        result.idle = True

    async def ends_session(direction: Callable[[], Awaitable[None]], nursery: trio.Nursery) -> None:
        try:
            await direction()
        except Exception as exc:  # stream reset/closed/error from libp2p, or the UDP socket closed
            side = "local socket" if isinstance(exc, (OSError, trio.ClosedResourceError)) else "stream"
            result.error = result.error or f"{side}: {type(exc).__name__} {exc}".strip()
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ends_session, to_remote, nursery)
            nursery.start_soon(ends_session, from_remote, nursery)
            nursery.start_soon(ends_session, watch_idle, nursery)
    except trio.Cancelled:
        result.interrupted = True
        raise
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            try:
                if result.error is not None:
                    await stream.reset()
                else:
                    await stream.close()
            except Exception:
                pass  # the stream is gone already


class DatagramStats(SessionStats):
    """:class:`SessionStats` plus datagram counts, for ``punchgate status``."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_datagrams_to_remote = 0
        self.closed_datagrams_from_remote = 0
        self.closed_dropped = 0
        self.listener_dropped = 0  # datagrams no session took (too many sources, too long)
        self._results: dict[int, DatagramResult] = {}

    @contextmanager
    def track(self, result: PipeResult, peer: str | None = None, path: str | None = None) -> Iterator[None]:
        assert isinstance(result, DatagramResult)
        self._results[id(result)] = result
        try:
            with super().track(result, peer, path):
                yield
        finally:
            del self._results[id(result)]
            self.closed_datagrams_to_remote += result.datagrams_to_remote
            self.closed_datagrams_from_remote += result.datagrams_from_remote
            self.closed_dropped += result.dropped

    def count_unsent(self, result: DatagramResult) -> None:
        """A session that never carried anything: its dropped datagrams still count."""
        self.closed_dropped += result.dropped

    def snapshot(self) -> dict:
        snap = super().snapshot()
        live = list(self._results.values())
        snap["datagrams_to_remote"] = self.closed_datagrams_to_remote + sum(r.datagrams_to_remote for r in live)
        snap["datagrams_from_remote"] = self.closed_datagrams_from_remote + sum(r.datagrams_from_remote for r in live)
        snap["dropped"] = self.closed_dropped + self.listener_dropped + sum(r.dropped for r in live)
        return snap


async def udp_socket_for(host: str, port: int) -> tuple[socket.socket, tuple]:
    """A non-blocking UDP socket of the right family for ``host:port`` (resolved), with
    large buffers. A plain socket, read with :class:`_Receiver` and written with
    :func:`send_datagram`: a burst of datagrams costs one scheduler pass, not one each."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass  # the default buffer still works; bursts just overflow sooner
    return sock, address


class _Receiver:
    """Reads what a UDP socket has queued, waiting (in trio) only when it has nothing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray(RECEIVE_SIZE)
        self._view = memoryview(self._buffer)

    async def burst(self, limit: int = BURST) -> list[tuple[bytes, tuple]]:
        """At least one (datagram, source) and at most ``limit``; a datagram longer than
        ``wire.MAX_DATAGRAM`` comes back as it was cut (one byte too long), for the caller to drop."""
        out: list[tuple[bytes, tuple]] = []
        while not out:
            await trio.lowlevel.wait_readable(self.sock)
            for _ in range(limit):
                try:
                    size, source = self.sock.recvfrom_into(self._buffer)
                except BlockingIOError:
                    break
                except OSError:  # an ICMP error about an earlier datagram (ECONNREFUSED): go on
                    continue
                out.append((bytes(self._view[:size]), source))
        await trio.lowlevel.cancel_shielded_checkpoint()  # fairness: a flood cannot starve other tasks
        return out


async def send_datagram(sock: socket.socket, datagram: bytes, destination: tuple | None = None) -> None:
    """Send one datagram; waits only when the socket's send buffer is full. OSError for a
    datagram the kernel refuses (EMSGSIZE, ECONNREFUSED after an ICMP error, ENOBUFS)."""
    while True:
        try:
            if destination is None:
                sock.send(datagram)
            else:
                sock.sendto(datagram, destination)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


class _SocketCloser:
    """What the node closes at the end (it awaits ``aclose`` on each listener)."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()


@dataclass(eq=False)
class _Flow:
    source: tuple
    result: DatagramResult = field(default_factory=DatagramResult)
    queue: DatagramQueue = field(init=False)
    piped: bool = False  # its counts went to the stats with the pipe

    def __post_init__(self) -> None:
        self.queue = DatagramQueue(self.result)


class UdpTunnelClient:
    """``--tunnel(-by-name) SERVICE@HOST:PORT/udp``: every source address its own session."""

    transport = "udp"

    def __init__(
        self,
        service: str,
        bind: HostPort,
        fixed_peer: str | None,
        table: SessionTable,
        registry: SessionRegistry,
        post: Callable[[ev.Event], None],
        idle: float,
    ) -> None:
        self.service = service
        self.bind = bind
        self.fixed_peer = fixed_peer
        self.table = table
        self.registry = registry
        self.post = post
        self.idle = idle
        self.listeners: list[_SocketCloser] = []
        self.flows: dict[tuple, _Flow] = {}
        self.stats = DatagramStats()
        self._socket: socket.socket | None = None

    async def open_listeners(self) -> None:
        """Bind the local port now, so that a taken port fails the start."""
        sock, address = await udp_socket_for(self.bind.host, self.bind.port)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.listeners = [_SocketCloser(sock)]
        log.info("tunnel listening", bind=str(self.bind), service=self.service, peer=self.fixed_peer, transport="udp")

    async def serve(self, handler_nursery: trio.Nursery) -> None:
        sock = self._socket
        assert sock is not None
        receiver = _Receiver(sock)
        while True:
            for datagram, source in await receiver.burst():
                if len(datagram) > MAX_DATAGRAM:
                    self.stats.listener_dropped += 1
                    continue
                flow = self.flows.get(source)
                if flow is None:
                    if len(self.flows) >= MAX_FLOWS or self.registry.closing:
                        self.stats.listener_dropped += 1
                        continue
                    flow = self.flows[source] = _Flow(source)
                    handler_nursery.start_soon(self._run_flow, flow)
                flow.queue.put(datagram)

    async def _run_flow(self, flow: _Flow) -> None:
        fields = {"service": self.service, "bind": f"{self.bind}/udp", "source": _show(flow.source)}
        if self.fixed_peer is not None:
            fields["peer"] = self.fixed_peer
        try:
            with local_session(
                self.table, self.registry, self.post, self.service, self.fixed_peer, self.bind, "udp"
            ) as session:
                await session.decided.wait()
                if session.opened is not None:
                    await self._pipe(flow, session.opened, session.started, fields)
                elif session.closing is not None:
                    event, reason = session.closing
                    log.warning(event, **fields, reason=reason)
        except RegistryClosed:
            pass
        finally:
            if self.flows.get(flow.source) is flow:
                del self.flows[flow.source]
            if flow.queue:
                flow.queue.discard()
            if not flow.piped:
                self.stats.count_unsent(flow.result)

    async def _pipe(self, flow: _Flow, opened: Opened, started: float, fields: dict) -> None:
        sock = self._socket
        assert sock is not None
        fields = {**fields, "peer": opened.peer, "path": opened.path}
        if opened.relay is not None:
            fields["relay"] = opened.relay
        log.info("client tunnel opened", **fields, transport="udp", setup_ms=round((trio.current_time() - started) * 1000, 2))
        result = flow.result
        flow.piped = True

        async def send(datagram: bytes) -> None:
            await send_datagram(sock, datagram, flow.source)

        try:
            with self.stats.track(result, peer=opened.peer, path=opened.path):
                try:
                    await datagram_pipe(opened.stream, flow.queue, send, result, self.idle, opened.early)
                finally:
                    # The flow goes now: a datagram from this source after this starts a new session.
                    if self.flows.get(flow.source) is flow:
                        del self.flows[flow.source]
                    flow.queue.discard()
        finally:
            log.info(
                "client tunnel closed",
                **fields,
                transport="udp",
                bytes_to_remote=result.to_remote,
                bytes_from_remote=result.from_remote,
                datagrams_to_remote=result.datagrams_to_remote,
                datagrams_from_remote=result.datagrams_from_remote,
                dropped=result.dropped,
                idle=result.idle,
                duration_s=round(trio.current_time() - started, 3),
                error=result.error,
                interrupted=result.interrupted,
            )


async def open_service_socket(target: HostPort) -> socket.socket:
    """A UDP socket connected to the exposed service (raises OSError if it cannot be)."""
    sock, address = await udp_socket_for(target.host, target.port)
    try:
        sock.connect(address)  # UDP: no packet is sent, nothing to wait for
    except OSError:
        sock.close()
        raise
    return sock


async def serve_datagrams(
    sock: socket.socket, stream: INetStream, result: DatagramResult, idle: float, early: bytes = b""
) -> None:
    """The serving side of one UDP session: ``sock`` (connected to the service) <-> ``stream``."""
    queue = DatagramQueue(result)
    receiver = _Receiver(sock)

    async def receive() -> None:
        while True:
            for datagram, _ in await receiver.burst():
                if len(datagram) > MAX_DATAGRAM:
                    result.dropped += 1
                    continue
                queue.put(datagram)

    async def send(datagram: bytes) -> None:
        await send_datagram(sock, datagram)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await datagram_pipe(stream, queue, send, result, idle, early)
            nursery.cancel_scope.cancel()
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _show(source: tuple) -> str:
    host, port = source[0], source[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
