"""The proxy entry (--proxy): SOCKS5 and HTTP CONNECT to every name.

Parsers fuzzed with hypothesis; real curl through real nodes to a real HTTP server (sha256
of a 10 MB body); the protocols' own error codes for every kind of refusal; garbage and
silence fed to a live proxy, which must answer or close, never hang or crash.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from conftest import address_of, free_port, start_node
from hypothesis import given, settings
from hypothesis import strategies as st
from test_state_machine import PROVIDER, joined

from punchgate import proxy
from punchgate.proxy import ConnectRequest, Destination, Failure, ProxyRefusal
from punchgate.specs import ExposeSpec, HostPort
from punchgate.state import commands as cmd
from punchgate.state import events as ev

TEST_TIMEOUT = 60
PEER = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"
CURL = shutil.which("curl")


# --- the parsers, without I/O ------------------------------------------------------------


def socks_request(host: bytes, port: int = 80, command: int = 1, kind: int = 3) -> bytes:
    address = bytes([len(host)]) + host if kind == 3 else host
    return bytes([5, command, 0, kind]) + address + port.to_bytes(2, "big")


def test_socks5_greeting_and_request():
    assert proxy.parse_socks_greeting(b"\x05") is None
    assert proxy.parse_socks_greeting(b"\x05\x02\x00") is None
    assert proxy.parse_socks_greeting(b"\x05\x02\x00\x01") == 4
    for greeting in (b"\x05\x01\x02", b"\x05\x00"):  # username/password only; no method at all
        with pytest.raises(ProxyRefusal) as refused:
            proxy.parse_socks_greeting(greeting)
        assert refused.value.reply == b"\x05\xff"
    request = socks_request(b"web.punchgate", 443) + b"early data"
    for cut in range(len(request) - len(b"early data")):
        assert proxy.parse_socks_request(request[:cut]) is None
    assert proxy.parse_socks_request(request) == ConnectRequest("web.punchgate", 443, len(request) - 10)
    assert proxy.parse_socks_request(socks_request(bytes([127, 0, 0, 1]), kind=1)).host == "127.0.0.1"
    assert proxy.parse_socks_request(socks_request(bytes(15) + b"\x01", kind=4)).host == "::1"
    for bad, code in ((socks_request(b"x", command=2), 0x07), (socks_request(b"x", kind=9), 0x08)):
        with pytest.raises(ProxyRefusal) as refused:
            proxy.parse_socks_request(bad)
        assert refused.value.reply[:2] == bytes([5, code])


def test_http_connect_requests():
    request = b"CONNECT web.punchgate:443 HTTP/1.1\r\nHost: web.punchgate:443\r\nUser-Agent: t\r\n\r\n"
    assert proxy.parse_http_connect(request[:-1]) is None
    assert proxy.parse_http_connect(request + b"\x16\x03") == ConnectRequest("web.punchgate", 443, len(request))
    assert proxy.parse_http_connect(b"CONNECT [::1]:22 HTTP/1.0\n\n").host == "::1"
    for bad, status in (
        (b"GET http://web.punchgate/ HTTP/1.1\r\n\r\n", b"405"),
        (b"CONNECT web.punchgate:443 HTTP/2\r\n\r\n", b"505"),
        (b"CONNECT web.punchgate HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT web.punchgate:0 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT web.punchgate:443 HTTP/1.1\r\nno colon\r\n\r\n", b"400"),
        (b"CONNECT  web.punchgate:443 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x:1 HTTP/1.1\r\n" + b"A: b\r\n" * 100 + b"\r\n", b"431"),
        (b"CONNECT x:1 HTTP/1.1\r\nA: " + b"b" * 9000, b"431"),
    ):
        with pytest.raises(ProxyRefusal) as refused:
            proxy.parse_http_connect(bad)
        assert refused.value.reply.startswith(b"HTTP/1.1 " + status), (bad[:40], refused.value.reply[:40])


def test_destinations():
    assert proxy.parse_destination("ssh.punchgate") == Destination("ssh", None)
    assert proxy.parse_destination("ssh.PunchGate.") == Destination("ssh", None)
    assert proxy.parse_destination(f"ssh.{PEER}.punchgate") == Destination("ssh", PEER)
    assert proxy.parse_destination("my.web.punchgate") == Destination("my.web", None)  # '.' in a name
    for bad in ("punchgate", ".punchgate", "example.com", "127.0.0.1", "::1", "web.punchgate.evil",
                f"bad name.{PEER}.punchgate", f"{PEER}/tcp/1.punchgate", "-x.punchgate"):
        with pytest.raises(ValueError):
            proxy.parse_destination(bad)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_no_input_makes_a_parser_fail_other_than_by_refusing(data):
    for parse in (proxy.parse_socks_greeting, proxy.parse_socks_request, proxy.parse_http_connect):
        try:
            result = parse(data)
        except ProxyRefusal as refusal:
            assert isinstance(refusal.reply, bytes) and len(refusal.reply) < 1024
            continue
        if isinstance(result, int):
            assert 0 < result <= len(data)
        elif result is not None:
            assert 0 < result.size <= len(data) and 0 <= result.port < 65536
    kind = proxy.protocol_of(data[0]) if data else None
    assert kind in (None, "socks5", "socks4", "http")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_destination_text_parses_to_a_valid_target_or_a_reason(host):
    try:
        destination = proxy.parse_destination(host)
    except ValueError as exc:
        assert str(exc)
        return
    assert proxy.SUFFIX in host.lower() and destination.service
    assert destination.peer is None or destination.peer in host


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
    st.integers(1, 65535),
    st.binary(max_size=50),
    st.integers(1, 40),
)
def test_valid_requests_parse_from_any_cut(service, port, trailer, step):
    host = f"{service}.punchgate"
    for request, parse in (
        (socks_request(host.encode(), port), proxy.parse_socks_request),
        (f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), proxy.parse_http_connect),
    ):
        data = request + trailer
        parsed = None
        for end in range(step, len(data) + step, step):
            parsed = parse(data[:end])
            if parsed is not None:
                break
        assert parsed == ConnectRequest(host, port, len(request))
        assert proxy.parse_destination(parsed.host) == Destination(service, None)


def test_close_reasons_from_the_state_machine_map_to_the_protocols_codes():
    """The reasons come from the real machine, so a change of its wording shows here."""
    run = joined(connect_timeout=2.0)
    run(ev.SessionStarted(1, "nobody"))
    for _ in range(40):
        for lookup in [c for c in run.log if isinstance(c, cmd.LookupService)]:
            run(ev.ProvidersFound("nobody", lookup.attempt, ()))
        run.until(run.now + 0.1)
    close = run.last(cmd.CloseSession)
    assert proxy.classify_close(close.event, close.reason) is Failure.NO_PROVIDER

    run = joined()
    run(ev.ConnectionOpened(PROVIDER, "tcp"))
    run(ev.SessionStarted(2, "ssh", PROVIDER))
    run(ev.StreamRefused(2, run.last(cmd.OpenStream).attempt, "unknown service 'ssh'"), 0.01)
    close = run.last(cmd.CloseSession)
    assert proxy.classify_close(close.event, close.reason) is Failure.REFUSED

    run = joined(connect_timeout=2.0)
    run(ev.SessionStarted(3, "ssh", PROVIDER))  # a peer nobody can reach
    run.until(run.now + 3)
    close = run.last(cmd.CloseSession)
    assert proxy.classify_close(close.event, close.reason) is Failure.TIMEOUT
    assert proxy.SOCKS_REPLY[Failure.TIMEOUT] == 0x06 and proxy.HTTP_STATUS[Failure.TIMEOUT] == 504


# --- a live proxy -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_root():
    """A 10 MB file served by Python's own HTTP server (a real server, in its own process)."""
    with tempfile.TemporaryDirectory(prefix="punchgate-web-") as d:
        body = os.urandom(10 * 1000 * 1000)
        (Path(d) / "body.bin").write_bytes(body)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", d],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None:
                        raise AssertionError("the HTTP server exited") from None
                    import time

                    time.sleep(0.05)
            yield port, hashlib.sha256(body).hexdigest()
        finally:
            server.terminate()
            server.wait(10)


