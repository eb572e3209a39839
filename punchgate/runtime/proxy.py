"""The proxy entry (``--proxy HOST:PORT``): SOCKS5 and HTTP CONNECT on one TCP port.

Each accepted connection is read (bounded: :data:`READ_DEADLINE` for the whole request,
the sizes in ``punchgate/proxy.py``), its destination parsed, and it becomes a tunnel
session like any local connection (``local_session``): the machine finds the provider
and the path. The client is answered only then: success (SOCKS5 reply 0x00 /
``HTTP/1.1 200 Connection established``) when the session is handed its stream, the
protocol's own error when it is told to close (``proxy.classify_close``). After success
the connection is piped exactly as a ``--tunnel`` connection (``pipe_session``); bytes
the client sent after its request go to the service first.

Garbage, oversized or slow requests are answered in the protocol spoken so far (or the
connection is closed when nothing can be said) and never reach the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

from punchgate import proxy as protocol
from punchgate.logs import get_logger
from punchgate.proxy import ConnectRequest, Failure, ProxyRefusal
from punchgate.runtime.counters import SessionStats
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.runtime.tunnel_client import SessionTable, local_session, pipe_session
from punchgate.specs import HostPort
from punchgate.state import events as ev

log = get_logger("punchgate.proxy")

READ_DEADLINE = 10.0  # seconds for a client to send its whole request
WRITE_DEADLINE = 5.0  # seconds to deliver an answer
READ_SIZE = 4096


class _Closed(Exception):
    """The client went away before its request was complete."""


@dataclass
class _Reading:
    """How far a client's request has come (for the answer when its time runs out)."""

    buffer: bytearray = field(default_factory=bytearray)
    kind: str = "unknown"  # "socks5", "socks4", "http" once the first byte is in
    greeted: bool = False  # SOCKS5: the method was answered


class ProxyServer:
    """``--proxy``: one listener; every connection a session to the service it names."""

    transport = "tcp"
    kind = "proxy"
    service = "*"  # any: each request names its own (status shows the entry as one row)
    fixed_peer: str | None = None

    def __init__(
        self,
        bind: HostPort,
        table: SessionTable,
        registry: SessionRegistry,
        post: Callable[[ev.Event], None],
        read_deadline: float = READ_DEADLINE,
    ) -> None:
        self.bind = bind
        self.table = table
        self.registry = registry
        self.post = post
        self.read_deadline = read_deadline
        self.listeners: list[trio.SocketListener] = []
        self.stats = SessionStats()
        self.refused = 0  # requests answered with an error (bad request, unknown destination, no tunnel)

    async def open_listeners(self) -> None:
        self.listeners = await trio.open_tcp_listeners(self.bind.port, host=self.bind.host)
        log.info("proxy listening", bind=str(self.bind), protocols="socks5,http-connect")

    async def serve(self, handler_nursery: trio.Nursery) -> None:
        await trio.serve_listeners(self._handle, self.listeners, handler_nursery=handler_nursery)

    async def _handle(self, conn: trio.SocketStream) -> None:
        try:
            await self._serve(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client left; nothing to tell it
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _serve(self, conn: trio.SocketStream) -> None:
        reading = _Reading()
        request: ConnectRequest | None = None
        with trio.move_on_after(self.read_deadline):
            try:
                request = await self._read_request(conn, reading)
            except _Closed:
                return
            except ProxyRefusal as refusal:
                await self._refuse(conn, reading.kind, str(refusal), refusal.reply)
                return
        kind = reading.kind
        if request is None:
            reason = f"no complete request within {self.read_deadline:g} s"
            reply = b""  # a SOCKS5 client not yet greeted, or garbage: nothing to say
            if kind == "http":
                reply = protocol.http_reply(408, reason)
            elif reading.greeted:
                reply = protocol.socks_reply(protocol.SOCKS_REPLY[Failure.GENERAL])
            await self._refuse(conn, kind, reason, reply)
            return

        rest = bytes(reading.buffer[request.size :])
        try:
            destination = protocol.parse_destination(request.host)
        except ValueError as exc:
            await self._refuse(conn, kind, str(exc), protocol.failure_reply(kind, Failure.NOT_OURS, str(exc)))
            return
        fields = {"entry": "proxy", "protocol": kind, "bind": str(self.bind), "service": destination.service}
        if destination.peer is not None:
            fields["peer"] = destination.peer
        log.debug("proxy request", **fields, destination=request.host)
        try:
            with local_session(
                self.table, self.registry, self.post, destination.service, destination.peer, self.bind
            ) as session:
                await session.decided.wait()
                if session.opened is not None:
                    opened = session.opened
                    ok = protocol.socks_reply(0) if kind == "socks5" else protocol.HTTP_ESTABLISHED
                    try:
                        with trio.fail_after(WRITE_DEADLINE):
                            await conn.send_all(ok)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                        with trio.CancelScope(shield=True), trio.move_on_after(2):
                            await _reset(opened.stream)  # nobody to pipe to
                        return
                    await pipe_session(conn, session, opened, self.stats, fields, pending_to_remote=rest)
                elif session.closing is not None:
                    event, reason = session.closing
                    failure = protocol.classify_close(event, reason)
                    log.warning(event, **fields, reason=reason)
                    await self._refuse(conn, kind, reason, protocol.failure_reply(kind, failure, reason), logged=True)
        except RegistryClosed:
            reason = Failure.SHUTTING_DOWN.value
            await self._refuse(conn, kind, reason, protocol.failure_reply(kind, Failure.SHUTTING_DOWN, reason))

    async def _read_request(self, conn: trio.SocketStream, reading: _Reading) -> ConnectRequest:
        """Read until one request is complete; answers the SOCKS5 greeting on the way."""
        buffer = reading.buffer
        await _read_more(conn, buffer)
        kind = reading.kind = protocol.protocol_of(buffer[0]) or "unknown"
        if kind == "unknown":
            raise ProxyRefusal(f"first byte 0x{buffer[0]:02x} is neither SOCKS5 nor an HTTP request", b"")
        if kind == "socks4":
            raise ProxyRefusal("SOCKS4 is not spoken here (use SOCKS5: socks5h://)", protocol.SOCKS4_REJECTED)
        if kind == "http":
            while (request := protocol.parse_http_connect(bytes(buffer))) is None:
                await _read_more(conn, buffer)
            return request
        while (taken := protocol.parse_socks_greeting(bytes(buffer))) is None:
            await _read_more(conn, buffer)
        del buffer[:taken]
        await conn.send_all(protocol.METHOD_ACCEPTED)
        reading.greeted = True
        while (socks := protocol.parse_socks_request(bytes(buffer))) is None:
            await _read_more(conn, buffer)  # bounded: a SOCKS5 request is at most 262 bytes
        return socks

    async def _refuse(self, conn: trio.SocketStream, kind: str, reason: str, reply: bytes, logged: bool = False) -> None:
        self.refused += 1
        if not logged:
            log.warning("proxy refused", entry="proxy", protocol=kind, bind=str(self.bind), reason=reason)
        if reply:
            with trio.move_on_after(WRITE_DEADLINE):
                try:
                    await conn.send_all(reply)
                    await conn.send_eof()
                    # Let the answer out before the close: unread input would turn it into a reset.
                    with trio.move_on_after(1):
                        for _ in range(16):
                            if not await conn.receive_some(READ_SIZE):
                                break
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # the client left


async def _read_more(conn: trio.SocketStream, buffer: bytearray) -> None:
    data = await conn.receive_some(READ_SIZE)
    if not data:
        raise _Closed()
    buffer += data


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:
        pass  # gone already
