"""Tunnels between two hosts behind NAT routers, in the network-namespace lab.

``scripts/netns_lab.sh`` builds a small internet: ``pub`` (100.64.0.10) is a public
node, ``hosta`` and ``hostb`` sit behind their own routers (MASQUERADE, or
``--random-fully`` for a symmetric NAT) that drop unsolicited inbound traffic. Every
process runs inside a namespace of a lab made for this test alone (a unique prefix),
and the lab is torn down afterwards whatever happens.

* pub: ``punchgate --listen /ip4/0.0.0.0/tcp/4001`` (the bootstrap node and relay);
* hosta: an echo server on 127.0.0.1:7777 and ``punchgate --expose echo=127.0.0.1:7777``;
* hostb: ``punchgate --tunnel-by-name echo@127.0.0.1:2222``.

Checked, for both NAT kinds: bytes echo end to end (sha256 of a random payload) through
hostb's 127.0.0.1:2222; with a port-preserving NAT the tunnel moves to a direct
connection between the two routers' public addresses (seen in the routers' conntrack
tables, from outside the nodes, and in the client's ``client tunnel opened`` event);
with a symmetric NAT it stays on the relay and no direct flow exists; and killing the
provider (SIGKILL) ends an open client connection within 10 s instead of leaving it
hanging.

Runs only as root with ``ip`` and ``iptables`` installed (CI installs them).
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from punchgate.devtools.processes import PunchgateProcess

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "scripts" / "netns_lab.sh"
ECHO_SERVER = ROOT / "scripts" / "echo_server.py"

PUB_IP = "100.64.0.10"
NODE_PORT = 4001
ECHO_PORT = 7777
TUNNEL_PORT = 2222
PAYLOAD_BYTES = 2 * 1024 * 1024

START_TIMEOUT = 30  # a node: process start to "ready" (python start-up included, 2 cores)
SETUP_TIMEOUT = 30  # reachability, relay reservation, service publication
FIRST_ECHO_TIMEOUT = 60  # first connection: resolution, relay connection, handshake
PUNCH_TIMEOUT = 40  # the "hole punch" event after the first connection
PAYLOAD_TIMEOUT = 60
STALL_BYTES = 100 * 1024 * 1024  # relayed: a 100 MB echo whose reader stalls ...
STALL_SECONDS = float(os.environ.get("PUNCHGATE_STALL_TEST_SECONDS", "60"))  # ... this long
CLOSE_LIMIT = 10  # (d): the client connection must end this soon after the provider dies

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"
    ),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None,
        reason="needs ip (iproute2) and iptables",
    ),
]

# A TCP client run inside hostb's namespace: python -c CLIENT echo PORT SIZE TIMEOUT
#                                            python -c CLIENT hold PORT TIMEOUT
# "echo" sends SIZE random bytes, half-closes, reads everything back and prints one JSON
# line with both sha256 digests. "hold" echoes a short message, prints {"state": "open"},
# then waits (at most TIMEOUT) for the connection to end and prints {"state": "closed"}.
CLIENT = r"""
import hashlib, json, os, socket, sys, threading, time
mode, port = sys.argv[1], int(sys.argv[2])
def out(**fields):
    print(json.dumps(fields), flush=True)
started = time.monotonic()
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
elif mode == "hold":
    limit = float(sys.argv[3])
    conn.settimeout(limit)
    try:
        conn.sendall(b"hold\n")
        got = b""
        while len(got) < 5:
            data = conn.recv(64)
            if not data:
                break
            got += data
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


