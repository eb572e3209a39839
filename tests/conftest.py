"""Shared helpers for tests that run real nodes, sockets and processes on loopback."""

from __future__ import annotations

import gc
import hashlib
import socket
import tempfile
from functools import partial
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from punchgate.config import Config
from punchgate.logs import configure_logging
from punchgate.runtime.node import Node
from punchgate.specs import transport_of

LOOPBACK_TCP = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
LOOPBACK_QUIC = multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")
LOOPBACK = {"tcp": LOOPBACK_TCP, "quic": LOOPBACK_QUIC}  # a node listening on one transport only
_NODE_DIRS = tempfile.TemporaryDirectory(prefix="punchgate-test-nodes-")  # removed when the run ends
NODE_START_TIMEOUT = 20


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs():
    configure_logging("console", "warning")


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test():
    """py-libp2p's host shutdown leaves a socket object in a reference cycle. Found by
    the garbage collector during a later test, it would close whatever that test had
    opened under the same descriptor number; collecting after every test keeps each
    test's sockets its own."""
    yield
    gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_echo_server(nursery: trio.Nursery) -> int:
    """A half-close aware echo server on loopback; returns its port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(256 * 1024):
                await stream.send_all(data)
            await stream.send_eof()

    nursery.start_soon(partial(trio.serve_listeners, echo, listeners))
    return listeners[0].socket.getsockname()[1]


async def start_node(nursery: trio.Nursery, key_pair=None, **config: object) -> Node:
    config.setdefault("listen", (LOOPBACK_TCP,))
    # Each node its own identity path: its memory of peers is written next to it.
    config.setdefault("identity", Path(tempfile.mkdtemp(dir=_NODE_DIRS.name)) / "identity.key")
    config.setdefault("mdns", False)  # tests that want the LAN say so
    node = Node(Config(**config), key_pair or create_new_key_pair())
    with trio.fail_after(NODE_START_TIMEOUT):
        await nursery.start(node.run)
        await node.ready.wait()
    return node


def address_of(node: Node, transport: str = "tcp") -> multiaddr.Multiaddr:
    """The node's listen address for ``transport``, with /p2p/<id>."""
    for addr in node.host.get_transport_addrs():
        if transport_of(addr) == transport:
            return addr.encapsulate(multiaddr.Multiaddr(f"/p2p/{node.peer_id}"))
    raise AssertionError(f"node has no {transport} address: {node.host.get_transport_addrs()}")


async def exchange(port: int, payload: bytes, chunk: int = 256 * 1024) -> bytes:
    """Send ``payload`` to 127.0.0.1:port while reading; half-close; return all bytes read.

    A connection the other end closes or resets early just returns what arrived (the
    callers compare it with what they sent).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    async with stream:

        async def send() -> None:
            view = memoryview(payload)
            try:
                for i in range(0, len(view), chunk):
                    await stream.send_all(view[i : i + chunk])
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the reader below sees how the connection ended

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await stream.receive_some(1024 * 1024):
                    received += data
        except* trio.BrokenResourceError:
            pass
    return bytes(received)


async def exchange_all(port: int, payloads: list[bytes]) -> list[bytes]:
    """Run :func:`exchange` for every payload at once, each on its own connection."""
    results: list[bytes] = [b""] * len(payloads)

    async def one(i: int) -> None:
        results[i] = await exchange(port, payloads[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(payloads)):
            nursery.start_soon(one, i)
    return results


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
