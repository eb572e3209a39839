#!/usr/bin/env python3
"""Round-trip times per peer, from the ``ping`` events (every 30 s per connected peer).

    python3 scripts/log_latency.py [logs/ | FILE | -] [--json] [--plot rtt.png]

Per peer: pings, failures (rate and reasons) and RTT min, mean, median, p95, p99 and
max in milliseconds (percentiles interpolate linearly between ranks, as numpy's default
does). ``--plot`` draws RTT over time, one line per node and peer, failures marked
below the axis (needs matplotlib; the report itself needs only the standard library).
Keeps the report in logs/latency.txt (or FILE's <name>.latency.txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from punchgate import logtools as lt  # noqa: E402

STATS = ("min", "mean", "median", "p95", "p99", "max")


def analyse(section: lt.Section, names: lt.PeerNames) -> dict[str, Any]:
    peers = lt.ping_figures(section)
    for peer, entry in peers.items():
        entry.pop("samples")
        entry["name"] = names.label(peer)
    pings = sum(p["pings"] for p in peers.values())
    failed = sum(p["failed"] for p in peers.values())
    return {
        "pings": pings,
        "failed": failed,
        "failure_rate": round(failed / pings, 4) if pings else None,
        "peers": peers,
    }


def render(node: dict[str, Any]) -> list[str]:
    if not node["pings"]:
        return ["  no ping events (a node pings each connected peer every 30 s)"]
    out = [
        f"  {node['pings']} pings to {len(node['peers'])} peer(s), {node['failed']} failed"
        f" ({node['failure_rate'] * 100:.1f}%)",
        "",
    ]
    rows = []
    for peer, entry in sorted(node["peers"].items(), key=lambda item: item[1]["name"] or item[0]):
        shown = f"{entry['name']} ({lt.short_peer(peer)})" if entry["name"] else lt.short_peer(peer)
        rtt = entry["rtt_ms"]
        rows.append([shown, entry["pings"], entry["failed"], f"{entry['failure_rate'] * 100:.1f}%",
                     *(lt.fmt_number(rtt[k]) for k in STATS)])
    out += lt.table(["peer", "pings", "failed", "failed %", *(f"{k} ms" for k in STATS)], rows)
    for peer, entry in node["peers"].items():
        for reason, count in entry["reasons"].items():
            out.append(f"  failed x{count} to {entry['name'] or lt.short_peer(peer)}: {reason}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", metavar="FILE.png", help="draw RTT over time per peer into a PNG (matplotlib)")


def plot(args: argparse.Namespace, report: dict[str, Any], sections: list[lt.Section], pyplot: Any) -> None:
    if not args.plot:
        return
    names = lt.PeerNames(sections)
    series = []
    for section in sections:
        for peer, entry in lt.ping_figures(section).items():
            series.append((f"{section.label} -> {names.label(peer) or lt.short_peer(peer)}", entry["samples"]))
    times = [s["time"] for _, samples in series for s in samples if s["time"] is not None]
    origin = min(times, default=0.0)
    span = max(times, default=0.0) - origin
    scale, unit = (60.0, "min") if span > 600 else (1.0, "s")
    figure, axes = pyplot.subplots(figsize=(10, 5))
    for label, samples in series:
        good = [(s["time"], s["rtt_ms"]) for s in samples if s["ok"] and s["time"] is not None]
        bad = [s["time"] for s in samples if not s["ok"] and s["time"] is not None]
        line = axes.plot([(t - origin) / scale for t, _ in good], [r for _, r in good], marker=".", label=label)[0]
        if bad:
            axes.plot([(t - origin) / scale for t in bad], [0] * len(bad), "x", color=line.get_color(),
                      label=f"{label}: failed")
    if not series:
        axes.text(0.5, 0.5, "no ping events", ha="center", va="center", transform=axes.transAxes)
    else:
        axes.legend(fontsize="small")
    axes.set_xlabel(f"time since the first ping ({unit})")
    axes.set_ylabel("RTT (ms)")
    axes.set_title(f"punchgate ping RTT per peer: {report['input']}")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    lt.save_figure(figure, args.plot)
    pyplot.close(figure)
    print(f"{SCRIPT.prog}: plot written to {args.plot}", file=sys.stderr)


SCRIPT = lt.Script("latency", "Per-peer RTT statistics and ping failures.", analyse, render, add_arguments, plot)

if __name__ == "__main__":
    sys.exit(lt.run_script(SCRIPT))
