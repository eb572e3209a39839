"""`punchgate connect`: standard input and output joined to a service through the running
node's control socket. The real CLI in a subprocess, real ssh to a throwaway sshd."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio
from conftest import address_of, free_port, start_echo_server, start_node

from punchgate.devtools.echo import EchoServer
from punchgate.devtools.processes import PunchgateProcess
from punchgate.specs import ExposeSpec, HostPort

TEST_TIMEOUT = 60


@pytest.fixture
def sock_dir():
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too long.
    with tempfile.TemporaryDirectory(prefix="pgcon-") as directory:
        yield Path(directory)


async def connect(*args: str, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "punchgate", "connect", *args],
            stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
        )


async def test_connect_pipes_stdin_and_stdout_with_half_close(sock_dir):
    payload = os.urandom(3 * 1024 * 1024)
    control = sock_dir / "control.sock"
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo_port = await start_echo_server(nursery)
            provider = await start_node(nursery, expose=(ExposeSpec("echo", HostPort("127.0.0.1", echo_port)),))
            client = await start_node(nursery, bootstrap=(address_of(provider),), control_socket=control)
            # By peer, then by name: the echo comes back whole, after stdin's end reached the server.
            for target in (f"{provider.peer_id}:echo", "echo"):
                done = await connect("--control-socket", str(control), target, stdin=payload)
                assert done.returncode == 0, done.stderr
                assert hashlib.sha256(done.stdout).hexdigest() == hashlib.sha256(payload).hexdigest()
                assert done.stderr == b""
            [row] = [t for t in client.status()["tunnels"] if t["kind"] == "connect"]
            assert row["total_connections"] == 2 and row["bytes_to_remote"] == 2 * len(payload)
            nursery.cancel_scope.cancel()


def reader_that_stops_early(control: Path, target: str) -> tuple[int, bytes]:
    """`punchgate connect` with stdin left open and stdout read for 100 bytes, then closed
    (as `| head -c 100` does); its exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "punchgate", "connect", "--control-socket", str(control), target],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(os.urandom(4 * 1024 * 1024))  # echoed back: more than a pipe holds
        proc.stdin.flush()
        assert len(proc.stdout.read(100)) == 100
        proc.stdout.close()
        code = proc.wait(timeout=15)  # stdin is still open: it must not wait for it
        return code, proc.stderr.read() if proc.stderr else b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdin, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


async def test_a_reader_that_stops_early_ends_the_session_quietly(sock_dir):
    control = sock_dir / "control.sock"
    # The session ends with data in flight, so the service may see a reset: a threaded echo
    # server that takes that in its stride.
    with trio.fail_after(TEST_TIMEOUT), EchoServer() as echo:
        async with trio.open_nursery() as nursery:
            provider = await start_node(nursery, expose=(ExposeSpec("echo", HostPort("127.0.0.1", echo.port)),))
            await start_node(nursery, bootstrap=(address_of(provider),), control_socket=control)
            code, stderr = await trio.to_thread.run_sync(reader_that_stops_early, control, "echo")
            assert (code, stderr) == (0, b"")
            nursery.cancel_scope.cancel()


async def test_connect_errors_are_one_line_with_exit_codes(sock_dir):
    control = sock_dir / "control.sock"
    done = await connect("--control-socket", str(control), "ssh")
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1 and "no punchgate node is running" in done.stderr.decode()
    done = await connect("--control-socket", str(control), "bad name")
    assert done.returncode == 2 and b"example: punchgate connect ssh" in done.stderr
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider = await start_node(nursery, expose=(ExposeSpec("web", HostPort("127.0.0.1", free_port())),))
            await start_node(nursery, bootstrap=(address_of(provider),), control_socket=control)
            done = await connect("--control-socket", str(control), f"{provider.peer_id}:nosuch")
            assert done.returncode == 1 and done.stdout == b""
            [line] = done.stderr.decode().splitlines()
            assert line.startswith(f"punchgate: error: cannot reach {provider.peer_id}:nosuch:")
            assert "unknown service 'nosuch'" in line
            # The service exists but nothing listens behind it: refused with the provider's reason.
            done = await connect("--control-socket", str(control), f"{provider.peer_id}:web")
            assert done.returncode == 1 and "unreachable" in done.stderr.decode()
            nursery.cancel_scope.cancel()


# --- a real ssh session through `punchgate connect` ---------------------------------------


def ssh_missing() -> str | None:
    if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
        return "OpenSSH server not installed (scripts/test.sh installs openssh-server when root)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "OpenSSH client not installed (scripts/test.sh installs openssh-client when root)"
    if os.geteuid() != 0:
        return "needs root (the throwaway sshd lets root in with a temporary key)"
    return None


@pytest.fixture
def sshd():
    """A throwaway sshd on 127.0.0.1: its own host key, client key and config in a temp dir."""
    if missing := ssh_missing():
        pytest.skip(missing)
    with tempfile.TemporaryDirectory(prefix="punchgate-sshd-") as directory:
        d = Path(directory)
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True, capture_output=True,
                timeout=30,
            )
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
        port = free_port()
        (d / "sshd_config").write_text(
            "\n".join([
                "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {d / 'host_key'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}", f"PidFile {d / 'sshd.pid'}", "UsePAM no",
                "StrictModes no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "PrintMotd no", "LogLevel ERROR",
            ]) + "\n"
        )
        sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
        with open(d / "sshd.log", "w") as log:
            proc = subprocess.Popen(
                [sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"sshd did not start: {(d / 'sshd.log').read_text()}") from None
                    time.sleep(0.05)
            yield port, d / "client_key"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def test_a_real_ssh_session_through_punchgate_connect(sshd, sock_dir):
    ssh_port, key = sshd
    control = sock_dir / "control.sock"
    payload = os.urandom(1024 * 1024)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            provider = await start_node(nursery, expose=(ExposeSpec("ssh", HostPort("127.0.0.1", ssh_port)),))
            await start_node(nursery, bootstrap=(address_of(provider),), control_socket=control)
            proxy_command = f"{sys.executable} -m punchgate connect --control-socket {control} ssh"
            with trio.fail_after(40):
                done = await trio.run_process(
                    [
                        "ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy_command}",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                        "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(key),
                        "root@host-behind-punchgate", "echo $((6 * 7)); sha256sum",
                    ],
                    stdin=payload, capture_stdout=True, capture_stderr=True, check=False,
                )
            assert done.returncode == 0, done.stderr
            answer, digest = done.stdout.decode().split("\n", 1)
            assert answer == "42"
            assert digest.split()[0] == hashlib.sha256(payload).hexdigest()
            nursery.cancel_scope.cancel()


# --- real processes: the flags as a user gives them, and SIGTERM with every entry open ----


def udp_echo_thread() -> tuple[socket.socket, int]:
    """A UDP echo server in a thread (the node under test is another process)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, source = sock.recvfrom(70000)
                sock.sendto(data, source)
            except OSError:
                return  # closed at the end of the test

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


def test_sigterm_with_udp_proxy_and_connect_sessions_open_exits_0_within_5s(tmp_path, sock_dir):
    udp_echo, udp_port = udp_echo_thread()
    started: list[PunchgateProcess] = []
    connect_proc = None
    try:
        with EchoServer() as echo:
            provider = PunchgateProcess(
                "--identity", str(tmp_path / "p.key"), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
                "--control-socket", str(sock_dir / "p.sock"),
                "--expose", f"echo=127.0.0.1:{echo.port}", "--expose", f"uecho=127.0.0.1:{udp_port}/udp",
            )
            started.append(provider)
            provider_id = provider.wait_event("punchgate starting")["peer_id"]
            tunnel_port, proxy_port, control = free_port(), free_port(), sock_dir / "c.sock"
            client = PunchgateProcess(
                "--identity", str(tmp_path / "c.key"), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
                "--bootstrap", provider.tcp_address(), "--control-socket", str(control), "--udp-idle", "30",
                "--tunnel", f"{provider_id}:uecho@127.0.0.1:{tunnel_port}/udp", "--proxy", f"127.0.0.1:{proxy_port}",
            )
            started.append(client)
            client.wait_event("phase transition", to_phase="ready")
            assert client.wait_event("proxy listening")["bind"] == f"127.0.0.1:{proxy_port}"

            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.settimeout(10)
            udp.sendto(b"datagram", ("127.0.0.1", tunnel_port))
            assert udp.recvfrom(100)[0] == b"datagram"
            proxied = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
            proxied.sendall(b"\x05\x01\x00")
            assert proxied.recv(2) == b"\x05\x00"
            proxied.sendall(b"\x05\x01\x00\x03\x0eecho.punchgate\x00\x07")
            assert proxied.recv(10)[:2] == b"\x05\x00"
            proxied.sendall(b"through the proxy")
            assert proxied.recv(100) == b"through the proxy"
            connect_proc = subprocess.Popen(
                [sys.executable, "-m", "punchgate", "connect", "--control-socket", str(control), "echo"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            assert connect_proc.stdin is not None and connect_proc.stdout is not None
            connect_proc.stdin.write(b"through connect\n")
            connect_proc.stdin.flush()
            assert connect_proc.stdout.readline() == b"through connect\n"
            for entry in ("udp", "proxy", "connect"):
                client.wait_for(lambda e, entry=entry: e.get("event") == "client tunnel opened"
                                and (e.get("transport") == "udp" if entry == "udp" else e.get("entry") == entry))

            code, seconds = client.terminate_and_wait(timeout=10)
            assert code == 0 and seconds < 5, (code, seconds)
            proxied.settimeout(5)
            try:
                assert proxied.recv(100) == b""  # closed, not left hanging
            except ConnectionResetError:
                pass
            proxied.close()
            assert connect_proc.wait(timeout=10) == 0  # ended with the node, its stdin still open
            client.drain()
            closed = [e for e in client.events() if e.get("event") == "client tunnel closed"]
            assert {e.get("entry") or e.get("transport") for e in closed} == {"udp", "proxy", "connect"}
            udp.close()
    finally:
        if connect_proc is not None and connect_proc.poll() is None:
            connect_proc.kill()
            connect_proc.wait(10)
        for proc in started:
            proc.kill()
        udp_echo.close()


async def test_connect_protocol_on_the_socket_bytes_after_the_line_and_bad_requests(sock_dir):
    """Data sent in the same write as the request line is the session's first bytes; bad
    connect requests get one error line; the status op still answers meanwhile."""
    control = sock_dir / "control.sock"

    async def exchange_raw(payload: bytes) -> bytes:
        stream = await trio.open_unix_socket(str(control))
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            data = bytearray()
            with trio.fail_after(15):
                while chunk := await stream.receive_some(65536):
                    data += chunk
        return bytes(data)

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            echo_port = await start_echo_server(nursery)
            provider = await start_node(nursery, expose=(ExposeSpec("echo", HostPort("127.0.0.1", echo_port)),))
            await start_node(nursery, bootstrap=(address_of(provider),), control_socket=control)
            answer = await exchange_raw(b'{"op": "connect", "service": "echo", "peer": null}\nfirst bytes')
            line, _, rest = answer.partition(b"\n")
            assert json.loads(line) == {"ok": True, "peer": str(provider.peer_id), "path": "direct"}
            assert rest == b"first bytes"
            for request, words in (
                (b'{"op": "connect"}\n', "bad request"),
                (b'{"op": "connect", "service": "bad name"}\n', "bad request"),
                (b'{"op": "connect", "service": "echo", "peer": "12D3KooW/tcp/1"}\n', "not a valid peer ID"),
            ):
                [line] = (await exchange_raw(request)).splitlines()
                assert words in json.loads(line)["error"], line
            assert json.loads(await exchange_raw(b'{"op": "ping"}\n')) == {"ok": True}
            nursery.cancel_scope.cancel()
