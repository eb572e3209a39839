#!/usr/bin/env python3
"""A punchgate process under attack on loopback: how fast it refuses, what it costs, and
how fast its good peer stays. Prints one block of figures per scenario.

    .venv/bin/python scripts/bench_abuse.py               # every scenario
    .venv/bin/python scripts/bench_abuse.py streams junk  # some of them
    .venv/bin/python scripts/bench_abuse.py --json out.jsonl

Scenarios (punchgate/devtools/hostile.py): ``streams`` (one peer opens 10,000 streams
and never sends a request), ``handshakes`` (1,000 connections from one address that
never finish a handshake), ``handshakes40`` (the same from 40 addresses), ``relay``
(identities flooding relay reservations, one naming 200 made-up peers), ``junk`` (16 MiB
sent on each of 200 refused streams). The node under attack runs with the default
limits, except the relay caps (12 in all, 3 per address) so that a flood reaches them.
The good peer echoes 16 MiB through its tunnel, sha256 checked, in its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout

from punchgate.devtools.hostile import (  # noqa: E402
    Target,
    handshake_flood,
    junk_flood,
    measure,
    reservation_flood,
    stream_flood,
)

SCENARIOS = {
    "streams": ("10,000 streams from one peer", lambda t: stream_flood(t.address, 10_000)),
    "handshakes": (
        "1,000 unfinished handshakes, one address",
        lambda t: handshake_flood("127.0.0.1", t.tcp_port, 1000, ["127.0.0.2"]),
    ),
    "handshakes40": (
        "1,000 unfinished handshakes, 40 addresses",
        lambda t: handshake_flood("127.0.0.1", t.tcp_port, 1000, [f"127.0.1.{i}" for i in range(1, 41)]),
    ),
    "relay": (
        "relay reservation flood",
        lambda t: reservation_flood(t.address, "127.0.2.1", 6, [f"127.0.2.{i}" for i in range(2, 14)], 200),
    ),
    "junk": ("16 MiB on each of 200 refused streams", lambda t: junk_flood(t.address, 200, 16 << 20)),
}


def show(title: str, figures: dict) -> None:
    print(f"\n== {title}")
    print(f"   outcomes: {figures['outcomes']}")
    for kind, latency in figures["latency_s"].items():
        print(f"   time to '{kind}': median {latency['median']} s, max {latency['max']} s")
    fds, rss, good = figures["fds"], figures["rss_mb"], figures["good_mb_s"]
    print(f"   node descriptors: {fds['before']} before, {fds['peak']} at the peak, {fds['after']} after")
    print(f"   node RSS: {rss['before']} MB before, {rss['peak']} MB at the peak, {rss['after']} MB after")
    print(
        f"   good peer: {good['before']} MB/s before, {good['during']} MB/s during (median of"
        f" {good['transfers_during']}, slowest {good['during_min']}), {good['after']} MB/s after"
    )


async def run(names: list[str], out: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Target(Path(tmp), ("--limit", "relay_reservations=12", "--limit", "relay_reservations_per_ip=3"))
        try:
            for name in names:
                title, attack = SCENARIOS[name]
                figures = await measure(target, lambda attack=attack: attack(target))
                show(title, figures)
                if out is not None:
                    with out.open("a") as f:
                        f.write(json.dumps({"scenario": title, **figures}) + "\n")
        finally:
            target.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"some of: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--json", type=Path, help="append each scenario's figures to this file")
    args = parser.parse_args()
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # the attacker's library complains about its own flood
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; scenarios: {', '.join(SCENARIOS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # the attacker holds 1,000 sockets at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096, hard))
    trio.run(run, args.scenarios or list(SCENARIOS), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
