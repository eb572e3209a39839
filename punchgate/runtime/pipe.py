"""One tunnel session's data path: a local TCP socket <-> a libp2p stream.

Who reads and writes: two tasks, one per direction, in a nursery owned by :func:`pipe`.

* local -> remote: ``receive_some`` on the socket, ``write`` on the stream. The socket's
  end of file becomes ``close_write`` on the stream (a half-close the peer sees as EOF).
* remote -> local: ``read`` on the stream, ``send_all`` on the socket. The stream's EOF
  becomes ``send_eof`` on the socket (shutdown of its write side).

Back-pressure: each task awaits its write before reading again, so a slow reader on
one end holds the writer on the other (the stream's credit, Yamux's window or QUIC's
flow control, carries it across the network: ``punchgate.transports``).

Who closes: when both directions have ended cleanly, both ends are closed. If either
direction fails (stream reset, socket error), the other is cancelled, the stream is
reset and the socket closed, so neither side is left hanging.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from punchgate.transports import BATCH_BYTES

CHUNK = BATCH_BYTES  # one read fills one Yamux sender batch (punchgate.transports, rule 4)
CLOSE_TIMEOUT = 2.0


@dataclass
class PipeResult:
    to_remote: int = 0  # bytes read from the local socket and written to the stream
    from_remote: int = 0  # bytes read from the stream and written to the local socket
    error: str | None = None  # why the session broke, None for a clean end
    interrupted: bool = False  # cancelled from outside (shutdown) before both directions ended


async def pipe(
    local: trio.SocketStream,
    remote: INetStream,
    result: PipeResult,
    pending_to_local: bytes = b"",
    pending_to_remote: bytes = b"",
) -> None:
    """Copy both ways until both directions end, counting into ``result``; always closes both ends.
    ``pending_to_*``: bytes already read from the other end, delivered first."""

    async def local_to_remote() -> None:
        if pending_to_remote:
            await remote.write(pending_to_remote)
            result.to_remote += len(pending_to_remote)
        while True:
            data = await local.receive_some(CHUNK)
            if not data:
                await remote.close_write()  # type: ignore[attr-defined]  # NetStream has it; the interface does not say
                return
            await remote.write(data)
            result.to_remote += len(data)

    async def remote_to_local() -> None:
        if pending_to_local:
            await local.send_all(pending_to_local)
            result.from_remote += len(pending_to_local)
        while True:
            try:
                data = await remote.read(CHUNK)
            except StreamEOF:
                await local.send_eof()
                return
            await local.send_all(data)
            result.from_remote += len(data)

    async def guarded(direction, nursery: trio.Nursery) -> None:
        try:
            await direction()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            result.error = result.error or f"local socket: {exc or type(exc).__name__}"
            nursery.cancel_scope.cancel()
        except Exception as exc:  # stream reset/closed/error from libp2p
            result.error = result.error or f"stream: {type(exc).__name__} {exc}".strip()
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, local_to_remote, nursery)
            nursery.start_soon(guarded, remote_to_local, nursery)
    except trio.Cancelled:
        result.interrupted = True
        raise
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await close_ends(local, remote, broken=result.error is not None)


async def close_ends(local: trio.SocketStream, remote: INetStream, broken: bool) -> None:
    """Close both ends: a reset for a broken session, a normal close otherwise."""
    try:
        if broken:
            await remote.reset()
        else:
            await remote.close()
    except Exception:
        pass  # the stream is gone already; nothing more to tell the peer
    await local.aclose()
