"""The tunnel data path under stalls, idleness, faults and load: nothing lost, nothing hangs, nothing leaks.

Each test runs over a direct connection between in-process nodes on loopback, once
with both nodes listening on TCP only and once on QUIC only (``transport``): the same
tunnel, the same checks, the stream riding a TCP+Noise+Yamux connection or a QUIC one
(``punchgate.transports``). The relayed variants run in the NAT lab (tests/test_nat.py);
a QUIC peer killed outright is in tests/test_processes.py.
"""

from __future__ import annotations

import hashlib
import os
import resource
from functools import partial

import pytest
import trio
import trio.testing
from conftest import LOOPBACK, address_of, exchange_all, free_port, sha256, start_echo_server, start_node

from punchgate.runtime.host import connection_transport
from punchgate.specs import ExposeSpec, HostPort, TunnelSpec

MIB = 1024 * 1024
STALL_SECONDS = float(os.environ.get("PUNCHGATE_STALL_TEST_SECONDS", "60"))
IDLE_SECONDS = float(os.environ.get("PUNCHGATE_IDLE_TEST_SECONDS", "70"))
IDLE_MINUTES = 10  # on the trio clock (see test_idle_for_10_minutes_of_trio_time_with_the_real_defaults)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pattern(size: int, seed: int = 7) -> bytes:
    """Deterministic incompressible-looking bytes."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


class Source:
    """A TCP service that sends a fixed payload to each client, counting what it has sent."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sent = 0

    async def start(self, nursery: trio.Nursery) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(partial(trio.serve_listeners, self._serve, listeners))
        return listeners[0].socket.getsockname()[1]

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            view = memoryview(self.payload)
            for i in range(0, len(view), 64 * 1024):
                await stream.send_all(view[i : i + 64 * 1024])
                self.sent += len(view[i : i + 64 * 1024])
            await stream.send_eof()


async def tunnel_to(nursery, service_port: int, transport: str = "tcp", name: str = "svc"):
    """A provider exposing 127.0.0.1:service_port and a client tunnelling to it, both
    listening on ``transport`` only; returns (provider, client, port)."""
    listen = (LOOPBACK[transport],)
    provider = await start_node(nursery, listen=listen, expose=(ExposeSpec(name, HostPort("127.0.0.1", service_port)),))
    port = free_port()
    client = await start_node(
        nursery,
        listen=listen,
        bootstrap=(address_of(provider, transport),),
        tunnels=(TunnelSpec(str(provider.peer_id), name, HostPort("127.0.0.1", port)),),
    )
    return provider, client, port


@pytest.fixture(params=["tcp", "quic"])
def transport(request) -> str:
    """The transport both nodes listen on (so the tunnel's direct connection uses it)."""
    return request.param


def assert_rides(client, provider, transport: str) -> None:
    """The client reaches the provider over ``transport`` only: the tunnel ran on the transport under test."""
    kinds = [connection_transport(c) for c in client.host.get_network().get_connections(provider.peer_id)]
    assert kinds and set(kinds) == {transport}, kinds


@pytest.fixture(autouse=True)
def _enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
async def test_reader_stalling_60s_mid_download_loses_nothing_and_pushes_back(transport):
    payload = pattern(100 * MIB)
    source = Source(payload)
    with trio.fail_after(STALL_SECONDS + 120):
        async with trio.open_nursery() as nursery:
            provider, client, port = await tunnel_to(nursery, await source.start(nursery), transport)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            received = bytearray()
            while len(received) < 10 * MIB:
                received += await stream.receive_some(MIB)
            rss_before, sent_before = rss_bytes(), source.sent
            await trio.sleep(STALL_SECONDS)  # the reader stalls: this is the scenario, not a wait for an event
            sent_during, rss_during = source.sent - sent_before, rss_bytes() - rss_before
            while data := await stream.receive_some(MIB):
                received += data
            await stream.aclose()
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()
    assert len(received) == len(payload)
    assert sha256(bytes(received)) == sha256(payload)
    # Back-pressure reached the service: it could not push the whole payload into buffers.
    assert sent_before + sent_during < 60 * MIB, (sent_before, sent_during)
    assert rss_during < 64 * MIB, rss_during


@pytest.mark.slow
async def test_idle_connection_still_carries_data(transport):
    with trio.fail_after(IDLE_SECONDS + 60):
        async with trio.open_nursery() as nursery:
            provider, client, port = await tunnel_to(nursery, await start_echo_server(nursery), transport)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"before")
            assert await stream.receive_some(100) == b"before"
            await trio.sleep(IDLE_SECONDS)  # idleness is the scenario under test
            await stream.send_all(b"after the pause")
            assert await stream.receive_some(100) == b"after the pause"
            await stream.aclose()
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()


