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
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from punchgate.devtools.natlab import NatLab  # noqa: E402

START_TIMEOUT = 30
SETUP_TIMEOUT = 30
CONNECTION_TIMEOUT = 60
PUNCH_TIMEOUT = 40

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


def event_time(event: dict) -> float:
    """The event's ISO UTC timestamp as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def maybe(lab: NatLab, name: str, event: str, timeout: float, **fields) -> dict | None:
    """NAME's event called EVENT, or None if it does not come within TIMEOUT."""
    try:
        return lab.nodes[name].wait_event(event, timeout=timeout, **fields)
    except AssertionError:
        return None


def first_byte(lab: NatLab, name: str) -> dict:
    """One connection through hostb's tunnel port, timed by a client inside hostb."""
    answer = lab.ping_through_tunnel(name, CONNECTION_TIMEOUT)
    if answer["error"]:
        raise RunFailed(f"tunnel client: {answer['error']}")
    return answer


def measure(lab: NatLab) -> dict:
    values: dict = {"prefix": lab.prefix}
    lab.up(timeout=120)
    started = lab.start_tunnel_topology(START_TIMEOUT)
    for name, ready in started.ready.items():
        values[f"start_to_ready_{name}_ms"] = round((event_time(ready) - lab.nodes[name].started_at) * 1000, 1)
    lab.expect("hosta", "relay reservation accepted", SETUP_TIMEOUT)
    lab.expect("hosta", "service published", SETUP_TIMEOUT, service="echo")

    first = first_byte(lab, "first client")
    values["first_byte_first_connection_ms"] = first["first_byte_ms"]
    opened = lab.expect("hostb", "client tunnel opened", 5)
    values["setup_first_connection_ms"] = opened.get("setup_ms")
    values["first_connection_path"] = opened.get("path")
    resolved = lab.expect("hostb", "service resolved", 5, service="echo")
    values["name_resolution_ms"] = resolved.get("duration_ms")
    relay = maybe(lab, "hostb", "relay connected", 2)  # absent when the runtime does not log it
    values["relay_connect_ms"] = relay.get("duration_ms") if relay else None
    punch = lab.expect("hostb", "hole punch", PUNCH_TIMEOUT, peer=started.hosta_id)
    values["hole_punch_outcome"] = punch.get("outcome")
    values["hole_punch_ms"] = punch.get("duration_ms") if punch.get("outcome") == "direct" else None

    second = first_byte(lab, "second client")
    values["first_byte_after_punch_ms"] = second["first_byte_ms"]
    opened = lab.expect("hostb", "client tunnel opened", 5, nth=2)
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
            lab = NatLab(workdir, "pgb", failure=RunFailed)
            started = time.monotonic()
            try:
                values = measure(lab)
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
                print(f"run {number} FAILED: {exc}\n{lab.report(last=40)}", file=sys.stderr, flush=True)
            finally:
                with signals_deferred():
                    down = lab.close()
                    if down is not None and down.returncode != 0:
                        print(f"warning: lab {lab.prefix} down failed: {down.stderr.strip()}", file=sys.stderr)
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
