"""The client side of a tunnel: a local TCP listener whose every connection becomes a stream.

Each accepted local connection is a session: it is announced to the state machine
(``SessionStarted``), which chooses the peer and the path, opens the stream and asks
for the service (through the node's executor), and finally either hands the session an
accepted stream (:meth:`Session.deliver`) or tells it to close with a reason
(:meth:`Session.refuse`). The session then pipes bytes both ways, or closes the local
connection at once; either way the machine hears ``SessionEnded``.

:func:`local_session` is that announcement for any entry: a TCP listener here, a UDP
source (``runtime/udp.py``), a proxy request (``runtime/proxy.py``) or ``punchgate
connect`` on the control socket. The machine does not know which: the session's
``transport`` only chooses the request the executor sends.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

from punchgate.logs import get_logger
from punchgate.runtime.counters import SessionStats
from punchgate.runtime.pipe import PipeResult, pipe
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.specs import HostPort
from punchgate.state import events as ev

log = get_logger("punchgate.tunnel")

_session_ids = itertools.count(1)


@dataclass
class Opened:
    """What the executor hands a session: the accepted stream and where it goes."""

    stream: INetStream
    early: bytes  # bytes the provider sent after its answer (they belong to the local client)
    peer: str
    path: str  # "direct" or "relayed"
    relay: str | None
    transport: str = "tcp"  # of the connection the stream rides: "tcp" or "quic" (direct), "relay"


@dataclass(eq=False)
class Session:
    id: int
    service: str
    fixed_peer: str | None
    bind: HostPort | str  # where the local side came from (a listener, the proxy, the control socket)
    started: float
    transport: str = "tcp"  # "udp": the stream carries framed datagrams (asked for in the request)
    decided: trio.Event = field(default_factory=trio.Event)
    opened: Opened | None = None
    closing: tuple[str, str] | None = None  # (log event, reason)
    result: PipeResult | None = None  # while piping: live byte counts

    def deliver(self, opened: Opened) -> bool:
        if self.decided.is_set():
            return False
        self.opened = opened
        self.decided.set()
        return True

    def refuse(self, event: str, reason: str) -> None:
        if not self.decided.is_set():
            self.closing = (event, reason)
            self.decided.set()


class SessionTable:
    """Live client sessions by ID: the executor finds a session here to hand it its stream."""

    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def values(self) -> list[Session]:
        return list(self._sessions.values())


@contextmanager
def local_session(
    table: SessionTable,
    registry: SessionRegistry,
    post: Callable[[ev.Event], None],
    service: str,
    fixed_peer: str | None,
    bind: HostPort | str,
    transport: str = "tcp",
) -> Iterator[Session]:
    """A session known to the machine while the block runs: ``SessionStarted`` on entry,
    ``SessionEnded`` on exit. Inside, await ``session.decided``, then use ``session.opened``
    or ``session.closing``. Raises :class:`RegistryClosed` when the node is shutting down;
    shutdown cancels the block."""
    with registry.session():
        session = Session(next(_session_ids), service, fixed_peer, bind, trio.current_time(), transport)
        table.add(session)
        post(ev.SessionStarted(session.id, service, fixed_peer))
        try:
            yield session
        finally:
            table.remove(session)
            post(ev.SessionEnded(session.id))


class TunnelClient:
    def __init__(
        self,
        service: str,
        bind: HostPort,
        fixed_peer: str | None,
        table: SessionTable,
        registry: SessionRegistry,
        post: Callable[[ev.Event], None],
    ) -> None:
        self.service = service
        self.bind = bind
        self.fixed_peer = fixed_peer
        self.table = table
        self.registry = registry
        self.post = post
        self.listeners: list[trio.SocketListener] = []
        self.stats = SessionStats()  # for `punchgate status`

    async def open_listeners(self) -> None:
        """Bind the local port now, so that a taken port fails the start, not a later connection."""
        self.listeners = await trio.open_tcp_listeners(self.bind.port, host=self.bind.host)
        log.info("tunnel listening", bind=str(self.bind), service=self.service, peer=self.fixed_peer)

    async def serve(self, handler_nursery: trio.Nursery) -> None:
        await trio.serve_listeners(self._handle, self.listeners, handler_nursery=handler_nursery)

    async def _handle(self, local: trio.SocketStream) -> None:
        try:
            with local_session(self.table, self.registry, self.post, self.service, self.fixed_peer, self.bind) as session:
                await session.decided.wait()
                if session.opened is not None:
                    await self._pipe(local, session, session.opened)
                elif session.closing is not None:
                    event, reason = session.closing
                    log.warning(event, **self._fields(), reason=reason)
        except RegistryClosed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await local.aclose()

    def _fields(self) -> dict:
        fields = {"service": self.service, "bind": str(self.bind)}
        if self.fixed_peer is not None:
            fields["peer"] = self.fixed_peer
        return fields

    async def _pipe(self, local: trio.SocketStream, session: Session, opened: Opened) -> None:
        await pipe_session(local, session, opened, self.stats, self._fields())


async def pipe_session(
    local: trio.SocketStream,
    session: Session,
    opened: Opened,
    stats: SessionStats,
    fields: dict,
    pending_to_remote: bytes = b"",
) -> None:
    """Pipe a session's local connection and its accepted stream, with the log events and
    the counters every TCP entry shares (``client tunnel opened`` / ``closed``)."""
    fields = {**fields, "peer": opened.peer, "path": opened.path, "transport": opened.transport}
    if opened.relay is not None:
        fields["relay"] = opened.relay
    setup_ms = round((trio.current_time() - session.started) * 1000, 2)
    log.info("client tunnel opened", **fields, setup_ms=setup_ms)
    result = session.result = PipeResult()
    try:
        with stats.track(result, peer=opened.peer, path=opened.path):
            await pipe(local, opened.stream, result, pending_to_local=opened.early, pending_to_remote=pending_to_remote)
    finally:
        log.info(
            "client tunnel closed",
            **fields,
            bytes_to_remote=result.to_remote,
            bytes_from_remote=result.from_remote,
            duration_s=round(trio.current_time() - session.started, 3),
            error=result.error,
            interrupted=result.interrupted,
        )
