"""Drives the network-namespace NAT lab (``scripts/netns_lab.sh``) from Python.

The lab is a small internet: ``pub`` (100.64.0.10) is a public node, ``hosta`` and
``hostb`` sit behind their own routers (``rtra``, ``rtrb``: MASQUERADE, or
``--random-fully`` for a symmetric NAT). ``NatLab`` builds one lab, starts punchgate
nodes and helper processes (the echo server, TCP clients) inside its namespaces, reads
their output, and removes it all again. ``tests/test_nat.py`` and
``scripts/bench_nat.py`` use it. The rules:

* every lab has a unique prefix (``unique_prefix``), so labs never meet each other or
  one built by hand;
* every lab is torn down: ``close`` belongs in a ``finally``, and is due as soon as
  ``up`` was called, even if ``up`` failed half-way;
* processes are killed by PID (``ip netns exec`` execs, so the PID is the process
  itself); ``netns_lab.sh down`` then ends whatever is left in the lab's namespaces.
  Nothing is ever killed by name.

Needs root, ``ip`` and ``iptables``, and this repository's ``scripts/`` directory.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from punchgate.devtools.processes import PunchgateProcess

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
LAB_SCRIPT = SCRIPTS / "netns_lab.sh"
ECHO_SERVER = SCRIPTS / "echo_server.py"

# What tests/test_nat_orders.py and scripts/bench_nat.py put a lab through, in this order.
SITUATIONS = (
    "all started at once",
    "provider restarted on another port",
    "relay restarted",
    "client started first",
)

TOPOLOGY_FILE = SCRIPTS / "nat_topology.env"  # the lab's (and compose's) addresses


def read_topology(path: Path = TOPOLOGY_FILE) -> dict[str, str]:
    """The ``KEY=value`` lines of ``scripts/nat_topology.env``."""
    pairs: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key] = value
    return pairs


TOPOLOGY = read_topology()
PUB_IP = TOPOLOGY["PUB_IP"]
NODE_PORT = int(TOPOLOGY["NODE_PORT"])  # every node listens on /ip4/0.0.0.0/tcp/4001 in its namespace (udp/4001 for QUIC)
ECHO_PORT = 7777  # the echo server on hosta's 127.0.0.1
TUNNEL_PORT = 2222  # hostb's local end of the tunnel to the echo service

# A TCP client run inside a namespace:
#   python -c CLIENT_SCRIPT echo PORT SIZE TIMEOUT [STALL_AT STALL_SECONDS]
#   python -c CLIENT_SCRIPT hold PORT TIMEOUT
#   python -c CLIENT_SCRIPT ping PORT TIMEOUT
#   python -c CLIENT_SCRIPT idle PORT IDLE_SECONDS TIMEOUT
#   python -c CLIENT_SCRIPT many PORT COUNT SIZE TIMEOUT
#   python -c CLIENT_SCRIPT sequential PORT COUNT TIMEOUT
#   python -c CLIENT_SCRIPT first PORT SIZE SINCE TIMEOUT
# "echo" sends SIZE random bytes, half-closes, reads everything back (optionally pausing
# its reading for STALL_SECONDS after STALL_AT bytes) and prints one JSON line with both
# sha256 digests. "hold" echoes a short message, prints {"state": "open"}, then waits (at
# most TIMEOUT) for the connection to end and prints {"state": "closed"}. "ping" sends one
# short message and prints one JSON line with the connect and first-echoed-byte times.
# "idle" echoes a message, prints {"state": "open"}, sends nothing for IDLE_SECONDS,
# echoes again and prints how long the connection was idle. "many" runs COUNT
# connections at once, each echoing SIZE random bytes (sha256 compared); "sequential"
# runs COUNT short echo connections one after the other; both print their tallies.
# "first" connects as soon as the port accepts (retrying refusals), echoes SIZE random
# bytes and prints when the first byte came back, in seconds since the Unix time SINCE.
CLIENT_SCRIPT = r"""
import asyncio, hashlib, json, os, socket, sys, threading, time
mode, port = sys.argv[1], int(sys.argv[2])
def out(**fields):
    print(json.dumps(fields), flush=True)
started = time.monotonic()
def echo(conn, message, first_byte=None):
    # Send MESSAGE, read until as many bytes came back or EOF; first_byte(): first data seen.
    conn.sendall(message)
    got = b""
    while len(got) < len(message):
        data = conn.recv(4096)
        if not data:
            break
        if not got and first_byte is not None:
            first_byte()
        got += data
    return got
