"""Peers that misbehave on purpose, against a real punchgate process on loopback.

One provider process (exposing an echo service) is attacked four ways while a
well-behaved client process keeps echoing 16 MiB through its tunnel (sha256 checked,
in its own process): a peer opening 10,000 streams, 1,000 connections that never
finish a handshake (from one address, then spread over 40), a flood of relay
reservations, and a peer that keeps sending on streams the node refused. Each must be refused beyond its cap, with a reason where the protocol
carries one, while the node's descriptors and memory stay bounded and the good peer
keeps being served. The figures are printed (``pytest -s``) and, if
``PUNCHGATE_ABUSE_REPORT`` names a file, appended to it as JSON lines.
"""

from __future__ import annotations

import json
import os
import resource

import pytest

from punchgate.devtools.hostile import (
    Target,
    handshake_flood,
    junk_flood,
    measure,
    reservation_flood,
    stream_flood,
)
from punchgate.limits import NODE_BUSY, TOO_FAST, TOO_MANY_STREAMS, Limits

pytestmark = pytest.mark.slow

DEFAULTS = Limits()
RELAY_CAP, RELAY_CAP_PER_IP = 12, 3  # small, so a flood is quick to reach them
MB = 1e6
# Generous bounds: the machine has 2 cores shared by the node, its peer, the echo
# service and the attacker, so the good peer slows down while an attack burns CPU.
GOOD_PEER_SHARE = 0.2  # the good peer keeps at least this share of its speed
RSS_GROWTH_MB = 150  # the node's memory may grow this much at most


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # the attacker holds 1,000 sockets at once
        wanted = 4096 if hard == resource.RLIM_INFINITY else max(hard, 4096)
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, wanted))
    node = Target(
        tmp_path_factory.mktemp("hostile"),
        ("--limit", f"relay_reservations={RELAY_CAP}", "--limit", f"relay_reservations_per_ip={RELAY_CAP_PER_IP}"),
    )
    yield node
    node.close()


def report(name: str, figures: dict) -> None:
    line = json.dumps({"scenario": name, **figures})
    print(line)
    if os.environ.get("PUNCHGATE_ABUSE_REPORT"):
        with open(os.environ["PUNCHGATE_ABUSE_REPORT"], "a") as out:
            out.write(line + "\n")


def assert_node_held_up(figures: dict, extra_fds: int) -> None:
    fds, rss, good = figures["fds"], figures["rss_mb"], figures["good_mb_s"]
    assert fds["peak"] <= fds["before"] + extra_fds, fds
    assert fds["after"] <= fds["before"] + 2, fds
    assert rss["peak"] - rss["before"] < RSS_GROWTH_MB and rss["after"] - rss["before"] < RSS_GROWTH_MB, rss
    assert good["during"] >= GOOD_PEER_SHARE * good["before"], good
    assert good["after"] >= GOOD_PEER_SHARE * good["before"], good


async def test_a_peer_opening_10000_streams(target):
    figures = await measure(target, lambda: stream_flood(target.address, 10_000, probes=20))
    report("10,000 streams from one peer", figures)
    outcomes, latency = figures["outcomes"], figures["latency_s"]
    assert sum(outcomes.values()) == 10_000  # every stream ended: none left hanging
    late = "refused: bad request: no request in time"
    known = {late, *(f"refused: {r}" for r in (TOO_MANY_STREAMS, TOO_FAST, NODE_BUSY)), "reset without a reason"}
    assert {k.removeprefix("probe ") for k in outcomes} <= known, outcomes
    # At most tunnel_streams_per_peer were let in (they met the request deadline); beyond
    # that, refused with a reason; past the muxer's cap, reset before any protocol ran.
    assert 0 < outcomes.get(late, 0) <= DEFAULTS.tunnel_streams_per_peer
    assert outcomes.get(f"refused: {TOO_MANY_STREAMS}", 0) >= 500, outcomes
    assert outcomes.get("reset without a reason", 0) <= 10_000 - DEFAULTS.inbound_streams_per_conn
    # One more stream while the flood is held: refused, with the reason, at once.
    probe = f"probe refused: {TOO_MANY_STREAMS}"
    assert outcomes.get(probe) == 20 and latency[probe]["max"] < 1.0, (outcomes, latency)
    assert max(v["max"] for v in latency.values()) < 10 + 15  # the request deadline, and slack
    assert_node_held_up(figures, extra_fds=10)


