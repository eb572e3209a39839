"""Hostile peers on loopback, and the measurements taken while they attack a node.

Used by ``tests/test_hostile.py`` (which asserts bounds) and ``scripts/bench_abuse.py``
(which prints the figures). Every attack is bounded in count and time and talks only
to the loopback address it is given (source addresses are taken from 127.0.0.0/8).

* :func:`stream_flood` - one peer opens N streams at once on one connection, asks for
  the tunnel protocol on each and never sends a request.
* :func:`handshake_flood` - N raw TCP connections at once that never finish a
  handshake: half send nothing, half send garbage.
* :func:`reservation_flood` - many identities (from a few source IPs) reserve relay
  slots, and one of them sends RESERVE after RESERVE naming made-up peer IDs.
* :func:`good_transfer` - the well-behaved peer: N bytes through a tunnel's local port
  in a separate process (so the attacker's Python never slows it down), sha256 checked.
* :func:`process_usage` / :class:`UsageSampler` - open descriptors and RSS of the node.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Status
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from punchgate.devtools.processes import PunchgateProcess, identity_path
from punchgate.runtime.host import build_host, live_connection
from punchgate.wire import PROTOCOL_ID

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
ATTACK_TIMEOUT = 60.0
AT_ONCE = 2.0  # a connection closed within this many seconds was not held for a deadline
ECHO_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "echo_server.py"


def process_usage(pid: int) -> tuple[int, int]:
    """(open file descriptors, resident bytes) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, rss_kib * 1024


class UsageSampler:
    """Samples a process's descriptors and RSS every ``interval`` seconds; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak_fds = self.peak_rss = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            fds, rss = process_usage(self.pid)
            self.peak_fds, self.peak_rss = max(self.peak_fds, fds), max(self.peak_rss, rss)
            await trio.sleep(self.interval)


def _connection(host: Any, peer: ID) -> Any:
    conn = live_connection(host, peer, "tcp")
    if conn is None:
        raise ConnectionError(f"no connection to {peer}")
    return conn


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def multistream_line(text: str) -> bytes:
    line = text.encode() + b"\n"
    return _varint(len(line)) + line


def refusal_reason(data: bytes) -> str | None:
    """The reason in a tunnel refusal that follows the multistream answers in ``data``."""
    start = data.find(b'{"accepted"')
    if start < 4:
        return None
    try:
        return json.loads(data[start : start + int.from_bytes(data[start - 4 : start], "big")]).get("reason")
    except ValueError:
        return None


@dataclass
class FloodResult:
    outcomes: Counter = field(default_factory=Counter)  # how each attempt ended
    latencies: dict[str, list[float]] = field(default_factory=dict)  # seconds to that end, per kind
    duration: float = 0.0

    def record(self, kind: str, seconds: float) -> None:
        self.outcomes[kind] += 1
        self.latencies.setdefault(kind, []).append(seconds)

    def summary(self) -> dict:
        return {
            "outcomes": dict(self.outcomes),
            "latency_s": {
                kind: {"median": round(statistics.median(v), 3), "max": round(max(v), 3)}
                for kind, v in self.latencies.items()
            },
            "duration_s": round(self.duration, 2),
        }


async def stream_flood(target: multiaddr.Multiaddr, count: int, probes: int = 20) -> FloodResult:
    """Open ``count`` streams to ``target`` (``.../p2p/ID``), all at once but the last
    ``probes`` (opened one by one once the node refuses the flood: ``probe ...``),
    negotiate the tunnel protocol on each, never send a request; record how each ends."""
    peer = ID.from_base58(target.value_for_protocol("p2p"))
    host = build_host(create_new_key_pair(), [LOOPBACK])
    hello = multistream_line("/multistream/1.0.0") + multistream_line(PROTOCOL_ID)
    result = FloodResult()
    async with host.run(listen_addrs=[LOOPBACK]):
        await host.get_network().dial_addr(target.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}")), peer)
        muxed: Any = _connection(host, peer).muxed_conn
        muxed.stream_backlog_semaphore = trio.Semaphore(count + 1)  # an attacker does not hold back
        started = trio.current_time()

        async def one(probe: bool = False) -> None:
            begun, data, ended, stream = trio.current_time(), bytearray(), "closed", None
            try:
                stream = await muxed.open_stream()
                await stream.write(hello)
                begun = trio.current_time()  # the request is on its way: the node's turn
                while True:
                    data += await stream.read(4096)
            except Exception as exc:  # how the stream ended is the result
                ended = "reset" if "Reset" in type(exc).__name__ else "closed"
            if stream is not None:  # done with it (an attacker keeping it half-open meets the muxer cap)
                with trio.move_on_after(1):
                    try:
                        await stream.reset()
                    except Exception:  # gone already
                        pass
            reason = refusal_reason(bytes(data))
            kind = f"refused: {reason}" if reason else f"{ended} without a reason"
            result.record(f"probe {kind}" if probe else kind, trio.current_time() - begun)

        with trio.fail_after(ATTACK_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(count - probes):
                    nursery.start_soon(one)
                # Once the flood is refused, time single streams beyond the caps, one by one:
                # how long the node takes to refuse (the flood's own figures include the
                # attacker's queueing behind its thousands of streams).
                while not any(k.startswith("refused: too many") for k in result.outcomes):
                    await trio.sleep(0.05)
                for _ in range(probes):
                    await one(probe=True)
        result.duration = trio.current_time() - started
        await _close_all(host)
    return result


async def junk_flood(target: multiaddr.Multiaddr, streams: int, per_stream: int) -> FloodResult:
    """Open ``streams`` tunnel streams whose request is junk (so each is refused), and
    keep sending ``per_stream`` bytes on each as if the refusal never came: a peer
    trying to make the node buffer what nobody reads. Records how each stream ended and
    how many bytes the node let through before that."""
    peer = ID.from_base58(target.value_for_protocol("p2p"))
    host = build_host(create_new_key_pair(), [LOOPBACK])
    hello = multistream_line("/multistream/1.0.0") + multistream_line(PROTOCOL_ID)
    junk = b"\x00\x00\x00\x10" + os.urandom(1 << 20)  # a 16-byte "request" of random bytes, then more
    result = FloodResult()
    async with host.run(listen_addrs=[LOOPBACK]):
        await host.get_network().dial_addr(target.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}")), peer)
        muxed: Any = _connection(host, peer).muxed_conn
        muxed.stream_backlog_semaphore = trio.Semaphore(streams + 1)
        started = trio.current_time()
        sent: list[int] = []

        async def one() -> None:
            begun, written = trio.current_time(), 0
            stream = await muxed.open_stream()
            try:
                await stream.write(hello)
                while written < per_stream:
                    await stream.write(junk)
                    written += len(junk)
                kind = "all sent"
            except Exception:  # the node reset the stream: what we measure
                kind = "reset by the node"
            sent.append(written)
            result.record(kind, trio.current_time() - begun)

        with trio.fail_after(ATTACK_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(one)
        result.duration = trio.current_time() - started
        result.outcomes["MiB sent before the end, max"] = max(sent) >> 20
        await _close_all(host)
    return result


async def handshake_flood(host: str, port: int, count: int, sources: list[str]) -> FloodResult:
    """``count`` TCP connections at once to ``host:port``, spread over the source
    addresses ``sources``; even ones send garbage, odd ones nothing; none ever finishes a
    handshake. Records how long the node took to close each one."""
    result = FloodResult()
    garbage = os.urandom(512)
    started = trio.current_time()

    async def one(i: int) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with sock:
            await sock.bind((sources[i % len(sources)], 0))
            begun = trio.current_time()
            try:
                await sock.connect((host, port))
                if i % 2 == 0:
                    await sock.send(garbage)
                while await sock.recv(4096):
                    pass
                kind = "closed"
            except OSError:
                kind = "reset"
            took = trio.current_time() - begun
            result.record(f"{kind} {'at once' if took < AT_ONCE else 'after waiting'}", took)

    with trio.fail_after(ATTACK_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    result.duration = trio.current_time() - started
    return result


async def reservation_flood(
    relay: multiaddr.Multiaddr, crowded_ip: str, crowd: int, other_ips: list[str], spoofed: int
) -> FloodResult:
    """Identities ask ``relay`` for a slot: first one from ``crowded_ip``, which then sends
    ``spoofed`` RESERVE messages naming made-up peer IDs (``spoof: STATUS``), then
    ``crowd - 1`` more from ``crowded_ip``, then one from each of ``other_ips``. Each
    identity's answer is recorded by status name (``crowded: OK``, ``spread: ...``)."""
    relay_id = ID.from_base58(relay.value_for_protocol("p2p"))
    bare = relay.decapsulate(multiaddr.Multiaddr(f"/p2p/{relay_id}"))
    sources = [crowded_ip] * crowd + list(other_ips)
    hosts = [build_host(create_new_key_pair(), [LOOPBACK]) for _ in sources]
    result = FloodResult()
    started = trio.current_time()

    async def reserve(host, named: bytes | None = None) -> str:
        stream = await host.new_stream(relay_id, [HOP_PROTOCOL_ID])
        try:
            message = HopMessage(type=HopMessage.RESERVE)
            if named is not None:
                message.peer.CopyFrom(CircuitPeerId(id=named))
            await write_delimited_msg(stream, message)
            answer = await read_delimited_msg(stream, HopMessage)
        finally:
            await stream.close()
        return Status.Name(answer.status)

    async with trio.open_nursery() as nursery:
        for host in hosts:
            await nursery.start(_run_host, host)
        with trio.fail_after(ATTACK_TIMEOUT):
            for i, (host, source) in enumerate(zip(hosts, sources, strict=True)):
                await host.get_network().dial_addr(bare, relay_id, source=(source, 0))
                begun = trio.current_time()
                label = "crowded" if source == crowded_ip else "spread"
                result.record(f"{label}: {await reserve(host)}", trio.current_time() - begun)
                for _ in range(spoofed if i == 0 else 0):
                    made_up = ID.from_pubkey(create_new_key_pair().public_key).to_bytes()
                    begun = trio.current_time()
                    result.record(f"spoof: {await reserve(host, made_up)}", trio.current_time() - begun)
        result.duration = trio.current_time() - started
        for host in hosts:
            await _close_all(host)
        nursery.cancel_scope.cancel()
    return result


async def _close_all(host) -> None:
    """Close a host's connections for real (cancelling ``host.run`` alone leaves its
    sockets open until garbage collection)."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        for conns in list(host.get_network().get_connections_map().values()):
            for conn in list(conns):
                try:
                    await conn.close()
                except Exception:  # closing either way
                    pass


async def _run_host(host, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with host.run(listen_addrs=[LOOPBACK]):
        task_status.started()
        await trio.sleep_forever()


# --- the node under attack and its well-behaved peer ------------------------------------------


class Target:
    """A provider process exposing an echo service (another process), and a client process
    tunnelling to it: the good peer's path. ``provider_args`` add flags (e.g. ``--limit``)."""

    def __init__(self, workdir: Path, provider_args: tuple[str, ...] = ()) -> None:
        self.procs: list[Any] = []
        try:
            self.echo = subprocess.Popen(
                [sys.executable, str(ECHO_SCRIPT), "--port", "0"], stderr=subprocess.PIPE, text=True
            )
            assert self.echo.stderr is not None
            echo_port = int(self.echo.stderr.readline().rsplit(":", 1)[1])
            common = ("--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns")
            self.provider = self._start(
                "--identity", identity_path(workdir, "provider"), *common, "--expose", f"echo=127.0.0.1:{echo_port}",
                *provider_args,
            )
            self.provider.wait_event("phase transition", to_phase="ready")
            self.peer_id = self.provider.wait_event("punchgate starting")["peer_id"]
            self.address = multiaddr.Multiaddr(self.provider.tcp_address())
            self.tcp_port = int(self.address.value_for_protocol("tcp"))
            self.tunnel_port = _free_port()
            self.client = self._start(
                "--identity", identity_path(workdir, "client"), *common, "--bootstrap", str(self.address),
                "--tunnel", f"{self.peer_id}:echo@127.0.0.1:{self.tunnel_port}",
            )
            self.client.wait_event("bootstrap connected")
        except BaseException:
            self.close()
            raise

    def _start(self, *args: str) -> Any:
        proc = PunchgateProcess(*args)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        if getattr(self, "echo", None) is not None:
            self.echo.kill()
            self.echo.wait(timeout=10)

    def usage(self) -> tuple[int, int]:
        return process_usage(self.provider.pid)


async def measure(target: Target, attack: Callable[[], Awaitable[FloodResult]], size: int = 16 << 20) -> dict:
    """Run ``attack`` against ``target`` while its good peer moves ``size``-byte echoes;
    return the attack's outcomes with the node's descriptors and memory before, at the
    peak and once settled, and the good peer's MB/s before, during and after."""

    async def transfer() -> float:
        return await trio.to_thread.run_sync(good_transfer, target.tunnel_port, size)

    baseline = [await transfer() for _ in range(3)]
    fds_before, rss_before = target.usage()
    sampler = UsageSampler(target.provider.pid)
    during: list[float] = []
    done = trio.Event()
    result = FloodResult()

    async def good_peer() -> None:
        while not done.is_set() or not during:  # at least one transfer overlaps the attack
            during.append(await transfer())

    async with trio.open_nursery() as nursery:
        await nursery.start(sampler.run)
        nursery.start_soon(good_peer)
        try:
            result = await attack()
        finally:
            done.set()
        with trio.fail_after(ATTACK_TIMEOUT):
            while True:  # settled: the node holds no more descriptors than before (bounded wait)
                fds_after, rss_after = target.usage()
                if fds_after <= fds_before + 2:
                    break
                await trio.sleep(0.2)
        while not during:
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    after = [await transfer() for _ in range(2)]
    return {
        **result.summary(),
        "fds": {"before": fds_before, "peak": sampler.peak_fds, "after": fds_after},
        "rss_mb": {
            "before": round(rss_before / 1e6, 1), "peak": round(sampler.peak_rss / 1e6, 1),
            "after": round(rss_after / 1e6, 1),
        },
        "good_mb_s": {
            "before": round(statistics.median(baseline), 1),
            "during": round(statistics.median(during), 1),
            "during_min": round(min(during), 1),
            "transfers_during": len(during),
            "after": round(statistics.median(after), 1),
        },
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the well-behaved peer ----------------------------------------------------------------


def good_transfer(port: int, size: int, timeout: float = 60.0) -> float:
    """MB/s of ``size`` random bytes echoed through 127.0.0.1:``port``, measured in a
    child process; raises if the bytes that came back differ."""
    done = subprocess.run(
        [sys.executable, "-m", "punchgate.devtools.hostile", "transfer", str(port), str(size)],
        capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"good transfer failed: {done.stderr.strip() or done.stdout.strip()}")
    return float(json.loads(done.stdout)["mb_s"])


def _transfer(port: int, size: int) -> int:
    payload = os.urandom(size)
    received = hashlib.sha256()
    count = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.perf_counter()

        def send() -> None:
            view = memoryview(payload)
            for i in range(0, size, 256 * 1024):
                sock.sendall(view[i : i + 256 * 1024])
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := sock.recv(1 << 20):
            received.update(chunk)
            count += len(chunk)
        sender.join()
        elapsed = time.perf_counter() - started
    if count != size or received.digest() != hashlib.sha256(payload).digest():
        print(json.dumps({"error": f"got {count} of {size} bytes or a different sha256"}))
        return 1
    print(json.dumps({"mb_s": size / elapsed / 1e6}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "transfer":
        raise SystemExit(_transfer(int(sys.argv[2]), int(sys.argv[3])))
    raise SystemExit("usage: python -m punchgate.devtools.hostile transfer PORT BYTES")
