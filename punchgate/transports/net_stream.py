"""Stream reads and writes (TCP and QUIC alike) that do not pass a trio lock before the I/O.

Defect (py-libp2p 0.8.1, ``libp2p/network/stream/net_stream.py``, ``NetStream.read``
~196-207 and ``NetStream.write`` ~259-268): every call first does
``async with self._state_lock`` around a check of ``self._state`` that contains
no ``await``. Acquiring a ``trio.Lock`` is a checkpoint (a full scheduler pass
with an ``epoll_wait``) even when nobody holds it, so each tunnel read and each
write costs one more pass than the I/O itself needs: a 1-byte round trip
through a tunnel passed four of them, and opening a stream many more (the
multistream-select reads go one small ``read`` at a time).

Adjustment: ``LeanNetStream`` does the same state check without the lock. Under
trio nothing can run between the check and the call into the muxed stream, so
the check is as atomic as before; the lock still serialises the state changes
made elsewhere (close, reset, EOF and error bookkeeping keep the library's
code). Each read or write still reaches at least one checkpoint in the muxed
stream (a wait for data, or the socket send), so other tasks keep their turns.
Failures map to the same exceptions and state changes as in the library
(EOF -> ``StreamEOF`` and CLOSE_READ/CLOSE_BOTH, reset -> ``StreamReset`` and
RESET, anything unexpected -> ``StreamError`` and ERROR), taking the lock there.

``libp2p/network/connection/swarm_connection.py`` builds its streams by the
module-global name ``NetStream`` (``SwarmConn._add_stream`` ~318), where
``punchgate.transports.adjusted`` binds ``LeanNetStream``.
"""

from __future__ import annotations

from libp2p.network.connection import swarm_connection
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.stream_muxer.exceptions import (
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamError,
    MuxedStreamReset,
)

LIBRARY_NET_STREAM = swarm_connection.NetStream  # what connections build as shipped

_RESET_ON_READ = (MuxedStreamReset,)
_CLOSED_ON_WRITE = (MuxedStreamClosed,)
_RESET_ON_WRITE = (MuxedStreamReset, MuxedStreamError)
# Raised as they are (the library's lists): anything else marks the stream ERROR.
_KNOWN_ON_READ = (MuxedStreamEOF, *_RESET_ON_READ, StreamEOF, StreamReset, StreamClosed, ValueError)
_KNOWN_ON_WRITE = (*_CLOSED_ON_WRITE, *_RESET_ON_WRITE, StreamClosed, StreamReset, ValueError)


class LeanNetStream(NetStream):
    """``NetStream`` whose ``read``/``write`` check the state without a checkpoint."""

    async def read(self, n: int | None = None) -> bytes:
        state = self._state
        if state is StreamState.ERROR:
            raise StreamError("Cannot read from stream; stream is in error state")
        if state is StreamState.RESET:
            raise StreamReset("Cannot read from stream; stream is reset")
        try:
            return await self.muxed_stream.read(n)
        except MuxedStreamEOF as error:
            async with self._state_lock:
                if self._state is StreamState.OPEN:
                    self._state = StreamState.CLOSE_READ
                elif self._state is StreamState.CLOSE_WRITE:
                    self._state = StreamState.CLOSE_BOTH
            raise StreamEOF() from error
        except _RESET_ON_READ as error:
            async with self._state_lock:
                self._state = StreamState.RESET
            raise StreamReset() from error
        except Exception as error:
            if isinstance(error, _KNOWN_ON_READ):
                raise
            async with self._state_lock:
                self._state = StreamState.ERROR
            raise StreamError(f"Read operation failed: {error}") from error

    async def write(self, data: bytes) -> None:
        state = self._state
        if state is StreamState.ERROR:
            raise StreamError("Cannot write to stream; stream is in error state")
        if state is StreamState.RESET:
            raise StreamReset("Cannot write to stream; stream is reset")
        if state is StreamState.CLOSE_WRITE or state is StreamState.CLOSE_BOTH:
            raise StreamClosed("Cannot write to stream; closed for writing")
        try:
            await self.muxed_stream.write(data)
        except _CLOSED_ON_WRITE as error:
            async with self._state_lock:
                if self._state is StreamState.OPEN:
                    self._state = StreamState.CLOSE_WRITE
                elif self._state is StreamState.CLOSE_READ:
                    self._state = StreamState.CLOSE_BOTH
            raise StreamClosed() from error
        except _RESET_ON_WRITE as error:
            async with self._state_lock:
                self._state = StreamState.RESET
            raise StreamReset() from error
        except Exception as error:
            if isinstance(error, _KNOWN_ON_WRITE):
                raise
            async with self._state_lock:
                self._state = StreamState.ERROR
            raise StreamError(f"Write operation failed: {error}") from error