async def test_a_peer_that_keeps_sending_on_refused_streams(target):
    """200 refused streams, each followed by 16 MiB nobody will read: the node discards it
    and resets each stream after 1 MiB, instead of buffering up to its 16 MiB window
    (3.2 GB here) until the connection ends."""
    figures = await measure(target, lambda: junk_flood(target.address, 200, 16 << 20))
    report("16 MiB sent on each of 200 refused streams", figures)
    outcomes = figures["outcomes"]
    assert outcomes.get("reset by the node") == 200, outcomes
    assert outcomes["MiB sent before the end, max"] < 16, outcomes  # cut off, not all taken
    assert_node_held_up(figures, extra_fds=10)


@pytest.mark.parametrize("spread", [1, 40], ids=["one-address", "40-addresses"])
async def test_1000_connections_that_never_finish_their_handshake(target, spread):
    sources = ["127.0.0.2"] if spread == 1 else [f"127.0.1.{i}" for i in range(1, spread + 1)]
    figures = await measure(target, lambda: handshake_flood("127.0.0.1", target.tcp_port, 1000, sources))
    report(f"1,000 unfinished handshakes from {spread} address(es)", figures)
    outcomes, latency = figures["outcomes"], figures["latency_s"]
    assert sum(outcomes.values()) == 1000  # the node closed every one of them
    cap = DEFAULTS.inbound_conns_per_ip if spread == 1 else DEFAULTS.inbound_conns
    # Beyond the cap: closed at accept. Within it: garbage fails at once, silence is cut
    # off at the handshake deadline; never more than the cap were held at a time.
    waited = sum(n for kind, n in outcomes.items() if kind.endswith("after waiting"))
    assert 1000 - waited >= 1000 - cap and waited > 0, outcomes
    assert max(v["max"] for v in latency.values()) < DEFAULTS.handshake_timeout + 5, latency
    assert_node_held_up(figures, extra_fds=cap + 10)


async def test_a_flood_of_relay_reservations(target):
    crowded, others = "127.0.2.1", [f"127.0.2.{i}" for i in range(2, 2 + RELAY_CAP)]
    crowd = RELAY_CAP_PER_IP + 3
    figures = await measure(target, lambda: reservation_flood(target.address, crowded, crowd, others, spoofed=200))
    report("relay reservation flood", figures)
    outcomes, latency = figures["outcomes"], figures["latency_s"]
    # The good client joined through the provider, so it holds a slot there already.
    target.client.log_text()  # take every line printed so far
    held = 1 if any(e["event"] == "relay reservation accepted" for e in target.client.events()) else 0
    # 200 RESERVEs naming made-up peers only renewed the sender's own slot...
    assert outcomes.get("spoof: OK") == 200, outcomes
    # ...so the slots went to real peers: 3 from the crowded address, the rest up to the cap.
    assert (outcomes.get("crowded: OK"), outcomes.get("crowded: RESOURCE_LIMIT_EXCEEDED")) == (RELAY_CAP_PER_IP, 3)
    spread_ok = RELAY_CAP - held - RELAY_CAP_PER_IP
    assert (outcomes.get("spread: OK"), outcomes.get("spread: RESOURCE_LIMIT_EXCEEDED")) == (
        spread_ok, len(others) - spread_ok
    ), outcomes
    assert max(v["max"] for k, v in latency.items() if "EXCEEDED" in k) < 2
    assert_node_held_up(figures, extra_fds=crowd + len(others) + 10)


def test_limits_refusals_are_logged_without_flooding_the_log(target):
    """Runs after the attacks: each kind of refusal was logged, a handful of times, not
    once per refused stream or connection."""
    text = target.provider.log_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    counts: dict[str, int] = {}
    for event in events:
        if event.get("event") in ("inbound connection refused", "inbound handshake timed out",
                                  "tunnel rejected", "relay reservation refused"):
            counts[event["event"]] = counts.get(event["event"], 0) + 1
    assert set(counts) == {"inbound connection refused", "inbound handshake timed out", "tunnel rejected",
                           "relay reservation refused"}, counts
    assert all(n <= 20 for n in counts.values()), counts
    assert any(e.get("not_logged_since", 0) > 100 for e in events), "the counts of lines held back are logged"
