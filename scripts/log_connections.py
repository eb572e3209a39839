#!/usr/bin/env python3
"""Connection topology of each node: which peers, over which transport, for how long.

    python3 scripts/log_connections.py [logs/ | FILE | -] [--json]

From ``connection opened`` / ``connection closed`` (peer, transport: tcp, quic, relay):
per peer the transports used, connections opened and closed, session durations (an
opening paired with the next closing of the same peer and transport) and those still
open when the log ends; churn per minute; the most connections open at once; plus the
bootstrap, mDNS, relay and hole-punch events that explain them. Keeps the report in
logs/connections.txt (or FILE's <name>.connections.txt). Standard library only.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from punchgate import logtools as lt  # noqa: E402

BUSIEST_MINUTES = 10  # minutes listed in the text when there are more than MINUTES_LISTED
MINUTES_LISTED = 30


def analyse(section: lt.Section, names: lt.PeerNames) -> dict[str, Any]:
    end = section.end
    peers: dict[str, dict[str, Any]] = {}
    waiting: dict[tuple[str, str], list[lt.Event]] = {}  # opened, not closed yet, per (peer, transport)
    minutes: dict[str, dict[str, int]] = {}
    open_now = most_open = 0
    opened = closed = unmatched_closes = 0

    def peer_entry(peer: str) -> dict[str, Any]:
        return peers.setdefault(peer, {
            "name": names.label(peer), "transports": {}, "opened": 0, "closed": 0, "open_at_end": 0,
            "sessions_s": [], "first_seen": None, "last_seen": None,
            "bootstrap_connected": 0, "bootstrap_failed": 0, "discovered": [], "relayed": 0, "hole_punches": {},
            "open_for_s": [],  # how long each connection still open at the end had been open
        })

    def seen(entry: dict[str, Any], event: lt.Event) -> None:
        moment = lt.iso(event.time)
        if moment:
            entry["first_seen"] = entry["first_seen"] or moment
            entry["last_seen"] = moment

    for event in section.events:
        peer = event.text("peer")
        if event.name in ("connection opened", "connection closed") and peer:
            transport = event.text("transport") or "-"
            entry = peer_entry(peer)
            seen(entry, event)
            minute = _minute(event.time)
            counts = minutes.setdefault(minute, {"opened": 0, "closed": 0}) if minute else None
            key = (peer, transport)
            if event.name == "connection opened":
                opened += 1
                entry["opened"] += 1
                entry["transports"][transport] = entry["transports"].get(transport, 0) + 1
                waiting.setdefault(key, []).append(event)
                open_now += 1
                most_open = max(most_open, open_now)
                if counts:
                    counts["opened"] += 1
            else:
                closed += 1
                entry["closed"] += 1
                open_now = max(open_now - 1, 0)
                if counts:
                    counts["closed"] += 1
                if waiting.get(key):
                    start = waiting[key].pop(0)
                    if start.time is not None and event.time is not None:
                        entry["sessions_s"].append(round(event.time - start.time, 3))
                else:
                    unmatched_closes += 1  # opened before the log begins
        elif event.name == "bootstrap connected" and peer:
            peer_entry(peer)["bootstrap_connected"] += 1
        elif event.name == "bootstrap dial failed" and peer:
            peer_entry(peer)["bootstrap_failed"] += 1
        elif event.name == "peer discovered" and peer:
            source = event.text("source") or "-"
            entry = peer_entry(peer)
            if source not in entry["discovered"]:
                entry["discovered"].append(source)
        elif event.name == "relay connected" and peer:
            peer_entry(peer)["relayed"] += 1
        elif event.name == "hole punch" and peer:
            punches = peer_entry(peer)["hole_punches"]
            outcome = event.text("outcome") or "-"
            punches[outcome] = punches.get(outcome, 0) + 1

    still_open = 0
    for (peer, _transport), starts in waiting.items():
        entry = peers[peer]
        entry["open_at_end"] += len(starts)
        still_open += len(starts)
        entry["open_for_s"] += [round(end - s.time, 3) for s in starts if s.time is not None and end is not None]
    for entry in peers.values():
        entry["session_s"] = lt.describe(entry.pop("sessions_s"))
        closed_time = entry["session_s"]["mean"] * entry["session_s"]["count"] if entry["session_s"]["count"] else 0
        entry["connected_s"] = round(closed_time + sum(entry["open_for_s"]), 3)
    per_minute = [{"minute": m, **c} for m, c in sorted(minutes.items())]
    return {
        "connections": {
            "opened": opened, "closed": closed, "open_at_end": still_open, "most_open_at_once": most_open,
            "closed_without_open": unmatched_closes, "peers": len([p for p in peers.values() if p["opened"]]),
        },
        "stopped": section.first("stopped") is not None,
        "peers": peers,
        "churn_per_minute": per_minute,
        "churn_peak": max((m["opened"] + m["closed"] for m in per_minute), default=0),
    }


def _minute(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def render(node: dict[str, Any]) -> list[str]:
    totals = node["connections"]
    at_end = " (still open when the node stopped)" if node["stopped"] and totals["open_at_end"] else ""
    out = [
        f"  connections: {totals['opened']} opened, {totals['closed']} closed,"
        f" {totals['open_at_end']} open when the log ends{at_end}; {totals['peers']} peer(s);"
        f" at most {totals['most_open_at_once']} open at once"
    ]
    if totals["closed_without_open"]:
        out.append(f"  {totals['closed_without_open']} closed connection(s) opened before the log begins")
    rows = []
    for peer, entry in sorted(node["peers"].items(), key=lambda item: -item[1]["opened"]):
        shown = f"{entry['name']} ({lt.short_peer(peer)})" if entry["name"] else lt.short_peer(peer)
        transports = " ".join(f"{k} x{v}" for k, v in entry["transports"].items()) or "-"
        sessions = entry["session_s"]
        notes = []
        if entry["bootstrap_connected"] or entry["bootstrap_failed"]:
            notes.append(f"bootstrap ({entry['bootstrap_connected']} ok, {entry['bootstrap_failed']} failed)")
        if entry["discovered"]:
            notes.append("found by " + ", ".join(entry["discovered"]))
        if entry["relayed"]:
            notes.append(f"relayed x{entry['relayed']}")
        if entry["hole_punches"]:
            notes.append("punch " + ", ".join(f"{k} x{v}" for k, v in entry["hole_punches"].items()))
        rows.append([
            shown, transports, entry["opened"], entry["closed"], entry["open_at_end"],
            _seconds(sessions["median"]), _seconds(sessions["max"]),
            _seconds(max(entry["open_for_s"], default=None)), _seconds(entry["connected_s"]),
            "; ".join(notes),
        ])
    if rows:
        out.append("")
        out += lt.table(
            ["peer", "transports", "opened", "closed", "open at end", "median session", "longest",
             "open for", "total", "notes"],
            rows,
        )
    minutes = node["churn_per_minute"]
    if minutes:
        out.append("")
        out.append(f"  churn per minute (UTC; opened / closed), peak {node['churn_peak']} events in a minute:")
        listed = minutes
        if len(minutes) > MINUTES_LISTED:
            listed = sorted(minutes, key=lambda m: -(m["opened"] + m["closed"]))[:BUSIEST_MINUTES]
            listed.sort(key=lambda m: m["minute"])
            out.append(f"    ({len(minutes)} minutes with connection events; the {BUSIEST_MINUTES} busiest)")
        out += [f"    {m['minute']}  {m['opened']:>5} / {m['closed']}" for m in listed]
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


SCRIPT = lt.Script("connections", "Connection topology, churn and session durations per node.", analyse, render)

if __name__ == "__main__":
    sys.exit(lt.run_script(SCRIPT))
