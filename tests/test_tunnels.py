"""Tunnels between real nodes on loopback: bytes through real sockets, checked by sha256."""

from __future__ import annotations

import os
import struct

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from conftest import address_of, exchange, exchange_all, free_port, sha256, start_echo_server, start_node
from punchgate.specs import ExposeSpec, HostPort, TunnelSpec
from punchgate.wire import MAX_MESSAGE_SIZE, PROTOCOL_ID, FrameDecoder, encode_request, parse_response

TEST_TIMEOUT = 60


async def expose_and_tunnel(nursery, service="echo", tunnel_service=None, extra_boot=()):
    """A bootstrap node A, B exposing an echo server, C tunnelling to B. Returns (B, C, port)."""
    echo_port = await start_echo_server(nursery)
    a = await start_node(nursery)
    b = await start_node(
        nursery, bootstrap=(address_of(a),), expose=(ExposeSpec(service, HostPort("127.0.0.1", echo_port)),)
    )
    port = free_port()
    c = await start_node(
        nursery,
        bootstrap=(address_of(a), address_of(b), *extra_boot),
        tunnels=(TunnelSpec(str(b.peer_id), tunnel_service or service, HostPort("127.0.0.1", port)),),
    )
    return b, c, port


async def test_three_peer_tunnel_echoes():
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, _, port = await expose_and_tunnel(nursery)
            assert await exchange(port, b"hello punchgate!") == b"hello punchgate!"
            nursery.cancel_scope.cancel()


async def test_50_mb_payload_sha256_end_to_end():
    payload = os.urandom(50 * 1024 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, _, port = await expose_and_tunnel(nursery)
            received = await exchange(port, payload)
            assert len(received) == len(payload)
            assert sha256(received) == sha256(payload)
            nursery.cancel_scope.cancel()


async def test_50_concurrent_connections_through_one_tunnel():
    payloads = [os.urandom(256 * 1024 + i) for i in range(50)]
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, _, port = await expose_and_tunnel(nursery)
            results = await exchange_all(port, payloads)
            nursery.cancel_scope.cancel()
    for i, payload in enumerate(payloads):
        assert sha256(results[i]) == sha256(payload), f"connection {i} corrupted"


async def test_half_close_carries_across_both_ways():
    """A client that shuts its write side still receives the whole answer, then EOF."""
    payload = os.urandom(3 * 1024 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, _, port = await expose_and_tunnel(nursery)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(payload)
            await stream.send_eof()  # only now may the echo server finish
            received = bytearray()
            while data := await stream.receive_some(1 << 20):
                received += data
            assert sha256(bytes(received)) == sha256(payload)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_unknown_service_closes_the_client_and_node_keeps_serving():
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            b, c, bad_port = await expose_and_tunnel(nursery, tunnel_service="nosuch")
            stream = await trio.open_tcp_stream("127.0.0.1", bad_port)
            await stream.send_all(b"anyone there?")
            with trio.fail_after(10):
                assert await closed_without_data(stream)
            await stream.aclose()
            # The same provider still serves a correct request from another node.
            good_port = free_port()
            d = await start_node(
                nursery,
                bootstrap=(address_of(b),),
                tunnels=(TunnelSpec(str(b.peer_id), "echo", HostPort("127.0.0.1", good_port)),),
            )
            assert await exchange(good_port, b"still here") == b"still here"
            nursery.cancel_scope.cancel()


async def closed_without_data(stream: trio.SocketStream) -> bool:
    """True once the peer closes the connection (FIN or, with unread input, RST) sending nothing."""
    try:
        return await stream.receive_some(1024) == b""
    except trio.BrokenResourceError:
        return True


async def raw_tunnel_stream(nursery, target):
    """A bare libp2p host (Noise) with a stream to ``target`` on the tunnel protocol."""
    key_pair = create_new_key_pair()
    host = new_host(key_pair=key_pair, listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    await nursery.start(_run_host, host)
    await host.connect(info_from_p2p_addr(address_of(target)))
    return await host.new_stream(target.peer_id, [TProtocol(PROTOCOL_ID)])


async def _run_host(host, task_status=trio.TASK_STATUS_IGNORED):
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        task_status.started()
        await trio.sleep_forever()


async def read_answer(stream) -> dict | None:
    """The provider's answer, or None if it reset or closed the stream without one."""
    decoder = FrameDecoder()
    try:
        while True:
            decoder.feed(await stream.read(4096))
            if (decoded := decoder.message()) is not None:
                return decoded[0]
    except Exception:  # StreamEOF / StreamReset: no answer
        return None


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"\x00\x00\x00\x05hello", id="not-json"),
        pytest.param(struct.pack(">I", 2) + b"[]", id="json-not-object"),
        pytest.param(struct.pack(">I", MAX_MESSAGE_SIZE + 1) + b"x" * 100, id="oversize-length"),
        pytest.param(struct.pack(">I", 0xFFFFFFFF), id="huge-length"),
        pytest.param(b"\x00\x00", id="truncated-then-eof"),
    ],
)
async def test_bad_frames_are_refused_and_node_keeps_serving(frame):
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            b, c, port = await expose_and_tunnel(nursery)
            stream = await raw_tunnel_stream(nursery, b)
            await stream.write(frame)
            await stream.close_write()
            answer = await read_answer(stream)
            assert answer is None or parse_response(answer).accepted is False
            # The provider is unharmed: a correct request on a new stream works.
            good = await raw_tunnel_stream(nursery, b)
            await good.write(encode_request("echo"))
            assert parse_response(await read_answer(good)).accepted is True
            await good.write(b"ping")
            assert await good.read(4) == b"ping"
            assert await exchange(port, b"and the tunnel too") == b"and the tunnel too"
            nursery.cancel_scope.cancel()


async def plaintext_connects(nursery, target_addr) -> bool:
    """Whether a dialer that offers only /plaintext/2.0.0 gets a connection to target."""
    key_pair = create_new_key_pair()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    dialer = new_host(
        key_pair=key_pair,
        listen_addrs=listen,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
    )
    await nursery.start(_run_host, dialer)
    try:
        with trio.fail_after(15):
            await dialer.connect(info_from_p2p_addr(target_addr))
    except Exception:
        return False
    return True


async def test_plaintext_dialer_is_refused():
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            b, c, port = await expose_and_tunnel(nursery)
            assert not await plaintext_connects(nursery, address_of(b))
            assert await exchange(port, b"noise only") == b"noise only"
            # Control: a host built with the library's default security options accepts it,
            # which is the defect this guards against.
            default_host = new_host(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
            await nursery.start(_run_host, default_host)
            addr = default_host.get_addrs()[0]
            assert await plaintext_connects(nursery, addr)
            nursery.cancel_scope.cancel()