async def proxy_pair(nursery, web_port: int, **client_config):
    """A provider exposing the web server as "web", a client node with --proxy."""
    provider = await start_node(nursery, expose=(ExposeSpec("web", HostPort("127.0.0.1", web_port)),))
    proxy_port = free_port()
    client = await start_node(
        nursery, bootstrap=(address_of(provider),), proxy=HostPort("127.0.0.1", proxy_port), **client_config
    )
    return provider, client, proxy_port


async def curl(*args: str) -> subprocess.CompletedProcess:
    with trio.fail_after(40):
        return await trio.run_process(
            [CURL, "--silent", "--show-error", "--max-time", "30", *args],
            capture_stdout=True, capture_stderr=True, check=False,
        )


@pytest.mark.skipif(CURL is None, reason="curl not installed (scripts/test.sh installs it when root)")
async def test_curl_through_socks5h_and_http_connect_gets_the_10_mb_body(web_root):
    web_port, digest = web_root
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider, client, proxy_port = await proxy_pair(nursery, web_port)
            socks = await curl("--proxy", f"socks5h://127.0.0.1:{proxy_port}", "http://web.punchgate/body.bin")
            assert socks.returncode == 0, socks.stderr
            assert hashlib.sha256(socks.stdout).hexdigest() == digest
            http = await curl(
                "--proxytunnel", "--proxy", f"http://127.0.0.1:{proxy_port}",
                f"http://web.{provider.peer_id}.punchgate:8080/body.bin",
            )
            assert http.returncode == 0, http.stderr
            assert hashlib.sha256(http.stdout).hexdigest() == digest
            [row] = [t for t in client.status()["tunnels"] if t["kind"] == "proxy"]
            assert row["bind"] == f"127.0.0.1:{proxy_port}" and row["total_connections"] == 2
            assert row["bytes_from_remote"] > 20_000_000
            nursery.cancel_scope.cancel()


