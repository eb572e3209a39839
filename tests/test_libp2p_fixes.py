"""Tests for punchgate.transports' TCP data path over real hosts (TCP + Noise + Yamux on loopback).

Run as a script (``python tests/test_libp2p_fixes.py <scenario>``) this file
plays one scenario with the library *as shipped* and prints the outcome as
JSON; the tests use that to prove the scenarios fail without the fixes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
from libp2p.security.noise.transport import Transport as Noise

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = TProtocol("/punchgate-test/fixes/1")
MiB = 1 << 20
CHUNK = 256 * 1024
# Receive window a patched node announces (and the most the unpatched library grows to).
WINDOW = 16 * MiB
HEADER = struct.Struct("!BBHII")  # yamux: version, type, flags, stream id, length


def make_host():
    key_pair = create_new_key_pair()
    addrs = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    noise = Noise(key_pair, noise_privkey=create_x25519().private_key)
    return new_host(key_pair=key_pair, listen_addrs=addrs, sec_opt={NOISE: noise}), addrs


@asynccontextmanager
async def host_pair():
    """Two running hosts, ``dialer`` connected to ``listener``."""
    listener, listener_addrs = make_host()
    dialer, dialer_addrs = make_host()
    async with listener.run(listen_addrs=listener_addrs):
        async with dialer.run(listen_addrs=dialer_addrs):
            await dialer.connect(PeerInfo(listener.get_id(), listener.get_addrs()))
            yield listener, dialer


def pattern(total: int) -> bytes:
    """Deterministic, non-repeating-looking payload of ``total`` bytes."""
    seed = hashlib.sha256(str(total).encode()).digest()
    block = hashlib.shake_256(seed).digest(MiB)
    return (block * (total // MiB + 1))[:total]


# ---------------------------------------------------------------------------
# Scenario: the receiver stops reading for longer than 5 s mid-transfer.


async def stall_scenario(
    total: int = 48 * MiB, stall_after: int = 4 * MiB, stall_seconds: float = 7.0
) -> dict:
    """Send ``total`` bytes; the receiver pauses ``stall_seconds`` after ``stall_after``.

    ``reader_end`` is how the receiver's reading ended: "eof", an error, or None
    when it was never told anything (it would hang) although the writer stopped.
    """
    payload = pattern(total)
    outcome: dict = {"writer_error": None, "reader_end": None}
    sent = 0
    received = bytearray()
    sent_during_stall: list[int] = []
    buffered_during_stall: list[int] = []
    reader_done = trio.Event()

    async def handler(stream) -> None:
        try:
            while len(received) < stall_after:
                received.extend(await stream.read(CHUNK))
            # Stop reading; watch the sender while we sleep.
            muxed = stream.muxed_stream
            for _ in range(int(stall_seconds / 0.5)):
                await trio.sleep(0.5)
                sent_during_stall.append(sent)
                buffered_during_stall.append(
                    len(muxed.conn.stream_buffers.get(muxed.stream_id, b""))
                )
            while True:
                received.extend(await stream.read(CHUNK))
        except StreamEOF:
            outcome["reader_end"] = "eof"
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome["reader_end"] = repr(exc)
        finally:
            reader_done.set()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        try:
            with trio.fail_after(60):
                while sent < total:
                    await stream.write(payload[sent : sent + CHUNK])
                    sent += min(CHUNK, total - sent)
                await stream.close_write()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome["writer_error"] = repr(exc)
        with trio.fail_after(60):
            if outcome["writer_error"] is None:
                await reader_done.wait()
            else:
                # The writer gave up: give the reader time to drain what arrived
                # and to be told; if it is not, it would wait forever.
                while len(received) < sent and not reader_done.is_set():
                    await trio.sleep(0.05)
                with trio.move_on_after(2.0):
                    await reader_done.wait()
    outcome.update(
        total=total,
        sent=sent,
        received=len(received),
        intact=hashlib.sha256(received).digest() == hashlib.sha256(payload).digest(),
        sent_during_stall=sent_during_stall,
        buffered_during_stall=buffered_during_stall,
    )
    return outcome


def run_unpatched(scenario: str, *args: str) -> subprocess.Popen:
    """Start this file as a script: it plays ``scenario`` without install()."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), scenario, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def collect(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def fixes_installed():
    from punchgate import libp2p_fixes

    libp2p_fixes.install()


def test_install_is_idempotent_and_rebinds_the_library_names():
    from libp2p.network.connection import swarm_connection
    from libp2p.security.noise import patterns
    from libp2p.stream_muxer import muxer_multistream

    from punchgate import libp2p_fixes, transports
    from punchgate.transports.net_stream import LeanNetStream
    from punchgate.transports.noise import NoiseSession
    from punchgate.transports.yamux import yamux_for

    libp2p_fixes.install()
    libp2p_fixes.install()
    assert libp2p_fixes.installed() and transports.installed()
    assert muxer_multistream.Yamux is yamux_for
    assert patterns.SecureSession is NoiseSession
    assert swarm_connection.NetStream is LeanNetStream


async def test_as_shipped_gives_back_the_library_for_a_block_and_ours_after_it():
    """The adjustment is reversible: connections made inside ``as_shipped()`` use the
    library's own session, muxer and stream; after it, ours again (same process)."""
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.security.secure_session import SecureSession
    from libp2p.stream_muxer.yamux.yamux import Yamux

    from punchgate.transports import as_shipped
    from punchgate.transports.net_stream import LeanNetStream
    from punchgate.transports.noise import NoiseSession
    from punchgate.transports.yamux import FlowYamux

    payload = pattern(2 * MiB)
    kinds = []
    for shipped in (True, False):
        with as_shipped() if shipped else contextlib.nullcontext():
            async with host_pair() as (listener, dialer):
                async def echo(stream) -> None:
                    await stream.write(await read_until_eof(stream))
                    await stream.close()

                listener.set_stream_handler(PROTO, echo)
                stream = await dialer.new_stream(listener.get_id(), [PROTO])
                muxed = stream.muxed_stream.conn
                kinds.append((type(stream), type(muxed), type(muxed.secured_conn)))
                with trio.fail_after(30):
                    await stream.write(payload)
                    await stream.close_write()
                    assert await read_until_eof(stream) == payload
    assert kinds[0] == (NetStream, Yamux, SecureSession), kinds
    assert kinds[1] == (LeanNetStream, FlowYamux, NoiseSession), kinds


def test_an_unexpected_library_version_is_refused(monkeypatch):
    from punchgate import transports

    monkeypatch.setattr(transports.importlib.metadata, "version", lambda name: "0.9.0")
    with pytest.raises(transports.UnsupportedLibrary, match="pin|install libp2p==0.8.1"), transports.adjusted():
        pass


@pytest.mark.slow
async def test_slow_reader_blocks_writer_instead_of_resetting():
    unpatched = run_unpatched("stall")  # same scenario, library as shipped, in parallel
    outcome = await stall_scenario()
    assert outcome["writer_error"] is None and outcome["reader_end"] == "eof", outcome
    assert outcome["received"] == outcome["total"] and outcome["intact"], outcome
    # Back-pressure: the sender ran at most one window (+ one write) ahead of the
    # reader, the receiver buffered at most one window, and the sender was
    # parked (no progress) for the second half of the stall.
    ahead = max(outcome["sent_during_stall"]) - 4 * MiB
    assert ahead <= WINDOW + 2 * CHUNK, outcome["sent_during_stall"]
    assert max(outcome["buffered_during_stall"]) <= WINDOW, outcome["buffered_during_stall"]
    half = len(outcome["sent_during_stall"]) // 2
    assert len(set(outcome["sent_during_stall"][half:])) == 1, outcome["sent_during_stall"]

    # The very same scenario against the library as shipped: the writer is reset
    # after 5 s, the reader is never told (no EOF, no reset), bytes are missing.
    shipped = collect(unpatched)
    assert shipped["writer_error"] is not None and "StreamReset" in shipped["writer_error"]
    assert shipped["reader_end"] is None, shipped
    assert not shipped["intact"] and shipped["received"] < shipped["total"], shipped


# ---------------------------------------------------------------------------
# A writer parked on a full window must still wake when the stream or connection dies.


@asynccontextmanager
async def parked_writer():
    """Yield (listener_stream, dialer_stream, writer_result) with the writer blocked."""
    streams: dict = {}
    accepted = trio.Event()

    async def handler(stream) -> None:
        streams["listener"] = stream
        accepted.set()
        await trio.sleep_forever()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        result: dict = {}

        async def writer() -> None:
            try:
                await stream.write(b"\0" * (WINDOW + 4 * MiB))
                result["error"] = None
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc
            result["at"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await accepted.wait()
            # Parked: the muxer's send window is empty and the write has not returned.
            with trio.fail_after(10):
                while stream.muxed_stream.send_window > 0:
                    await trio.sleep(0.02)
            await trio.sleep(0.3)
            assert "at" not in result
            yield streams["listener"], stream, result, listener, dialer
            with trio.fail_after(3):
                while "at" not in result:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_parked_writer_wakes_on_peer_reset():
    async with parked_writer() as (remote, local, result, _, _):
        await remote.reset()
    assert isinstance(result["error"], StreamReset)


async def test_parked_writer_wakes_on_local_reset():
    async with parked_writer() as (_, local, result, _, _):
        await local.reset()
    assert isinstance(result["error"], (StreamReset, StreamError))


async def test_parked_writer_wakes_on_connection_close():
    async with parked_writer() as (_, _, result, listener, dialer):
        await listener.get_network().close_peer(dialer.get_id())
    assert isinstance(result["error"], (StreamReset, StreamError))


async def test_parked_writer_is_bounded_by_callers_cancel_scope():
    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, lambda s: trio.sleep_forever())
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        with trio.move_on_after(1.0) as scope:
            await stream.write(b"\0" * (WINDOW + 4 * MiB))
        assert scope.cancelled_caught


# ---------------------------------------------------------------------------
# Flow control and the frame path (transports: yamux + noise).


def frame_log(conn) -> list[tuple[int, int, int, int]]:
    """Record (type, flags, stream id, length) of every frame ``conn`` sends."""
    log: list = []
    write_frame, send_frames = conn._write_frame, conn._send_frames

    async def _write_frame(data):
        log.append(HEADER.unpack(bytes(data[:12]))[1:])
        await write_frame(data)

    async def _send_frames(frames):
        log.extend(HEADER.unpack(header)[1:] for header, _ in frames)
        await send_frames(frames)

    conn._write_frame, conn._send_frames = _write_frame, _send_frames
    return log


async def read_until_eof(stream, size: int = CHUNK) -> bytes:
    out = bytearray()
    try:
        while True:
            out += await stream.read(size)
    except StreamEOF:
        return bytes(out)


async def test_frames_fit_one_noise_message_and_bodies_are_not_copied():
    from punchgate.transports import NOISE_PLAINTEXT as MAX_PLAINTEXT

    payload = pattern(3 * MiB + 12345)
    got = {}
    done = trio.Event()
    body_kinds: list[str] = []

    async def handler(stream) -> None:
        muxed = stream.muxed_stream
        with trio.fail_after(10):  # everything fits the window: wait until it is all buffered
            while not muxed.recv_closed:
                await trio.sleep(0.01)
        chunks = list(muxed.conn.stream_buffers[muxed.stream_id]._chunks)
        body_kinds.extend(type(chunk).__name__ for chunk in chunks)
        got["data"] = await read_until_eof(stream)
        done.set()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        session = stream.muxed_stream.conn.secured_conn
        messages: list[int] = []
        write_many = session.write_many

        async def record(batch):
            batch = list(batch)
            messages.extend(sum(len(part) for part in parts) for parts in batch)
            await write_many(batch)

        session.write_many = record
        await stream.write(payload)
        await stream.close_write()
        with trio.fail_after(10):
            await done.wait()
    assert got["data"] == payload
    full = len(payload) // (MAX_PLAINTEXT - 12)
    assert messages[:full] == [MAX_PLAINTEXT] * full  # header + 65,507 B = one message
    assert max(messages) <= MAX_PLAINTEXT
    # Bodies are queued as views into the decrypted messages, not copies.
    assert len(body_kinds) == full + 1 and set(body_kinds) == {"memoryview"}, body_kinds


async def test_write_batches_are_4_full_frames_and_a_small_tail_rides_along():
    """A write goes to the sender in batches of WRITE_BATCH full frames; a tail of a few bytes joins
    the last batch instead of becoming a batch (a socket write) of its own."""
    from punchgate.transports import FRAME_PAYLOAD, WRITE_BATCH

    got = {}
    done = trio.Event()

    async def handler(stream) -> None:
        got["data"] = await read_until_eof(stream)
        done.set()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        conn = stream.muxed_stream.conn
        batches: list[list[int]] = []
        send_frames = conn._send_frames

        async def _send_frames(frames):
            batches.append([len(payload) for _, payload in frames])
            await send_frames(frames)

        conn._send_frames = _send_frames
        payload = pattern(2 * WRITE_BATCH * FRAME_PAYLOAD + 120)  # as two batches of a relayed Noise session
        with trio.fail_after(10):
            await stream.write(payload)
            await stream.close_write()
            await done.wait()
    data_batches = [sizes for sizes in batches if any(sizes)]
    assert data_batches == [[FRAME_PAYLOAD] * WRITE_BATCH, [FRAME_PAYLOAD] * WRITE_BATCH + [120]], data_batches
    assert got["data"] == payload


async def test_streams_announce_16_mib_window_and_credit_every_half_window():
    total = 40 * MiB
    payload = pattern(total)
    received = {}
    done = trio.Event()

    async def handler(stream) -> None:
        received["log"] = frame_log(stream.muxed_stream.conn)
        received["send_window"] = stream.muxed_stream.send_window
        received["data"] = await read_until_eof(stream)
        done.set()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        muxed = stream.muxed_stream
        # The listener's ACK granted the big window (less what protocol negotiation used).
        assert WINDOW - 1024 < muxed.send_window <= WINDOW
        for offset in range(0, total, CHUNK):
            await stream.write(payload[offset : offset + CHUNK])
        await stream.close_write()
        with trio.fail_after(20):
            await done.wait()
    assert received["data"] == payload
    assert WINDOW - 1024 < received["send_window"] <= WINDOW  # the dialer's SYN granted it too
    updates = [f for f in received["log"] if f[0] == 1 and f[2] == muxed.stream_id and f[3] > 0]
    # 40 MiB through a 16 MiB window needs >= 24 MiB of credit, given 8 MiB at a time.
    assert 3 <= len(updates) <= 5, updates
    assert all(length >= WINDOW // 2 for _, _, _, length in updates), updates


async def test_cancelled_reads_lose_neither_bytes_nor_window_credit():
    total = 40 * MiB  # more than two windows: credit must keep flowing
    payload = pattern(total)
    got = bytearray()
    done = trio.Event()
    cancelled = 0

    async def handler(stream) -> None:
        nonlocal cancelled
        try:
            while True:
                with trio.move_on_after(0.0002) as scope:  # callers' deadlines fire often
                    got.extend(await stream.read(CHUNK))
                cancelled += scope.cancelled_caught
        except StreamEOF:
            done.set()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        with trio.fail_after(30):
            for offset in range(0, total, CHUNK):
                await stream.write(payload[offset : offset + CHUNK])
            await stream.close_write()
            await done.wait()
    assert cancelled > 0
    assert len(got) == total and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_200_concurrent_streams_echo_intact():
    async def echo(stream) -> None:
        data = await read_until_eof(stream)
        await stream.write(data)
        await stream.close()

    failures: list = []

    async def one(dialer, peer, index: int) -> None:
        payload = os.urandom(64 * 1024)
        stream = await dialer.new_stream(peer, [PROTO])
        await stream.write(payload)
        await stream.close_write()
        echoed = await read_until_eof(stream)
        if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
            failures.append(index)

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, echo)
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for index in range(200):
                    nursery.start_soon(one, dialer, listener.get_id(), index)
    assert failures == []


async def test_frame_reader_keeps_reading_while_the_connection_cannot_send():
    """The frame reader never waits on the write path.

    Regression: the reader used to take the connection's write lock to acknowledge
    a SYN or answer a ping. With a writer holding that lock, stuck in a socket
    send because the peer reads nothing, and the peer's reader stuck the same way,
    both ends stopped reading for good (50 concurrent tunnel connections hung
    about one run in four). Here the listener's write lock is held, as by such a
    writer, while the dialer pings and opens two streams: the listener must still
    read every frame, so the second stream is seen. Its answers go out once the
    lock is free.
    """
    from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_PING

    async with host_pair() as (listener, dialer):
        listener_side: list = []
        arrived = trio.Event()

        async def handler(stream) -> None:
            listener_side.append(stream)
            arrived.set()
            await trio.sleep_forever()  # the test reads from it; the host's shutdown ends it

        listener.set_stream_handler(PROTO, handler)
        first = await dialer.new_stream(listener.get_id(), [PROTO])
        with trio.fail_after(5):
            await arrived.wait()
        dialer_conn = first.muxed_stream.conn
        listener_conn = listener_side[0].muxed_stream.conn
        with trio.fail_after(10):
            async with listener_conn._write_lock:
                await dialer_conn._write_frame(HEADER.pack(0, TYPE_PING, FLAG_SYN, 0, 4242))
                one = await dialer_conn.open_stream()
                two = await dialer_conn.open_stream()
                with trio.move_on_after(3):
                    while two.stream_id not in listener_conn.streams:
                        await trio.sleep(0.01)
                assert one.stream_id in listener_conn.streams
                assert two.stream_id in listener_conn.streams, "frame reader stopped at the first SYN"
            # Lock released: the queued acknowledgement reaches the dialer.
            await first.write(b"still works")
            assert await listener_side[0].read(11) == b"still works"


async def test_half_close_both_ways():
    log: list = []

    async def handler(stream) -> None:
        request = await read_until_eof(stream)  # the dialer half-closed
        log.append(("listener got", request))
        await stream.write(b"reply after your FIN")  # we can still write
        await stream.close_write()

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        await stream.write(b"request")
        await stream.close_write()
        with pytest.raises(StreamError):
            await stream.write(b"too late")
        with trio.fail_after(5):
            reply = await read_until_eof(stream)  # we can still read after our FIN
    assert log == [("listener got", b"request")]
    assert reply == b"reply after your FIN"


async def test_reset_propagates_to_reader_and_writer():
    outcome: dict = {}
    got_data = trio.Event()

    async def handler(stream) -> None:
        outcome["first"] = await stream.read(100)
        got_data.set()
        try:
            with trio.fail_after(5):
                await stream.read(100)
        except Exception as exc:  # noqa: BLE001
            outcome["read"] = exc
        try:
            await stream.write(b"x")
        except Exception as exc:  # noqa: BLE001
            outcome["write"] = exc

    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        stream = await dialer.new_stream(listener.get_id(), [PROTO])
        await stream.write(b"hello")
        await got_data.wait()
        await stream.reset()
        with trio.fail_after(5):
            while "write" not in outcome:
                await trio.sleep(0.01)
    assert outcome["first"] == b"hello"
    assert isinstance(outcome["read"], StreamReset)
    assert isinstance(outcome["write"], (StreamReset, StreamError))


async def test_small_stream_not_starved_by_bulk_stream_on_same_connection():
    async def handler(stream) -> None:
        try:
            while True:
                await stream.write(await stream.read(CHUNK))
        except (StreamEOF, StreamReset):
            pass

    async def sink(stream) -> None:
        await read_until_eof(stream)

    bulk_proto = TProtocol("/punchgate-test/bulk/1")
    latencies: list[float] = []
    async with host_pair() as (listener, dialer):
        listener.set_stream_handler(PROTO, handler)
        listener.set_stream_handler(bulk_proto, sink)
        bulk = await dialer.new_stream(listener.get_id(), [bulk_proto])
        chat = await dialer.new_stream(listener.get_id(), [PROTO])
        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                block = b"\0" * CHUNK
                while True:
                    await bulk.write(block)

            nursery.start_soon(pump)
            await trio.sleep(0.2)
            for _ in range(20):
                start = time.perf_counter()
                await chat.write(b"?")
                assert await chat.read(1) == b"?"
                latencies.append(time.perf_counter() - start)
            nursery.cancel_scope.cancel()
    assert max(latencies) < 0.5, latencies


# ---------------------------------------------------------------------------
# NoiseSession on its own, over an in-memory transport (the path relayed
# connections take: no trio socket underneath), against the shipped session.


class _MemoryReadWriteCloser:
    def __init__(self, stream) -> None:
        self.stream = stream

    async def read(self, n=None):
        return await self.stream.receive_some(n)

    async def write(self, data) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self):
        return None


async def noise_pair(monkeypatch, patched_dialer: bool = True, patched_listener: bool = True):
    """Run a real Noise XX handshake over memory streams; return both sessions."""
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.peer.id import ID
    from libp2p.security.noise import patterns
    from libp2p.security.secure_session import SecureSession

    from punchgate.transports.noise import NoiseSession

    a, b = trio.testing.memory_stream_pair()
    key_a, key_b = create_new_key_pair(), create_new_key_pair()
    noise_a = Noise(key_a, noise_privkey=create_x25519().private_key)
    noise_b = Noise(key_b, noise_privkey=create_x25519().private_key)
    raw_a = RawConnection(_MemoryReadWriteCloser(a), True)
    raw_b = RawConnection(_MemoryReadWriteCloser(b), False)
    sessions: dict = {}

    async def dial() -> None:
        sessions["dialer"] = await noise_a.secure_outbound(raw_a, ID.from_pubkey(key_b.public_key))

    async def listen() -> None:
        sessions["listener"] = await noise_b.secure_inbound(raw_b)

    # Handshakes run one message at a time, so each side picks its class in turn.
    kinds = {
        "dialer": NoiseSession if patched_dialer else SecureSession,
        "listener": NoiseSession if patched_listener else SecureSession,
    }

    class Chooser:
        def __call__(self, **kwargs):
            role = "dialer" if kwargs["is_initiator"] else "listener"
            return kinds[role](**kwargs)

    monkeypatch.setattr(patterns, "SecureSession", Chooser())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial)
        nursery.start_soon(listen)
    return sessions["dialer"], sessions["listener"]


async def test_noise_session_read_semantics_without_a_socket(monkeypatch):
    from punchgate.transports import NOISE_PLAINTEXT as MAX_PLAINTEXT
    from punchgate.transports.noise import NoiseSession

    dialer, listener = await noise_pair(monkeypatch)
    assert isinstance(dialer, NoiseSession) and isinstance(listener, NoiseSession)
    big = pattern(3 * MAX_PLAINTEXT + 7)

    async def send() -> None:
        await dialer.write(b"hello")
        await dialer.write_many([(b"ab", b"cd"), (b"",), (b"ef",)])  # empty message skipped
        await dialer.write(big)
        await dialer.write(b"tail")
        await dialer.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        assert await listener.read(None) == b"hello"  # one message
        assert await listener.read(3) == b"abc"  # exact, across messages
        assert bytes(await listener.read_exact(3)) == b"def"
        view = await listener.read_exact(1000)  # inside one message: a view, no copy
        assert isinstance(view, memoryview) and bytes(view) == big[:1000]
        assert await listener.read(len(big) - 1000) == big[1000:]  # spans 4 messages
        assert await listener.read(100) == b"tail"  # peer closed: what there was
        with pytest.raises(ConnectionClosedError):
            await listener.read(1)


