"""Scheduler passes and cancel safety on the stream data path (punchgate.transports).

A trio checkpoint costs a scheduler pass (an ``epoll_wait`` and the run loop's
bookkeeping); on a 1-byte round trip through a tunnel those passes were most of
the CPU. These tests count how often the task that reads or writes is
rescheduled: with the library as shipped the ``NetStream`` state lock alone
made each read and write one pass more, so they fail if that adjustment is
lost. A write hands its frames to the connection's sender task (transports/yamux.py) and,
with nothing of its own still in flight, returns without a pass.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset

from punchgate import libp2p_fixes
from punchgate.transports.net_stream import LeanNetStream
from tests.test_libp2p_fixes import host_pair, pattern, read_until_eof

PROTO = TProtocol("/punchgate-test/hot-path/1")


@pytest.fixture(autouse=True)
def fixes_installed():
    libp2p_fixes.install()


class StepCounter(trio.abc.Instrument):
    """Counts the steps of one task (each step after the first is a reschedule)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def passes(operation) -> int:
    """How many times the current task yields to the scheduler during ``operation``."""
    counter = StepCounter(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(counter)
    try:
        await operation()
    finally:
        trio.lowlevel.remove_instrument(counter)
    return counter.steps


async def _echo(stream) -> None:
    try:
        while True:
            await stream.write(await stream.read(65536))
    except StreamEOF:
        await stream.close()
    except StreamReset:
        pass


def test_install_binds_lean_net_stream():
    from libp2p.network.connection import swarm_connection

    assert swarm_connection.NetStream is LeanNetStream


async def test_stream_write_and_buffered_read_do_not_yield():
    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, _echo)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        assert isinstance(stream, LeanNetStream)
        for _ in range(3):  # warm up: window updates, first frames
            await stream.write(b"warm")
            assert await stream.read(4) == b"warm"

        # One write with nothing in flight: queued for the sender, no pass.
        assert await passes(lambda: stream.write(b"x" * 1000)) == 0
        with trio.fail_after(10):
            while len(stream.muxed_conn.stream_buffers[stream.muxed_stream.stream_id]) < 1000:
                await trio.sleep(0.001)
        # A read that buffered bytes satisfy does not yield.
        assert await passes(lambda: stream.read(1000)) == 0


class _FakeMuxed:
    """A muxed stream that raises what it is told to (for the state mapping)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.muxed_conn = None

    async def read(self, n=None) -> bytes:
        if self.error is not None:
            raise self.error
        return b"data"

    async def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize(
    "cls", [NetStream, LeanNetStream], ids=["library", "lean"]
)
@pytest.mark.parametrize(
    "op, error, start, raised, end",
    [
        ("read", MuxedStreamEOF(), StreamState.OPEN, StreamEOF, StreamState.CLOSE_READ),
        ("read", MuxedStreamEOF(), StreamState.CLOSE_WRITE, StreamEOF, StreamState.CLOSE_BOTH),
        ("read", MuxedStreamReset(), StreamState.OPEN, StreamReset, StreamState.RESET),
        ("read", RuntimeError("boom"), StreamState.OPEN, StreamError, StreamState.ERROR),
        ("read", None, StreamState.RESET, StreamReset, StreamState.RESET),
        ("read", None, StreamState.ERROR, StreamError, StreamState.ERROR),
        ("write", MuxedStreamError("x"), StreamState.OPEN, StreamReset, StreamState.RESET),
        ("write", RuntimeError("boom"), StreamState.OPEN, StreamError, StreamState.ERROR),
        ("write", None, StreamState.CLOSE_WRITE, StreamClosed, StreamState.CLOSE_WRITE),
        ("write", None, StreamState.CLOSE_BOTH, StreamClosed, StreamState.CLOSE_BOTH),
        ("write", None, StreamState.RESET, StreamReset, StreamState.RESET),
    ],
)
async def test_lean_stream_maps_failures_as_the_library_does(cls, op, error, start, raised, end):
    stream = cls(_FakeMuxed(error), None, None)
    stream._state = start
    with pytest.raises(raised):
        if op == "read":
            await stream.read(10)
        else:
            await stream.write(b"x")
    assert stream._state is end


async def test_cancelled_writes_leave_the_connection_intact():
    """Writers cancelled at random moments mid-write never leave the Noise nonces
    or the byte stream out of step: another stream on the same connection still
    echoes every byte, and the connection stays up."""
    async def sink(stream) -> None:
        try:
            while await stream.read(1 << 20):
                pass
        except (StreamEOF, StreamReset):
            pass

    bulk_proto = TProtocol("/punchgate-test/hot-path-bulk/1")
    rng = random.Random(7)
    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, _echo)
        listener.set_stream_handler(bulk_proto, sink)
        block = b"\x5a" * (1 << 20)
        cancelled = 0
        for _ in range(40):
            bulk = await dialer.new_stream(listener.get_id(), [bulk_proto])
            with trio.move_on_after(rng.uniform(0.0001, 0.01)) as scope:
                while True:
                    await bulk.write(block)
            cancelled += scope.cancelled_caught
            await bulk.reset()
        assert cancelled > 30

        payload = pattern(4 << 20)
        chat = await dialer.new_stream(listener.get_id(), [PROTO])

        async def writer() -> None:
            for offset in range(0, len(payload), 65536):
                await chat.write(payload[offset : offset + 65536])
            await chat.close_write()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                echoed = await read_until_eof(chat, 65536)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