async def echo_once(payload, limit):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), limit)  # until EOF
    finally:
        writer.close()
async def many(count, size, limit):
    payloads = [os.urandom(size) for _ in range(count)]
    async def one(payload):
        try:
            got = await echo_once(payload, limit)
            return "ok" if hashlib.sha256(got).digest() == hashlib.sha256(payload).digest() else "differs (%d B)" % len(got)
        except Exception as exc:
            return repr(exc)
    results = await asyncio.wait_for(asyncio.gather(*(one(p) for p in payloads)), limit)
    bad = [r for r in results if r != "ok"]
    out(state="done", ok=count - len(bad), bad=bad[:5], total_s=round(time.monotonic() - started, 3))
async def sequential(count, limit):
    failures, first = 0, None
    deadline = time.monotonic() + limit
    done = 0
    for i in range(count):
        if time.monotonic() > deadline:
            break
        message = b"sequential %d" % i
        try:
            if await echo_once(message, 10) != message:
                failures += 1
                first = first or "connection %d: wrong echo" % i
        except Exception as exc:
            failures += 1
            first = first or "connection %d: %r" % (i, exc)
        done += 1
    out(state="done", done=done, failures=failures, first_failure=first, total_s=round(time.monotonic() - started, 3))
if mode == "first":
    # Connect as soon as the tunnel's port accepts (retrying refusals), echo SIZE random bytes,
    # and say when the first byte came back, in wall-clock seconds since SINCE.
    size, since, limit = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    payload = os.urandom(size)
    result = {"error": None, "first_byte_s": None, "done_s": None, "attempts": 0}
    conn = None
    while conn is None and time.time() - since < limit:
        result["attempts"] += 1
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=limit)
        except ConnectionRefusedError:
            time.sleep(0.02)
    if conn is None:
        out(error="never connected", **{k: v for k, v in result.items() if k != "error"})
        sys.exit(0)
    conn.settimeout(max(1.0, limit - (time.time() - since)))
    digest, received = hashlib.sha256(), 0
    def send():
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    threading.Thread(target=send, daemon=True).start()
    try:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            if result["first_byte_s"] is None:
                result["first_byte_s"] = round(time.time() - since, 3)
            digest.update(data)
            received += len(data)
    except OSError as exc:
        result["error"] = repr(exc)
    result["done_s"] = round(time.time() - since, 3)
    ok = received == size and digest.hexdigest() == hashlib.sha256(payload).hexdigest()
    if result["error"] is None and not ok:
        result["error"] = "echo differs (%d of %d B)" % (received, size)
    out(received=received, **result)
    sys.exit(0)
if mode == "many":
    asyncio.run(many(int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])))
    sys.exit(0)
if mode == "sequential":
    asyncio.run(sequential(int(sys.argv[3]), float(sys.argv[4])))
    sys.exit(0)
if mode == "ping":
    limit = float(sys.argv[3])
    message = b"punchgate first byte\n"
    result = {"first_byte_ms": None, "error": None}
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=limit) as conn:
            result["connect_ms"] = round((time.monotonic() - started) * 1000, 2)
            got = echo(conn, message, lambda: result.update(first_byte_ms=round((time.monotonic() - started) * 1000, 2)))
            if got != message:
                result["error"] = "echo was " + repr(got)
    except OSError as exc:
        result["error"] = repr(exc)
    out(**result)
    sys.exit(0)
try:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
except OSError as exc:
    out(state="error", error="connect: " + repr(exc))
    sys.exit(0)
if mode == "echo":
    size, limit = int(sys.argv[3]), float(sys.argv[4])
    stall_at, stall_for = (int(sys.argv[5]), float(sys.argv[6])) if len(sys.argv) > 6 else (None, 0.0)
    payload = os.urandom(size)
    send_error = []
    def send():
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_error.append(repr(exc))
    conn.settimeout(limit)
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest, received, first_byte, error = hashlib.sha256(), 0, None, None
    try:
        while time.monotonic() - started < limit:
            data = conn.recv(1 << 20)
            if not data:
                break
            if first_byte is None:
                first_byte = time.monotonic() - started
            digest.update(data)
            received += len(data)
            if stall_at is not None and received >= stall_at:
                stall_at = None
                time.sleep(stall_for)  # the reader stops reading: back-pressure must hold
        else:
            error = "time limit"
    except OSError as exc:
        error = repr(exc)
    sender.join(timeout=5)
    out(state="done", sent=size, received=received, sent_sha256=hashlib.sha256(payload).hexdigest(),
        received_sha256=digest.hexdigest(), first_byte_ms=None if first_byte is None else round(first_byte * 1000, 1),
        total_s=round(time.monotonic() - started, 3), error=error or (send_error[0] if send_error else None))
