#!/usr/bin/env python3
"""Timings of a tunnel between two hosts behind port-preserving NATs, in the netns lab.

Each run builds a fresh lab (``scripts/netns_lab.sh up``, MASQUERADE, a unique prefix),
starts the same topology as ``tests/test_nat.py`` and removes the lab again:

* pub:   ``punchgate --listen /ip4/0.0.0.0/tcp/4001`` (bootstrap node and relay)
* hosta: echo server on 127.0.0.1:7777, ``punchgate --expose echo=127.0.0.1:7777``
* hostb: ``punchgate --tunnel-by-name echo@127.0.0.1:2222``

and measures, from the nodes' JSON log events and from a client inside hostb:

* start to ready:    process start -> ``phase transition`` to ``ready`` (hosta, hostb)
* name resolution:   ``service resolved`` duration_ms (hostb)
* relay connect:     ``relay connected`` duration_ms (hostb; n/a if the runtime does not log it)
* hole punch:        ``hole punch`` duration_ms, outcome ``direct`` (hostb)
* first byte:        client connect -> first echoed byte, for the first connection (which
                     pays for resolution, relay and punch) and for one after the punch
* tunnel setup:      ``client tunnel opened`` setup_ms, for the same two connections

Prints the median, min and max of each over the runs.

    sudo .venv/bin/python scripts/bench_nat.py [--runs 5] [--json results.json]

(any python with punchgate and its dependencies installed; nodes run with the same one).

Needs root, ``ip`` and ``iptables``. Every lab is torn down, also on errors and Ctrl+C.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from punchgate.devtools.processes import PunchgateProcess  # noqa: E402

LAB = REPO_ROOT / "scripts" / "netns_lab.sh"
ECHO_SERVER = REPO_ROOT / "scripts" / "echo_server.py"
PUB_IP = "100.64.0.10"
NODE_PORT = 4001
ECHO_PORT = 7777
TUNNEL_PORT = 2222

START_TIMEOUT = 30
SETUP_TIMEOUT = 30
CONNECTION_TIMEOUT = 60
PUNCH_TIMEOUT = 40

# Runs inside hostb: connect to the tunnel, send a short message, time the first echoed
# byte, read the rest; one JSON line.
CLIENT = r"""
import json, socket, sys, time
port, limit = int(sys.argv[1]), float(sys.argv[2])
message = b"punchgate first byte\n"
started = time.monotonic()
result = {"first_byte_ms": None, "error": None}
try:
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as conn:
        result["connect_ms"] = round((time.monotonic() - started) * 1000, 2)
        conn.sendall(message)
        got = b""
        while len(got) < len(message):
            data = conn.recv(4096)
            if not data:
                break
            if not got:
                result["first_byte_ms"] = round((time.monotonic() - started) * 1000, 2)
            got += data
        if got != message:
            result["error"] = "echo was " + repr(got)
except OSError as exc:
    result["error"] = repr(exc)
print(json.dumps(result), flush=True)
"""

METRICS = [
    ("start_to_ready_hosta_ms", "start to ready, hosta"),
    ("start_to_ready_hostb_ms", "start to ready, hostb"),
    ("name_resolution_ms", "name resolution"),
    ("relay_connect_ms", "relay connect"),
    ("hole_punch_ms", "hole punch (direct)"),
    ("first_byte_first_connection_ms", "first byte, first connection"),
    ("first_byte_after_punch_ms", "first byte, after the punch"),
    ("setup_first_connection_ms", "tunnel setup, first connection"),
    ("setup_after_punch_ms", "tunnel setup, after the punch"),
]


class RunFailed(Exception):
    pass


def lab_command(command: str, prefix: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAB), command, "--prefix", prefix, *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )


def event_time(event: dict) -> float:
    """The event's ISO UTC timestamp as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


