"""``punchgate connect``, the node's side: a control-socket connection becomes a tunnel session.

After the request line ``{"op": "connect", "service": "ssh", "peer": null}`` (``peer``: a
peer ID, or null for any provider found by name), the connection is a session like a
``--tunnel`` listener's: the machine finds the peer and the path. The node answers one
line, ``{"ok": true, "peer": …, "path": …}`` when the stream is accepted, then the
connection carries the session's bytes both ways (half-close included) until both
directions end; or ``{"error": "<reason>", "failure": "<kind>"}`` and closes.

Only the control socket's owner can ask (the socket is 0600 in a 0700 directory).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from punchgate.logs import get_logger
from punchgate.proxy import Failure, classify_close
from punchgate.runtime.counters import SessionStats
from punchgate.runtime.sessions import RegistryClosed, SessionRegistry
from punchgate.runtime.tunnel_client import SessionTable, local_session, pipe_session
from punchgate.specs import SpecError, parse_peer_id, parse_service_name
from punchgate.state import events as ev

log = get_logger("punchgate.tunnel")

WRITE_DEADLINE = 5.0


class ConnectEntry:
    """Sessions opened by ``punchgate connect`` (one status row once there has been one)."""

    transport = "tcp"
    kind = "connect"
    service = "*"
    fixed_peer: str | None = None
    bind = "control socket"

    def __init__(self, table: SessionTable, registry: SessionRegistry, post: Callable[[ev.Event], None]) -> None:
        self.table = table
        self.registry = registry
        self.post = post
        self.stats = SessionStats()

    async def handle(self, conn: trio.SocketStream, request: dict[str, Any], rest: bytes) -> None:
        """Serve one connect request on ``conn`` (the caller closes ``conn`` afterwards)."""
        try:
            service = parse_service_name(str(request.get("service", "")))
            peer = request.get("peer")
            if peer is not None:
                peer = parse_peer_id(str(peer))
        except SpecError as exc:
            await _answer(conn, {"error": f"bad request: {exc}", "failure": "bad request"})
            return
        fields = {"entry": "connect", "service": service}
        if peer is not None:
            fields["peer"] = peer
        try:
            with local_session(self.table, self.registry, self.post, service, peer, self.bind) as session:
                await session.decided.wait()
                if session.opened is not None:
                    opened = session.opened
                    if not await _answer(conn, {"ok": True, "peer": opened.peer, "path": opened.path}):
                        with trio.CancelScope(shield=True), trio.move_on_after(2):
                            try:
                                await opened.stream.reset()
                            except Exception:
                                pass  # gone already
                        return
                    await pipe_session(conn, session, opened, self.stats, fields, pending_to_remote=rest)
                elif session.closing is not None:
                    event, reason = session.closing
                    log.warning(event, **fields, reason=reason)
                    await _answer(conn, {"error": reason, "failure": classify_close(event, reason).value})
        except RegistryClosed:
            await _answer(conn, {"error": "the node is shutting down", "failure": Failure.SHUTTING_DOWN.value})


async def _answer(conn: trio.SocketStream, answer: dict[str, Any]) -> bool:
    """Send one answer line; False if the client is gone."""
    try:
        with trio.fail_after(WRITE_DEADLINE):
            await conn.send_all(json.dumps(answer).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        return False
    return True