elif mode == "idle":
    idle_for, limit = float(sys.argv[3]), float(sys.argv[4])
    conn.settimeout(limit)
    idle_from = time.monotonic()
    try:
        if echo(conn, b"before idle\n") != b"before idle\n":
            out(state="error", error="first echo differs")
            sys.exit(0)
        out(state="open")
        idle_from = time.monotonic()
        time.sleep(idle_for)
        idle_s = round(time.monotonic() - idle_from, 1)
        got = echo(conn, b"after idle\n")
        out(state="done", idle_s=idle_s, error=None if got == b"after idle\n" else "echo after idle was " + repr(got))
    except OSError as exc:
        out(state="done", idle_s=round(time.monotonic() - idle_from, 1), error=repr(exc))
elif mode == "hold":
    limit = float(sys.argv[3])
    conn.settimeout(limit)
    try:
        got = echo(conn, b"hold\n")
    except OSError as exc:
        out(state="error", error=repr(exc))
        sys.exit(0)
    if got != b"hold\n":
        out(state="error", error="echo was " + repr(got))
        sys.exit(0)
    out(state="open")
    try:
        data = conn.recv(64)
        how = "eof" if not data else "data " + repr(data)
    except socket.timeout:
        how = "timeout"
    except OSError as exc:
        how = "reset " + repr(exc)
    out(state="closed", how=how)
"""


def unique_prefix(tag: str) -> str:
    """A lab prefix no other lab has: TAG, our PID and random hex (netns_lab.sh allows 32 chars)."""
    return f"{tag}{os.getpid() % 100000}-{secrets.token_hex(3)}"


class LineReader:
    """Lines of a pipe as they come, each with its monotonic arrival time.

    ``wait`` raises ``error`` (AssertionError unless told otherwise) when no line matches.
    """

    def __init__(self, pipe, error: type[Exception] = AssertionError) -> None:
        self.lines: list[str] = []
        self.error = error
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe) -> None:
        for line in pipe:
            self._queue.put((time.monotonic(), line.rstrip("\n")))
        self._queue.put(None)

    def wait(self, predicate: Callable[[str], bool], timeout: float, what: str) -> tuple[float, str]:
        """The first new line matching ``predicate`` and when it arrived; ``what`` names it in the error."""
        deadline = time.monotonic() + timeout
        while not self._ended and (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                self._ended = True
                break
            arrived, line = item
            self.lines.append(line)
            if predicate(line):
                return arrived, line
        raise self.error(
            f"{what}: " + ("output ended" if self._ended else f"nothing within {timeout} s")
            + "; output so far:\n" + "\n".join(self.lines)
        )

    def text(self) -> str:
        """Every line received so far (taking what is already queued)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            self.lines.append(item[1])
        return "\n".join(self.lines)


class Started(NamedTuple):
    """What ``NatLab.start_tunnel_topology`` waited for."""

    bootstrap: str  # pub's address, as the other nodes were given it
    pub_id: str
    hosta_id: str
    ready: dict[str, dict]  # hosta's and hostb's "phase transition" to "ready"