# Over QUIC the keep-alive (a PING every 3 s while a stream is open) wakes the jumping clock
# about 200 times, each after 0.1 s of real quiet: half a minute, so it is a slow test there.
@pytest.mark.parametrize("transport", ["tcp", pytest.param("quic", marks=pytest.mark.slow)])
async def test_idle_for_10_minutes_of_trio_time_with_the_real_defaults(mock_clock, transport):
    """Ten idle minutes on the trio clock, every timer at its real default.

    All nodes run in this process, so once the tunnel is idle every task waits on a
    timer or a socket. The mock clock then jumps to the next deadline after 0.1 s of
    real quiet: each timer on the path (pings, Yamux RTT probes, the TCP path's
    timeouts, QUIC's keep-alives, loss detection and idle timeout, DHT refreshes) fires
    as it would in ten real minutes, in seconds. (A
    timer that closed the peer connection after 5 minutes, added by hand, made this
    test fail.)
    """
    mock_clock.autojump_threshold = 0.1  # real seconds of quiet before the clock jumps
    with trio.fail_after(IDLE_MINUTES * 60 + 120):
        async with trio.open_nursery() as nursery:
            provider, client, port = await tunnel_to(nursery, await start_echo_server(nursery), transport)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"before")
            assert await stream.receive_some(100) == b"before"
            idle_from = trio.current_time()
            await trio.sleep(IDLE_MINUTES * 60)  # idleness is the scenario under test
            assert trio.current_time() - idle_from >= IDLE_MINUTES * 60
            await stream.send_all(b"after ten minutes")
            assert await stream.receive_some(100) == b"after ten minutes"
            await stream.aclose()
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()


async def test_service_half_closing_first_still_receives_everything(transport):
    """The service answers and shuts its write side first; the client keeps sending after EOF."""
    upload = os.urandom(4 * MIB)
    got = {}

    async def greet_then_collect(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello, send me your data")
            await stream.send_eof()
            data = bytearray()
            while chunk := await stream.receive_some(MIB):
                data += chunk
            got["upload"] = bytes(data)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            nursery.start_soon(partial(trio.serve_listeners, greet_then_collect, listeners))
            provider, client, port = await tunnel_to(nursery, listeners[0].socket.getsockname()[1], transport)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            greeting = bytearray()
            while chunk := await stream.receive_some(1024):  # until the service's EOF arrives
                greeting += chunk
            assert greeting == b"hello, send me your data"
            await stream.send_all(upload)
            await stream.send_eof()
            with trio.fail_after(10):
                while "upload" not in got:
                    await trio.sleep(0.01)
            await stream.aclose()
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()
    assert sha256(got["upload"]) == sha256(upload)


async def test_service_going_away_closes_the_remote_client(transport):
    service_scope = trio.CancelScope()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def service(task_status=trio.TASK_STATUS_IGNORED):
                with service_scope:
                    async with trio.open_nursery() as inner:
                        task_status.started(await start_echo_server(inner))
                        await trio.sleep_forever()

            provider, client, port = await tunnel_to(nursery, await nursery.start(service), transport)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"ping")
            assert await stream.receive_some(10) == b"ping"
            service_scope.cancel()  # the echo server and its connections vanish
            with trio.fail_after(5):
                try:
                    while await stream.receive_some(1024):
                        pass
                except trio.BrokenResourceError:
                    pass  # reset instead of FIN: closed all the same
            await stream.aclose()
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()


async def test_1000_concurrent_connections_each_echo_64k(transport):
    payloads = [os.urandom(64 * 1024) for _ in range(1000)]
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            provider, client, port = await tunnel_to(nursery, await start_echo_server(nursery), transport)
            results = await exchange_all(port, payloads)
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()
    bad = [i for i, p in enumerate(payloads) if results[i] != p]
    assert not bad, f"{len(bad)} of 1000 connections wrong, e.g. {bad[:5]}"


@pytest.mark.slow
async def test_no_leaks_after_10000_sequential_connections(transport):
    count = int(os.environ.get("PUNCHGATE_LEAK_TEST_CONNECTIONS", "10000"))
    with trio.fail_after(900):
        async with trio.open_nursery() as nursery:
            provider, client, port = await tunnel_to(nursery, await start_echo_server(nursery), transport)

            async def round_trip(i: int) -> None:
                message = b"%08d" % i
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(message)
                    await stream.send_eof()
                    reply = b""
                    while chunk := await stream.receive_some(64):
                        reply += chunk
                assert reply == message

            for i in range(200):  # warm up caches and allocator pools before the baseline
                await round_trip(i)
            await quiesce(client)
            fds, rss = open_fds(), rss_bytes()
            tasks = trio.lowlevel.current_statistics().tasks_living
            for i in range(count):
                await round_trip(i)
            await quiesce(client)
            fds_after, rss_after = open_fds(), rss_bytes()
            tasks_after = trio.lowlevel.current_statistics().tasks_living
            assert_rides(client, provider, transport)
            nursery.cancel_scope.cancel()
    assert fds_after <= fds + 5, (fds, fds_after)
    assert tasks_after <= tasks + 5, (tasks, tasks_after)
    assert rss_after - rss < 48 * MIB, (rss, rss_after)


async def quiesce(client) -> None:
    """Wait until the client has no open tunnel sessions (the last close is asynchronous)."""
    with trio.fail_after(10):
        while len(client.registry):
            await trio.sleep(0.01)
    await trio.testing.wait_all_tasks_blocked(0.05)
