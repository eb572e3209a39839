"""Throughput and 1-byte round trip of one bare libp2p stream between two processes.

Both processes build a host over TCP + Noise + Yamux on loopback (the stack
punchgate uses). The client opens one stream per throughput run, writes
``--mib`` MiB in ``--write-kib`` KiB writes, half-closes, and waits for the
server's sha256 of everything it read; the run counts only if the digests
match. The round trip is a 1-byte echo repeated ``--rtt-count`` times on one
stream. Results are medians over ``--runs`` runs.

    python scripts/bench_stream.py              # with punchgate.transports' TCP data path
    python scripts/bench_stream.py --no-fixes   # the library as shipped
    python scripts/bench_stream.py --private    # both in a private network (pnet protector)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import subprocess
import sys
import time

import trio

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import multiaddr  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.network.stream.exceptions import StreamEOF  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.peer.peerinfo import PeerInfo  # noqa: E402
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE  # noqa: E402
from libp2p.security.noise.transport import Transport as Noise  # noqa: E402

SINK = TProtocol("/punchgate-bench/sink/1")
ECHO = TProtocol("/punchgate-bench/echo/1")
READ_SIZE = 256 * 1024
LISTEN = "/ip4/127.0.0.1/tcp/0"


PSK_VARIABLE = "PUNCHGATE_BENCH_PSK"  # a throwaway random key, hex, handed to the server process


def make_host():
    key_pair = create_new_key_pair()
    addrs = [multiaddr.Multiaddr(LISTEN)]
    noise = Noise(key_pair, noise_privkey=create_x25519().private_key)
    host = new_host(key_pair=key_pair, listen_addrs=addrs, sec_opt={NOISE: noise})
    if os.environ.get(PSK_VARIABLE):
        from punchgate.libp2p_fixes.pnet import protect_host

        protect_host(host, bytes.fromhex(os.environ[PSK_VARIABLE]))
    return host, addrs


async def sink_handler(stream) -> None:
    digest = hashlib.sha256()
    total = 0
    try:
        while True:
            chunk = await stream.read(READ_SIZE)
            digest.update(chunk)
            total += len(chunk)
    except StreamEOF:
        pass
    await stream.write(f"{total} {digest.hexdigest()}".encode())
    await stream.close()


async def echo_handler(stream) -> None:
    try:
        while True:
            await stream.write(await stream.read(READ_SIZE))
    except StreamEOF:
        await stream.close()


async def serve() -> None:
    host, addrs = make_host()
    host.set_stream_handler(SINK, sink_handler)
    host.set_stream_handler(ECHO, echo_handler)
    async with host.run(listen_addrs=addrs):
        addr = host.get_addrs()[0]
        print(f"READY {host.get_id().to_base58()} {addr}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin


async def read_all(stream) -> bytes:
    out = bytearray()
    try:
        while True:
            out += await stream.read(READ_SIZE)
    except StreamEOF:
        return bytes(out)


async def one_transfer(host, peer: ID, payload: bytes, total: int) -> float:
    expected = hashlib.sha256()
    stream = await host.new_stream(peer, [SINK])
    start = time.perf_counter()
    sent = 0
    while sent < total:
        piece = payload[: min(len(payload), total - sent)]
        await stream.write(piece)
        expected.update(piece)
        sent += len(piece)
    await stream.close_write()
    reply = (await read_all(stream)).decode()
    elapsed = time.perf_counter() - start
    if reply != f"{total} {expected.hexdigest()}":
        raise SystemExit(f"payload corrupted: server saw {reply!r}")
    return total / elapsed / (1 << 20)


async def rtt_once(host, peer: ID, count: int) -> float:
    stream = await host.new_stream(peer, [ECHO])
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await stream.write(b"x")
        got = await stream.read(1)
        samples.append(time.perf_counter() - start)
        assert got == b"x"
    await stream.close()
    return statistics.median(samples) * 1000.0


async def client(args: argparse.Namespace, peer_id: str, addr: str) -> dict[str, float]:
    host, addrs = make_host()
    payload = os.urandom(args.write_kib * 1024)
    total = args.mib * (1 << 20)
    async with host.run(listen_addrs=addrs):
        peer = ID.from_base58(peer_id)
        await host.connect(PeerInfo(peer, [multiaddr.Multiaddr(addr)]))
        await one_transfer(host, peer, payload, 8 << 20)  # warm-up
        rates = [await one_transfer(host, peer, payload, total) for _ in range(args.runs)]
        rtts = [await rtt_once(host, peer, args.rtt_count) for _ in range(args.runs)]
    return {
        "mib_s": statistics.median(rates),
        "mib_s_all": rates,
        "rtt_ms": statistics.median(rtts),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-fixes", action="store_true", help="run the library as shipped")
    parser.add_argument(
        "--private", action="store_true", help="wrap both ends in the private-network protector (random key)"
    )
    parser.add_argument("--mib", type=int, default=200, help="MiB per throughput run")
    parser.add_argument("--write-kib", type=int, default=256, help="size of each write")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt-count", type=int, default=300)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    if not args.no_fixes:
        from punchgate import transports

        transports.install()
    if args.serve:
        trio.run(serve)
        return
    if args.private:
        os.environ[PSK_VARIABLE] = os.urandom(32).hex()  # inherited by the server process
    command = [sys.executable, os.path.abspath(__file__), "--serve"]
    if args.no_fixes:
        command.append("--no-fixes")
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline().split()
        if not line or line[0] != "READY":
            raise SystemExit("server did not start")
        result = trio.run(client, args, line[1], line[2])
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    label = ("library as shipped" if args.no_fixes else "punchgate.transports") + (
        ", private network" if args.private else ""
    )
    runs = ", ".join(f"{r:.0f}" for r in result["mib_s_all"])
    print(
        f"{label}: {result['mib_s']:.0f} MiB/s (runs: {runs}; {args.mib} MiB in "
        f"{args.write_kib} KiB writes, sha256 ok), 1-byte RTT {result['rtt_ms']:.3f} ms"
    )


if __name__ == "__main__":
    main()
