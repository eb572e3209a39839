#!/usr/bin/env python3
"""Tunnels per service, as the serving node and the using node saw them.

    python3 scripts/log_tunnels.py [logs/ | FILE | -] [--json] [--plot bytes.png]

Serving side (``tunnel accepted`` / ``rejected`` / ``closed``): accepted, rejected with
their reasons, errors, bytes to and from the service, durations. Using side (``client
tunnel opened`` / ``rejected`` / ``error`` / ``closed``): the same plus the path (direct
or relayed) and the set-up time. ``--plot`` draws the bytes of each closed tunnel in
both directions (needs matplotlib; the report itself needs only the standard library).
Keeps the report in logs/tunnels.txt (or FILE's <name>.tunnels.txt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from punchgate import logtools as lt  # noqa: E402

BARS_UP_TO = 60  # more tunnels than this are drawn as points


def analyse(section: lt.Section, names: lt.PeerNames) -> dict[str, Any]:
    figures = lt.tunnel_figures(section)
    for side in ("served", "used"):
        for entry in figures[side].values():
            entry["peers"] = {peer: {"count": n, "name": names.label(peer)} for peer, n in entry["peers"].items()}
    served, used = figures["served"], figures["used"]
    return {
        "served": served,
        "used": used,
        "totals": {
            "accepted": sum(e["accepted"] for e in served.values()),
            "rejected": sum(e["rejected"] for e in served.values()),
            "served_errors": sum(e["errors"] for e in served.values()),
            "bytes_to_services": sum(e["bytes_to_service"] for e in served.values()),
            "bytes_from_services": sum(e["bytes_from_service"] for e in served.values()),
            "opened": sum(e["opened"] for e in used.values()),
            "refused": sum(e["rejected"] for e in used.values()),
            "client_errors": sum(e["errors"] for e in used.values()),
            "bytes_to_remote": sum(e["bytes_to_remote"] for e in used.values()),
            "bytes_from_remote": sum(e["bytes_from_remote"] for e in used.values()),
        },
    }


def render(node: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if not node["served"] and not node["used"]:
        return ["  no tunnel events"]
    if node["served"]:
        out.append("  served (this node exposes the service):")
        rows = []
        for name, entry in sorted(node["served"].items()):
            duration = entry["duration_s"]
            rows.append([
                name, entry["accepted"], entry["rejected"], entry["closed"], entry["errors"],
                f"{entry['bytes_to_service']:,}", f"{entry['bytes_from_service']:,}",
                _seconds(duration["median"]), _seconds(duration["max"]), ", ".join(entry["targets"]) or "-",
            ])
        out += lt.table(["service", "accepted", "rejected", "closed", "errors", "bytes in", "bytes out",
                         "median time", "longest", "target"], rows, indent="    ")
        out += _reasons(node["served"])
    if node["used"]:
        if out:
            out.append("")
        out.append("  used (this node's local listeners):")
        rows = []
        for name, entry in sorted(node["used"].items()):
            duration, setup = entry["duration_s"], entry["setup_ms"]
            paths = " ".join(f"{k} x{v}" for k, v in entry["paths"].items()) or "-"
            rows.append([
                name, ", ".join(entry["binds"]) or "-", entry["opened"], entry["rejected"], entry["errors"],
                entry["closed"], f"{entry['bytes_to_remote']:,}", f"{entry['bytes_from_remote']:,}", paths,
                "-" if setup["median"] is None else f"{setup['median']:.1f} ms",
                _seconds(duration["median"]),
            ])
        out += lt.table(["service", "bind", "opened", "rejected", "errors", "closed", "bytes sent",
                         "bytes received", "paths", "median setup", "median time"], rows, indent="    ")
        out += _reasons(node["used"])
    return out


def _reasons(entries: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, entry in sorted(entries.items()):
        for reason, count in entry["rejections"].items():
            out.append(f"    {name}: rejected x{count}: {reason}")
        for reason, count in entry["error_reasons"].items():
            out.append(f"    {name}: error x{count}: {reason}")
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", metavar="FILE.png", help="draw the bytes of each tunnel into a PNG (matplotlib)")


def plot(args: argparse.Namespace, report: dict[str, Any], sections: list[lt.Section], pyplot: Any) -> None:
    if not args.plot:
        return
    # Each closed tunnel as one node logged it; both directions named from the client's side.
    tunnels: list[tuple[str, int, int]] = []
    for section in sections:
        figures = lt.tunnel_figures(section)
        for name, entry in figures["used"].items():
            for index, t in enumerate(entry["tunnels"], 1):
                tunnels.append((f"{section.label} {name} #{index}", t["bytes_to_remote"], t["bytes_from_remote"]))
        for name, entry in figures["served"].items():
            for index, t in enumerate(entry["tunnels"], 1):
                tunnels.append((f"{section.label} serves {name} #{index}", t["bytes_to_service"],
                                t["bytes_from_service"]))
    width = min(16, max(6, 0.35 * len(tunnels) + 3)) if len(tunnels) <= BARS_UP_TO else 12
    figure, axes = pyplot.subplots(figsize=(width, 5))
    positions = list(range(len(tunnels)))
    upstream = [t[1] for t in tunnels]
    downstream = [t[2] for t in tunnels]
    if not tunnels:
        axes.text(0.5, 0.5, "no closed tunnels", ha="center", va="center", transform=axes.transAxes)
    elif len(tunnels) <= BARS_UP_TO:
        axes.bar([p - 0.2 for p in positions], upstream, width=0.4, label="client -> service")
        axes.bar([p + 0.2 for p in positions], downstream, width=0.4, label="service -> client")
        axes.set_xticks(positions)
        axes.set_xticklabels([t[0] for t in tunnels], rotation=45, ha="right", fontsize="small")
        axes.legend()
    else:
        axes.plot(positions, upstream, ".", label="client -> service")
        axes.plot(positions, downstream, ".", label="service -> client")
        axes.set_xlabel("tunnel (in the order the logs were read)")
        axes.legend()
    if any(upstream + downstream):
        axes.set_yscale("symlog", linthresh=1)
        axes.set_ylim(0, max(upstream + downstream) * 30)  # room for the legend above the bars
    axes.set_ylabel("bytes")
    axes.set_title(f"punchgate bytes per tunnel: {report['input']}")
    axes.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    lt.save_figure(figure, args.plot)
    pyplot.close(figure)
    print(f"{SCRIPT.prog}: plot written to {args.plot}", file=sys.stderr)


SCRIPT = lt.Script("tunnels", "Tunnels per service: accepted, rejected, errors, bytes, durations.", analyse,
                   render, add_arguments, plot)

if __name__ == "__main__":
    sys.exit(lt.run_script(SCRIPT))
