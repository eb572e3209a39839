"""UDP services through tunnels between real nodes on loopback: real UDP sockets, every
datagram compared, a real DNS server (dnsmasq) answering through the tunnel."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

import multiaddr
import pytest
import trio
from conftest import address_of, free_port, start_node
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from test_tunnels import _run_host, raw_tunnel_stream, read_answer

from punchgate.runtime.handshake import read_message
from punchgate.runtime.udp import DatagramQueue, DatagramResult
from punchgate.specs import ExposeSpec, HostPort, TunnelByNameSpec, TunnelSpec
from punchgate.wire import PROTOCOL_ID, TunnelResponse, encode_request, encode_response, parse_response

TEST_TIMEOUT = 60
RECEIVE_TIMEOUT = 10  # one datagram's round trip through the tunnel, at most


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_udp_echo(nursery: trio.Nursery, host: str = "127.0.0.1") -> int:
    """A UDP echo server: every datagram back to its source, unchanged."""
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    await sock.bind((host, 0))

    async def echo() -> None:
        with sock:
            while True:
                data, source = await sock.recvfrom(70000)
                await sock.sendto(data, source)

    nursery.start_soon(echo)
    return sock.getsockname()[1]


async def udp_client(host: str = "127.0.0.1") -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    await sock.bind((host, 0))
    return sock


async def udp_pair(nursery, *, udp_idle: float = 60.0, by_name: bool = False, target_port: int | None = None,
                   bind_host: str = "127.0.0.1", service: str = "echo"):
    """Provider exposing a UDP service (an echo server unless ``target_port``), client with a
    UDP tunnel to it. Returns (provider, client, tunnel port)."""
    if target_port is None:
        target_port = await start_udp_echo(nursery)
    provider = await start_node(
        nursery, udp_idle=udp_idle, expose=(ExposeSpec(service, HostPort("127.0.0.1", target_port), "udp"),)
    )
    port = free_udp_port()
    bind = HostPort(bind_host, port)
    if by_name:
        tunnels: dict = {"tunnels_by_name": (TunnelByNameSpec(service, bind, "udp"),)}
    else:
        tunnels = {"tunnels": (TunnelSpec(str(provider.peer_id), service, bind, "udp"),)}
    client = await start_node(nursery, udp_idle=udp_idle, bootstrap=(address_of(provider),), **tunnels)
    return provider, client, port


async def round_trip(sock, port: int, datagram: bytes, host: str = "127.0.0.1") -> bytes:
    await sock.sendto(datagram, (host, port))
    with trio.fail_after(RECEIVE_TIMEOUT):
        data, _ = await sock.recvfrom(70000)
    return data


async def test_1000_datagrams_of_1_to_65000_bytes_keep_every_boundary():
    rng = random.Random(11)
    sizes = [1, 65000, 2, 64999] + [rng.randint(1, 65000) for _ in range(996)]
    datagrams = [os.urandom(n) for n in sizes]
    window = 8  # datagrams in flight: well inside every socket buffer on the way
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            _provider, client, port = await udp_pair(nursery)
            sock = await udp_client()
            received: list[bytes] = []

            async def receive() -> None:
                while len(received) < len(datagrams):
                    with trio.fail_after(RECEIVE_TIMEOUT):
                        data, _ = await sock.recvfrom(70000)
                    received.append(data)

            async with trio.open_nursery() as inner:
                inner.start_soon(receive)
                for i, datagram in enumerate(datagrams):
                    while i - len(received) >= window:
                        await trio.sleep(0.001)  # bounded: receive() fails after RECEIVE_TIMEOUT
                    await sock.sendto(datagram, ("127.0.0.1", port))
            assert len(received) == len(datagrams)
            for i, (got, sent) in enumerate(zip(received, datagrams, strict=True)):
                assert got == sent, f"datagram {i} ({len(sent)} B) came back as {len(got)} B"
            [tunnel] = client.status()["tunnels"]
            assert tunnel["transport"] == "udp"
            assert tunnel["datagrams_to_remote"] == tunnel["datagrams_from_remote"] == 1000
            assert tunnel["bytes_to_remote"] == sum(sizes) and tunnel["dropped"] == 0
            assert tunnel["total_connections"] == 1  # one source, one session
            sock.close()
            nursery.cancel_scope.cancel()


async def test_100_concurrent_sources_each_get_their_own_session():
    per_source = 5
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider, client, port = await udp_pair(nursery, by_name=True)
            answers: dict[int, list[bytes]] = {}

            async def source(n: int) -> None:
                sock = await udp_client()
                with sock:
                    got = []
                    for k in range(per_source):
                        payload = f"source {n} datagram {k} ".encode() + os.urandom(n * 10)
                        assert await round_trip(sock, port, payload) == payload
                        got.append(payload)
                    answers[n] = got

            async with trio.open_nursery() as sources:
                for n in range(100):
                    sources.start_soon(source, n)
            assert sorted(answers) == list(range(100))
            [tunnel] = client.status()["tunnels"]
            assert tunnel["total_connections"] == 100
            assert tunnel["datagrams_to_remote"] == tunnel["datagrams_from_remote"] == 100 * per_source
            [service] = provider.status()["services"]
            assert service["transport"] == "udp" and service["total_connections"] == 100
            nursery.cancel_scope.cancel()


async def open_sessions(node, key: str = "tunnels") -> int:
    return node.status()[key][0]["connections"]


async def test_idle_sessions_close_and_the_next_datagram_opens_a_new_one():
    idle = 1.0
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider, client, port = await udp_pair(nursery, udp_idle=idle)
            sock = await udp_client()
            assert await round_trip(sock, port, b"first") == b"first"
            assert await open_sessions(client) == 1
            opened_at = trio.current_time()
            with trio.fail_after(idle + 5):
                while await open_sessions(client) or await open_sessions(provider, "services"):
                    await trio.sleep(0.05)
            assert trio.current_time() - opened_at >= idle * 0.9
            # Same source again: a new session, and it works.
            assert await round_trip(sock, port, b"second") == b"second"
            [tunnel] = client.status()["tunnels"]
            assert (tunnel["connections"], tunnel["total_connections"]) == (1, 2)
            sock.close()
            nursery.cancel_scope.cancel()


async def test_transport_mismatch_is_refused_with_a_reason():
    """A TCP request for a UDP service and a UDP request for a TCP service: refused, saying why."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            udp_port = await start_udp_echo(nursery)
            provider = await start_node(
                nursery,
                expose=(
                    ExposeSpec("dns", HostPort("127.0.0.1", udp_port), "udp"),
                    ExposeSpec("web", HostPort("127.0.0.1", free_port())),
                ),
            )
            for service, transport, word in (("dns", "tcp", "is UDP here, not TCP"), ("web", "udp", "is TCP here, not UDP")):
                stream = await raw_tunnel_stream(nursery, provider)
                await stream.write(encode_request(service, transport))
                answer = parse_response(await read_answer(stream))
                assert not answer.accepted and word in (answer.reason or ""), answer
            # The right transport is accepted, and datagrams flow on the stream.
            stream = await raw_tunnel_stream(nursery, provider)
            await stream.write(encode_request("dns", "udp") + struct.pack(">H", 5) + b"hello")
            assert parse_response(await read_answer(stream)).accepted
            assert await stream.read(7) == struct.pack(">H", 5) + b"hello"
            nursery.cancel_scope.cancel()