class Run:
    """One lab with its processes; ``close`` kills them by PID and removes the lab."""

    def __init__(self, number: int, workdir: Path) -> None:
        self.prefix = f"pgb{os.getpid() % 100000}-{number}-{secrets.token_hex(2)}"
        self.workdir = workdir
        self.nodes: dict[str, PunchgateProcess] = {}
        self.helpers: list[subprocess.Popen] = []
        self.lab_is_up = False

    def ns(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}-{role}"]

    def up(self) -> None:
        self.lab_is_up = True  # from here on, "down" is due even if "up" fails half-way
        result = lab_command("up", self.prefix)
        if result.returncode != 0:
            raise RunFailed(f"lab up failed: {result.stderr.strip()}")

    def close(self) -> None:
        for node in self.nodes.values():
            try:
                node.kill()
            except (OSError, subprocess.TimeoutExpired):
                pass  # "down" terminates what is left in the namespaces
        for proc in self.helpers:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self.lab_is_up:
            result = lab_command("down", self.prefix)
            if result.returncode != 0:
                print(f"warning: lab {self.prefix} down failed: {result.stderr.strip()}", file=sys.stderr)
            self.lab_is_up = False

    def node(self, name: str, role: str, *args: str) -> PunchgateProcess:
        self.nodes[name] = PunchgateProcess(
            "--identity", str(self.workdir / f"{self.prefix}-{name}.key"),
            "--listen", f"/ip4/0.0.0.0/tcp/{NODE_PORT}",
            "--no-mdns",
            *args,
            wrapper=self.ns(role),
        )
        return self.nodes[name]

    def expect(self, name: str, event: str, timeout: float, nth: int = 1, **fields) -> dict:
        """The ``nth`` event called ``event`` with ``fields`` in NAME's log, waiting up to ``timeout``."""
        seen = 0

        def match(e: dict) -> bool:
            nonlocal seen
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                seen += 1
                return seen == nth
            return False

        try:
            return self.nodes[name].wait_for(match, timeout)
        except AssertionError as exc:
            why = str(exc).split("; log:\n")[0]
            raise RunFailed(f"{name}: no {event!r} #{nth} {fields or ''} within {timeout} s ({why})") from None

    def maybe(self, name: str, event: str, timeout: float, **fields) -> dict | None:
        try:
            return self.nodes[name].wait_event(event, timeout=timeout, **fields)
        except AssertionError:
            return None

    def start_echo_server(self) -> None:
        proc = subprocess.Popen(
            [*self.ns("hosta"), sys.executable, str(ECHO_SERVER), "--host", "127.0.0.1", "--port", str(ECHO_PORT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.helpers.append(proc)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
        try:
            line = lines.get(timeout=20)
        except queue.Empty:
            raise RunFailed("echo server did not start within 20 s") from None
        if "listening" not in line:
            raise RunFailed(f"echo server: {line.strip()}")

    def first_byte(self) -> dict:
        """One connection through hostb's tunnel port, timed by a client inside hostb."""
        try:
            result = subprocess.run(
                [*self.ns("hostb"), sys.executable, "-c", CLIENT, str(TUNNEL_PORT), str(CONNECTION_TIMEOUT)],
                check=False, capture_output=True, text=True, timeout=CONNECTION_TIMEOUT + 15,
            )
        except subprocess.TimeoutExpired:
            raise RunFailed("tunnel client did not finish") from None
        try:
            answer = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RunFailed(f"tunnel client: {result.stdout}{result.stderr}") from None
        if answer["error"]:
            raise RunFailed(f"tunnel client: {answer['error']}")
        return answer

    def logs(self, last: int = 40) -> str:
        return "\n".join(
            f"--- {name} (pid {node.pid}, exit {node.proc.poll()}):\n{node.log_text(last=last)}"
            for name, node in self.nodes.items()
        )


def measure(run: Run) -> dict:
    values: dict = {"prefix": run.prefix}
    run.up()
    run.node("pub", "pub")
    pub_id = run.expect("pub", "punchgate starting", START_TIMEOUT)["peer_id"]
    run.expect("pub", "phase transition", START_TIMEOUT, to_phase="ready")
    bootstrap = f"/ip4/{PUB_IP}/tcp/{NODE_PORT}/p2p/{pub_id}"
    run.start_echo_server()
    hosta = run.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
    hostb = run.node("hostb", "hostb", "--bootstrap", bootstrap, "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}")
    hosta_id = run.expect("hosta", "punchgate starting", START_TIMEOUT)["peer_id"]
    for name, node in (("hosta", hosta), ("hostb", hostb)):
        ready = run.expect(name, "phase transition", START_TIMEOUT, to_phase="ready")
        values[f"start_to_ready_{name}_ms"] = round((event_time(ready) - node.started_at) * 1000, 1)
    run.expect("hosta", "relay reservation accepted", SETUP_TIMEOUT)
    run.expect("hosta", "service published", SETUP_TIMEOUT, service="echo")

    first = run.first_byte()
    values["first_byte_first_connection_ms"] = first["first_byte_ms"]
    opened = run.expect("hostb", "client tunnel opened", 5)
    values["setup_first_connection_ms"] = opened.get("setup_ms")
    values["first_connection_path"] = opened.get("path")
    resolved = run.expect("hostb", "service resolved", 5, service="echo")
    values["name_resolution_ms"] = resolved.get("duration_ms")
    relay = run.maybe("hostb", "relay connected", 2)  # absent when the runtime does not log it
    values["relay_connect_ms"] = relay.get("duration_ms") if relay else None
    punch = run.expect("hostb", "hole punch", PUNCH_TIMEOUT, peer=hosta_id)
    values["hole_punch_outcome"] = punch.get("outcome")
    values["hole_punch_ms"] = punch.get("duration_ms") if punch.get("outcome") == "direct" else None

    second = run.first_byte()
    values["first_byte_after_punch_ms"] = second["first_byte_ms"]
    opened = run.expect("hostb", "client tunnel opened", 5, nth=2)
    values["setup_after_punch_ms"] = opened.get("setup_ms")
    values["after_punch_path"] = opened.get("path")
    return values


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class signals_deferred:
    """Holds SIGINT/SIGTERM back while a lab is being removed; re-raises one afterwards."""

    def __enter__(self) -> None:
        self.caught: list[int] = []
        self.previous = {
            sig: signal.signal(sig, lambda signum, frame: self.caught.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.caught:
            raise KeyboardInterrupt


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for key, _ in METRICS:
        samples = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        summary[key] = (
            {"n": len(samples), "median": statistics.median(samples), "min": min(samples), "max": max(samples)}
            if samples else {"n": 0, "median": None, "min": None, "max": None}
        )
    return summary


def print_summary(runs: list[dict], summary: dict, failures: list[dict], requested: int) -> None:
    print(f"\n{len(runs)} of {requested} runs completed (MASQUERADE NATs)\n")
    print(f"{'measurement':34} {'n':>3} {'median ms':>11} {'min ms':>10} {'max ms':>10}")
    for key, label in METRICS:
        s = summary[key]
        if s["n"]:
            print(f"{label:34} {s['n']:>3} {s['median']:>11.1f} {s['min']:>10.1f} {s['max']:>10.1f}")
        else:
            print(f"{label:34} {0:>3} {'n/a':>11} {'n/a':>10} {'n/a':>10}")
    outcomes = [r.get("hole_punch_outcome") for r in runs]
    paths = [r.get("after_punch_path") for r in runs]
    print(f"\nhole punch outcomes: {outcomes}; tunnel path after the punch: {paths}")
    for failure in failures:
        print(f"run {failure['run']} failed: {failure['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="number of fresh labs to measure (default 5)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's values and the summary here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0:
        print("bench_nat: must run as root (network namespaces)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        print(f"bench_nat: missing {', '.join(missing)} (apt-get install -y iproute2 iptables)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl+C, so the lab is torn down
    workdir = Path(tempfile.mkdtemp(prefix="punchgate-bench-nat-"))
    runs: list[dict] = []
    failures: list[dict] = []
    interrupted = False
    try:
        for number in range(1, args.runs + 1):
            run = Run(number, workdir)
            started = time.monotonic()
            try:
                values = measure(run)
                values["run"] = number
                runs.append(values)
                print(
                    f"run {number}: ready a/b {values['start_to_ready_hosta_ms']}/{values['start_to_ready_hostb_ms']} ms, "
                    f"resolve {values['name_resolution_ms']} ms, relay {values['relay_connect_ms']} ms, "
                    f"punch {values['hole_punch_outcome']} {values['hole_punch_ms']} ms, first byte "
                    f"{values['first_byte_first_connection_ms']} / {values['first_byte_after_punch_ms']} ms "
                    f"({time.monotonic() - started:.1f} s)",
                    flush=True,
                )
            except RunFailed as exc:
                failures.append({"run": number, "error": str(exc)})
                print(f"run {number} FAILED: {exc}\n{run.logs()}", file=sys.stderr, flush=True)
            finally:
                with signals_deferred():
                    run.close()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; lab removed", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(runs)
    print_summary(runs, summary, failures, args.runs)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": runs, "failures": failures, "summary": summary, "nat": "masquerade"}, indent=2) + "\n"
        )
    return 1 if failures or interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
