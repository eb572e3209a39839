#!/usr/bin/env python3
"""What bare aioquic can move on loopback: the ceiling for a QUIC transport built on it.

Two processes (this script with ``--serve`` is the receiver), one bidirectional stream,
trio driving aioquic's sans-I/O ``QuicConnection`` with plain non-blocking UDP sockets:
no libp2p, no certificates checked. The sender writes ``--mib`` MiB and a FIN; the
receiver answers with the sha256 of what it read, and the run counts only if it matches.
Figures are medians of ``--runs`` runs, for each packet size given with ``--sizes``
(``max_datagram_size``: 1200 is QUIC's minimum; loopback's MTU allows ~65,000).

    .venv/bin/python scripts/bench_quic_raw.py
    .venv/bin/python scripts/bench_quic_raw.py --sizes 1200,1452,9000,16384,65000 --mib 200

Also printed: CPU seconds per GB of both processes together (user + sys).

``--pacing burst`` lets aioquic's pacer release 2 ms worth of packets at once (what
punchgate's transport does): as shipped it waits between packets for less than trio's
timers can wait (1 ms), which, not the CPU, limits small packets. aioquic 1.7.2 writes
STREAM frame lengths in 2 bytes, so sizes above 16,384 break bare aioquic
(punchgate's transport lifts that limit).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import os
import socket
import statistics
import subprocess
import sys
import time

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MIB = 1 << 20
WINDOW = 16 * MIB
CHUNK = MIB
SOCKET_BUFFER = 8 * MIB


def self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def udp_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


class Pump:
    """One connection on one socket: receive, handle timers, transmit."""

    def __init__(self, sock: socket.socket, conn: QuicConnection) -> None:
        self.sock = sock
        self.conn = conn

    def transmit(self) -> None:
        for data, addr in self.conn.datagrams_to_send(now=trio.current_time()):
            try:
                self.sock.sendto(data, addr)
            except BlockingIOError:
                pass  # like a loss: recovery resends

    async def step(self) -> list[events.QuicEvent]:
        timer = self.conn.get_timer()
        with trio.move_on_at(timer if timer is not None else math.inf):
            await trio.lowlevel.wait_readable(self.sock)
        now = trio.current_time()
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                break
            self.conn.receive_datagram(data, addr, now)
        timer = self.conn.get_timer()
        if timer is not None and now >= timer:
            self.conn.handle_timer(now)
        found = []
        while (event := self.conn.next_event()) is not None:
            found.append(event)
        self.transmit()
        return found


def configuration(is_client: bool, size: int) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["bench"],
        max_datagram_size=size,
        max_data=WINDOW,
        max_stream_data=WINDOW,
        idle_timeout=30.0,
    )
    if is_client:
        config.verify_mode = 0  # ssl.CERT_NONE: nothing to verify in a ceiling measurement
    else:
        config.certificate, config.private_key = self_signed()
    return config


async def serve(port_out) -> None:
    """Control socket: each ``#size N`` gets a fresh data socket (its port in the answer)
    serving one connection; ``#quit`` ends."""
    control = udp_socket()
    print(control.getsockname()[1], file=port_out, flush=True)
    async with trio.open_nursery() as nursery:
        current = trio.CancelScope()
        while True:
            await trio.lowlevel.wait_readable(control)
            data, addr = control.recvfrom(100)
            if data == b"#quit":
                nursery.cancel_scope.cancel()
                return
            current.cancel()  # the previous run is over
            current = trio.CancelScope()
            sock = udp_socket()
            control.sendto(b"#ok %d" % sock.getsockname()[1], addr)
            nursery.start_soon(receive_one, sock, int(data.split()[1]), current)


async def receive_one(sock: socket.socket, size: int, scope: trio.CancelScope) -> None:
    with sock, scope:
        await trio.lowlevel.wait_readable(sock)
        data, addr = sock.recvfrom(65536)
        header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        conn = QuicConnection(
            configuration=configuration(False, size), original_destination_connection_id=header.destination_cid
        )
        conn.receive_datagram(data, addr, trio.current_time())
        pump = Pump(sock, conn)
        pump.transmit()
        digest, total = hashlib.sha256(), 0
        while True:
            for event in await pump.step():
                if isinstance(event, events.StreamDataReceived):
                    digest.update(event.data)
                    total += len(event.data)
                    if event.end_stream:
                        conn.send_stream_data(event.stream_id, f"{total} {digest.hexdigest()}".encode(), True)
                        pump.transmit()
                elif isinstance(event, events.ConnectionTerminated):
                    return


async def send_once(port: int, size: int, nbytes: int, payload: bytes) -> float:
    sock = udp_socket()
    sock.sendto(b"#size %d" % size, ("127.0.0.1", port))
    await trio.lowlevel.wait_readable(sock)
    answer, _ = sock.recvfrom(100)
    server = ("127.0.0.1", int(answer.split()[1]))
    conn = QuicConnection(configuration=configuration(True, size))
    pump = Pump(sock, conn)
    started = time.perf_counter()
    conn.connect(server, now=trio.current_time())
    pump.transmit()
    stream_id: int | None = None
    written = 0
    answer = b""
    expected = hashlib.sha256()
    while True:
        for event in await pump.step():
            if isinstance(event, events.HandshakeCompleted):
                stream_id = conn.get_next_available_stream_id()
            elif isinstance(event, events.StreamDataReceived):
                answer += event.data
                if event.end_stream:
                    seconds = time.perf_counter() - started
                    total, digest = answer.decode().split()
                    conn.close()
                    pump.transmit()
                    sock.close()
                    assert int(total) == nbytes and digest == expected.hexdigest(), "payload differs"
                    return seconds
        if stream_id is not None and written < nbytes:
            stream = conn._streams.get(stream_id)
            buffered = 0 if stream is None else len(stream.sender._buffer)
            while written < nbytes and buffered < 4 * CHUNK:
                piece = payload[: min(CHUNK, nbytes - written)]
                expected.update(piece)
                written += len(piece)
                conn.send_stream_data(stream_id, piece, written == nbytes)
                buffered += len(piece)
            pump.transmit()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def burst_pacing() -> None:
    """Let aioquic's pacer release 2 ms of packets at once (as punchgate's transport does)."""
    from aioquic.quic.recovery import QuicPacketPacer

    shipped = QuicPacketPacer.update_rate

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        shipped(self, congestion_window, smoothed_rtt)
        self.bucket_max = max(self.bucket_max, 0.002)

    QuicPacketPacer.update_rate = update_rate  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pacing", choices=("shipped", "burst"), default="burst")
    parser.add_argument("--sizes", default="1200,1452,4096,9000,16384", help="max_datagram_size values")
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.pacing == "burst":
        burst_pacing()
    if args.serve:
        trio.run(serve, sys.stdout)
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--pacing", args.pacing], stdout=subprocess.PIPE, text=True
    )
    port = None
    try:
        port = int(server.stdout.readline())
        payload = os.urandom(CHUNK)
        nbytes = args.mib * MIB
        print(f"bare aioquic on loopback, one stream, {args.mib} MiB per run, median of {args.runs}, "
              f"pacing {args.pacing}")
        print(f"{'max_datagram_size':>18} {'MB/s':>8} {'min':>8} {'max':>8} {'CPU s/GB':>9}")
        for size in (int(s) for s in args.sizes.split(",")):
            rates, cpus = [], []
            for _ in range(args.runs):
                cpu0 = cpu_seconds(os.getpid()) + cpu_seconds(server.pid)
                seconds = trio.run(send_once, port, size, nbytes, payload)
                cpu = cpu_seconds(os.getpid()) + cpu_seconds(server.pid) - cpu0
                rates.append(nbytes / 1e6 / seconds)
                cpus.append(cpu / (nbytes / 1e9))
            print(f"{size:>18} {statistics.median(rates):>8.1f} {min(rates):>8.1f} {max(rates):>8.1f}"
                  f" {statistics.median(cpus):>9.1f}")
    finally:
        if port is not None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quit_sock:
                quit_sock.sendto(b"#quit", ("127.0.0.1", port))
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
