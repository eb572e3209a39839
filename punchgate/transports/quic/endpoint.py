"""One UDP socket and the QUIC connections that use it.

An :class:`Endpoint` owns one non-blocking UDP socket. Its one receiving task reads
every datagram the socket has (up to :data:`BATCH` per wake-up), hands each to the
connection its destination connection ID names, and then lets each connection that got
something :meth:`~punchgate.transports.quic.connection.QuicConn.flush` once, so that a
burst of packets is acknowledged together. Connections send through :meth:`Endpoint.send`
(a plain ``sendto``; a full socket buffer drops the packet, which QUIC's loss recovery
resends).

**Dials leave from the listener's socket.** A listening endpoint also dials
(:meth:`Endpoint.connect`), so every packet of ours leaves from the port we listen on:
the port a NAT mapped for it is the one peers learn from identify, and the one a hole
punch needs open (the packets that open it, :meth:`Endpoint.send_raw`, leave from it
too). An endpoint that does not listen (a node without a QUIC listen address) serves
outgoing connections only.

**A peer that vanished.** The socket asks the kernel for extended errors
(``IP_RECVERR``): when the host of a peer we sent to answers with ICMP port unreachable
(its process is gone, its socket closed), the error names the address we sent to, and
the connections to that address are told (:meth:`QuicConn.unreachable`), which end after
two such answers in a row with nothing heard between. A packet from anywhere else
(spoofed ICMP cannot name our peer's address and port unless it sits on the path) does
nothing.

Incoming connections: a long-header Initial packet (version 1, at least 1,200 bytes, as
QUIC requires of a client's first datagram) for an unknown connection ID starts a server
connection, when the endpoint listens; anything else unknown is dropped (the random
packets a peer sends while hole punching, late packets of closed connections).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.peer.id import ID

from punchgate.limits import ConnectionAdmission
from punchgate.transports.quic.connection import Engine, QuicConn

QUIC_V1 = 0x00000001
CID_LENGTH = 8  # aioquic's default for the connection IDs it picks
BATCH = 256  # datagrams read per wake-up before the connections flush
SOCKET_BUFFER = 8 * 1024 * 1024
MAX_DATAGRAM = 65535
_EXTENDED_ERROR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_ORIGIN_ICMP, _ORIGIN_ICMP6 = 2, 3
_UNREACHABLE = {(_ORIGIN_ICMP, 3, 3), (_ORIGIN_ICMP6, 1, 4)}  # (origin, type, code): port unreachable


def udp_socket(family: int, host: str, port: int) -> socket.socket:
    """A bound, non-blocking UDP socket with large buffers and extended errors on."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for forced, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                              (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced if forced is not None else plain, SOCKET_BUFFER)
            except OSError:  # not root: as much as net.core.[rw]mem_max allows
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        _enable_extended_errors(sock, family)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# Linux's values (<linux/in.h>, <linux/in6.h>); Python's socket module names them from 3.12 on.
_RECVERR: dict[int, int] = {
    socket.AF_INET: getattr(socket, "IP_RECVERR", 11),
    socket.AF_INET6: getattr(socket, "IPV6_RECVERR", 25),
}


def _enable_extended_errors(sock: socket.socket, family: int) -> None:
    if not sys.platform.startswith("linux"):
        return  # elsewhere a vanished peer is noticed by the idle timeout only
    option = _RECVERR[family]
    level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
    try:
        sock.setsockopt(level, option, 1)
    except OSError:
        pass


