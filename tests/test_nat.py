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
with a symmetric NAT it stays on the relay and no direct flow exists, and the relayed
path passes the data-path checks (1,000 concurrent connections, 10,000 sequential ones
with no descriptor or memory growth in any of the three nodes, a connection idle 75 s
meanwhile, the echo service killed under an open connection, a 100 MB echo whose reader
stalls 60 s); and killing the
provider (SIGKILL) ends an open client connection within 10 s instead of leaving it
hanging.

Runs only as root with ``ip`` and ``iptables`` installed (CI installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from punchgate.devtools.natlab import TUNNEL_PORT, NatLab, conntrack_bytes

PAYLOAD_BYTES = 2 * 1024 * 1024

START_TIMEOUT = 30  # a node: process start to "ready" (python start-up included, 2 cores)
SETUP_TIMEOUT = 30  # reachability, relay reservation, service publication
FIRST_ECHO_TIMEOUT = 60  # first connection: resolution, relay connection, handshake
PUNCH_TIMEOUT = 40  # the "hole punch" event after the first connection
PAYLOAD_TIMEOUT = 60
STALL_BYTES = 100 * 1024 * 1024  # relayed: a 100 MB echo whose reader stalls ...
STALL_SECONDS = float(os.environ.get("PUNCHGATE_STALL_TEST_SECONDS", "60"))  # ... this long
CLOSE_LIMIT = 10  # (d): the client connection must end this soon after the provider dies
IDLE_SECONDS = 75  # relayed: a tunnel connection that carries nothing this long still works
CONCURRENT = 1000  # relayed: connections at once, each echoing CONCURRENT_BYTES
CONCURRENT_BYTES = 64 * 1024
SEQUENTIAL = int(os.environ.get("PUNCHGATE_LEAK_TEST_CONNECTIONS", "10000"))  # relayed: one after another
FD_SLACK, RSS_SLACK = 5, 48 * 1024 * 1024  # what the nodes may hold more after SEQUENTIAL connections

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


def run_scenario(lab: NatLab, symmetric: bool) -> None:
    # pub: bootstrap node and relay; hosta: echo server + provider; hostb: client by name
    hosta_id = lab.start_tunnel_topology(START_TIMEOUT).hosta_id
    hosta, hostb = lab.nodes["hosta"], lab.nodes["hostb"]

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
    opened_before = hostb.count_events("client tunnel opened")
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
        relayed_reliability(lab)
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
    opened_before = hostb.count_events("client tunnel opened")
    closed_before = hostb.count_events("client tunnel closed")
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


def process_usage(pid: int) -> tuple[int, int]:
    """Open file descriptors and resident bytes of a process (any namespace: /proc is shared)."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return fds, rss_kib * 1024


def relayed_reliability(lab: NatLab) -> None:
    """Over the relay: many connections at once, many in a row without leaks, and a
    connection left idle meanwhile that still works afterwards."""
    idle_proc, idle = lab.client("idle client", "idle", str(TUNNEL_PORT), str(IDLE_SECONDS), str(IDLE_SECONDS + 60))
    _, line = idle.wait(lambda text: '"state"' in text, FIRST_ECHO_TIMEOUT, "idle connection open")
    assert json.loads(line)["state"] == "open", f"idle connection did not open: {line}"

    many = lab.many_through_tunnel("concurrent clients", CONCURRENT, CONCURRENT_BYTES, 120)
    lab.note(f"relayed: {CONCURRENT} concurrent x {CONCURRENT_BYTES} B: {many}")
    assert many["ok"] == CONCURRENT, f"relayed concurrent connections failed: {many}"

    nodes = {name: lab.nodes[name].proc.pid for name in ("hostb", "hosta", "pub")}
    warm = lab.sequential_through_tunnel("warm-up clients", 200, 60)
    assert warm["failures"] == 0 and warm["done"] == 200, f"relayed warm-up: {warm}"
    before = {name: process_usage(pid) for name, pid in nodes.items()}
    seq = lab.sequential_through_tunnel("sequential clients", SEQUENTIAL, 600)
    after = {name: process_usage(pid) for name, pid in nodes.items()}
    lab.note(f"relayed: {SEQUENTIAL} sequential connections: {seq}; (fds, rss) before {before} after {after}")
    assert seq["done"] == SEQUENTIAL and seq["failures"] == 0, f"relayed sequential connections: {seq}"
    for name in nodes:
        (fds0, rss0), (fds1, rss1) = before[name], after[name]
        assert fds1 <= fds0 + FD_SLACK, f"{name} leaks file descriptors: {fds0} -> {fds1}"
        assert rss1 <= rss0 + RSS_SLACK, f"{name} memory grew {(rss1 - rss0) >> 20} MiB"

    _, line = idle.wait(lambda text: '"done"' in text, IDLE_SECONDS + 60, "idle connection result")
    result = json.loads(line)
    lab.note(f"relayed idle connection: {result}")
    assert result["error"] is None and result["idle_s"] >= IDLE_SECONDS, f"idle connection: {result}"
    idle_proc.wait(timeout=10)

    # The service going away (its process killed) closes the client's connection.
    _, held = lab.client("service-gone client", "hold", str(TUNNEL_PORT), str(CLOSE_LIMIT + 20))
    _, line = held.wait(lambda text: '"state"' in text, FIRST_ECHO_TIMEOUT, "connection to the service open")
    assert json.loads(line)["state"] == "open", f"connection to the service did not open: {line}"
    echo_server, _ = lab.helpers["echo server"]
    killed_at = time.monotonic()
    echo_server.kill()  # SIGKILL, by PID
    echo_server.wait(timeout=10)
    arrived, line = held.wait(lambda text: '"closed"' in text, CLOSE_LIMIT + 25, "connection end after the service died")
    how = json.loads(line)["how"]
    lab.note(f"relayed: service killed; client connection ended ({how}) {arrived - killed_at:.2f} s later")
    assert how == "eof" or how.startswith("reset"), f"client connection did not end with the service: {how}"
    assert arrived - killed_at < CLOSE_LIMIT, f"client connection ended {arrived - killed_at:.1f} s after the service"
    lab.start_echo_server()  # back for the checks that follow


@pytest.mark.parametrize("symmetric", [False, True], ids=["masquerade", "symmetric"])
def test_tunnel_between_two_nats(tmp_path, symmetric):
    lab = NatLab(tmp_path, "pgt", symmetric)
    try:
        lab.up()
        try:
            run_scenario(lab, symmetric)
        except Exception as exc:  # any failure: say why, with every log of the lab
            reason = str(exc).split("; log:\n")[0]  # wait_for's own log dump is in the report
            raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}") from None
    finally:
        down = lab.close()
        assert down is None or down.returncode == 0, f"lab down failed:\n{down.stdout}{down.stderr}"
