"""Yamux stream writer that blocks under back-pressure instead of resetting.

Defect (libp2p 0.8.1, ``libp2p/stream_muxer/yamux/yamux.py``, ``YamuxStream.write``
~lines 229-292): when the peer's receive window is exhausted the writer polls
``trio.sleep(0.01)`` inside ``trio.move_on_after(5.0)`` and then raises
``MuxedStreamError("Timed out waiting for window update after 5 seconds.")``,
which ``NetStream`` surfaces as ``StreamReset``. No RST goes on the wire, so the
peer's reader hangs on what it got. Any tunnel whose far-end client stops
reading for more than 5 s is destroyed, and the 10 ms poll also throttles
throughput whenever the window runs dry.

Adjustment: ``BackpressureYamuxStream`` replaces ``write`` with one that waits on
an event for window space. The event is signalled whenever one of the fields
the library's frame handler and ``Yamux.close``/``_cleanup_on_error`` mutate
directly changes (``send_window``, ``closed``, ``send_closed``,
``reset_received``): those assignments are the only observation points the
library offers, so the fields are descriptors that wake the writer. There is no
timeout: a caller bounds a write with its own cancel scope.

``Yamux`` builds its streams by looking up the module-global name
``YamuxStream`` (``open_stream`` ~887, ``handle_incoming`` ~1293), so
``install()`` binds the subclass to that name.
"""

from __future__ import annotations

import struct
from typing import Any

import trio
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    YamuxStream,
)

from punchgate.libp2p_fixes._locks import InnerLock

_DATA_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)


class _WakesWriter:
    """A plain instance field whose every assignment wakes a blocked writer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__[self.slot]

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.slot] = value
        instance._wake_writer()


class BackpressureYamuxStream(YamuxStream):
    """``YamuxStream`` whose ``write`` waits for window space without a deadline."""

    max_frame_payload = MAX_MESSAGE_SIZE - HEADER_SIZE

    send_window = _WakesWriter()
    closed = _WakesWriter()
    send_closed = _WakesWriter()
    reset_received = _WakesWriter()

    def __init__(self, stream_id: int, conn: Any, is_initiator: bool) -> None:
        # Must exist before the base __init__ assigns the watched fields.
        self._writer_wakeup = trio.Event()
        self._writer_lock = InnerLock()  # the connection's write lock yields
        super().__init__(stream_id, conn, is_initiator)

    def _wake_writer(self) -> None:
        """Release whoever waits on the current event; later waiters get a new one."""
        self._writer_wakeup.set()
        self._writer_wakeup = trio.Event()

    def _check_writable(self) -> None:
        # Same messages, hence same NetStream mapping (StreamReset), as the library.
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

    def _data_frame(self, payload: memoryview) -> bytes:
        header = _DATA_HEADER.pack(0, TYPE_DATA, 0, self.stream_id, len(payload))
        return header + payload

    async def write(self, data: bytes) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        total = len(view)
        async with self._writer_lock:  # one write's frames are not interleaved
            sent = 0
            while sent < total:
                await self._wait_for_send_window()
                size = min(self.send_window, self.max_frame_payload, total - sent)
                # No checkpoint between the check and the debit: atomic under trio.
                self.send_window -= size
                await self.conn._write_frame(self._data_frame(view[sent : sent + size]))
                sent += size


def install() -> None:
    """Make every Yamux connection build ``BackpressureYamuxStream`` streams."""
    yamux_module.YamuxStream = BackpressureYamuxStream  # type: ignore[misc]  # the rebinding this module exists for