async def test_a_provider_that_predates_udp_is_not_sent_datagrams():
    """An older provider ignores the transport field and accepts as if for TCP (it does not
    say "transport": "udp"): the client must refuse that answer, not pour framed datagrams
    into a TCP service."""
    requests: list[dict] = []
    after_accept: list[bytes] = []

    async def old_provider(stream) -> None:
        message, _ = await read_message(stream)
        requests.append(message)
        await stream.write(encode_response(TunnelResponse(True)))  # what every older version answers
        try:
            while data := await stream.read(65536):
                after_accept.append(data)
                await stream.write(data)  # an echo service: would hand the datagrams back
        except Exception:  # reset by the client: expected
            pass

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            old = new_host(key_pair=create_new_key_pair(), listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
            await nursery.start(_run_host, old)
            old.set_stream_handler(TProtocol(PROTOCOL_ID), old_provider)
            old_addr = old.get_addrs()[0]
            port = free_udp_port()
            client = await start_node(
                nursery, bootstrap=(old_addr,), tunnels=(TunnelSpec(str(old.get_id()), "dns", HostPort("127.0.0.1", port), "udp"),)
            )
            sock = await udp_client()
            await sock.sendto(b"query", ("127.0.0.1", port))
            with trio.fail_after(10):
                while not requests:
                    await trio.sleep(0.02)
            with trio.move_on_after(1.5):
                await sock.recvfrom(70000)
                raise AssertionError("a datagram came back through a provider that does not serve UDP")
            assert requests == [{"service_name": "dns", "transport": "udp"}]
            assert after_accept == []
            assert client.status()["tunnels"][0]["total_connections"] == 0
            sock.close()
            nursery.cancel_scope.cancel()


async def test_a_datagram_the_service_socket_cannot_send_is_dropped_and_counted():
    """A 65,520-byte datagram is valid over IPv6 but too long for the IPv4 service: the
    provider drops and counts it, and the session goes on."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider, _client, port = await udp_pair(nursery, bind_host="::1")
            sock = await udp_client("::1")
            await sock.sendto(os.urandom(65520), ("::1", port))
            assert await round_trip(sock, port, b"after", "::1") == b"after"
            [service] = provider.status()["services"]
            assert service["dropped"] == 1 and service["datagrams_in"] == 1
            sock.close()
            nursery.cancel_scope.cancel()


async def test_queue_keeps_the_newest_and_counts_what_it_drops():
    result = DatagramResult()
    queue = DatagramQueue(result, max_datagrams=4, max_bytes=1000)
    for i in range(10):
        queue.put(bytes([i]) * 10)
    assert result.dropped == 6
    frames, count, payload = await queue.get_batch()
    assert (count, payload) == (4, 40)
    assert frames == b"".join(struct.pack(">H", 10) + bytes([i]) * 10 for i in range(6, 10))
    queue.put(b"a" * 600)
    queue.put(b"b" * 600)  # over the byte bound: the older one goes
    assert result.dropped == 7
    frames, count, _ = await queue.get_batch(max_bytes=1)  # always at least one datagram
    assert (count, frames) == (1, struct.pack(">H", 600) + b"b" * 600)


# --- a real DNS server behind the tunnel -----------------------------------------------

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)


def dns_query(name: str, query_id: int) -> bytes:
    header = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + question + struct.pack(">HH", 1, 1)  # type A, class IN


def dns_a_records(answer: bytes, query_id: int) -> list[str]:
    """The IPv4 addresses in a DNS answer (names compressed or not)."""
    ident, flags, qd, an, _, _ = struct.unpack_from(">HHHHHH", answer)
    assert ident == query_id and flags & 0x8000 and flags & 0xF == 0, (ident, hex(flags))
    offset = 12

    def skip_name(at: int) -> int:
        while answer[at] != 0:
            if answer[at] & 0xC0 == 0xC0:
                return at + 2
            at += answer[at] + 1
        return at + 1

    for _ in range(qd):
        offset = skip_name(offset) + 4
    addresses = []
    for _ in range(an):
        offset = skip_name(offset)
        rtype, _, _, length = struct.unpack_from(">HHIH", answer, offset)
        offset += 10
        if rtype == 1:
            addresses.append(socket.inet_ntoa(answer[offset : offset + length]))
        offset += length
    return addresses


@pytest.fixture
def dnsmasq():
    """dnsmasq on 127.0.0.1 at a free port, answering one made-up name and nothing else."""
    if DNSMASQ is None:
        pytest.skip("dnsmasq not installed (scripts/test.sh installs dnsmasq-base when root)")
    port = free_udp_port()
    with tempfile.TemporaryDirectory(prefix="punchgate-dns-") as d:
        log = Path(d) / "dnsmasq.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [
                    DNSMASQ, "--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                    "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={port}",
                    "--pid-file=", "--user=root" if os.geteuid() == 0 else f"--user={os.getuid()}",
                    "--host-record=printer.example.test,192.0.2.44", "--log-facility=-",
                ],
                stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            yield port, proc, log
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def test_dns_query_through_the_tunnel_to_dnsmasq(dnsmasq):
    dns_port, proc, log = dnsmasq
    with trio.fail_after(TEST_TIMEOUT):
        # dnsmasq answers directly first (so a failure below is the tunnel's).
        sock = await udp_client()
        for _ in range(50):
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {log.read_text()}")
            await sock.sendto(dns_query("printer.example.test", 1), ("127.0.0.1", dns_port))
            with trio.move_on_after(0.2):
                data, _ = await sock.recvfrom(4096)
                break
        else:
            raise AssertionError(f"dnsmasq did not answer: {log.read_text()}")
        assert dns_a_records(data, 1) == ["192.0.2.44"]
        async with trio.open_nursery() as nursery:
            _provider, _client, port = await udp_pair(nursery, target_port=dns_port, service="dns", by_name=True)
            for query_id in (0x1234, 0x4321):
                answer = await round_trip(sock, port, dns_query("printer.example.test", query_id))
                assert dns_a_records(answer, query_id) == ["192.0.2.44"]
            sock.close()
            nursery.cancel_scope.cancel()
