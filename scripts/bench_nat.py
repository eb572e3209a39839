#!/usr/bin/env python3
"""Start-to-first-byte and recovery times of a tunnel between two hosts behind NATs.

Each run builds a fresh namespace lab (``scripts/netns_lab.sh``, a unique prefix), for
port-preserving (cone) NATs and for symmetric ones, and puts it through the situations
of ``tests/test_nat_orders.py`` (``punchgate.devtools.natlab.SITUATIONS``), in order:

1. all three nodes started at the same instant: pub (bootstrap node and relay), hosta
   (``--expose echo``) and hostb (``--tunnel-by-name echo``);
2. the provider killed and started again on another port, same identity;
3. the relay/bootstrap node killed and started again;
4. provider and client stopped, the client started ``--client-ahead`` s (20) before the
   provider.

After each, a client inside hostb connects to the tunnel as soon as it can and echoes
64 KiB (sha256 compared); the figure is the time from the start of the situation's last
node to the first echoed byte, with the path the tunnel took. Prints the median, min
and max over the runs for each NAT kind and situation, against the targets (5 s from a
simultaneous start, 15 s to recover).

    sudo .venv/bin/python scripts/bench_nat.py [--runs 5] [--nat cone,symmetric] [--json FILE]

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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from punchgate.devtools.natlab import SITUATIONS, NatLab  # noqa: E402

PAYLOAD = 64 * 1024
CLIENT_TIMEOUT = 60.0
TARGETS = {"all started at once": 5.0}  # seconds; the others: RECOVERY_TARGET
RECOVERY_TARGET = 15.0


class RunFailed(Exception):
    pass


def measure(lab: NatLab, client_ahead: float) -> dict:
    """One lab through every situation: {situation: {"first_byte_s", "path"}}."""
    lab.up(timeout=120)
    results = {}
    for situation in SITUATIONS:
        node = lab.enact(situation, client_ahead=client_ahead)
        before = lab.nodes["hostb"].count_events("client tunnel opened")
        answer = lab.first_echo(situation, lab.started[node], PAYLOAD, CLIENT_TIMEOUT)
        if answer["error"] is not None:
            raise RunFailed(f"{situation}: {answer}")
        opened = lab.expect("hostb", "client tunnel opened", 5, nth=before + 1)
        results[situation] = {"first_byte_s": answer["first_byte_s"], "path": opened.get("path")}
    return results


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
    for situation in SITUATIONS:
        samples = [r[situation]["first_byte_s"] for r in runs if situation in r]
        paths = sorted({r[situation]["path"] for r in runs if situation in r})
        target = TARGETS.get(situation, RECOVERY_TARGET)
        summary[situation] = {
            "n": len(samples),
            "median": statistics.median(samples) if samples else None,
            "min": min(samples) if samples else None,
            "max": max(samples) if samples else None,
            "paths": paths,
            "target": target,
            "result": None if not samples else ("pass" if statistics.median(samples) <= target else "miss"),
        }
    return summary


def print_summary(nat: str, summary: dict, runs: int, requested: int) -> None:
    print(f"\n{nat} NATs: {runs} of {requested} runs completed")
    print(f"{'situation (s from the last start to the first byte)':52} {'n':>2} {'median':>7} {'min':>6} {'max':>6}"
          f" {'target':>7}  result  path")
    for situation, s in summary.items():
        if s["n"]:
            print(f"{situation:52} {s['n']:>2} {s['median']:>7.2f} {s['min']:>6.2f} {s['max']:>6.2f}"
                  f" {s['target']:>6.0f}s  {s['result']:6}  {','.join(map(str, s['paths']))}")
        else:
            print(f"{situation:52} {0:>2} {'n/a':>7}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh labs per NAT kind (default 5)")
    parser.add_argument("--nat", default="cone,symmetric", help="NAT kinds to measure (default cone,symmetric)")
    parser.add_argument("--client-ahead", type=float, default=20.0, help="situation 4: seconds the client runs alone")
    parser.add_argument("--json", metavar="FILE", help="also write every run's values and the summary here")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.nat.split(",") if k.strip()]
    if args.runs < 1 or not kinds or any(k not in ("cone", "symmetric") for k in kinds):
        parser.error("--runs must be at least 1 and --nat a list of cone, symmetric")
    if os.geteuid() != 0:
        print("bench_nat: must run as root (network namespaces)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    if missing:
        print(f"bench_nat: missing {', '.join(missing)} (apt-get install -y iproute2 iptables)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl+C, so the lab is torn down
    workdir = Path(tempfile.mkdtemp(prefix="punchgate-bench-nat-"))
    report: dict = {}
    failed = interrupted = False
    try:
        for kind in kinds:
            runs: list[dict] = []
            failures: list[dict] = []
            for number in range(1, args.runs + 1):
                lab = NatLab(workdir, "pgb", symmetric=kind == "symmetric", failure=RunFailed)
                started = time.monotonic()
                try:
                    values = measure(lab, args.client_ahead)
                    runs.append(values)
                    figures = ", ".join(f"{s}: {v['first_byte_s']} s {v['path']}" for s, v in values.items())
                    print(f"{kind} run {number} ({time.monotonic() - started:.0f} s): {figures}", flush=True)
                except RunFailed as exc:
                    failures.append({"run": number, "error": str(exc)})
                    failed = True
                    print(f"{kind} run {number} FAILED: {exc}\n{lab.report(last=40)}", file=sys.stderr, flush=True)
                finally:
                    with signals_deferred():
                        down = lab.close()
                        if down is not None and down.returncode != 0:
                            print(f"warning: lab {lab.prefix} down failed: {down.stderr.strip()}", file=sys.stderr)
            report[kind] = {"runs": runs, "failures": failures, "summary": summarize(runs)}
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted; lab removed", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for kind, result in report.items():
        print_summary(kind, result["summary"], len(result["runs"]), args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