class LineReader:
    """Lines of a pipe as they come, each with its monotonic arrival time."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe) -> None:
        for line in pipe:
            self._queue.put((time.monotonic(), line.rstrip("\n")))
        self._queue.put(None)

    def wait(self, predicate: Callable[[str], bool], timeout: float, what: str) -> tuple[float, str]:
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
        raise AssertionError(
            f"{what}: " + ("output ended" if self._ended else f"nothing within {timeout} s")
            + "; output so far:\n" + "\n".join(self.lines)
        )

    def text(self) -> str:
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


class NatLab:
    """One lab (unique prefix) and every process started in it; ``close`` tears all down."""

    def __init__(self, tmp_path: Path, symmetric: bool) -> None:
        self.tmp_path = tmp_path
        self.symmetric = symmetric
        self.prefix = f"pgt{os.getpid() % 100000}-{secrets.token_hex(3)}"
        self.nodes: dict[str, PunchgateProcess] = {}
        self.helpers: dict[str, tuple[subprocess.Popen, LineReader]] = {}
        self.env: dict[str, str] = {}
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """A measurement worth seeing: printed (pytest -s) and part of the failure report."""
        self.notes.append(text)
        print(f"[{self.prefix}] {text}", flush=True)

    # --- lab lifecycle
    def lab(self, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``netns_lab.sh COMMAND --prefix PREFIX ARGS...`` (options first, as the script wants)."""
        return subprocess.run(
            ["bash", str(LAB), command, "--prefix", self.prefix, *args],
            check=False, capture_output=True, text=True, timeout=timeout,
        )

    def up(self) -> None:
        result = self.lab("up", *(["--symmetric"] if self.symmetric else []))
        assert result.returncode == 0, f"lab up failed:\n{result.stdout}{result.stderr}"
        env = self.lab("env")
        assert env.returncode == 0, env.stderr
        self.env = dict(line.split("=", 1) for line in env.stdout.split() if "=" in line)
        # Byte counters in the routers' conntrack entries (must be on before the flows
        # exist): they show how much the direct flow carried. Best effort.
        for role in ("rtra", "rtrb"):
            subprocess.run(
                [*self.wrap(role), "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1"],
                check=False, capture_output=True, timeout=10,
            )

    def close(self) -> None:
        """Kill what we started (by PID), then remove the lab. Never raises for a dead process."""
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
        result = self.lab("down", timeout=120)
        assert result.returncode == 0, f"lab down failed:\n{result.stdout}{result.stderr}"

    def wrap(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.env.get(f"NS_{role.upper()}", f"{self.prefix}-{role}")]

    # --- processes
    def node(self, name: str, role: str, *args: str) -> PunchgateProcess:
        proc = PunchgateProcess(
            "--identity", str(self.tmp_path / f"{name}.key"),
            "--listen", f"/ip4/0.0.0.0/tcp/{NODE_PORT}",
            "--no-mdns",
            *args,
            wrapper=self.wrap(role),
        )
        self.nodes[name] = proc
        return proc

    def expect(self, node: str, event: str, timeout: float, nth: int = 1, **fields) -> dict:
        """The ``nth`` event called ``event`` (with ``fields``) in NODE's log, waiting up to ``timeout``."""
        try:
            return self.nodes[node].wait_for(nth_match(event, nth, **fields), timeout)
        except AssertionError as exc:
            why = str(exc).split("; log:\n")[0]
            wanted = f"{event!r} #{nth}" + (f" with {fields}" if fields else "")
            raise AssertionError(f"{node}: no {wanted} within {timeout} s ({why})") from None

    def helper(self, name: str, role: str, *command: str) -> tuple[subprocess.Popen, LineReader]:
        """A non-punchgate process in ROLE's namespace; its stdout and stderr are read as lines."""
        proc = subprocess.Popen(
            [*self.wrap(role), *command],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.helpers[name] = (proc, reader := LineReader(proc.stdout))
        return proc, reader

    def client(self, name: str, *args: str) -> tuple[subprocess.Popen, LineReader]:
        return self.helper(name, "hostb", sys.executable, "-c", CLIENT, *args)

    def echo_through_tunnel(self, name: str, size: int, timeout: float, stall: tuple[int, float] | None = None) -> dict:
        """Run an "echo" client in hostb; its result line (it gives up after ``timeout``).

        With ``stall=(n, s)`` the client stops reading for s seconds after n bytes.
        """
        extra = [str(stall[0]), str(stall[1])] if stall else []
        _, reader = self.client(name, "echo", str(TUNNEL_PORT), str(size), str(timeout), *extra)
        _, line = reader.wait(lambda text: text.startswith("{"), timeout + 15, f"{name} result")
        return json.loads(line)

    def direct(self, *args: str) -> tuple[int, str]:
        result = self.lab("direct", *args, timeout=30)
        return result.returncode, result.stdout + result.stderr

    # --- diagnostics
    def report(self) -> str:
        parts = [f"lab {self.prefix} (symmetric={self.symmetric})", *self.notes]
        for name, node in self.nodes.items():
            parts.append(
                f"===== {name} (pid {node.pid}, exit {node.proc.poll()}) last lines:\n{node.log_text(last=150)}"
            )
        for name, (proc, reader) in self.helpers.items():
            parts.append(f"===== {name} (pid {proc.pid}, exit {proc.poll()}):\n{reader.text()}")
        try:
            parts.append("===== netns_lab.sh direct --all:\n" + self.direct("--all")[1])
        except Exception as exc:  # the report must not hide the failure it explains
            parts.append(f"===== direct --all failed: {exc!r}")
        return "\n".join(parts)


def nth_match(name: str, n: int, **fields) -> Callable[[dict], bool]:
    """A predicate true for the n-th (1-based) event called ``name`` with ``fields``."""
    seen = 0

    def match(event: dict) -> bool:
        nonlocal seen
        if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
            seen += 1
            return seen == n
        return False

    return match


def count_events(node: PunchgateProcess, name: str) -> int:
    node.log_text()  # take what has arrived
    return sum(1 for e in node.events() if e.get("event") == name)


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


def run_scenario(lab: NatLab, symmetric: bool) -> None:
    # pub: bootstrap node and relay
    lab.node("pub", "pub")
    pub_id = lab.expect("pub", "punchgate starting", START_TIMEOUT)["peer_id"]
    lab.expect("pub", "phase transition", START_TIMEOUT, to_phase="ready")
    bootstrap = f"/ip4/{PUB_IP}/tcp/{NODE_PORT}/p2p/{pub_id}"

    # hosta: echo server + provider; hostb: client by name
    _, echo_out = lab.helper(
        "echo server", "hosta", sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1", "--port", str(ECHO_PORT)
    )
    echo_out.wait(lambda text: "listening" in text, 20, "echo server start")
    hosta = lab.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
    hostb = lab.node("hostb", "hostb", "--bootstrap", bootstrap, "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}")
    hosta_id = lab.expect("hosta", "punchgate starting", START_TIMEOUT)["peer_id"]
    for node in ("hosta", "hostb"):
        lab.expect(node, "phase transition", START_TIMEOUT, to_phase="ready")

    # hosta finds out it is behind NAT, reserves a slot on the relay, publishes the service.
    lab.expect("hosta", "reachability", SETUP_TIMEOUT, status="private")
    lab.expect("hosta", "relay reservation accepted", SETUP_TIMEOUT)
    lab.expect("hosta", "service published", SETUP_TIMEOUT, service="echo")

    # First connection: resolution, relayed connection, and (in the background) the punch.
    first = lab.echo_through_tunnel("first client", 64, FIRST_ECHO_TIMEOUT)
    assert first["state"] == "done" and first["error"] is None, f"first connection failed: {first}"
    assert first["received_sha256"] == first["sent_sha256"], f"first connection: echo differs: {first}"
    resolved = lab.expect("hostb", "service resolved", 5, service="echo")
    assert hosta_id in resolved["providers"], f"hosta is not among the providers: {resolved}"

    punch = lab.expect("hostb", "hole punch", PUNCH_TIMEOUT, peer=hosta_id)
    lab.note(f"first connection: first byte after {first['first_byte_ms']} ms; hole punch: {punch}")
    if symmetric:
        assert punch["outcome"] in ("failed", "skipped"), f"a punch through symmetric NATs cannot succeed: {punch}"
    else:
        assert punch["outcome"] == "direct", f"hole punch through port-preserving NATs: {punch}"

    # (a) the payload connection: random bytes, sha256 both ways.
    opened_before = count_events(hostb, "client tunnel opened")
    result = lab.echo_through_tunnel("payload client", PAYLOAD_BYTES, PAYLOAD_TIMEOUT)
    assert result["state"] == "done" and result["error"] is None, f"payload connection failed: {result}"
    assert result["received"] == PAYLOAD_BYTES and result["received_sha256"] == result["sent_sha256"], (
        f"payload corrupted or truncated: {result}"
    )
    opened = lab.expect("hostb", "client tunnel opened", 5, nth=opened_before + 1)
    assert opened["service"] == "echo" and opened["peer"] == hosta_id, f"unexpected tunnel: {opened}"

    if symmetric:
        # (c) relayed, and no flow between the routers ever got an answer.
        assert opened["path"] == "relayed", f"symmetric NAT: the tunnel must use the relay: {opened}"
        rc, flows = lab.direct()
        assert rc == 1, f"symmetric NAT: a direct flow between the routers exists:\n{flows}"
        # The relayed data path under a reader that stops for a minute mid-transfer.
        stalled = lab.echo_through_tunnel(
            "stalling client", STALL_BYTES, STALL_SECONDS + 180, stall=(10 * 1024 * 1024, STALL_SECONDS)
        )
        lab.note(f"relayed {STALL_BYTES} B echo with a {STALL_SECONDS:.0f} s reader stall: {stalled}")
        assert stalled["error"] is None and stalled["received"] == STALL_BYTES, f"stalled transfer: {stalled}"
        assert stalled["received_sha256"] == stalled["sent_sha256"], f"stalled transfer corrupted: {stalled}"
    else:
        # (b) direct: the client says so, and the routers' conntrack tables agree.
        assert opened["path"] == "direct", f"the tunnel did not use the direct connection: {opened}"
        rc, flows = lab.direct("--state", "ESTABLISHED")
        assert rc == 0, f"no ESTABLISHED flow between the routers' public addresses:\n{flows}"
        carried = conntrack_bytes(flows)
        lab.note(f"direct flows (bytes original, reply): {carried}")
        if carried:  # conntrack accounting is on: the payload crossed a direct flow, both ways
            assert set(carried) == {"rtra", "rtrb"} and all(
                any(min(pair) >= PAYLOAD_BYTES for pair in pairs) for pairs in carried.values()
            ), f"no direct flow carried the payload both ways ({carried}):\n{flows}"

    # (d) SIGKILL the provider while a client connection is open through the tunnel.
    opened_before = count_events(hostb, "client tunnel opened")
    closed_before = count_events(hostb, "client tunnel closed")
    _, held = lab.client("held client", "hold", str(TUNNEL_PORT), str(CLOSE_LIMIT + 20))
    _, line = held.wait(lambda text: '"state"' in text, FIRST_ECHO_TIMEOUT, "held connection open")
    assert json.loads(line)["state"] == "open", f"held connection did not open: {line}"
    path = lab.expect("hostb", "client tunnel opened", 5, nth=opened_before + 1)["path"]
    killed_at = time.monotonic()
    hosta.proc.kill()  # SIGKILL, by PID, to the punchgate process itself (ip netns exec execs)
    arrived, line = held.wait(lambda text: '"closed"' in text, CLOSE_LIMIT + 25, "held connection end")
    took = arrived - killed_at
    how = json.loads(line)["how"]
    lab.note(f"held connection ({path}) ended ({how}) {took:.2f} s after SIGKILL")
    assert how == "eof" or how.startswith("reset"), f"held connection ({path}) did not end: {how}"
    assert took < CLOSE_LIMIT, f"held connection ({path}) ended {took:.1f} s after the provider was killed"
    lab.expect("hostb", "client tunnel closed", CLOSE_LIMIT, nth=closed_before + 1)


@pytest.mark.parametrize("symmetric", [False, True], ids=["masquerade", "symmetric"])
def test_tunnel_between_two_nats(tmp_path, symmetric):
    lab = NatLab(tmp_path, symmetric)
    try:
        lab.up()
        try:
            run_scenario(lab, symmetric)
        except Exception as exc:  # any failure: say why, with every log of the lab
            reason = str(exc).split("; log:\n")[0]  # wait_for's own log dump is in the report
            raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}") from None
    finally:
        lab.close()
