"""The log analysis scripts (scripts/log_*.py) on the logs of a real run.

Once per module, real ``punchgate`` processes run on loopback in each log format, with
stderr going straight to a file as a user would run them (``2> logs/peer-a.log``):
peer B exposes an echo server, peer A tunnels to it, three connections carry payloads
of known sizes (sha256 checked) and one asks for a service B does not have. Then both
stop on SIGTERM, and every script reads the logs as a subprocess: the directory, one
file, stdin, as text and as JSON; the figures must be what the run did.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from punchgate.devtools.echo import EchoServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("summary", "connections", "latency", "tunnels", "phases")
SIZES = (1_000, 65_536, 300_000)  # bytes sent through each accepted tunnel connection
UNKNOWN = "nope"  # the service peer A asks for and peer B does not expose
FORMATS = ("json", "console")
READY = {"json": '"to_phase": "ready"', "console": "to_phase=ready"}
EVENT = {"json": '"event": "{}"', "console": "] {} "}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoggedNode:
    """A real punchgate process whose stderr goes to a log file."""

    def __init__(self, log: Path, fmt: str, *args: str) -> None:
        self.log = log
        self.fmt = fmt
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUNCHGATE_")}
        # The console format is the default; a file is not a terminal, so no colour.
        command = [sys.executable, "-m", "punchgate", *(["--log-format", "json"] if fmt == "json" else []), *args]
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=handle, env=env, cwd=log.parent
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, count: int = 1, timeout: float = 30) -> str:
        """Poll the log file (bounded) until ``needle`` occurs ``count`` times; the log text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if text.count(needle) >= count:
                return text
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} x{count} not in {self.log.name} (exit {self.proc.poll()}):\n{text}")
            time.sleep(0.05)

    def wait_event(self, name: str, count: int = 1) -> str:
        return self.wait_for(EVENT[self.fmt].format(name), count)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def first_match(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return match.group(1)


def echo_through(port: int, size: int) -> int:
    """Send ``size`` random bytes through the tunnel at ``port``; check they come back."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        sender = threading.Thread(target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received = b"".join(iter(lambda: conn.recv(1 << 20), b""))
        sender.join()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    return len(received)


def refused_through(port: int) -> bytes:
    """A connection to a tunnel whose service the provider refuses: closed with nothing read."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(b"anyone?")
        try:
            return conn.recv(1024)
        except ConnectionResetError:
            return b""


def real_run(directory: Path, fmt: str, echo_port: int) -> dict:
    """Peers B (provider) and A (client) in ``fmt``; what the test knows about the run."""
    directory.mkdir()
    nodes: list[LoggedNode] = []
    try:
        b = LoggedNode(
            directory / "peer-b.log", fmt, "--identity", "b.key", "--no-mdns",
            "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", "/ip4/127.0.0.1/udp/0/quic-v1",
            "--expose", f"echo=127.0.0.1:{echo_port}",
        )
        nodes.append(b)
        text = b.wait_for(READY[fmt])
        b_tcp = first_match(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", text)
        b_id = b_tcp.rsplit("/", 1)[1]
        echo_bind, unknown_bind = free_port(), free_port()
        a = LoggedNode(
            directory / "peer-a.log", fmt, "--identity", "a.key", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0",
            "--bootstrap", b_tcp,
            "--tunnel", f"{b_id}:echo@127.0.0.1:{echo_bind}", "--tunnel", f"{b_id}:{UNKNOWN}@127.0.0.1:{unknown_bind}",
        )
        nodes.append(a)
        a_text = a.wait_for(READY[fmt])
        a_id = first_match(r"peer_id\W+(12D3\w+)", a_text)
        for size in SIZES:
            assert echo_through(echo_bind, size) == size
        assert refused_through(unknown_bind) == b""
        a.wait_event("client tunnel closed", len(SIZES))
        a.wait_event("client tunnel rejected")
        b.wait_event("tunnel closed", len(SIZES))
        b.wait_event("tunnel rejected")
        assert a.stop() == 0
        assert b.stop() == 0
    finally:
        for node in nodes:
            node.kill()
    return {"dir": directory, "a_id": a_id, "b_id": b_id, "b_tcp": b_tcp, "echo_bind": f"127.0.0.1:{echo_bind}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real run per log format (in parallel), logs in <tmp>/<format>/peer-{a,b}.log."""
    base = tmp_path_factory.mktemp("logs")
    results: dict[str, dict] = {}
    errors: list[BaseException] = []
    with EchoServer() as echo:
        def one(fmt: str) -> None:
            try:
                results[fmt] = real_run(base / fmt, fmt, echo.port)
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(fmt,)) for fmt in FORMATS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    if errors:
        raise errors[0]
    assert set(results) == set(FORMATS), "a run did not finish in 120 s"
    return results


# ---------------------------------------------------------------- running the scripts


def script(name: str, *args: str, stdin: bytes | None = None, flags: tuple[str, ...] = (), cwd: Path | None = None):
    """``python scripts/log_<name>.py args`` as a user runs it; the finished process."""
    return subprocess.run(
        [sys.executable, *flags, str(ROOT / "scripts" / f"log_{name}.py"), *args],
        input=stdin, capture_output=True, timeout=60, cwd=cwd or ROOT,
    )


def report(name: str, *args: str, stdin: bytes | None = None) -> dict:
    """The --json report; the script must succeed."""
    done = script(name, *args, "--json", stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def nodes(rep: dict) -> dict[str, dict]:
    return {node["label"]: node for node in rep["nodes"]}


def text(name: str, *args: str) -> str:
    done = script(name, *args)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def count_events(log: Path, fmt: str, name: str) -> int:
    """Events called ``name`` in a log, counted without the scripts' parser."""
    if fmt == "json":
        return sum(1 for line in log.read_text().splitlines() if json.loads(line)["event"] == name)
    return sum(1 for line in log.read_text().splitlines() if f"] {name} " in line)


def check_png(path: Path, size: tuple[int, int]) -> None:
    """A complete PNG of ``size`` pixels: signature, every chunk's CRC, image data that
    decompresses to exactly one row per pixel row, and an end chunk."""
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, idat = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind, body = data[position + 4:position + 8], data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append(kind)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        if kind == b"IDAT":
            idat += body
        position += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND"
    assert (width, height) == size
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    assert depth == 8
    assert len(zlib.decompress(idat)) == height * (1 + width * channels)
    assert 5_000 < len(data) < 2_000_000


# ---------------------------------------------------------------- each script on the real run


@pytest.mark.parametrize("fmt", FORMATS)
def test_summary_tells_who_listened_where_and_what_went_through(runs, fmt):
    run = runs[fmt]
    rep = report("summary", str(run["dir"]))
    assert rep["skipped_lines"] == 0
    a, b = nodes(rep)["peer-a"], nodes(rep)["peer-b"]
    from punchgate import __version__

    assert (a["peer_id"], b["peer_id"]) == (run["a_id"], run["b_id"])
    for node, key in ((a, "a.key"), (b, "b.key")):
        assert node["format"] == fmt
        assert (node["version"], node["identity"], node["identity_created"]) == (__version__, key, True)
        assert node["stopped"] and node["shutdown_signal"] == "SIGTERM"
        assert node["problems"]["by_level"].get("error", 0) == 0
    assert run["b_tcp"] in b["listen_addresses"]
    assert any("/quic-v1/" in address for address in b["listen_addresses"])
    assert a["phases"] == ["starting", "joining", "ready", "shutting_down"]
    assert b["phases"] == ["starting", "ready", "shutting_down"]
    assert a["connections"]["by_transport"].get("tcp", 0) >= 1
    total = sum(SIZES)
    assert b["tunnels"]["served"]["echo"] | {"rejections": None} == {
        "accepted": 3, "rejected": 0, "closed": 3, "errors": 0, "bytes_to_service": total,
        "bytes_from_service": total, "rejections": None,
    }
    assert b["tunnels"]["served"][UNKNOWN]["rejections"] == {f"unknown service '{UNKNOWN}'": 1}
    used = a["tunnels"]["used"]["echo"]
    assert (used["opened"], used["closed"], used["bytes_to_remote"], used["bytes_from_remote"]) == (3, 3, total, total)
    assert used["paths"] == {"direct": 3}
    assert a["tunnels"]["used"][UNKNOWN]["rejections"] == {f"unknown service '{UNKNOWN}'": 1}
    assert {k["event"] for k in a["problems"]["kinds"]} == {"client tunnel rejected"}

    out = text("summary", str(run["dir"]))
    assert out == (run["dir"] / "summary.txt").read_text()  # kept next to the logs
    for needle in (run["a_id"], run["b_id"], run["b_tcp"], f"{total:,} B", f"unknown service '{UNKNOWN}'",
                   "starting -> joining -> ready -> shutting_down", "stopped cleanly on SIGTERM",
                   "0 lines skipped"):
        assert needle in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_connections_pair_opens_and_closes_per_peer(runs, fmt):
    run = runs[fmt]
    rep = report("connections", str(run["dir"]))
    for label, other, other_label in (("peer-a", run["b_id"], "peer-b"), ("peer-b", run["a_id"], "peer-a")):
        node = nodes(rep)[label]
        log = run["dir"] / f"{label}.log"
        opened, closed = count_events(log, fmt, "connection opened"), count_events(log, fmt, "connection closed")
        totals = node["connections"]
        assert (totals["opened"], totals["closed"]) == (opened, closed) and opened >= 1
        assert set(node["peers"]) == {other}  # loopback, no mDNS: only each other
        peer = node["peers"][other]
        assert peer["name"] == other_label
        assert set(peer["transports"]) == {"tcp"} and peer["transports"]["tcp"] == opened
        # Every close ends one session; the rest were still open when the node stopped.
        assert peer["session_s"]["count"] == closed - totals["closed_without_open"]
        assert totals["open_at_end"] == opened - peer["session_s"]["count"]
        assert all(d >= 0 for d in peer["open_for_s"]) and len(peer["open_for_s"]) == totals["open_at_end"]
        assert sum(m["opened"] for m in node["churn_per_minute"]) == opened
        assert sum(m["closed"] for m in node["churn_per_minute"]) == closed
    assert nodes(rep)["peer-a"]["peers"][run["b_id"]]["bootstrap_connected"] == 1

    out = text("connections", str(run["dir"]))
    assert "peer-b (.." in out and "tcp x" in out and "churn per minute" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_tunnels_per_service_with_bytes_reasons_and_a_plot(runs, fmt, tmp_path):
    run = runs[fmt]
    png = tmp_path / "bytes.png"
    done = script("tunnels", str(run["dir"]), "--json", "--plot", str(png))
    assert done.returncode == 0, done.stderr.decode()
    a, b = nodes(json.loads(done.stdout))["peer-a"], nodes(json.loads(done.stdout))["peer-b"]
    served, used = b["served"]["echo"], a["used"]["echo"]
    assert [t["bytes_to_service"] for t in served["tunnels"]] == list(SIZES)
    assert [t["bytes_from_service"] for t in served["tunnels"]] == list(SIZES)
    assert [t["bytes_to_remote"] for t in used["tunnels"]] == list(SIZES)
    assert served["peers"] == {run["a_id"]: {"count": 3, "name": "peer-a"}}
    assert served["duration_s"]["count"] == used["duration_s"]["count"] == 3
    assert used["setup_ms"]["count"] == 3 and used["setup_ms"]["min"] > 0
    assert used["binds"] == [run["echo_bind"]]
    assert b["served"][UNKNOWN]["rejected"] == 1 and b["served"][UNKNOWN]["accepted"] == 0
    assert a["used"][UNKNOWN]["rejected"] == 1 and a["used"][UNKNOWN]["opened"] == 0
    assert b["totals"]["bytes_to_services"] == a["totals"]["bytes_to_remote"] == sum(SIZES)
    assert a["served"] == {} and b["used"] == {}
    check_png(png, (600, 500))  # six bars: three tunnels as each side saw them

    out = text("tunnels", str(run["dir"]))
    assert f"{sum(SIZES):,}" in out and f"{UNKNOWN}: rejected x1: unknown service '{UNKNOWN}'" in out
    assert "direct x3" in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_phases_timeline_and_no_anomaly_in_a_clean_run(runs, fmt):
    run = runs[fmt]
    rep = nodes(report("phases", str(run["dir"])))
    assert rep["peer-a"]["phases_seen"] == ["starting", "joining", "ready", "shutting_down"]
    assert rep["peer-b"]["phases_seen"] == ["starting", "ready", "shutting_down"]
    for node in rep.values():
        assert node["anomalies"] == []
        assert node["reached_ready"] and node["stopped"] and node["ready_after_s"] > 0
        offsets = [t["offset_s"] for t in node["timeline"]]
        assert offsets == sorted(offsets)
        assert all(entry["entered"] == 1 and entry["seconds"] >= 0 for entry in node["per_phase"].values())
        assert node["stays"][-1]["ended_by"] == "stopped"
    out = text("phases", str(run["dir"]))
    assert "joining -> ready" in out and "anomalies: none" in out


def test_phases_anomalies_in_a_cut_log_and_a_return_to_joining(runs):
    lines = (runs["json"]["dir"] / "peer-a.log").read_text().splitlines(keepends=True)
    events = [json.loads(line) for line in lines]
    to_ready = next(i for i, e in enumerate(events) if e.get("to_phase") == "ready")
    cut = "".join(lines[:to_ready]).encode()  # the node was killed while joining
    node = report("phases", "-", stdin=cut)["nodes"][0]
    assert not node["reached_ready"]
    assert "never became ready" in node["anomalies"]
    assert any("ends in phase joining without 'stopped'" in a for a in node["anomalies"])

    # The same real log with the node losing its bootstrap peer once: ready -> joining -> ready.
    back = dict(events[to_ready], from_phase="ready", to_phase="joining")
    again = dict(events[to_ready], from_phase="joining", to_phase="ready")
    relapse = lines[:to_ready + 1] + [json.dumps(back) + "\n", json.dumps(again) + "\n"] + lines[to_ready + 1:]
    node = report("phases", "-", stdin="".join(relapse).encode())["nodes"][0]
    assert node["per_phase"]["joining"]["entered"] == 2 and node["per_phase"]["ready"]["entered"] == 2
    assert [a for a in node["anomalies"] if "back to joining from ready" in a]
    assert len(node["anomalies"]) == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_latency_of_a_short_run_has_no_pings(runs, fmt):
    """Nodes ping every 30 s (not configurable): a short run logs none, and says so."""
    run = runs[fmt]
    rep = report("latency", str(run["dir"]))
    assert [n["pings"] for n in rep["nodes"]] == [0, 0]
    assert "no ping events" in text("latency", str(run["dir"]))


RTTS = [float(ms) for ms in range(1, 21)]  # 1..20 ms, and two timeouts


def ping_log(runs) -> bytes:
    """Peer A's real JSON log followed by ping events built from its real `connection
    opened` event to B (same peer, fields and shape as the pinger logs), 30 s apart."""
    lines = (runs["json"]["dir"] / "peer-a.log").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    opened = next(e for e in events if e["event"] == "connection opened")
    stop = next(i for i, e in enumerate(events) if e["event"] == "shutdown requested")
    start = calendar.timegm(time.strptime(opened["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
    pings = []
    for index, rtt in enumerate(RTTS + [None, None]):
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + 30 * (index + 1))) + ".250000Z"
        fields = {"ok": True, "rtt_ms": rtt} if rtt is not None else {"ok": False, "reason": "TooSlowError"}
        pings.append({"peer": opened["peer"], **fields, "event": "ping", "level": "info", "timestamp": moment})
    body = lines[:stop] + [json.dumps(p) for p in pings] + lines[stop:]
    return ("\n".join(body) + "\n").encode()


def test_latency_figures_and_plot_from_ping_events(runs, tmp_path):
    log = tmp_path / "pinged.log"
    log.write_bytes(ping_log(runs))
    png = tmp_path / "rtt.png"
    done = script("latency", str(log), "--json", "--plot", str(png))
    assert done.returncode == 0, done.stderr.decode()
    node = json.loads(done.stdout)["nodes"][0]
    peer = node["peers"][runs["json"]["b_id"]]
    assert (peer["pings"], peer["ok"], peer["failed"]) == (22, 20, 2)
    assert peer["failure_rate"] == round(2 / 22, 4)
    assert peer["reasons"] == {"TooSlowError": 2}
    # 1..20: percentiles interpolate between ranks (numpy's default): p95 = 19 + 0.05, p99 = 19 + 0.81.
    assert peer["rtt_ms"] == {"count": 20, "min": 1.0, "mean": 10.5, "median": 10.5, "p95": 19.05, "p99": 19.81,
                              "max": 20.0}
    check_png(png, (1000, 500))
    assert (tmp_path / "pinged.latency.json").exists()
    out = text("latency", str(log))
    assert "22 pings to 1 peer(s), 2 failed (9.1%)" in out and "19.81" in out and "TooSlowError" in out


def test_latency_of_ping_events_in_the_console_format(runs):
    """The same pings rendered by punchgate's own console configuration, in a process."""
    peer = runs["json"]["b_id"]
    program = (
        "import sys; from punchgate.logs import configure_logging, get_logger\n"
        "configure_logging('console', 'info', stream=sys.stdout)\n"
        "log = get_logger('punchgate.ping')\n"
        f"for rtt in {RTTS!r}: log.info('ping', peer={peer!r}, ok=True, rtt_ms=rtt)\n"
        f"log.info('ping', peer={peer!r}, ok=False, reason='TooSlowError')\n"
    )
    rendered = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, check=True).stdout
    assert b"] ping " in rendered and b"{" not in rendered
    node = report("latency", "-", stdin=rendered)["nodes"][0]
    assert node["format"] == "console" and node["skipped_lines"] == 0
    entry = node["peers"][peer]
    assert (entry["pings"], entry["failed"], entry["rtt_ms"]["p99"], entry["rtt_ms"]["mean"]) == (21, 1, 19.81, 10.5)


# ---------------------------------------------------------------- inputs, garbage, errors


def comparable(node: dict) -> dict:
    return {k: v for k, v in node.items() if k not in ("source", "label")}


@pytest.mark.parametrize("name", SCRIPTS)
def test_directory_file_and_stdin_give_the_same_figures(runs, name):
    run = runs["console"]
    log = run["dir"] / "peer-a.log"
    from_dir = nodes(report(name, str(run["dir"])))["peer-a"]
    from_file = report(name, str(log))["nodes"]
    from_stdin = report(name, "-", stdin=log.read_bytes())["nodes"]
    assert len(from_file) == len(from_stdin) == 1
    assert comparable(from_file[0]) == comparable(from_stdin[0])
    # The directory report names peer B from its log; alone, peer A's log cannot.
    assert json.dumps(comparable(from_file[0])) == json.dumps(comparable(from_dir)).replace('"peer-b"', "null")
    assert from_stdin[0]["source"] == "<stdin>"
    assert json.loads((run["dir"] / f"peer-a.{name}.json").read_text())["nodes"] == from_file
    before = sorted(p.name for p in run["dir"].iterdir())
    out = script(name, "-", stdin=log.read_bytes()).stdout.decode()
    assert out.startswith(f"punchgate {name} report: <stdin>")
    assert sorted(p.name for p in run["dir"].iterdir()) == before  # nothing kept for stdin
    assert text(name, str(log)) == (run["dir"] / f"peer-a.{name}.txt").read_text()


GARBAGE = [
    b"\x00\xff\xfe\x80 binary noise\n",
    b'{"event": "tunnel clo\n',  # truncated JSON
    b"Starting echo server on 127.0.0.1:7777 (another program)\n",
    b'["a", "json", "array"]\n',
    b'{"message": "an object without an event"}\n',
    b"\x1b[31mERROR\x1b[0m something else entirely\n",
    b"2026-01-01T00:00:00Z [info     ]\n",  # a console line cut after its level
    b"=" * 3000 + b"\n",
]


# Events and fields the scripts do not know (the runtime gains some): events, not garbage.
NEW_EVENTS = [
    b'{"event": "nat learnt", "by": "dialback", "status": "private", "level": "info",'
    b' "timestamp": "2026-01-01T00:00:00.5Z"}\n',
    b"2026-01-01T00:00:00.600000Z [info     ] relay limits                   duration_s=7200 data_bytes=8589934592\n",
]


def test_garbage_lines_are_counted_and_skipped(runs, tmp_path):
    clean = runs["json"]["dir"] / "peer-a.log", runs["console"]["dir"] / "peer-b.log"
    first = clean[0].read_bytes().splitlines(keepends=True)
    second = clean[1].read_bytes().splitlines(keepends=True)
    lines = first[:1] + NEW_EVENTS + first[1:] + second[:1] + NEW_EVENTS + second[1:]
    mixed = []
    for index, line in enumerate(lines):
        mixed.append(line)
        if index % 5 == 2:
            mixed.append(GARBAGE[(index // 5) % len(GARBAGE)])
    inserted = len(mixed) - len(lines)
    assert inserted >= len(GARBAGE)
    log = tmp_path / "mixed.log"
    log.write_bytes(b"".join(mixed) + b'{"event": "tunnel closed", "bytes_to')  # and a cut last line
    for name in SCRIPTS:
        dirty, tidy = report(name, str(log)), report(name, "-", stdin=b"".join(lines))
        assert dirty["skipped_lines"] == inserted + 1, name
        assert [comparable(n) | {"lines": 0, "skipped_lines": 0, "skipped_samples": 0} for n in dirty["nodes"]] == [
            comparable(n) | {"lines": 0, "skipped_lines": 0, "skipped_samples": 0} for n in tidy["nodes"]
        ], name
    assert [n["format"] for n in dirty["nodes"]] == ["mixed", "mixed"]  # two runs, one section each
    assert [n["events"] for n in tidy["nodes"]] == [len(first) + 2, len(second) + 2]
    assert tidy["skipped_lines"] == 0
    out = text("summary", str(log))
    assert f"{inserted + 1} lines skipped" in out


def test_scripts_need_only_the_standard_library_and_plots_say_what_is_missing(runs, tmp_path):
    """With site-packages off (python -S), the reports run; --plot fails with one line."""
    for name in SCRIPTS:
        done = script(name, str(runs["json"]["dir"]), flags=("-S",))
        assert done.returncode == 0, (name, done.stderr.decode())
    png = tmp_path / "rtt.png"
    done = script("latency", str(runs["json"]["dir"]), "--plot", str(png), flags=("-S",))
    assert done.returncode == 1
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("log_latency.py: error: --plot needs matplotlib")
    assert not png.exists() and list(tmp_path.iterdir()) == []


def test_default_is_the_logs_directory_here(runs, tmp_path):
    (tmp_path / "logs").mkdir()
    for name in ("peer-a.log", "peer-b.log"):
        (tmp_path / "logs" / name).write_bytes((runs["json"]["dir"] / name).read_bytes())
    done = script("phases", cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("punchgate phases report: logs")
    assert (tmp_path / "logs" / "phases.txt").read_bytes() == done.stdout


def test_usage_errors(tmp_path):
    missing = script("summary", str(tmp_path / "nope.log"))
    assert missing.returncode == 2
    assert missing.stderr.decode().strip().startswith("log_summary.py: error: ") and missing.stdout == b""
    assert len(missing.stderr.decode().splitlines()) == 1
    empty = script("tunnels", str(tmp_path))
    assert empty.returncode == 1 and "no *.log files" in empty.stderr.decode()
    no_logs = script("connections", cwd=tmp_path)
    assert no_logs.returncode == 1 and "no logs/ directory in" in no_logs.stderr.decode()
    bad_limit = script("phases", str(tmp_path), "--limit", "joining")
    assert bad_limit.returncode == 2 and "PHASE=SECONDS" in bad_limit.stderr.decode()
    bad_plot = script("latency", str(tmp_path), "--plot", str(tmp_path / "no" / "such" / "dir.png"))
    assert bad_plot.returncode == 2 and "does not exist" in bad_plot.stderr.decode()
