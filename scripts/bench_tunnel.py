#!/usr/bin/env python3
"""Side-by-side benchmark of tunnels on loopback: raw, ssh -L, punchgate direct TCP, relayed and direct QUIC.

    /work/venv/bin/python scripts/bench_tunnel.py                 # 500 MB x 3 runs per path
    .venv/bin/python scripts/bench_tunnel.py --quick              # smoke run (20 MB, 1 run)
    .venv/bin/python scripts/bench_tunnel.py --json results.json --size-mb 200 --runs 5

(any python with punchgate's dependencies; the punchgate nodes run with the same python.)

Paths, all on 127.0.0.1:

* raw:                 a direct TCP connection to the sink / echo server;
* ssh -L:              a throwaway ``sshd -D`` (own host key, client key, sshd_config and
                       authorized_keys in a temp dir) and ``ssh -N -L`` with the default cipher;
                       needs root and OpenSSH server (``apt-get install -y openssh-server``);
* punchgate direct:    provider ``--expose``, client ``--bootstrap <provider> --tunnel PEER:svc@``;
* punchgate relayed:   a third punchgate node as bootstrap and relay; provider and client reach
                       it but not each other: iptables REJECTs (TCP RST) new connections to the
                       provider's and client's libp2p ports on ``lo``. The relay's dial-back to the
                       provider then fails, so the provider finds itself PRIVATE, reserves a slot
                       on the relay and publishes circuit addresses in the DHT; the client
                       (``--tunnel-by-name``) resolves it, dials through the relay, and its hole
                       punch fails, so tunnels ride the relay (each connection's ``path`` in the
                       client log is checked). Needs root and iptables; the rules carry a comment
                       naming this run and are removed at the end. A relay circuit carries at most
                       RELAY_LIMITS.data bytes, so the client is restarted (new identity,
                       new circuit) before a transfer that would cross that budget, outside the
                       measured time;
* punchgate QUIC:      as direct, both nodes listening on QUIC only (``/udp/0/quic-v1``): the
                       tunnel streams ride punchgate's QUIC transport (every ``client tunnel
                       opened`` event in the client log says ``transport=quic``).

UDP and proxy entries (``--paths`` ``udp`` and ``proxy``, on one direct provider/client pair):

* UDP datagrams/s one way: datagrams of ``--udp-size`` bytes (a 12-byte header: run, sequence,
  size) sent from one source to a UDP sink through ``--tunnel PEER:usink@…/udp``, paced at a
  rising ladder of rates (``--udp-seconds`` each) and once unpaced (overload). The sink (in the
  helper process) counts what arrives, in order and whole; delivered/s = datagrams received /
  (last arrival - first arrival); loss = 1 - received / sent; the client's and provider's
  ``dropped`` counters (their bounded queues, from ``punchgate status``) say where loss
  happened (the rest overflowed a kernel socket buffer). The same ladder straight to the sink
  gives the raw baseline. "lossless" is the highest delivered rate of a step losing < 0.1 %;
* proxy setup: a new connect() to the proxy, SOCKS5 greeting and CONNECT (or an HTTP CONNECT
  request) to ``echo.PEER.punchgate`` / ``echo.punchgate``, then one byte echoed: median and
  max of ``--setup-count`` fresh connections, beside the same through a ``--tunnel`` listener.

Metrics per path:

* throughput: one-way transfer of ``--size-mb`` MB (10^6 bytes) to a sink server, which counts
  the bytes and answers ``total sha256`` after the sender half-closes; the run counts only if
  both equal what was sent (1 MiB chunks of seeded random bytes, each stamped with its index).
  MB/s = bytes / 10^6 / seconds from connect() to the sink's answer; median of ``--runs``;
* RTT: 1 byte to an echo server and back through one already open connection (TCP_NODELAY),
  median and p99 of 2,000 (after 50 warm-up round trips);
* setup: a new connect() to the local end until the first echoed byte, median of 50 fresh
  connections (for punchgate: on an existing peer connection; the client's own
  ``client tunnel opened`` ``setup_ms`` is shown too);
* CPU s/GB: user+sys CPU time of the tunnel processes (ssh + sshd and its children; the two
  punchgate nodes, plus the relay node for the relayed path) read from /proc/<pid>/stat before
  and after each throughput run, summed and divided by the GB (10^9 bytes) moved.

The sink and echo servers run in a helper process (this script with ``--serve``), so the
sender does not share a GIL with them. Paths are measured one after another, each with only
its own processes running. Every process started is stopped by its PID at the end, also on
errors and Ctrl+C; every wait is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # runs from a checkout, installed or not

from punchgate.devtools.echo import EchoServer  # noqa: E402
from punchgate.devtools.processes import PunchgateProcess  # noqa: E402
from punchgate.runtime.relay import RELAY_LIMITS  # noqa: E402

CHUNK = 1 << 20
SEED = 20240611
MB = 1_000_000
GB = 1_000_000_000

IO_TIMEOUT = 60.0  # any single socket operation
START_TIMEOUT = 30.0  # a node's start, an sshd's start
SETUP_TIMEOUT = 90.0  # reachability, reservation, DHT publication
FIRST_CONNECT_TIMEOUT = 60.0  # first tunnel connection (resolution, relay, punch)
PUNCH_TIMEOUT = 45.0  # the client's hole punch ends (punchgate bounds it at 25 s)
STOP_TIMEOUT = 10.0
CIRCUIT_LIMIT = RELAY_LIMITS.data  # bytes one relay circuit may carry
CIRCUIT_BUDGET = int(CIRCUIT_LIMIT * 0.95)  # headroom for Noise/Yamux framing and echo traffic

COLUMNS = ("raw", "ssh", "direct", "relayed", "quic")
PATHS = (*COLUMNS, "udp", "proxy")  # what --paths can choose
TITLES = {
    "raw": "raw TCP",
    "ssh": "ssh -L",
    "direct": "pg direct TCP",
    "relayed": "pg relayed",
    "quic": "pg direct QUIC",
}

BASE_CHUNK = random.Random(SEED).randbytes(CHUNK)
_digests: dict[int, str] = {}
HELPER_PORTS: dict[str, int] = {}  # the helper process's servers, by name


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# the helper process: sink and echo servers


class SinkServer:
    """Counts and hashes every byte; at the client's half-close answers ``SINK total sha256``."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        digest = hashlib.sha256()
        total = 0
        with conn:
            try:
                conn.settimeout(IO_TIMEOUT * 5)
                while n := conn.recv_into(buf):
                    digest.update(view[:n])
                    total += n
                conn.sendall(f"SINK {total} {digest.hexdigest()}\n".encode())
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass


UDP_HEADER = 12  # run, sequence, size: three u32 big-endian


class UdpSink:
    """Counts datagrams per run: how many, how many bytes, in order, whole; first and last
    arrival (monotonic clock, shared by processes on one machine). ``STATS <run>`` on its
    TCP port answers the counts as one JSON line."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.runs: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.stats_server = socket.create_server(("127.0.0.1", 0))
        self.stats_port: int = self.stats_server.getsockname()[1]
        threading.Thread(target=self._receive, daemon=True).start()
        threading.Thread(target=self._answer, daemon=True).start()

    def _receive(self) -> None:
        buf = bytearray(70000)
        while True:
            n = self.sock.recv_into(buf)
            now = time.monotonic()
            if n < UDP_HEADER:
                continue
            run, seq, size = int.from_bytes(buf[0:4], "big"), int.from_bytes(buf[4:8], "big"), int.from_bytes(buf[8:12], "big")
            with self.lock:
                r = self.runs.setdefault(run, {"received": 0, "bytes": 0, "first": now, "last": now,
                                               "next_seq": 0, "out_of_order": 0, "cut": 0})
                r["received"] += 1
                r["bytes"] += n
                r["last"] = now
                if seq < r["next_seq"]:
                    r["out_of_order"] += 1
                r["next_seq"] = max(r["next_seq"], seq + 1)
                if n != size:
                    r["cut"] += 1

    def _answer(self) -> None:
        while True:
            conn, _ = self.stats_server.accept()
            with conn:
                try:
                    words = conn.recv(100).split()
                    with self.lock:
                        counts = dict(self.runs.get(int(words[1]), {"received": 0}))
                    conn.sendall(json.dumps(counts).encode() + b"\n")
                except (OSError, IndexError, ValueError):
                    pass


def serve_main() -> int:
    """``--serve``: run the servers, print their ports as one JSON line, live until stdin ends."""
    sink = SinkServer()
    udp = UdpSink()
    with EchoServer("127.0.0.1", 0) as echo:
        print(json.dumps({"sink": sink.port, "echo": echo.port, "udp_sink": udp.port, "udp_stats": udp.stats_port}),
              flush=True)
        try:
            sys.stdin.read()  # the parent closes our stdin (or dies) when done
        except KeyboardInterrupt:
            pass
    return 0


# --------------------------------------------------------------------------------------------
# processes: bounded starts and stops, by PID


class Cleanup:
    """Stop actions run in reverse order; each one runs even if an earlier one failed."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def add(self, label: str, action: Callable[[], None]) -> None:
        self._actions.append((label, action))

    def run(self) -> None:
        while self._actions:
            label, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # keep stopping the rest
                print(f"cleanup: {label}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def stop_popen(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def stop_punchgate(node: PunchgateProcess, log_file: Path | None = None) -> None:
    try:
        if node.proc.poll() is None:
            try:
                node.terminate_and_wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                node.kill()
    finally:
        if log_file is not None:
            try:
                log_file.write_text(node.log_text() + "\n")
            except Exception:
                pass


def _proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, utime+stime+cutime+cstime in ticks, comm) of a live process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), sum(int(x) for x in rest[11:15]), comm


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def cpu_seconds(roots: list[int]) -> float:
    """User+sys CPU seconds of ``roots`` and their descendants (reaped children included)."""
    ticks = 0
    for root in roots:
        for pid in process_tree(root):
            stat = _proc_stat(pid)
            if stat is not None:
                ticks += stat[1]
    return ticks / os.sysconf("SC_CLK_TCK")


def stop_tree(proc: subprocess.Popen, name: str) -> None:
    """Stop ``proc``, then any of its descendants (still called ``name``) that outlived it."""
    descendants = [p for p in process_tree(proc.pid) if p != proc.pid]
    stop_popen(proc)
    for pid in descendants:
        stat = _proc_stat(pid)
        if stat is not None and name in stat[2]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}


def short_error(exc: BaseException, lines: int = 6) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return " | ".join(text[:1] + (text[-lines:] if len(text) > 1 else []))[:900]


# --------------------------------------------------------------------------------------------
# measurements


def stream_chunks(size: int):
    """The payload: 1 MiB chunks of seeded random bytes, the first 8 bytes of each its index."""
    buf = bytearray(BASE_CHUNK)
    view = memoryview(buf)
    sent, index = 0, 0
    while sent < size:
        n = min(CHUNK, size - sent)
        buf[0:8] = index.to_bytes(8, "big")
        yield view[:n]
        sent += n
        index += 1


def expected_digest(size: int) -> str:
    if size not in _digests:
        digest = hashlib.sha256()
        for chunk in stream_chunks(size):
            digest.update(chunk)
        _digests[size] = digest.hexdigest()
    return _digests[size]


def transfer(port: int, size: int) -> dict:
    """One one-way transfer to the sink; the result says whether it arrived intact."""
    expected = expected_digest(size)
    deadline = 120.0 + size / (2 * MB)  # no path here is slower than 2 MB/s
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        for chunk in stream_chunks(size):
            conn.sendall(chunk)
            if time.perf_counter() - started > deadline:
                raise TimeoutError(f"transfer took over {deadline:.0f} s")
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 200:
            data = conn.recv(256)
            if not data:
                break
            answer += data
    seconds = time.perf_counter() - started
    parts = answer.split()
    if len(parts) != 3 or parts[0] != b"SINK":
        return {"ok": False, "error": f"no answer from the sink (got {answer[:80]!r})", "seconds": seconds}
    received, digest = int(parts[1]), parts[2].decode()
    ok = received == size and digest == expected
    return {
        "ok": ok,
        "seconds": round(seconds, 4),
        "mb_s": round(size / MB / seconds, 2),
        "sent": size,
        "received": received,
        "sha256_sent": expected,
        "sha256_received": digest,
        "error": None if ok else "received bytes differ from sent bytes",
    }


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += more
    return data


def round_trips(port: int, count: int, warmup: int = 50) -> list[float]:
    """Seconds per 1-byte echo round trip on one open connection."""
    samples = []
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + count):
            started = time.perf_counter()
            conn.sendall(b"r")
            _recv_exactly(conn, 1)
            if i >= warmup:
                samples.append(time.perf_counter() - started)
    return samples


def first_echo(port: int, timeout: float = IO_TIMEOUT) -> float:
    """Seconds from a new connect() to the first echoed byte."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"s")
        _recv_exactly(conn, 1)
        return time.perf_counter() - started


def setups(port: int, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        samples.append(first_echo(port))
        time.sleep(0.02)  # let the previous session close (not measured)
    return samples


def retry_until(attempt: Callable[[float], str | None], what: str, timeout: float, alive: Callable[[], str | None]) -> None:
    """Call ``attempt(time_left)`` every 0.5 s until it returns None (success) or ``timeout``
    passes; it returns why it failed. ``alive`` names a helper process that died."""
    deadline = time.monotonic() + timeout
    last = "never tried"
    while time.monotonic() < deadline:
        dead = alive()
        if dead:
            raise RuntimeError(dead)
        try:
            failure = attempt(deadline - time.monotonic())
        except OSError as exc:  # refused (not listening yet), closed (tunnel refused), timeout
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None:
            return
        last = failure
        time.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout:.0f} s ({last})")


def wait_until_echoes(port: int, timeout: float, alive: Callable[[], str | None]) -> None:
    """Retry a 1-byte echo through ``port`` until it works."""

    def attempt(left: float) -> None:
        first_echo(port, timeout=max(1.0, min(30.0, left)))

    retry_until(attempt, f"echo through 127.0.0.1:{port}", timeout, alive)


def wait_until_sinks(port: int, timeout: float, alive: Callable[[], str | None]) -> None:
    """Retry a 1 MiB transfer to the sink through ``port`` until one arrives intact."""

    def attempt(left: float) -> str | None:
        result = transfer(port, CHUNK)
        return None if result["ok"] else str(result.get("error"))

    retry_until(attempt, f"intact transfer through 127.0.0.1:{port}", timeout, alive)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


# --------------------------------------------------------------------------------------------
# paths


class PathRun:
    """A started path: where to connect, which processes carry it, hooks around transfers."""

    sink_port: int
    echo_port: int
    notes: list[str]

    def tunnel_pids(self) -> list[int]:
        return []

    def before_transfer(self, size: int) -> None:
        pass

    def after_transfer(self, size: int) -> None:
        pass

    def tunnel_events_mark(self) -> int:
        return 0

    def logged_setup_ms(self, mark: int) -> list[float]:
        return []

    def paths_seen(self) -> list[str]:
        return []


class RawPath(PathRun):
    def __init__(self, sink: int, echo: int) -> None:
        self.sink_port, self.echo_port, self.notes = sink, echo, []


def _opened_events(node: PunchgateProcess) -> list[dict]:
    node.log_text()  # take in what has arrived
    return [e for e in node.events() if e.get("event") == "client tunnel opened"]


class PunchgatePath(PathRun):
    """Shared by direct and relayed: the client node's log says how each tunnel was set up."""

    def __init__(self) -> None:
        self.notes = []
        self.client: PunchgateProcess | None = None
        self.former_clients: list[PunchgateProcess] = []
        self.carriers: list[PunchgateProcess] = []  # provider (and relay)

    def tunnel_pids(self) -> list[int]:
        assert self.client is not None
        return [self.client.pid] + [n.pid for n in self.carriers]

    def tunnel_events_mark(self) -> int:
        assert self.client is not None
        return len(_opened_events(self.client))

    def logged_setup_ms(self, mark: int) -> list[float]:
        assert self.client is not None
        return [float(e["setup_ms"]) for e in _opened_events(self.client)[mark:] if "setup_ms" in e]

    def paths_seen(self) -> list[str]:
        seen: list[str] = []
        for node in [*self.former_clients, *([self.client] if self.client else [])]:
            for event in _opened_events(node):
                if event.get("path") not in seen:
                    seen.append(event.get("path"))
        return seen

    def check_alive(self) -> str | None:
        for node in [*self.carriers, *([self.client] if self.client else [])]:
            if node.proc.poll() is not None:
                return f"a punchgate node exited ({node.proc.returncode}); last log:\n{node.log_text(last=8)}"
        return None


def start_direct(workdir: Path, sink: int, echo: int, cleanup: Cleanup, transport: str = "tcp") -> PunchgatePath:
    """Provider and client on loopback, both listening on ``transport`` only ("tcp" or "quic")."""
    path = PunchgatePath()
    listen, marker = ("/ip4/127.0.0.1/tcp/0", "/tcp/") if transport == "tcp" else ("/ip4/127.0.0.1/udp/0/quic-v1", "/quic-v1")
    common = ("--listen", listen, "--no-mdns")
    name = "direct" if transport == "tcp" else "quic"
    provider = PunchgateProcess(
        "--identity", str(workdir / f"{name}-provider.key"), *common,
        "--expose", f"sink=127.0.0.1:{sink}", "--expose", f"echo=127.0.0.1:{echo}",
        env=node_env(),
    )
    cleanup.add(f"{name} provider", lambda: stop_punchgate(provider, workdir / f"{name}-provider.log"))
    path.carriers.append(provider)
    provider_id = provider.wait_event("punchgate starting", START_TIMEOUT)["peer_id"]
    provider_addr = provider.wait_for(
        lambda e: e.get("event") == "listening on" and marker in e.get("address", ""), START_TIMEOUT
    )["address"]
    path.sink_port, path.echo_port = free_port(), free_port()
    client = PunchgateProcess(
        "--identity", str(workdir / f"{name}-client.key"), *common, "--bootstrap", provider_addr,
        "--tunnel", f"{provider_id}:sink@127.0.0.1:{path.sink_port}",
        "--tunnel", f"{provider_id}:echo@127.0.0.1:{path.echo_port}",
        env=node_env(),
    )
    cleanup.add(f"{name} client", lambda: stop_punchgate(client, workdir / f"{name}-client.log"))
    path.client = client
    client.wait_event("phase transition", START_TIMEOUT, to_phase="ready")
    wait_until_echoes(path.echo_port, FIRST_CONNECT_TIMEOUT, path.check_alive)
    wait_until_sinks(path.sink_port, FIRST_CONNECT_TIMEOUT, path.check_alive)
    return path


def iptables_available() -> str | None:
    """None if we can add loopback REJECT rules, else why not."""
    if os.geteuid() != 0:
        return "needs root (iptables rules on lo keep the two peers from dialing each other directly)"
    if shutil.which("iptables") is None:
        return "needs iptables (apt-get install -y iptables) to keep the two peers from dialing each other"
    probe = subprocess.run(["iptables", "-S", "INPUT"], check=False, capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        return f"iptables does not work here: {probe.stderr.strip()[:200]}"
    return None


class LoopbackBlock:
    """iptables rules REJECTing (TCP RST) new connections to given ports on lo."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.rules: list[list[str]] = []

    def block(self, port: int) -> None:
        rule = [
            "INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "--syn",
            "-m", "comment", "--comment", self.tag, "-j", "REJECT", "--reject-with", "tcp-reset",
        ]
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True, timeout=20)
        self.rules.append(rule)

    def remove_all(self) -> None:
        while self.rules:
            rule = self.rules.pop()
            subprocess.run(["iptables", "-D", *rule], check=False, capture_output=True, timeout=20)


class RelayedPath(PunchgatePath):
    def __init__(self, workdir: Path, cleanup: Cleanup, blocks: LoopbackBlock) -> None:
        super().__init__()
        self.workdir = workdir
        self.cleanup = cleanup
        self.blocks = blocks
        self.relay_addr = ""
        self.circuit_bytes = 0
        self.restarts = 0
        self.punches: list[str] = []
        self.sink_port, self.echo_port = free_port(), free_port()

    def start(self, sink: int, echo: int) -> None:
        self.targets = (sink, echo)
        n = self.restarts
        relay = PunchgateProcess(
            "--identity", str(self.workdir / f"relay-{n}.key"), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",
            env=node_env(),
        )
        self.cleanup.add("relay node", lambda: stop_punchgate(relay, self.workdir / f"relay-{n}.log"))
        self.carriers.append(relay)
        self.relay_addr = relay.wait_for(
            lambda e: e.get("event") == "listening on" and "/tcp/" in e.get("address", ""), START_TIMEOUT
        )["address"]
        relay.wait_event("phase transition", START_TIMEOUT, to_phase="ready")

        provider_port = free_port()
        self.blocks.block(provider_port)
        provider = PunchgateProcess(
            "--identity", str(self.workdir / f"relayed-provider-{n}.key"),
            "--listen", f"/ip4/127.0.0.1/tcp/{provider_port}", "--no-mdns", "--bootstrap", self.relay_addr,
            "--expose", f"sink=127.0.0.1:{sink}", "--expose", f"echo=127.0.0.1:{echo}",
            env=node_env(),
        )
        self.cleanup.add(
            "relayed provider", lambda: stop_punchgate(provider, self.workdir / f"relayed-provider-{n}.log")
        )
        self.carriers.append(provider)
        provider.wait_event("reachability", SETUP_TIMEOUT, status="private")
        provider.wait_event("relay reservation accepted", SETUP_TIMEOUT)
        for service in ("sink", "echo"):
            provider.wait_for(
                lambda e, s=service: e.get("event") == "service published"
                and e.get("service") == s
                and any("p2p-circuit" in a for a in e.get("addresses") or []),
                SETUP_TIMEOUT,
            )
        self.start_client()

    def restart(self) -> None:
        """A fresh relay, provider and client (new identities, new circuit), nothing left over."""
        assert self.client is not None
        n = self.restarts
        stop_punchgate(self.client, self.workdir / f"relayed-client-{n}.log")
        self.former_clients.append(self.client)
        for node, name in zip(self.carriers, ("relay", "relayed-provider")):
            stop_punchgate(node, self.workdir / f"{name}-{n}.log")
        self.carriers, self.client = [], None
        self.restarts += 1
        self.start(*self.targets)

    def start_client(self) -> None:
        client_port = free_port()
        self.blocks.block(client_port)
        client = PunchgateProcess(
            "--identity", str(self.workdir / f"relayed-client-{self.restarts}.key"),
            "--listen", f"/ip4/127.0.0.1/tcp/{client_port}", "--no-mdns", "--bootstrap", self.relay_addr,
            "--tunnel-by-name", f"sink@127.0.0.1:{self.sink_port}",
            "--tunnel-by-name", f"echo@127.0.0.1:{self.echo_port}",
            env=node_env(),
        )
        number = self.restarts
        self.cleanup.add(
            f"relayed client {number}",
            lambda: stop_punchgate(client, self.workdir / f"relayed-client-{number}.log"),
        )
        self.client = client
        self.circuit_bytes = 0
        client.wait_event("phase transition", START_TIMEOUT, to_phase="ready")
        # The first connection resolves the service, dials through the relay and tries a punch.
        wait_until_echoes(self.echo_port, FIRST_CONNECT_TIMEOUT, self.check_alive)
        wait_until_sinks(self.sink_port, FIRST_CONNECT_TIMEOUT, self.check_alive)  # resolves "sink"
        self.circuit_bytes += CHUNK
        # Measure the steady state: while the punch runs, each new tunnel waits for it (up to
        # PUNCH_WAIT); once it has failed, tunnels take the relay at once for RETRY_AFTER.
        punch = client.wait_event("hole punch", PUNCH_TIMEOUT)
        if punch.get("outcome") == "direct":
            raise RuntimeError("the hole punch made a direct connection; cannot force the relayed path")
        why = f" ({punch['reason']})" if punch.get("reason") else ""
        self.punches.append(f"{punch.get('outcome')} after {punch.get('duration_ms')} ms{why}")
        paths = {e.get("path") for e in _opened_events(client)}
        if paths != {"relayed"}:
            raise RuntimeError(
                f"tunnels did not ride the relay (paths {sorted(map(str, paths))}); blocking direct "
                "dials on loopback did not force the relayed path"
            )

    def before_transfer(self, size: int) -> None:
        if self.circuit_bytes + size > CIRCUIT_BUDGET:
            self.restart()

    def after_transfer(self, size: int) -> None:
        self.circuit_bytes += size


class SshPath(PathRun):
    def __init__(self) -> None:
        self.notes = []
        self.sshd: subprocess.Popen | None = None
        self.ssh: subprocess.Popen | None = None

    def tunnel_pids(self) -> list[int]:
        assert self.sshd is not None and self.ssh is not None
        return [self.sshd.pid, self.ssh.pid]


def ssh_missing() -> str | None:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None:
        return "OpenSSH server not installed; install it with: apt-get install -y openssh-server"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} not found; install it with: apt-get install -y openssh-client"
    if os.geteuid() != 0:
        return "needs root (the throwaway sshd runs as root and lets root in with a temp key)"
    return None


def ssh_versions() -> dict:
    version = subprocess.run(["ssh", "-V"], check=False, capture_output=True, text=True, timeout=10).stderr.strip()
    config = subprocess.run(
        ["ssh", "-F", "/dev/null", "-G", "127.0.0.1"], check=False, capture_output=True, text=True, timeout=10
    ).stdout
    ciphers = next((line.split()[1] for line in config.splitlines() if line.startswith("ciphers ")), "")
    return {"version": version, "cipher": ciphers.split(",")[0] if ciphers else "default"}


def start_ssh(workdir: Path, sink: int, echo: int, cleanup: Cleanup) -> SshPath:
    path = SshPath()
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    d = workdir / "ssh"
    d.mkdir()
    for name in ("host_ed25519", "client_ed25519"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"bench-{name}", "-f", str(d / name)],
            check=True, capture_output=True, timeout=30,
        )
    shutil.copy(d / "client_ed25519.pub", d / "authorized_keys")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    ssh_port = free_port()
    (d / "sshd_config").write_text(
        "\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {ssh_port}",
            f"HostKey {d / 'host_ed25519'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            f"PidFile {d / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel INFO",
        ]) + "\n"
    )
    sshd_log = open(d / "sshd.log", "w")
    path.sshd = subprocess.Popen(
        [sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")],
        stdin=subprocess.DEVNULL, stdout=sshd_log, stderr=subprocess.STDOUT,
    )
    sshd = path.sshd
    cleanup.add("sshd", lambda: (stop_tree(sshd, "sshd"), sshd_log.close()))
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if sshd.poll() is not None:
            raise RuntimeError(f"sshd exited ({sshd.returncode}): {(d / 'sshd.log').read_text()[-600:]}")
        try:
            socket.create_connection(("127.0.0.1", ssh_port), timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sshd did not listen on 127.0.0.1:{ssh_port} within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    path.sink_port, path.echo_port = free_port(), free_port()
    ssh_log = open(d / "ssh.log", "w")
    path.ssh = subprocess.Popen(
        [
            "ssh", "-F", "/dev/null", "-N",
            "-L", f"{path.sink_port}:127.0.0.1:{sink}",
            "-L", f"{path.echo_port}:127.0.0.1:{echo}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "IdentitiesOnly=yes",
            "-o", "LogLevel=ERROR",
            "-i", str(d / "client_ed25519"), "-p", str(ssh_port), "root@127.0.0.1",
        ],
        stdin=subprocess.DEVNULL, stdout=ssh_log, stderr=subprocess.STDOUT,
    )
    ssh = path.ssh
    cleanup.add("ssh client", lambda: (stop_popen(ssh), ssh_log.close()))

    def dead() -> str | None:
        if ssh.poll() is not None:
            return f"ssh exited ({ssh.returncode}): {(d / 'ssh.log').read_text()[-600:]}"
        if sshd.poll() is not None:
            return f"sshd exited ({sshd.returncode}): {(d / 'sshd.log').read_text()[-600:]}"
        return None

    wait_until_echoes(path.echo_port, START_TIMEOUT, dead)
    wait_until_sinks(path.sink_port, START_TIMEOUT, dead)
    return path


# --------------------------------------------------------------------------------------------
# one path, measured


def measure(run: PathRun, size: int, runs: int, rtt_count: int, setup_count: int) -> dict:
    started = time.monotonic()
    rtts = round_trips(run.echo_port, rtt_count)
    say(f"    RTT: median {statistics.median(rtts) * 1000:.3f} ms ({time.monotonic() - started:.1f} s)")
    started = time.monotonic()
    mark = run.tunnel_events_mark()
    setup = setups(run.echo_port, setup_count)
    logged = run.logged_setup_ms(mark)
    say(f"    setup: median {statistics.median(setup) * 1000:.2f} ms ({time.monotonic() - started:.1f} s)")
    transfers, cpu, moved = [], 0.0, 0
    for number in range(runs):
        run.before_transfer(size)
        pids = run.tunnel_pids()
        before = cpu_seconds(pids)
        started = time.monotonic()
        try:
            result = transfer(run.sink_port, size)
        except Exception as exc:  # timeout, reset: the run failed, the others may not
            result = {"ok": False, "error": short_error(exc)}
        used = cpu_seconds(pids) - before
        result["wall_s"] = round(time.monotonic() - started, 2)
        run.after_transfer(size)
        result["cpu_s"] = round(used, 3)
        result["run"] = number + 1
        transfers.append(result)
        if result["ok"]:
            cpu += used
            moved += size
        say(
            f"    run {number + 1}/{runs}: "
            + (f"{result['mb_s']:.1f} MB/s, sha256 ok, tunnel CPU {used:.2f} s" if result["ok"]
               else f"FAILED: {result.get('error')}")
        )
    good = [t["mb_s"] for t in transfers if t["ok"]]
    return {
        "throughput_mb_s": statistics.median(good) if good else None,
        "throughput_runs_mb_s": [t.get("mb_s") for t in transfers],
        "transfers_ok": sum(t["ok"] for t in transfers),
        "transfers": transfers,
        "rtt_ms_median": statistics.median(rtts) * 1000,
        "rtt_ms_p99": p99(rtts) * 1000,
        "rtt_count": len(rtts),
        "setup_ms_median": statistics.median(setup) * 1000,
        "setup_ms_max": max(setup) * 1000,
        "setup_count": len(setup),
        "logged_setup_ms_median": statistics.median(logged) if logged else None,
        "cpu_s_per_gb": (cpu / (moved / GB)) if moved and run.tunnel_pids() else None,
        "cpu_s_total": round(cpu, 3),
        "bytes_moved": moved,
        "paths_seen": run.paths_seen(),
    }


# --------------------------------------------------------------------------------------------
# UDP and proxy entries


class EntriesPath:
    """Provider exposing the echo server and the UDP sink; client with a UDP tunnel, a TCP
    tunnel (the baseline for setup) and the proxy, and a control socket for its counters."""

    def __init__(self) -> None:
        self.provider: PunchgateProcess | None = None
        self.client: PunchgateProcess | None = None
        self.provider_id = ""
        self.udp_port = self.echo_port = self.proxy_port = 0
        self.client_socket = self.provider_socket = Path()

    def check_alive(self) -> str | None:
        for node in (self.provider, self.client):
            if node is not None and node.proc.poll() is not None:
                return f"a punchgate node exited ({node.proc.returncode}); last log:\n{node.log_text(last=8)}"
        return None

    def dropped(self) -> tuple[int, int]:
        """(client tunnel, provider service) datagrams dropped so far, from their status."""
        from punchgate.status import query

        client = query(self.client_socket)["tunnels"]
        provider = query(self.provider_socket)["services"]
        return (
            sum(t.get("dropped", 0) for t in client if t.get("transport") == "udp"),
            sum(s.get("dropped", 0) for s in provider if s.get("transport") == "udp"),
        )


def start_entries(workdir: Path, echo: int, udp_sink: int, cleanup: Cleanup) -> EntriesPath:
    path = EntriesPath()
    common = ("--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns")
    path.provider_socket, path.client_socket = workdir / "entries-provider.sock", workdir / "entries-client.sock"
    provider = path.provider = PunchgateProcess(
        "--identity", str(workdir / "entries-provider.key"), *common, "--control-socket", str(path.provider_socket),
        "--expose", f"echo=127.0.0.1:{echo}", "--expose", f"usink=127.0.0.1:{udp_sink}/udp",
        env=node_env(),
    )
    cleanup.add("entries provider", lambda: stop_punchgate(provider, workdir / "entries-provider.log"))
    path.provider_id = provider.wait_event("punchgate starting", START_TIMEOUT)["peer_id"]
    address = provider.wait_for(
        lambda e: e.get("event") == "listening on" and "/tcp/" in e.get("address", ""), START_TIMEOUT
    )["address"]
    path.udp_port, path.echo_port, path.proxy_port = free_udp_port(), free_port(), free_port()
    client = path.client = PunchgateProcess(
        "--identity", str(workdir / "entries-client.key"), *common, "--bootstrap", address,
        "--control-socket", str(path.client_socket),
        "--tunnel", f"{path.provider_id}:usink@127.0.0.1:{path.udp_port}/udp",
        "--tunnel", f"{path.provider_id}:echo@127.0.0.1:{path.echo_port}",
        "--proxy", f"127.0.0.1:{path.proxy_port}",
        env=node_env(),
    )
    cleanup.add("entries client", lambda: stop_punchgate(client, workdir / "entries-client.log"))
    client.wait_event("phase transition", START_TIMEOUT, to_phase="ready")
    wait_until_echoes(path.echo_port, FIRST_CONNECT_TIMEOUT, path.check_alive)
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_runs = iter(range(1, 1 << 30))


def udp_counts(run: int) -> dict:
    with socket.create_connection(("127.0.0.1", HELPER_PORTS["udp_stats"]), timeout=IO_TIMEOUT) as conn:
        conn.sendall(f"STATS {run}\n".encode())
        answer = b""
        while not answer.endswith(b"\n") and (data := conn.recv(4096)):
            answer += data
    return json.loads(answer)


def udp_step(port: int, size: int, rate: float | None, seconds: float) -> dict:
    """Send ``rate``/s (None: as fast as possible) datagrams of ``size`` B for ``seconds``;
    wait until the sink stops counting; the step's figures."""
    run = next(_runs)
    payload = bytearray(random.Random(run).randbytes(size))
    payload[0:4], payload[8:12] = run.to_bytes(4, "big"), size.to_bytes(4, "big")
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect(("127.0.0.1", port))
        started = time.monotonic()
        end = started + seconds
        while (now := time.monotonic()) < end:
            due = int((now - started) * rate) + 1 if rate is not None else sent + 256
            while sent < due:
                payload[4:8] = sent.to_bytes(4, "big")
                try:
                    sock.send(payload)
                except OSError:  # ENOBUFS: the sender's own buffer is full; that datagram is lost here
                    pass
                sent += 1
            if rate is not None:
                time.sleep(0.0005)
        send_seconds = time.monotonic() - started
    counts, stable = udp_counts(run), 0
    deadline = time.monotonic() + 10
    while stable < 3 and time.monotonic() < deadline:  # the tunnel may still be delivering
        time.sleep(0.1)
        later = udp_counts(run)
        stable = stable + 1 if later.get("received") == counts.get("received") else 0
        counts = later
    received = counts.get("received", 0)
    span = counts["last"] - counts["first"] if received > 1 else 0.0
    return {
        "offered_per_s": round(sent / send_seconds),
        "sent": sent,
        "received": received,
        "delivered_per_s": round(received / span) if span > 0 else None,
        "mb_s": round(counts.get("bytes", 0) / MB / span, 1) if span > 0 else None,
        "loss_pct": round(100 * (1 - received / sent), 3) if sent else None,
        "out_of_order": counts.get("out_of_order", 0),
        "cut": counts.get("cut", 0),
    }


def measure_udp(path: EntriesPath, sink_port: int, size: int, seconds: float, quick: bool) -> dict:
    rates = [5_000, 20_000, 40_000] if quick else [5_000, 10_000, 20_000, 40_000, 60_000, 80_000, 120_000]
    out: dict = {"size": size, "step_seconds": seconds}
    for label, port, carried in (("raw", sink_port, False), ("tunnel", path.udp_port, True)):
        steps: list[dict] = []
        ladder: list[int | None] = list(rates)
        while ladder or not steps or steps[-1]["offered"] != "unpaced":
            rate = ladder.pop(0) if ladder else None  # the ladder, then always one unpaced step
            before = path.dropped() if carried else (0, 0)
            step = udp_step(port, size, rate, seconds)
            after = path.dropped() if carried else (0, 0)
            step["dropped_client"], step["dropped_provider"] = after[0] - before[0], after[1] - before[1]
            step["offered"] = "unpaced" if rate is None else rate
            steps.append(step)
            shown = "unpaced" if rate is None else f"{rate:,}/s"
            say(f"    UDP {label} {size} B at {shown}: delivered {fmt(step['delivered_per_s'], ',')}/s, "
                f"loss {step['loss_pct']} %" + (f", dropped in punchgate {after[0] - before[0]} (client) "
                                                f"{after[1] - before[1]} (provider)" if carried else ""))
            if rate is not None and (step["loss_pct"] or 0) >= 1.0:
                ladder = []  # past what this path carries: go straight to overload
        clean = [s for s in steps if s["offered"] != "unpaced" and (s["loss_pct"] or 0) < 0.1 and s["delivered_per_s"]]
        best = max(clean, key=lambda s: s["delivered_per_s"]) if clean else None
        out[label] = {
            "steps": steps,
            "lossless_per_s": best["delivered_per_s"] if best else None,
            "lossless_at_top": best is not None and best["offered"] == rates[-1],  # the ladder ended first
            "overload": steps[-1],
        }
    return out


def socks_first_echo(port: int, host: str) -> float:
    """Seconds from connect() to the proxy until one byte came back through SOCKS5 CONNECT."""
    name = host.encode()
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"\x05\x01\x00")
        if _recv_exactly(conn, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 method refused")
        conn.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + (7).to_bytes(2, "big"))
        reply = _recv_exactly(conn, 10)
        if reply[1] != 0:
            raise ConnectionError(f"SOCKS5 reply {reply[1]}")
        conn.sendall(b"s")
        _recv_exactly(conn, 1)
    return time.perf_counter() - started


def http_first_echo(port: int, host: str) -> float:
    """Seconds from connect() to the proxy until one byte came back through HTTP CONNECT."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(f"CONNECT {host}:7 HTTP/1.1\r\nHost: {host}:7\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"\r\n\r\n"):
            answer += _recv_exactly(conn, 1)
        if not answer.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(answer.split(b"\r\n")[0].decode(errors="replace"))
        conn.sendall(b"s")
        _recv_exactly(conn, 1)
    return time.perf_counter() - started


def measure_proxy(path: EntriesPath, count: int) -> dict:
    ways = {
        "tunnel listener": lambda: first_echo(path.echo_port),
        "SOCKS5 echo.PEER.punchgate": lambda: socks_first_echo(path.proxy_port, f"echo.{path.provider_id}.punchgate"),
        "SOCKS5 echo.punchgate (by name)": lambda: socks_first_echo(path.proxy_port, "echo.punchgate"),
        "HTTP CONNECT echo.PEER.punchgate": lambda: http_first_echo(path.proxy_port, f"echo.{path.provider_id}.punchgate"),
    }
    out = {}
    for label, once in ways.items():
        once()  # warm-up (by name: the first look-up)
        samples = []
        for _ in range(count):
            samples.append(once())
            time.sleep(0.02)  # let the previous session close (not measured)
        out[label] = {"median_ms": statistics.median(samples) * 1000, "max_ms": max(samples) * 1000, "count": count}
        say(f"    setup via {label}: median {out[label]['median_ms']:.2f} ms, max {out[label]['max_ms']:.2f} ms")
    return out


def report_entries(entries: dict) -> None:
    udp = entries.get("udp")
    if udp:
        say()
        rows = [["UDP one way, " + f"{udp['size']} B datagrams", "raw UDP", "pg UDP tunnel"]]
        rows.append(["datagrams/s, loss < 0.1 %"] + [
            (">= " if udp[p].get("lossless_at_top") else "") + fmt(udp[p]["lossless_per_s"], ",") for p in ("raw", "tunnel")
        ])
        rows.append(["overload: offered/s (unpaced)"] + [fmt(udp[p]["overload"]["offered_per_s"], ",") for p in ("raw", "tunnel")])
        rows.append(["overload: delivered/s"] + [fmt(udp[p]["overload"]["delivered_per_s"], ",") for p in ("raw", "tunnel")])
        rows.append(["overload: loss %"] + [fmt(udp[p]["overload"]["loss_pct"], ".1f") for p in ("raw", "tunnel")])
        rows.append(["overload: dropped by punchgate (client/provider)", "-",
                     f"{udp['tunnel']['overload']['dropped_client']}/{udp['tunnel']['overload']['dropped_provider']}"])
        rows.append(["out of order / cut (all steps)", *(
            f"{sum(s['out_of_order'] for s in udp[p]['steps'])}/{sum(s['cut'] for s in udp[p]['steps'])}"
            for p in ("raw", "tunnel"))])
        print_table(rows)
    proxy = entries.get("proxy")
    if proxy:
        say()
        rows = [["setup connect->1st echo", "median ms", "max ms"]]
        for label, figures in proxy.items():
            rows.append([label, f"{figures['median_ms']:.2f}", f"{figures['max_ms']:.2f}"])
        print_table(rows)


# --------------------------------------------------------------------------------------------
# report


def fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def targets(results: dict[str, dict], na: dict[str, str]) -> list[dict]:
    def metric(column: str, key: str):
        return results.get(column, {}).get(key)

    def reason(*columns: str) -> str:
        return "; ".join(f"{TITLES[c]}: {na[c]}" for c in columns if c in na) or "not measured"

    rows = []

    def add(name: str, value, goal: float, at_most: bool, unit: str, needs: tuple[str, ...]) -> None:
        if value is None:
            rows.append({"target": name, "value": None, "goal": goal, "result": "n/a", "reason": reason(*needs)})
            return
        ok = value <= goal if at_most else value >= goal
        rows.append({"target": name, "value": value, "unit": unit, "goal": goal, "result": "pass" if ok else "miss"})

    add("direct TCP throughput >= 2x ssh",
        ratio(metric("direct", "throughput_mb_s"), metric("ssh", "throughput_mb_s")), 2.0, False, "x",
        ("direct", "ssh"))
    add("relayed throughput >= 0.5x direct",
        ratio(metric("relayed", "throughput_mb_s"), metric("direct", "throughput_mb_s")), 0.5, False, "x",
        ("relayed", "direct"))
    add("QUIC throughput >= 100 MB/s",
        metric("quic", "throughput_mb_s"), 100.0, False, " MB/s", ("quic",))
    add("direct TCP RTT (median) <= 1.5x ssh",
        ratio(metric("direct", "rtt_ms_median"), metric("ssh", "rtt_ms_median")), 1.5, True, "x",
        ("direct", "ssh"))
    add("QUIC RTT (median) <= 2x direct TCP",
        ratio(metric("quic", "rtt_ms_median"), metric("direct", "rtt_ms_median")), 2.0, True, "x",
        ("quic", "direct"))
    add("setup on an existing peer connection <= 5 ms",
        metric("direct", "setup_ms_median"), 5.0, True, " ms", ("direct",))
    add("CPU/GB <= ssh",
        ratio(metric("direct", "cpu_s_per_gb"), metric("ssh", "cpu_s_per_gb")), 1.0, True, "x",
        ("direct", "ssh"))
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        say("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            say("  ".join("-" * w for w in widths))


def report(results: dict[str, dict], na: dict[str, str], size: int, runs: int) -> list[dict]:
    def row(label: str, key: str, spec: str = ".1f") -> list[str]:
        return [label] + [("n/a" if c in na else fmt(results.get(c, {}).get(key), spec)) for c in COLUMNS]

    def ok_cell(c: str) -> str:
        if c in na:
            return "n/a"
        r = results[c]
        return f"{r['transfers_ok']}/{len(r['transfers'])}"

    setup_n = next((r["setup_count"] for r in results.values()), 0)
    rtt_n = next((r["rtt_count"] for r in results.values()), 0)
    table = [
        ["metric"] + [TITLES[c] for c in COLUMNS],
        row(f"throughput MB/s (median of {runs}, {size / MB:g} MB)", "throughput_mb_s"),
        ["  runs MB/s"] + [
            "n/a" if c in na else "/".join(fmt(v, ".0f") for v in results[c]["throughput_runs_mb_s"])
            for c in COLUMNS
        ],
        ["  sha256 verified"] + [ok_cell(c) for c in COLUMNS],
        row(f"RTT 1 B median ms (of {rtt_n})", "rtt_ms_median", ".3f"),
        row("RTT 1 B p99 ms", "rtt_ms_p99", ".3f"),
        row(f"setup connect->1st echo median ms (of {setup_n})", "setup_ms_median", ".2f"),
        row("setup max ms", "setup_ms_max", ".2f"),
        row("setup_ms in client log (median)", "logged_setup_ms_median", ".2f"),
        row("tunnel CPU s per GB", "cpu_s_per_gb", ".2f"),
    ]
    say()
    print_table(table)

    say()
    ssh = results.get("ssh") if "ssh" not in na else None
    ratio_rows = [["ratio vs ssh -L"] + [TITLES[c] for c in COLUMNS]]
    for label, key in (("throughput / ssh", "throughput_mb_s"), ("RTT median / ssh", "rtt_ms_median"),
                       ("CPU per GB / ssh", "cpu_s_per_gb")):
        cells = []
        for c in COLUMNS:
            value = None if c in na or ssh is None else ratio(results[c].get(key), ssh.get(key))
            cells.append(fmt(value, ".2f") + ("x" if value is not None else ""))
        ratio_rows.append([label] + cells)
    print_table(ratio_rows)

    rows = targets(results, na)
    say()
    target_rows = [["target", "measured", "result"]]
    for t in rows:
        measured = "n/a" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        target_rows.append([t["target"], measured, t["result"]])
    print_table(target_rows)

    notes = [f"{TITLES[c]}: n/a: {na[c]}" for c in COLUMNS if c in na]
    for c in COLUMNS:
        if c not in na and results[c].get("notes"):
            notes.extend(f"{TITLES[c]}: {n}" for n in results[c]["notes"])
    for t in rows:
        if t["result"] == "n/a":
            notes.append(f"target '{t['target']}': n/a ({t['reason']})")
    if notes:
        say()
        for n in notes:
            say(f"* {n}")
    return rows


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark raw TCP, ssh -L and punchgate tunnels (direct TCP, relayed, direct QUIC) on loopback."
    )
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON to FILE")
    parser.add_argument("--size-mb", type=float, default=None, help="MB (10^6 B) per transfer (default 500)")
    parser.add_argument("--runs", type=int, default=None, help="transfers per path (default 3)")
    parser.add_argument("--rtt-count", type=int, default=None, help="1-byte round trips (default 2000)")
    parser.add_argument("--setup-count", type=int, default=None, help="fresh connections (default 50)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 MB, 1 run, 200 RTTs, 10 setups")
    parser.add_argument(
        "--paths", default=",".join(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)} to measure (default all)",
    )
    parser.add_argument("--udp-size", type=int, default=1200, help="UDP datagram size in bytes (default 1200)")
    parser.add_argument("--udp-seconds", type=float, default=None, help="seconds per UDP rate step (default 2)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the helper process
    args = parser.parse_args(argv)
    defaults = (20, 1, 200, 10) if args.quick else (500, 3, 2000, 50)
    for name, default in zip(("size_mb", "runs", "rtt_count", "setup_count"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.size_mb <= 0 or args.runs < 1 or args.rtt_count < 1 or args.setup_count < 1:
        parser.error("--size-mb, --runs, --rtt-count and --setup-count must be positive")
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown := [p for p in args.paths if p not in PATHS]:
        parser.error(f"--paths: unknown {', '.join(unknown)} (choose from {','.join(PATHS)})")
    if not 12 <= args.udp_size <= 65507:
        parser.error("--udp-size must be 12-65507 (a 12-byte header; the largest IPv4 UDP payload)")
    if args.udp_seconds is None:
        args.udp_seconds = 1.0 if args.quick else 2.0
    if args.udp_seconds <= 0:
        parser.error("--udp-seconds must be positive")
    return args


def start_servers(cleanup: Cleanup) -> tuple[int, int]:
    helper = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )

    def stop() -> None:
        try:
            helper.stdin.close()
        except OSError:
            pass
        stop_popen(helper)

    cleanup.add("sink/echo servers", stop)
    ready, _, _ = select.select([helper.stdout], [], [], START_TIMEOUT)
    if not ready:
        raise TimeoutError("the sink/echo helper did not start")
    ports = json.loads(helper.stdout.readline())
    HELPER_PORTS.update(ports)
    return ports["sink"], ports["echo"]


def _interrupt(signum, frame) -> None:
    """SIGINT/SIGTERM: stop through every ``finally``; further signals cannot cut the cleanup short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_main()
    missing = [m for m in ("libp2p", "trio", "structlog") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"{sys.executable} lacks punchgate's dependencies ({', '.join(missing)}); the nodes run with "
            "this python. Use the venv's: .venv/bin/python scripts/bench_tunnel.py "
            "(./scripts/demo.sh creates .venv)",
            file=sys.stderr,
        )
        return 2
    size = int(args.size_mb * MB)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)

    from punchgate import __version__

    info = {
        "python": platform.python_version(),
        "punchgate": __version__,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "size_bytes": size,
        "runs": args.runs,
        "rtt_count": args.rtt_count,
        "setup_count": args.setup_count,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    na: dict[str, str] = {}
    for column in COLUMNS:
        if column not in args.paths:
            na[column] = "not selected (--paths)"
    if "ssh" not in na:
        if missing := ssh_missing():
            na["ssh"] = missing
        else:
            info["ssh"] = ssh_versions()
    if "relayed" not in na and (blocked := iptables_available()):
        na["relayed"] = f"cannot force the relayed path on loopback: {blocked}"

    say(f"punchgate {info['punchgate']} tunnel benchmark: python {info['python']}, {info['cpus']} CPUs, "
        f"{size / MB:g} MB x {args.runs} runs, {args.rtt_count} RTTs, {args.setup_count} setups, 127.0.0.1")
    if "ssh" in info:
        say(f"ssh: {info['ssh']['version']}, default cipher {info['ssh']['cipher']}")
    tcp_selected = any(c in args.paths for c in COLUMNS)  # the table's columns (UDP and proxy apart)
    if tcp_selected:
        say("computing the payload's sha256 ...")
        expected_digest(size)
        expected_digest(CHUNK)

    workdir = Path(tempfile.mkdtemp(prefix="punchgate-bench-"))
    outer = Cleanup()
    results: dict[str, dict] = {}
    entries: dict = {}  # UDP and proxy figures
    failed = False
    started = time.monotonic()
    try:
        sink, echo = start_servers(outer)
        for column in COLUMNS:
            if column in na:
                if tcp_selected:
                    say(f"\n== {TITLES[column]}: n/a ({na[column]})")
                continue
            say(f"\n== {TITLES[column]}")
            cleanup = Cleanup()
            blocks = LoopbackBlock(f"punchgate-bench-{os.getpid()}")
            column_started = time.monotonic()
            try:
                if column == "raw":
                    run: PathRun = RawPath(sink, echo)
                elif column == "ssh":
                    run = start_ssh(workdir, sink, echo, cleanup)
                elif column in ("direct", "quic"):
                    run = start_direct(workdir, sink, echo, cleanup, "tcp" if column == "direct" else "quic")
                else:
                    cleanup.add("iptables rules", blocks.remove_all)
                    relayed = RelayedPath(workdir, cleanup, blocks)
                    run = relayed
                    relayed.start(sink, echo)
                say(f"    started in {time.monotonic() - column_started:.1f} s; measuring")
                result = measure(run, size, args.runs, args.rtt_count, args.setup_count)
                notes = list(run.notes)
                if column in ("direct", "quic") and result["paths_seen"] != ["direct"]:
                    notes.append(f"client log paths: {result['paths_seen']}")
                if column == "quic":
                    assert isinstance(run, PunchgatePath) and run.client is not None
                    transports = {e.get("transport") for e in _opened_events(run.client)}
                    if transports != {"quic"}:
                        raise RuntimeError(f"not every tunnel rode QUIC: transports {sorted(map(str, transports))}")
                    notes.append("every tunnel connection rode a direct QUIC connection (client log transport=quic)")
                if column == "relayed":
                    if result["paths_seen"] != ["relayed"]:
                        raise RuntimeError(f"not every tunnel rode the relay: paths {result['paths_seen']}")
                    notes.append(
                        "every tunnel connection rode the relay (client log path=relayed); direct dials "
                        "between provider and client were refused by iptables on lo; CPU includes the relay node"
                    )
                    notes.append("client hole punch (before measuring): " + "; ".join(relayed.punches))
                    if relayed.restarts:
                        notes.append(
                            f"relay, provider and client restarted {relayed.restarts}x between transfers (new "
                            f"circuit) because a relay circuit carries at most {CIRCUIT_LIMIT >> 20} MiB"
                        )
                if column == "ssh":
                    notes.append(f"CPU is ssh + sshd and its per-connection children; cipher "
                                 f"{info['ssh']['cipher']} (OpenSSH default)")
                if result["transfers_ok"] < len(result["transfers"]):
                    failed = True  # keep the logs
                result["notes"] = notes
                result["seconds"] = round(time.monotonic() - column_started, 1)
                results[column] = result
                say(f"    done in {result['seconds']:.1f} s")
            except Exception as exc:  # one path failing must not lose the others
                failed = True
                na[column] = f"failed: {short_error(exc)}"
                say(f"    FAILED: {na[column]}")
            finally:
                cleanup.run()
                blocks.remove_all()
        if "udp" in args.paths or "proxy" in args.paths:
            say("\n== UDP and proxy entries (direct)")
            cleanup = Cleanup()
            try:
                entry_path = start_entries(workdir, echo, HELPER_PORTS["udp_sink"], cleanup)
                if "udp" in args.paths:
                    entries["udp"] = measure_udp(entry_path, HELPER_PORTS["udp_sink"], args.udp_size,
                                                 args.udp_seconds, args.quick)
                if "proxy" in args.paths:
                    entries["proxy"] = measure_proxy(entry_path, args.setup_count)
            except Exception as exc:  # the TCP results stand on their own
                failed = True
                entries["error"] = short_error(exc)
                say(f"    FAILED: {entries['error']}")
            finally:
                cleanup.run()
    except KeyboardInterrupt:
        failed = True
        say("\ninterrupted; stopping everything")
    finally:
        outer.run()
    for column in COLUMNS:
        if column not in results and column not in na:
            na[column] = "not measured (interrupted)"

    rows = report(results, na, size, args.runs) if tcp_selected else []
    report_entries(entries)
    total = time.monotonic() - started
    say(f"\ntotal {total:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"info": info, "results": results, "not_measured": na, "targets": rows, "entries": entries},
                       indent=2) + "\n"
        )
        say(f"results written to {args.json}")
    if failed:
        say(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