class NatLab:
    """One lab (unique prefix) and every process started in it; ``close`` tears all down.

    Failures (the lab does not come up, an awaited event or line does not come) raise
    ``failure``: AssertionError for tests, a script's own exception type otherwise.
    """

    def __init__(
        self,
        workdir: Path,
        tag: str,
        symmetric: bool = False,
        failure: type[Exception] = AssertionError,
        transport: str = "tcp",
    ) -> None:
        self.workdir = workdir  # node identities go here
        self.symmetric = symmetric
        # "tcp": every node listens on TCP; "quic": hosta and hostb listen on QUIC only, pub
        # (bootstrap and relay) on both, and the others join it over QUIC.
        self.transport = transport
        self.failure = failure
        self.prefix = unique_prefix(tag)
        self.nodes: dict[str, PunchgateProcess] = {}
        self.started: dict[str, float] = {}  # Unix time each node was (last) started
        self.node_env: dict[str, str] = {}  # extra environment for nodes (PUNCHGATE_LOG=debug, say)
        self._how: dict[str, tuple[str, tuple[str, ...]]] = {}  # role and flags, for restarts
        self.helpers: dict[str, tuple[subprocess.Popen, LineReader]] = {}
        self.env: dict[str, str] = {}
        self.notes: list[str] = []
        self.is_up = False  # "down" is due

    def note(self, text: str) -> None:
        """A measurement worth seeing: printed (pytest -s) and part of the failure report."""
        self.notes.append(text)
        print(f"[{self.prefix}] {text}", flush=True)

    # --- lab lifecycle
    def lab(self, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``netns_lab.sh COMMAND --prefix PREFIX ARGS...`` (options first, as the script wants)."""
        return subprocess.run(
            ["bash", str(LAB_SCRIPT), command, "--prefix", self.prefix, *args],
            check=False, capture_output=True, text=True, timeout=timeout,
        )

    def up(self, timeout: float = 60) -> None:
        self.is_up = True  # from here on, "down" is due even if "up" fails half-way
        result = self.lab("up", *(["--symmetric"] if self.symmetric else []), timeout=timeout)
        if result.returncode != 0:
            raise self.failure(f"lab up failed:\n{result.stdout}{result.stderr}")
        env = self.lab("env")
        if env.returncode != 0:
            raise self.failure(env.stderr)
        self.env = dict(line.split("=", 1) for line in env.stdout.split() if "=" in line)
        # Byte counters in the routers' conntrack entries (must be on before the flows
        # exist): they show how much a direct flow carried. Best effort.
        for role in ("rtra", "rtrb"):
            subprocess.run(
                [*self.wrap(role), "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1"],
                check=False, capture_output=True, timeout=10,
            )

    def close(self) -> subprocess.CompletedProcess | None:
        """Kill what we started (by PID), then remove the lab; never raises for a dead process.

        Returns the result of ``netns_lab.sh down`` (None if the lab was never brought up),
        for the caller to check.
        """
        for node in self.nodes.values():
            try:
                node.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass  # already gone, or not dead yet: "down" below kills what is left by PID
        for proc, _ in self.helpers.values():
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if not self.is_up:
            return None
        self.is_up = False
        return self.lab("down", timeout=120)

    def wrap(self, role: str) -> list[str]:
        """The command prefix that runs something in ROLE's namespace (and execs it)."""
        return ["ip", "netns", "exec", self.env.get(f"NS_{role.upper()}", f"{self.prefix}-{role}")]

    # --- processes
    def identity(self, name: str) -> Path:
        return self.workdir / f"{self.prefix}-{name}.key"

    def peer_id(self, name: str) -> str:
        """NAME's peer ID, its identity file made now if need be (so it is known before start)."""
        from libp2p.peer.id import ID

        from punchgate.identity import load_or_create_identity

        key_pair, _ = load_or_create_identity(self.identity(name))
        return str(ID.from_pubkey(key_pair.public_key))

    def listen_args(self, role: str, port: int) -> list[str]:
        tcp, quic = f"/ip4/0.0.0.0/tcp/{port}", f"/ip4/0.0.0.0/udp/{port}/quic-v1"
        if self.transport == "tcp":
            return ["--listen", tcp]
        return ["--listen", tcp, "--listen", quic] if role == "pub" else ["--listen", quic]

    def bootstrap_address(self, pub_id: str) -> str:
        if self.transport == "tcp":
            return f"/ip4/{PUB_IP}/tcp/{NODE_PORT}/p2p/{pub_id}"
        return f"/ip4/{PUB_IP}/udp/{NODE_PORT}/quic-v1/p2p/{pub_id}"

    def node(self, name: str, role: str, *args: str, port: int = NODE_PORT) -> PunchgateProcess:
        """``punchgate`` in ROLE's namespace, listening on PORT, with its own identity."""
        proc = PunchgateProcess(
            "--identity", str(self.identity(name)),
            *self.listen_args(role, port),
            "--no-mdns",
            *args,
            wrapper=self.wrap(role),
            env=self.node_env,
        )
        self.nodes[name] = proc
        self.started[name] = time.time()
        self._how[name] = (role, args)
        return proc

    def restart(self, name: str, *, port: int = NODE_PORT) -> PunchgateProcess:
        """Kill NAME (SIGKILL, by PID) and start it again with the same identity and flags,
        listening on PORT; returns the new process (its start time is ``started[name]``)."""
        self.nodes[name].kill()
        return self.start_again(name, port=port)

    def stop(self, name: str, timeout: float = 15) -> int:
        """Stop NAME as a user would (SIGTERM, by PID); its exit status."""
        code, _ = self.nodes[name].terminate_and_wait(timeout)
        return code

    def start_again(self, name: str, *, port: int = NODE_PORT) -> PunchgateProcess:
        """Start NAME (stopped) again: same namespace, identity and flags, listening on PORT."""
        role, args = self._how[name]
        return self.node(name, role, *args, port=port)

    def start_all_at_once(self) -> Started:
        """pub, hosta (echo server + ``--expose echo``) and hostb (``--tunnel-by-name echo``)
        started at the same instant (``started`` holds it), as a boot starts them; nothing
        is awaited."""
        pub_id = self.peer_id("pub")
        bootstrap = self.bootstrap_address(pub_id)
        self.start_echo_server()
        hosta_id = self.peer_id("hosta")
        self.peer_id("hostb")
        self.node("pub", "pub")
        self.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
        self.node("hostb", "hostb", "--bootstrap", bootstrap, "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}")
        return Started(bootstrap, pub_id, hosta_id, {})

    def enact(self, situation: str, client_ahead: float = 20.0) -> str:
        """Bring about one of :data:`SITUATIONS` (in that order, on one lab); returns the
        node whose start the next connection's timing counts from."""
        if situation == "all started at once":
            self.start_all_at_once()
            return "hostb"
        if situation == "provider restarted on another port":
            self.restart("hosta", port=NODE_PORT + 1)
            return "hosta"
        if situation == "relay restarted":
            self.restart("pub")
            return "pub"
        if situation == "client started first":
            self.nodes["hosta"].kill()
            self.restart("hostb")
            alone_until = self.started["hostb"] + client_ahead
            self.expect("hostb", "phase transition", 30, to_phase="ready")
            time.sleep(max(0.0, alone_until - time.time()))  # the situation itself: the client alone
            self.restart("hosta")
            return "hosta"
        raise ValueError(f"unknown situation {situation!r}")

    def first_echo(self, name: str, since: float, size: int, timeout: float, port: int = TUNNEL_PORT) -> dict:
        """A "first" client in hostb: connects to PORT as soon as it can, echoes SIZE bytes; its
        result (``first_byte_s`` counted from the Unix time SINCE)."""
        return self._client_result(name, "first", str(port), str(size), str(since), str(timeout), timeout=timeout)

    def expect(self, node: str, event: str, timeout: float, nth: int = 1, **fields) -> dict:
        """The ``nth`` event called ``event`` (with ``fields``) in NODE's log, waiting up to ``timeout``."""
        try:
            return self.nodes[node].wait_event(event, timeout, nth=nth, **fields)
        except AssertionError as exc:
            why = str(exc).split("; log:\n")[0]
            wanted = f"{event!r} #{nth}" + (f" with {fields}" if fields else "")
            raise self.failure(f"{node}: no {wanted} within {timeout} s ({why})") from None

    def helper(self, name: str, role: str, *command: str) -> tuple[subprocess.Popen, LineReader]:
        """A non-punchgate process in ROLE's namespace; its stdout and stderr are read as lines."""
        proc = subprocess.Popen(
            [*self.wrap(role), *command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.helpers[name] = (proc, reader := LineReader(proc.stdout, self.failure))
        return proc, reader

    def start_echo_server(self, role: str = "hosta", port: int = ECHO_PORT) -> None:
        """``scripts/echo_server.py`` on ROLE's 127.0.0.1:PORT, once it says it is listening."""
        _, out = self.helper(
            "echo server", role, sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1", "--port", str(port)
        )
        out.wait(lambda text: "listening" in text, 20, "echo server start")

    def start_tunnel_topology(self, start_timeout: float) -> Started:
        """pub (bootstrap node and relay); hosta: echo server and ``--expose echo=``;
        hostb: ``--tunnel-by-name echo@127.0.0.1:TUNNEL_PORT``; until both hosts are ready."""
        self.node("pub", "pub")
        pub_id = self.expect("pub", "punchgate starting", start_timeout)["peer_id"]
        self.expect("pub", "phase transition", start_timeout, to_phase="ready")
        bootstrap = self.bootstrap_address(pub_id)
        self.start_echo_server()
        self.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
        self.node("hostb", "hostb", "--bootstrap", bootstrap, "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}")
        hosta_id = self.expect("hosta", "punchgate starting", start_timeout)["peer_id"]
        ready = {
            name: self.expect(name, "phase transition", start_timeout, to_phase="ready")
            for name in ("hosta", "hostb")
        }
        return Started(bootstrap, pub_id, hosta_id, ready)

    def client(self, name: str, *args: str, role: str = "hostb") -> tuple[subprocess.Popen, LineReader]:
        """CLIENT_SCRIPT with ARGS in ROLE's namespace."""
        return self.helper(name, role, sys.executable, "-c", CLIENT_SCRIPT, *args)

    def _client_result(self, name: str, *args: str, timeout: float) -> dict:
        _, reader = self.client(name, *args)
        _, line = reader.wait(lambda text: text.startswith("{"), timeout + 15, f"{name} result")
        return json.loads(line)

    def echo_through_tunnel(
        self, name: str, size: int, timeout: float, stall: tuple[int, float] | None = None
    ) -> dict:
        """Run an "echo" client in hostb; its result line (it gives up after ``timeout``).

        With ``stall=(n, s)`` the client stops reading for s seconds after n bytes.
        """
        extra = [str(stall[0]), str(stall[1])] if stall else []
        return self._client_result(name, "echo", str(TUNNEL_PORT), str(size), str(timeout), *extra, timeout=timeout)

    def many_through_tunnel(self, name: str, count: int, size: int, timeout: float) -> dict:
        """COUNT connections at once through hostb's tunnel, each echoing SIZE random bytes."""
        return self._client_result(name, "many", str(TUNNEL_PORT), str(count), str(size), str(timeout), timeout=timeout)

    def sequential_through_tunnel(self, name: str, count: int, timeout: float) -> dict:
        """COUNT short echo connections one after another through hostb's tunnel."""
        return self._client_result(name, "sequential", str(TUNNEL_PORT), str(count), str(timeout), timeout=timeout)

    def ping_through_tunnel(self, name: str, timeout: float) -> dict:
        """Run a "ping" client in hostb; its result line (connect_ms, first_byte_ms, error)."""
        return self._client_result(name, "ping", str(TUNNEL_PORT), str(timeout), timeout=timeout)

    def direct(self, *args: str) -> tuple[int, str]:
        """``netns_lab.sh direct ARGS``: exit code 0 if a flow between the routers exists, and its listing."""
        result = self.lab("direct", *args, timeout=30)
        return result.returncode, result.stdout + result.stderr

    # --- diagnostics
    def report(self, last: int = 150) -> str:
        """Everything about the lab: notes, the last lines of each node, helpers' output, flows."""
        parts = [f"lab {self.prefix} (symmetric={self.symmetric})", *self.notes]
        for name, node in self.nodes.items():
            parts.append(
                f"===== {name} (pid {node.pid}, exit {node.proc.poll()}) last lines:\n{node.log_text(last=last)}"
            )
        for name, (proc, reader) in self.helpers.items():
            parts.append(f"===== {name} (pid {proc.pid}, exit {proc.poll()}):\n{reader.text()}")
        try:
            parts.append("===== netns_lab.sh direct --all:\n" + self.direct("--all")[1])
        except Exception as exc:  # the report must not hide the failure it explains
            parts.append(f"===== direct --all failed: {exc!r}")
        return "\n".join(parts)


def conntrack_bytes(direct_output: str) -> dict[str, list[tuple[int, int]]]:
    """Per router, the (original, reply) ``bytes=`` counters of each flow listed by ``direct``
    (empty when conntrack accounting is off)."""
    flows: dict[str, list[tuple[int, int]]] = {}
    router = None
    for line in direct_output.splitlines():
        if header := re.match(r"# (rtr[ab]) ", line):
            router = header.group(1)
        elif router and len(counters := re.findall(r"bytes=(\d+)", line)) == 2:
            flows.setdefault(router, []).append((int(counters[0]), int(counters[1])))
    return flows