async def socks_exchange(port: int, host: bytes, kind: int = 3) -> bytes:
    """Greeting and CONNECT; returns the reply's first two bytes, or b'' if closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        await stream.send_all(socks_request(host, 80, kind=kind))
        return await receive_exactly(stream, 2)


async def http_exchange(port: int, host: str) -> bytes:
    """A CONNECT request; returns the status line."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"CONNECT {host}:80 HTTP/1.1\r\nHost: {host}:80\r\n\r\n".encode())
        answer = bytearray()
        while b"\r\n" not in answer and (data := await stream.receive_some(4096)):
            answer += data
        return bytes(answer).split(b"\r\n", 1)[0]


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n and (chunk := await stream.receive_some(n - len(data))):
        data += chunk
    return bytes(data)


async def test_refusals_use_each_protocols_own_codes(web_root):
    web_port, _ = web_root
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider, _client, port = await proxy_pair(nursery, web_port, connect_timeout=1.5)
            cases = [
                (b"example.com", 3, b"\x05\x02", "example.com", b"403"),  # not ours
                (bytes([127, 0, 0, 1]), 1, b"\x05\x02", "127.0.0.1", b"403"),  # an address: not ours
                (b"nobody.punchgate", 3, b"\x05\x04", "nobody.punchgate", b"404"),  # no provider
                (f"nosuch.{provider.peer_id}.punchgate".encode(), 3, b"\x05\x05",
                 f"nosuch.{provider.peer_id}.punchgate", b"502"),  # the provider refuses
                (f"web.{PEER}.punchgate".encode(), 3, b"\x05\x06", f"web.{PEER}.punchgate", b"504"),  # unreachable peer
            ]
            results: dict[int, tuple[bytes, bytes]] = {}

            async def one(i: int, case) -> None:
                host, kind, _, http_host, _ = case
                results[i] = (await socks_exchange(port, host, kind), await http_exchange(port, http_host))

            async with trio.open_nursery() as checks:
                for i, case in enumerate(cases):
                    checks.start_soon(one, i, case)
            for i, (_, _, socks_code, _, http_status) in enumerate(cases):
                socks_reply, status_line = results[i]
                assert socks_reply == socks_code, (cases[i][0], socks_reply)
                assert status_line.startswith(b"HTTP/1.1 " + http_status), (cases[i][3], status_line)
            nursery.cancel_scope.cancel()


async def test_garbage_and_silence_are_answered_or_closed_and_the_proxy_keeps_serving(web_root):
    web_port, digest = web_root
    deadline = 1.0
    rng = random.Random(1928)
    garbage = [rng.randbytes(rng.randint(1, 3000)) for _ in range(40)]
    garbage += [
        b"", b"\x05", b"\x05\x01", b"\x05\x01\x00\x05\x01\x00\x03", b"\x05\xff" + bytes(255), b"\x04\x01\x00\x50",
        b"CONNECT", b"CONNECT web.punchgate:80 HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 10000,
        b"CONNECT " + b"a" * 20000, b"\x05\x01\x00" + socks_request(b"web.punchgate", kind=3)[:-1],
        b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", b"\r\n\r\n",
    ]
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            _provider, client, port = await proxy_pair(nursery, web_port)
            [entry] = [c for c in client.clients if getattr(c, "kind", "") == "proxy"]
            entry.read_deadline = deadline
            ends: list[float] = []

            async def feed(data: bytes) -> None:
                started = trio.current_time()
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    try:
                        await stream.send_all(data)
                        with trio.fail_after(deadline + 5):  # never hangs: closed by the deadline at most
                            while await stream.receive_some(65536):
                                pass
                    except trio.BrokenResourceError:
                        pass  # closed with our bytes unread: a reset is an answer too
                ends.append(trio.current_time() - started)

            async with trio.open_nursery() as feeders:
                for data in garbage:
                    feeders.start_soon(feed, data)
            assert len(ends) == len(garbage)
            assert client.clients[-1].refused >= len(garbage) - 1  # each one refused (b"" just closes)
            # Still serving, and well.
            socks = await curl("--proxy", f"socks5h://127.0.0.1:{port}", "http://web.punchgate/body.bin")
            assert socks.returncode == 0 and hashlib.sha256(socks.stdout).hexdigest() == digest
            nursery.cancel_scope.cancel()