class Endpoint:
    def __init__(
        self,
        sock: socket.socket,
        make_configuration: Callable[[bool], Any],
        accept: Callable[[QuicConn], Awaitable[None]] | None = None,
    ) -> None:
        self.sock = sock
        self.family = sock.family
        self.local_address: tuple[str, int] = sock.getsockname()[:2]
        self._make_configuration = make_configuration
        self._accept = accept
        self._routes: dict[bytes, QuicConn] = {}
        self._connections: set[QuicConn] = set()
        self._nursery: trio.Nursery | None = None
        self._dirty: list[QuicConn] = []
        self.closed = False
        self.dropped_sends = 0
        # Inbound caps (set by the transport from the host's limits): the same counts as
        # TCP's inbound gate, in total and per IP, taken by a peer's first Initial packet
        # and released when its connection ends; a handshake not done in time is ended.
        self.admission: ConnectionAdmission | None = None
        self.handshake_timeout = 10.0
        self._admitted: dict[QuicConn, str] = {}
        self.refused = 0  # Initial packets dropped for being over a cap
        self.timed_out = 0  # inbound handshakes ended at the deadline

    @property
    def listening(self) -> bool:
        return self._accept is not None

    @property
    def connections(self) -> frozenset[QuicConn]:
        return frozenset(self._connections)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive until closed; at the end, close every connection and the socket."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._receive()
        finally:
            self.closed = True
            for conn in list(self._connections):
                conn.terminate("the endpoint closed")
            self.sock.close()

    def close(self) -> None:
        """Say goodbye on every connection (CONNECTION_CLOSE), then stop receiving."""
        if self.closed:
            return
        for conn in list(self._connections):
            conn.close_now("the endpoint closed")
        self.closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        else:
            self.sock.close()

    # -- connections ----------------------------------------------------------------

    def connect(self, addr: tuple[Any, ...], peer: ID) -> QuicConn:
        """Start a client connection to ``addr``, which must prove to be ``peer``."""
        if self.closed or self._nursery is None:
            raise OSError(errno.EBADF, "the QUIC endpoint is closed")
        engine = Engine(configuration=self._make_configuration(True))
        conn = QuicConn(self, engine, addr, is_initiator=True, expected_peer=peer)
        self._adopt(conn, [engine.host_cid])
        engine.connect(addr, now=trio.current_time())
        conn.transmit()
        return conn

    def _adopt(self, conn: QuicConn, cids: list[bytes]) -> None:
        assert self._nursery is not None
        self._connections.add(conn)
        for cid in cids:
            self._routes[cid] = conn
        self._nursery.start_soon(conn.run)

    def route(self, cid: bytes, conn: QuicConn) -> None:
        if conn in self._connections:
            self._routes[cid] = conn

    def unroute(self, cid: bytes) -> None:
        self._routes.pop(cid, None)

    def connection_ended(self, conn: QuicConn) -> None:
        self._connections.discard(conn)
        ip = self._admitted.pop(conn, None)
        if ip is not None and self.admission is not None:
            self.admission.release(ip)
        for cid in [cid for cid, owner in self._routes.items() if owner is conn]:
            del self._routes[cid]

    # -- sending ----------------------------------------------------------------------

    def send(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped_sends += 1  # a full socket buffer: as a loss, which recovery repairs
        except ConnectionRefusedError:
            self._read_errors()  # a queued ICMP error surfaced here
        except OSError:
            self.dropped_sends += 1  # no route now (the network changed): recovery retries

    def send_raw(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """A datagram that is not QUIC (hole punching), from this endpoint's port."""
        if not self.closed:
            self.send(data, addr)

    # -- receiving --------------------------------------------------------------------

    async def _receive(self) -> None:
        sock = self.sock
        routes = self._routes
        dirty = self._dirty
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    self._read_errors()
                    continue
                except OSError:
                    self._read_errors()
                    continue
                conn = routes.get(_destination_cid(data))
                if conn is None:
                    conn = self._new_connection(data, addr)
                    if conn is None:
                        continue
                conn.datagram_received(data, addr, now)
                if not conn._in_batch:
                    conn._in_batch = True
                    dirty.append(conn)
            for conn in dirty:
                conn._in_batch = False
                conn.flush()
            dirty.clear()

    def _new_connection(self, data: bytes, addr: tuple[Any, ...]) -> QuicConn | None:
        if self._accept is None or len(data) < 1200 or not _is_initial_v1(data):
            return None
        ip = str(addr[0])
        if self.admission is not None and self.admission.admit(ip) is not None:
            self.refused += 1  # dropped: the peer's retransmissions ask again
            return None
        original = _destination_cid(data)
        engine = Engine(configuration=self._make_configuration(False), original_destination_connection_id=original)
        conn = QuicConn(self, engine, addr, is_initiator=False, expected_peer=None)
        conn.on_established = self._established
        if self.admission is not None:
            self._admitted[conn] = ip
        self._adopt(conn, [original, engine.host_cid])
        assert self._nursery is not None
        self._nursery.start_soon(self._handshake_deadline, conn)
        return conn

    async def _handshake_deadline(self, conn: QuicConn) -> None:
        with trio.move_on_after(self.handshake_timeout):
            await conn.handshake_done.wait()
            return
        self.timed_out += 1
        conn.close_now("no handshake in time")

    def _established(self, conn: QuicConn) -> None:
        if self._accept is not None and self._nursery is not None and not self.closed:
            self._nursery.start_soon(self._accept, conn)

    def _read_errors(self) -> None:
        """Drain the socket's error queue; tell connections whose peer's port is closed."""
        for _ in range(64):
            try:
                _, ancillary, _, addr = self.sock.recvmsg(1, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError, AttributeError, ValueError):
                return
            except OSError:
                return
            for _level, _kind, payload in ancillary:
                if len(payload) < _EXTENDED_ERROR.size:
                    continue
                _errno, origin, kind, code, _pad, _info, _data = _EXTENDED_ERROR.unpack_from(payload)
                if (origin, kind, code) in _UNREACHABLE and addr is not None:
                    self._unreachable(addr)

    def _unreachable(self, addr: tuple[Any, ...]) -> None:
        now = trio.current_time()
        for conn in list(self._connections):
            if conn.remote[:2] == addr[:2] and not conn.closed:
                conn.unreachable(now)


def _destination_cid(data: bytes) -> bytes:
    if not data:
        return b""
    if data[0] & 0x80:  # long header: version, then the length of the destination ID
        if len(data) < 6:
            return b""
        return data[6 : 6 + data[5]]
    return data[1 : 1 + CID_LENGTH]


def _is_initial_v1(data: bytes) -> bool:
    return (
        len(data) >= 6
        and data[0] & 0xC0 == 0xC0  # long header, fixed bit
        and (data[0] & 0x30) >> 4 == 0  # Initial
        and int.from_bytes(data[1:5], "big") == QUIC_V1
    )


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET

