"""Tests for punchgate.libp2p_fixes over real hosts (TCP + Noise + Yamux on loopback).

Run as a script (``python tests/test_libp2p_fixes.py <scenario>``) this file
plays one scenario with the library *as shipped* and prints the outcome as
JSON; the tests use that to prove the scenarios fail without the fixes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.custom_types import TProtocol
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


async def stall_scenario(total: int = 48 * MiB, stall_after: int = 4 * MiB,
                         stall_seconds: float = 7.0) -> dict:
    payload = pattern(total)
    outcome: dict = {"writer_error": None, "reader_error": None, "reader_hung": False}
    sent = 0
    received = bytearray()
    sent_during_stall: list[int] = []
    buffered_during_stall: list[int] = []
    receiver_ready = trio.Event()
    writer_done = trio.Event()
    holder: dict = {}

    async def handler(stream) -> None:
        holder["stream"] = stream
        receiver_ready.set()
        try:
            while len(received) < stall_after:
                received.extend(await stream.read(CHUNK))
            # Stop reading; watch the sender while we sleep.
            muxed = stream.muxed_stream
            deadline = trio.current_time() + stall_seconds
            while trio.current_time() < deadline:
                await trio.sleep(0.5)
                sent_during_stall.append(sent)
                buffered_during_stall.append(
                    len(muxed.conn.stream_buffers.get(muxed.stream_id, b""))
                )
            while True:
                # Once the writer has given up, nothing more can come: bound the wait.
                timeout = 3.0 if writer_done.is_set() else 60.0
                with trio.move_on_after(timeout) as scope:
                    received.extend(await stream.read(CHUNK))
                if scope.cancelled_caught:
                    outcome["reader_hung"] = True
                    return
        except StreamEOF:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome["reader_error"] = repr(exc)

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
        writer_done.set()
        with trio.fail_after(90):
            while "stream" not in holder or not (
                outcome["reader_hung"] or outcome["reader_error"] or len(received) >= total
                or outcome["writer_error"] and len(received) >= sent
            ):
                await trio.sleep(0.05)
            await trio.sleep(0.2)
    outcome.update(
        total=total,
        sent=sent,
        received=len(received),
        intact=hashlib.sha256(received).digest() == hashlib.sha256(payload).digest(),
        sent_during_stall=sent_during_stall,
        buffered_during_stall=buffered_during_stall,
    )
    return outcome


def run_unpatched(scenario: str, timeout: float = 120) -> subprocess.Popen:
    """Start this file as a script: it plays ``scenario`` without install()."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), scenario],
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


@pytest.mark.slow
async def test_slow_reader_blocks_writer_instead_of_resetting():
    unpatched = run_unpatched("stall")  # same scenario, library as shipped, in parallel
    outcome = await stall_scenario()
    assert outcome["writer_error"] is None, outcome
    assert outcome["reader_error"] is None and not outcome["reader_hung"], outcome
    assert outcome["received"] == outcome["total"] and outcome["intact"], outcome
    # Back-pressure: the sender ran at most one window (+ one write) ahead of the
    # reader, the receiver buffered at most one window, and the sender was
    # parked (no progress) for the second half of the stall.
    ahead = max(outcome["sent_during_stall"]) - 4 * MiB
    assert ahead <= WINDOW + 2 * CHUNK, outcome["sent_during_stall"]
    assert max(outcome["buffered_during_stall"]) <= WINDOW + 64 * 1024, outcome["buffered_during_stall"]
    half = len(outcome["sent_during_stall"]) // 2
    assert len(set(outcome["sent_during_stall"][half:])) == 1, outcome["sent_during_stall"]

    # The very same scenario against the library as shipped: the writer is reset
    # after 5 s and the reader never learns, so bytes are missing.
    shipped = collect(unpatched)
    assert shipped["writer_error"] is not None and "StreamReset" in shipped["writer_error"]
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


def _main(argv: list[str]) -> None:
    import logging

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    scenarios = {"stall": stall_scenario}
    print(json.dumps(trio.run(scenarios[argv[1]])))


if __name__ == "__main__":
    _main(sys.argv)