@pytest.mark.parametrize("patched_dialer", [True, False])
async def test_noise_session_talks_to_shipped_secure_session(monkeypatch, patched_dialer):
    from punchgate.transports.noise import NoiseSession

    dialer, listener = await noise_pair(
        monkeypatch, patched_dialer=patched_dialer, patched_listener=not patched_dialer
    )
    assert isinstance(dialer, NoiseSession) == patched_dialer
    assert isinstance(listener, NoiseSession) != patched_dialer
    up, down = pattern(300_000), pattern(200_000)[::-1]

    async def read_n(session, n):
        out = bytearray()
        while len(out) < n:
            out += await session.read(n - len(out))
        return bytes(out)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dialer.write, up)
        assert await read_n(listener, len(up)) == up
        nursery.start_soon(listener.write, down)
        assert await read_n(dialer, len(down)) == down


# ---------------------------------------------------------------------------
# Interop with the library as shipped, in another process.


async def unpatched_echo_server(count: int = 2) -> None:
    """Serve an echo protocol with the library as shipped; print the address."""
    host, addrs = make_host()

    async def echo(stream) -> None:
        try:
            while True:
                await stream.write(await stream.read(65536))
        except StreamEOF:
            await stream.close()

    host.set_stream_handler(PROTO, echo)
    async with host.run(listen_addrs=addrs):
        print(f"READY {host.get_id().to_base58()} {host.get_addrs()[0]}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


async def echo_through(host, peer, total: int) -> bool:
    """Write ``total`` bytes on an echo stream while reading them back; compare."""
    payload = pattern(total)
    stream = await host.new_stream(peer, [PROTO])
    echoed = bytearray()

    async def writer() -> None:
        for offset in range(0, total, CHUNK):
            await stream.write(payload[offset : offset + CHUNK])
        await stream.close_write()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        echoed += await read_until_eof(stream, 65536)
    return hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def unpatched_echo_client(peer_id: str, addr: str, total: int) -> dict:
    """Dial a (patched) echo server with the library as shipped."""
    from libp2p.peer.id import ID

    host, addrs = make_host()
    async with host.run(listen_addrs=addrs):
        peer = ID.from_base58(peer_id)
        await host.connect(PeerInfo(peer, [multiaddr.Multiaddr(addr)]))
        with trio.fail_after(60):
            return {"intact": await echo_through(host, peer, total)}


@asynccontextmanager
async def unpatched_server():
    """A host of ours connected to this file's ``echo-server`` (the library as shipped,
    in another process); yields (host, the server's peer ID)."""
    from libp2p.peer.id import ID

    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "echo-server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    try:
        line = await trio.to_thread.run_sync(server.stdout.readline)
        _, peer_id, addr = line.split()
        host, addrs = make_host()
        async with host.run(listen_addrs=addrs):
            peer = ID.from_base58(peer_id)
            await host.connect(PeerInfo(peer, [multiaddr.Multiaddr(addr)]))
            yield host, peer
    finally:
        server.stdin.close()
        server.stdout.close()
        server.wait(timeout=10)


async def test_interop_patched_dials_unpatched():
    async with unpatched_server() as (host, peer):
        with trio.fail_after(60):
            assert await echo_through(host, peer, 24 * MiB)


async def test_interop_unpatched_dials_patched():
    async def echo(stream) -> None:
        try:
            while True:
                await stream.write(await stream.read(65536))
        except StreamEOF:
            await stream.close()

    host, addrs = make_host()
    host.set_stream_handler(PROTO, echo)
    async with host.run(listen_addrs=addrs):
        client = run_unpatched(
            "echo-client", host.get_id().to_base58(), str(host.get_addrs()[0]), str(24 * MiB)
        )
        result = await trio.to_thread.run_sync(collect, client)
    assert result == {"intact": True}


# ---------------------------------------------------------------------------


def _main(argv: list[str]) -> None:
    import logging

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    if argv[1] == "echo-server":
        trio.run(unpatched_echo_server)
        return
    scenarios = {"stall": stall_scenario, "echo-client": unpatched_echo_client}
    args = [int(a) if a.isdigit() else a for a in argv[2:]]
    print(json.dumps(trio.run(scenarios[argv[1]], *args)))


if __name__ == "__main__":
    _main(sys.argv)
