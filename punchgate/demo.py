"""A self-contained demonstration: two punchgate peers on this machine tunnel an echo service.

    python -m punchgate.demo

It starts an echo server, a provider peer exposing it as ``echo``, and a client peer
with ``--tunnel <provider>:echo@127.0.0.1:<port>``; then talks through the tunnel,
moves a payload and checks its sha256, prints what happened, and stops everything.
Needs nothing but loopback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from punchgate.devtools.echo import EchoServer
from punchgate.devtools.processes import PunchgateProcess

PAYLOAD_MB = 64


def say(text: str) -> None:
    print(text, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(port: int, message: bytes) -> tuple[bytes, float]:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        received = b""
        while data := conn.recv(65536):
            received += data
    return received, time.perf_counter() - started


def transfer(port: int, payload: bytes) -> tuple[str, float]:
    """Send ``payload`` through the tunnel to the echo server while reading it back."""
    digest = hashlib.sha256()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:

        def send() -> None:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while data := conn.recv(1 << 20):
            digest.update(data)
        sender.join()
    return digest.hexdigest(), time.perf_counter() - started


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="punchgate-demo-"))
    with EchoServer() as echo:
        say(f"1. echo server on 127.0.0.1:{echo.port}")
        provider = PunchgateProcess(
            "--identity", str(workdir / "provider.key"),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
            "--expose", f"echo=127.0.0.1:{echo.port}",
        )
        client = None
        try:
            provider_id = provider.wait_event("punchgate starting")["peer_id"]
            provider_addr = provider.tcp_address()
            say(f"2. provider peer {provider_id}\n   exposes 'echo', listening on {provider_addr}")
            port = free_port()
            client = PunchgateProcess(
                "--identity", str(workdir / "client.key"),
                "--listen", "/ip4/127.0.0.1/tcp/0",
                "--bootstrap", provider_addr,
                "--tunnel", f"{provider_id}:echo@127.0.0.1:{port}",
            )
            client.wait_event("phase transition", to_phase="ready")
            say(f"3. client peer {client.wait_event('punchgate starting')['peer_id']}\n"
                f"   tunnels 127.0.0.1:{port} -> {provider_id[:16]}…:echo")

            reply, seconds = round_trip(port, b"hello punchgate")
            say(f"4. sent 'hello punchgate' to 127.0.0.1:{port}, got back {reply.decode()!r} "
                f"in {seconds * 1000:.1f} ms")
            payload = os.urandom(PAYLOAD_MB * 1024 * 1024)
            digest, seconds = transfer(port, payload)
            same = digest == hashlib.sha256(payload).hexdigest()
            say(f"5. echoed {PAYLOAD_MB} MiB through the tunnel in {seconds:.2f} s "
                f"({PAYLOAD_MB / seconds:.0f} MiB/s each way); sha256 {'matches' if same else 'DIFFERS'}")
            closed = client.wait_for(
                lambda e: e.get("event") == "client tunnel closed" and e["bytes_to_remote"] == len(payload)
            )
            say(f"   client log: bytes_to_remote={closed['bytes_to_remote']} "
                f"bytes_from_remote={closed['bytes_from_remote']}")
            say(f"   data path: you -> 127.0.0.1:{port} -> client peer -> libp2p (Noise+Yamux over TCP)"
                " -> provider peer -> echo server -> back")
            ok = reply == b"hello punchgate" and same
        finally:
            for name, proc in (("client", client), ("provider", provider)):
                if proc is None or proc.proc.poll() is not None:
                    continue
                code, seconds = proc.terminate_and_wait(timeout=10)
                say(f"6. {name} stopped on SIGTERM: exit {code} after {seconds:.2f} s")
    say(f"logs and keys in {workdir}" if not ok else "demo OK")
    for name, proc in (("provider", provider), ("client", client)):
        if proc is not None:
            proc.drain()
            (workdir / f"{name}.log").write_text("\n".join(proc.lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
