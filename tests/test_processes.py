"""Real punchgate processes: logs, identity reuse, a tunnel, and SIGTERM shutdown."""

from __future__ import annotations

import json
import socket
import time

import pytest

from punchgate.devtools.echo import EchoServer
from punchgate.devtools.processes import PunchgateProcess, identity_path

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
LOOPBACK_QUIC = "/ip4/127.0.0.1/udp/0/quic-v1"


@pytest.fixture
def echo_port():
    with EchoServer() as server:
        yield server.port


@pytest.fixture
def processes():
    started: list[PunchgateProcess] = []

    def start(*args: str, **kwargs) -> PunchgateProcess:
        proc = PunchgateProcess(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_logs_startup_events_and_identity_reuse(tmp_path, processes):
    key = identity_path(tmp_path, "node")
    first = processes("--identity", key, "--listen", LOOPBACK, "--listen", "/ip4/127.0.0.1/udp/0/quic-v1")
    start = first.wait_event("punchgate starting")
    first.wait_event("phase transition", to_phase="ready")
    addresses = [e["address"] for e in first.events() if e["event"] == "listening on"]
    assert any("/tcp/" in a for a in addresses) and any("/quic-v1" in a for a in addresses)
    assert all(a.endswith("/p2p/" + start["peer_id"]) for a in addresses)
    assert start["identity_created"] is True
    code, _ = first.terminate_and_wait(10)
    first.drain()
    assert code == 0
    # Every line on stderr is one JSON object: nothing stray from the library.
    assert all(isinstance(json.loads(line), dict) for line in first.lines)
    assert first.stdout == []

    second = processes("--identity", key, "--listen", LOOPBACK)
    again = second.wait_event("punchgate starting")
    assert again["peer_id"] == start["peer_id"] and again["identity_created"] is False


def test_corrupt_identity_is_a_clear_error(tmp_path, processes):
    key = tmp_path / "bad.key"
    key.write_bytes(b"not a key")
    key.chmod(0o600)
    proc = processes("--identity", str(key), "--listen", LOOPBACK)
    assert proc.proc.wait(timeout=30) == 1
    proc.drain()
    assert any(e["event"] == "identity error" and str(key) in e["reason"] for e in proc.events())
    assert key.read_bytes() == b"not a key"


def test_taken_tunnel_port_fails_the_start(tmp_path, processes):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        peer = "12D3KooWAuDFkDGEM9nHzYXD9C3mG4dUy9PAm5yf2BCKTuJQp41T"
        proc = processes(
            "--identity", identity_path(tmp_path, "c"), "--listen", LOOPBACK, "--tunnel", f"{peer}:ssh@127.0.0.1:{port}"
        )
        assert proc.proc.wait(timeout=30) == 1
    proc.drain()
    assert any(e["event"] == "cannot start" for e in proc.events())


def test_taken_listen_port_fails_the_start(tmp_path, processes):
    """py-libp2p listens with SO_REUSEPORT: without our check two nodes would share a port."""
    port = free_port()
    first = processes("--identity", identity_path(tmp_path, "a"), "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--no-mdns")
    first.wait_event("phase transition", to_phase="ready")
    second = processes("--identity", identity_path(tmp_path, "b"), "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--no-mdns")
    assert second.proc.wait(timeout=30) == 1
    second.drain()
    failure = next(e for e in second.events() if e["event"] == "cannot start")
    assert f"/tcp/{port}" in failure["reason"] and "in use" in failure["reason"]


def test_sigterm_closes_open_tunnels_and_exits_0_within_5s(tmp_path, processes, echo_port):
    provider = processes(
        "--identity", identity_path(tmp_path, "p"), "--listen", LOOPBACK, "--expose", f"echo=127.0.0.1:{echo_port}"
    )
    provider_id = provider.wait_event("punchgate starting")["peer_id"]
    provider_addr = provider.tcp_address()
    port = free_port()
    client = processes(
        "--identity", identity_path(tmp_path, "c"),
        "--listen", LOOPBACK,
        "--bootstrap", provider_addr,
        "--tunnel", f"{provider_id}:echo@127.0.0.1:{port}",
    )
    client.wait_event("phase transition", to_phase="ready")

    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"hello punchgate\n")
    assert conn.recv(100) == b"hello punchgate\n"  # the session is open and working
    client.wait_event("client tunnel opened")

    code, seconds = client.terminate_and_wait(timeout=10)
    assert code == 0 and seconds < 5, (code, seconds)
    # The local client's connection was closed, not left hanging.
    conn.settimeout(5)
    try:
        assert conn.recv(100) == b""
    except ConnectionResetError:
        pass
    conn.close()
    client.drain()
    assert any(e["event"] == "client tunnel closed" for e in client.events())

    provider.wait_event("tunnel closed", timeout=10)
    code, seconds = provider.terminate_and_wait(timeout=10)
    assert code == 0 and seconds < 5, (code, seconds)


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_provider_killed_closes_the_local_client_within_5s(tmp_path, processes, echo_port, transport):
    """Over TCP the dead provider's host resets the connection; over QUIC it answers the
    client's next keep-alive with ICMP port unreachable (punchgate/transports/quic)."""
    listen = LOOPBACK if transport == "tcp" else LOOPBACK_QUIC
    provider = processes(
        "--identity", identity_path(tmp_path, "p"), "--listen", listen, "--no-mdns",
        "--expose", f"echo=127.0.0.1:{echo_port}",
    )
    provider_id = provider.wait_event("punchgate starting")["peer_id"]
    port = free_port()
    client = processes(
        "--identity", identity_path(tmp_path, "c"), "--listen", listen, "--no-mdns",
        "--bootstrap", provider.address(transport), "--tunnel", f"{provider_id}:echo@127.0.0.1:{port}",
    )
    client.wait_event("phase transition", to_phase="ready")
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"are you there?")
    assert conn.recv(100) == b"are you there?"

    provider.proc.kill()  # SIGKILL: no goodbye from the provider
    provider.proc.wait(timeout=10)
    started = time.monotonic()
    conn.settimeout(10)
    try:
        assert conn.recv(100) == b""
    except ConnectionResetError:
        pass
    closed_after = time.monotonic() - started
    conn.close()
    assert closed_after < 5, closed_after
    event = client.wait_event("client tunnel closed")
    assert event["bytes_from_remote"] == len(b"are you there?")
    assert event["transport"] == transport, event
