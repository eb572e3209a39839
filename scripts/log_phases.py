#!/usr/bin/env python3
"""Phase timeline of each node (starting, joining, ready, shutting_down) and what looks wrong.

    python3 scripts/log_phases.py [logs/ | FILE | -] [--json] [--limit PHASE=SECONDS ...]

From the ``phase transition`` events (from_phase, to_phase): the timeline, the time spent
in each phase (a node starts in ``starting`` when it logs ``punchgate starting``; the last
phase lasts until ``stopped`` or the end of the log) and anomalies: a node that never
became ready, a return to ``joining`` from ``ready``, a transition that does not start
where the previous one ended (lines missing), a phase longer than its limit, a start that
failed, a log that ends without ``stopped``. With ``PUNCHGATE_LOG=debug`` the state
machine's events are counted per phase too. Keeps the report in logs/phases.txt (or
FILE's <name>.phases.txt). Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from punchgate import logtools as lt  # noqa: E402

# Longer than this in a phase is an anomaly (seconds); --limit changes them.
LIMITS = {"starting": 10.0, "joining": 60.0, "shutting_down": 5.0}
FAILED_STARTS = ("cannot start", "identity error")

limits = dict(LIMITS)


def analyse(section: lt.Section, names: lt.PeerNames) -> dict[str, Any]:
    origin = section.start
    started = section.first("punchgate starting")
    stopped = section.first("stopped")
    transitions = section.named("phase transition")
    timeline = [
        {"time": lt.iso(e.time), "offset_s": _offset(e.time, origin), "from": e.text("from_phase"),
         "to": e.text("to_phase")}
        for e in transitions
    ]
    # Stays: (phase, entered at, left at or None, left because).
    stays: list[dict[str, Any]] = []
    anomalies: list[str] = []
    phase = transitions[0].text("from_phase") if transitions else ("starting" if started else None)
    entered = started.time if started is not None else (transitions[0].time if transitions else None)
    for event in transitions:
        before, after = event.text("from_phase"), event.text("to_phase")
        if phase is not None and before is not None and before != phase:
            anomalies.append(f"transition {before} -> {after} at {lt.iso(event.time)} follows {phase}:"
                             " transitions are missing from the log")
        stays.append({"phase": before or phase, "entered": lt.iso(entered), "seconds": _between(entered, event.time),
                      "ended_by": f"-> {after}"})
        if before == "ready" and after == "joining":
            anomalies.append(f"back to joining from ready at {lt.iso(event.time)} (lost every bootstrap peer?)")
        phase, entered = after, event.time
    if phase is not None:
        end = stopped.time if stopped is not None else section.end
        stays.append({"phase": phase, "entered": lt.iso(entered), "seconds": _between(entered, end),
                      "ended_by": "stopped" if stopped is not None else "end of log"})

    per_phase: dict[str, dict[str, Any]] = {}
    for stay in stays:
        entry = per_phase.setdefault(stay["phase"] or "?", {"entered": 0, "seconds": 0.0, "longest_s": None})
        entry["entered"] += 1
        if stay["seconds"] is not None:
            entry["seconds"] = round(entry["seconds"] + stay["seconds"], 3)
            entry["longest_s"] = max(entry["longest_s"] or 0.0, stay["seconds"])
        limit = limits.get(stay["phase"] or "")
        if limit is not None and stay["seconds"] is not None and stay["seconds"] > limit:
            still = " (and still there when the log ends)" if stay["ended_by"] == "end of log" else ""
            anomalies.append(f"{stay['seconds']:.1f} s in {stay['phase']} from {stay['entered']}"
                             f" (more than {limit:g} s){still}")

    reached_ready = any(t["to"] == "ready" for t in timeline)
    failed = [e for e in section.events if e.name in FAILED_STARTS]
    for event in failed:
        anomalies.append(f"{event.name}: {event.text('reason') or '?'}")
    if started is not None and not reached_ready:
        anomalies.append("never became ready")
    if stopped is None and started is not None and not failed:
        if phase == "shutting_down":
            anomalies.append("shutting down but no 'stopped' event: the shutdown did not finish in this log")
        else:
            anomalies.append(f"the log ends in phase {phase} without 'stopped' (still running, killed or crashed)")

    return {
        "phases_seen": _unique([timeline[0]["from"]] + [t["to"] for t in timeline] if timeline else
                               ([phase] if phase else [])),
        "timeline": timeline,
        "stays": stays,
        "per_phase": per_phase,
        "reached_ready": reached_ready,
        "ready_after_s": next((t["offset_s"] for t in timeline if t["to"] == "ready"), None),
        "stopped": stopped is not None,
        "anomalies": anomalies,
        "state_events": _state_events(section),
        "limits_s": dict(limits),
    }


def _state_events(section: lt.Section) -> dict[str, dict[str, int]]:
    """Debug-level ``state event`` lines (event_type) counted per phase they arrived in."""
    counts: dict[str, dict[str, int]] = {}
    phase = "starting"
    for event in section.events:
        if event.name == "phase transition" and event.text("to_phase"):
            phase = event.text("to_phase")
        elif event.name == "state event":
            kind = event.text("event_type") or "?"
            bucket = counts.setdefault(phase, {})
            bucket[kind] = bucket.get(kind, 0) + 1
    return counts


def _offset(moment: float | None, origin: float | None) -> float | None:
    return None if moment is None or origin is None else round(moment - origin, 3)


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def _unique(values: list[Any]) -> list[str]:
    out: list[str] = []
    for value in values:
        if value and value not in out:
            out.append(value)
    return out


def render(node: dict[str, Any]) -> list[str]:
    out = []
    if node["timeline"]:
        out.append("  timeline:")
        for t in node["timeline"]:
            offset = "" if t["offset_s"] is None else f"+{t['offset_s']:.3f} s"
            clock = (t["time"] or "")[11:23]
            out.append(f"    {offset:>12}  {clock}  {t['from']} -> {t['to']}")
    else:
        out.append("  no phase transitions logged")
    if node["per_phase"]:
        out.append("")
        rows = []
        for phase, entry in node["per_phase"].items():
            rows.append([phase, entry["entered"], _seconds(entry["seconds"]), _seconds(entry["longest_s"])])
        out += lt.table(["phase", "times entered", "total time", "longest stay"], rows)
        last = node["stays"][-1] if node["stays"] else None
        if last is not None:
            out.append(f"  (the last phase, {last['phase']}, is counted until {last['ended_by']})")
    for phase, counts in node["state_events"].items():
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        out.append(f"  state events in {phase}: {listed}")
    out.append("")
    if node["anomalies"]:
        out.append(f"  anomalies ({len(node['anomalies'])}):")
        out += [f"    ! {a}" for a in node["anomalies"]]
    else:
        out.append("  anomalies: none")
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", action="append", default=[], metavar="PHASE=SECONDS",
        help="a stay longer than this in PHASE is an anomaly (defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in LIMITS.items()) + ")",
    )


def apply_limits(args: argparse.Namespace) -> None:
    limits.clear()
    limits.update(LIMITS)
    for item in args.limit:
        phase, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if not phase or value < 0:
            raise lt.UsageError(f"--limit {item!r}: expected PHASE=SECONDS (example: --limit joining=120)")
        limits[phase] = value


SCRIPT = lt.Script("phases", "Phase timeline, time per phase and anomalies per node.", analyse, render,
                   add_arguments, before=apply_limits)

if __name__ == "__main__":
    sys.exit(lt.run_script(SCRIPT))
