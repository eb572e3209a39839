"""The control socket and `punchgate status`: real nodes in-process, the real CLI in a
subprocess asking them over their Unix sockets."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from conftest import address_of, free_port, start_echo_server, start_node
from punchgate.runtime import control
from punchgate.runtime.control import ControlServer, ControlSocketInUse
from punchgate.specs import ExposeSpec, HostPort, TunnelSpec
from punchgate.status import render_text

TEST_TIMEOUT = 60
STATUS_FIELDS = {
    "peer_id", "version", "uptime_s", "phase", "nat", "listen_addrs", "advertised_addrs",
    "relays", "peers", "services", "tunnels", "refused",
}


@pytest.fixture
def sock_dir():
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too long.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pgctl-") as directory:
        yield Path(directory)


async def punchgate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (the node under test keeps running in this trio run)."""
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "punchgate", *args],
            capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, **(env or {})},
        )


async def raw_request(path: Path, payload: bytes, close_write: bool = True) -> dict:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(payload)
        if close_write:
            await stream.send_eof()
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    lines = bytes(data).splitlines()
    assert len(lines) == 1, data
    return json.loads(lines[0])


async def open_connection(port: int, message: bytes) -> trio.SocketStream:
    """A tunnel connection that has echoed ``message`` once and stays open."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(message)
    got = b""
    while len(got) < len(message):
        got += await stream.receive_some(65536)
    assert got == message
    return stream


async def test_status_of_nodes_with_a_tunnel_json_and_table(sock_dir):
    provider_sock, client_sock = sock_dir / "p" / "control.sock", sock_dir / "c" / "control.sock"
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo_port = await start_echo_server(nursery)
            provider = await start_node(
                nursery, control_socket=provider_sock, expose=(ExposeSpec("echo", HostPort("127.0.0.1", echo_port)),)
            )
            port = free_port()
            client = await start_node(
                nursery,
                control_socket=client_sock,
                bootstrap=(address_of(provider),),
                tunnels=(TunnelSpec(str(provider.peer_id), "echo", HostPort("127.0.0.1", port)),),
            )
            # One connection carried 100 KiB and closed; one stays open with 5 bytes each way.
            closed = await open_connection(port, b"x" * 100_000)
            await closed.aclose()
            held = await open_connection(port, b"hello")

            # Socket and directory are the user's alone.
            assert stat.S_IMODE(client_sock.stat().st_mode) == 0o600
            assert stat.S_IMODE(client_sock.parent.stat().st_mode) == 0o700
            assert stat.S_ISSOCK(client_sock.stat().st_mode)

            done = await punchgate("status", "--json", "--control-socket", str(client_sock))
            assert done.returncode == 0, done.stderr
            status = json.loads(done.stdout)
            assert STATUS_FIELDS <= set(status)
            assert status["peer_id"] == str(client.peer_id)
            assert status["phase"] == "ready"
            assert status["nat"]["status"] in ("unknown", "public", "private")
            assert any(a.startswith("/ip4/127.0.0.1/tcp/") for a in status["listen_addrs"])
            [peer] = [p for p in status["peers"] if p["peer"] == str(provider.peer_id)]
            assert (peer["transport"], peer["path"]) == ("tcp", "direct")
            [tunnel] = status["tunnels"]
            assert tunnel["bind"] == f"127.0.0.1:{port}"
            assert (tunnel["service"], tunnel["peer"], tunnel["path"]) == ("echo", str(provider.peer_id), "direct")
            assert (tunnel["connections"], tunnel["total_connections"]) == (1, 2)
            assert tunnel["bytes_to_remote"] == tunnel["bytes_from_remote"] == 100_005
            assert tunnel["oldest_age_s"] >= 0

            # The same figures in-process, and from the provider's side.
            assert client.status()["tunnels"][0]["bytes_to_remote"] == 100_005
            done = await punchgate("status", "--json", "--control-socket", str(provider_sock))
            [service] = json.loads(done.stdout)["services"]
            assert service == {
                "name": "echo", "target": f"127.0.0.1:{echo_port}", "connections": 1, "total_connections": 2,
                "bytes_in": 100_005, "bytes_out": 100_005, "oldest_age_s": service["oldest_age_s"], "transport": "tcp",
            }

            # The table: one row per tunnel and peer, readable without a terminal.
            done = await punchgate("status", "--control-socket", str(client_sock))
            assert done.returncode == 0, done.stderr
            table = done.stdout.decode()
            assert str(client.peer_id) in table
            row = next(line for line in table.splitlines() if line.startswith(f"127.0.0.1:{port}"))
            assert row.split()[:8] == [f"127.0.0.1:{port}", "echo", str(provider.peer_id), "direct", "1", "2", "97.7", "KiB"]
            assert all(line == line.rstrip() for line in table.splitlines())

            await held.aclose()
            nursery.cancel_scope.cancel()
    # A node that stops removes its socket.
    assert not client_sock.exists() and not provider_sock.exists()


async def test_status_counts_what_the_node_refused(sock_dir):
    """A tunnel to a name the provider does not expose is refused: the provider's status
    counts it (JSON and table), next to the other kinds of refusal, all still zero."""
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider = await start_node(nursery, control_socket=sock_dir / "p" / "control.sock")
            port = free_port()
            await start_node(
                nursery,
                control_socket=sock_dir / "c" / "control.sock",
                bootstrap=(address_of(provider),),
                tunnels=(TunnelSpec(str(provider.peer_id), "nope", HostPort("127.0.0.1", port)),),
            )
            assert provider.status()["refused"]["tunnel_streams"] == 0
            local = await trio.open_tcp_stream("127.0.0.1", port)
            assert await local.receive_some(1024) == b""  # refused: the local connection is closed
            await local.aclose()
            refused = provider.status()["refused"]
            assert refused == {
                "inbound_connections": 0, "handshakes_timed_out": 0, "tunnel_streams": 1, "relay_reservations": 0,
            }
            assert "refused     inbound connections 0, handshakes timed out 0, tunnel streams 1" in render_text(
                provider.status()
            )
            nursery.cancel_scope.cancel()


async def test_bad_requests_get_errors_and_the_node_keeps_answering(sock_dir, monkeypatch):
    monkeypatch.setattr(control, "READ_DEADLINE", 0.5)
    path = sock_dir / "control.sock"
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            node = await start_node(nursery, control_socket=path)
            assert "not JSON" in (await raw_request(path, b"garbage\n"))["error"]
            assert "not JSON" in (await raw_request(path, b"\xff\xfe\n"))["error"]
            assert "JSON object" in (await raw_request(path, b"[1, 2]\n"))["error"]
            assert "unknown op" in (await raw_request(path, b'{"op": "shutdown"}\n'))["error"]
            assert "unknown op" in (await raw_request(path, b"{}\n"))["error"]
            assert "longer than" in (await raw_request(path, b"{" * 100_000))["error"]
            assert "within" in (await raw_request(path, b'{"op": "sta', close_write=False))["error"]
            assert (await raw_request(path, b'{"op": "ping"}\n')) == {"ok": True}
            # A client that connects and vanishes, then one that never reads its answer.
            with socket.socket(socket.AF_UNIX) as quitter:
                quitter.connect(str(path))
            with socket.socket(socket.AF_UNIX) as deaf:
                deaf.connect(str(path))
                deaf.sendall(b'{"op": "status"}\n')
            # Still alive and answering; a request without a newline ends at EOF.
            assert (await raw_request(path, b'{"op": "status"}'))["peer_id"] == str(node.peer_id)
            nursery.cancel_scope.cancel()


async def test_no_node_running_is_one_line_and_exit_1(sock_dir):
    missing = sock_dir / "none" / "control.sock"
    done = await punchgate("status", "--control-socket", str(missing))
    assert done.returncode == 1
    assert done.stderr.decode().strip() == f"punchgate: error: no punchgate node is running (no control socket at {missing})"
    assert done.stdout == b""
    # A socket file left by a node that died (nobody listening): the same, exit 1.
    stale = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))
    done = await punchgate("status", "--json", "--control-socket", str(stale))
    assert done.returncode == 1
    assert "stale control socket" in done.stderr.decode()
    # The variable is read like the flag; a bad flag is usage (exit 2).
    done = await punchgate("status", env={"PUNCHGATE_CONTROL_SOCKET": str(missing)})
    assert done.returncode == 1 and str(missing) in done.stderr.decode()
    done = await punchgate("status", "--bogus")
    assert done.returncode == 2 and done.stderr.decode().count("\n") == 1


async def test_socket_in_use_stale_replaced_and_default_shared(sock_dir):
    path = sock_dir / "control.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # left behind by a node that died
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            first = await start_node(nursery, control_socket=path)
            assert (await raw_request(path, b'{"op": "status"}\n'))["peer_id"] == str(first.peer_id)
            # A second node asked for the same explicit path does not start.
            with pytest.raises(ControlSocketInUse, match="another punchgate node answers"):
                await start_node(nursery, control_socket=path)
            nursery.cancel_scope.cancel()


async def test_cli_node_with_taken_control_socket_exits_1(sock_dir):
    path = sock_dir / "control.sock"
    path.write_text("not a socket")
    done = await punchgate("--identity", str(sock_dir / "id.key"), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
                           "--control-socket", str(path))
    assert done.returncode == 1
    assert "exists and is not a socket" in done.stderr.decode()


def test_table_renders_every_section_from_a_plain_dict():
    """The renderer needs nothing but the documented fields."""
    status = {
        "peer_id": "12D3KooWPeer", "version": "9.9", "pid": 7, "uptime_s": 3723.4, "phase": "ready",
        "nat": {"status": "private", "learnt_by": "dialback", "port_preserving": False},
        "listen_addrs": ["/ip4/0.0.0.0/tcp/4001"], "advertised_addrs": ["/ip4/10.0.0.2/tcp/4001"],
        "relays": [{"relay": "12D3KooWBoot", "status": "reserved", "expires_in_s": 3300, "limit": None}],
        "peers": [{"peer": "12D3KooWBoot", "transport": "tcp", "transports": ["tcp", "quic"], "path": "direct",
                   "connections": 2, "rtt_ms": 1.25}],
        "services": [], "tunnels": [],
    }
    text = render_text(status)
    assert "1h 02m" in text
    assert "NAT         private (learnt by dialback; ports not preserved (symmetric NAT)" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["12D3KooWBoot", "reserved", "55m", "00s", "-"] in rows
    assert ["12D3KooWBoot", "tcp+quic", "direct", "2", "1.2", "ms"] in rows
    assert "Services: none exposed" in text and "Tunnels: none" in text


def test_nodes_starting_at_once_one_gets_the_socket_the_others_see_it_in_use(sock_dir):
    """Bound but not yet listening looks stale: without care, a second node starting at the
    same instant would replace the first one's socket file and leave it unreachable."""
    import threading

    path = sock_dir / "control.sock"
    servers = [ControlServer(path, dict) for _ in range(8)]
    outcomes: list[str] = [""] * len(servers)
    barrier = threading.Barrier(len(servers))

    def start(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            servers[i].bind()
            outcomes[i] = "bound"
        except ControlSocketInUse:
            outcomes[i] = "in use"

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(outcomes) == ["bound"] + ["in use"] * (len(servers) - 1), outcomes
    winner = servers[outcomes.index("bound")]
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))  # the file on disk is the winner's listening socket
    assert winner._sock is not None
    winner._sock.close()
    winner.remove()
    assert not path.exists()
