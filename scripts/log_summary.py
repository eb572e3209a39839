#!/usr/bin/env python3
"""One page per node log: who it is, where it listens, how it went.

    python3 scripts/log_summary.py [logs/ | FILE | -] [--json]

Peer ID, version, listen and advertised addresses, phases, NAT and reachability, relay
reservations, hole punches, connections, ping figures, tunnels (serving and using side:
counts, bytes, errors) and the errors and warnings logged. Reads JSON and console logs
(see punchgate/logtools.py); keeps the report in logs/summary.txt (or FILE's
<name>.summary.txt). Standard library only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from punchgate import logtools as lt  # noqa: E402


def analyse(section: lt.Section, names: lt.PeerNames) -> dict[str, Any]:
    started = section.first("punchgate starting")
    phases = [e for e in section.named("phase transition") if e.text("to_phase")]
    ready = next((e for e in phases if e.text("to_phase") == "ready"), None)
    stopped = section.first("stopped")
    shutdown = section.first("shutdown requested")
    publications = section.named("service published", "service publication failed")
    # An event that names our advertised addresses (if the runtime logs one) wins over publications.
    advertised = [e for e in section.events if "advertised" in e.fields or "advertis" in e.name]
    reachability = section.named("reachability")
    dht_modes = section.named("dht mode")
    nat_events = [e for e in section.events if e.name == "nat" or e.name.startswith("nat ")]
    connections_opened = section.named("connection opened")
    pings = lt.ping_figures(section)
    rtts = [s["rtt_ms"] for p in pings.values() for s in p["samples"] if s["rtt_ms"] is not None]
    return {
        "version": started.text("version") if started else None,
        "identity": started.text("identity") if started else None,
        "identity_created": started.fields.get("identity_created") if started else None,
        "listen_addresses": _unique(e.text("address") for e in section.named("listening on")),
        "advertised_addresses": _advertised(advertised, publications),
        "phases": [phases[0].text("from_phase")] + [e.text("to_phase") for e in phases] if phases else [],
        "final_phase": phases[-1].text("to_phase") if phases else None,
        "ready_after_s": _since(section, ready),
        "stopped": stopped is not None,
        "shutdown_signal": shutdown.text("signal") if shutdown else None,
        "reachability": [
            {
                "status": e.text("status"), "checked_by": e.text("checked_by"), "observed": e.text("observed"),
                "port_preserving": e.fields.get("port_preserving"), "error": e.fields.get("error"),
                "duration_ms": e.number("duration_ms"),
                "other": {k: v for k, v in e.fields.items() if k not in _REACHABILITY_SHOWN and v is not None},
            }
            for e in reachability
        ],
        "nat": [dict(e.fields, event=e.name) for e in nat_events],
        "dht_mode": dht_modes[-1].text("mode") if dht_modes else None,
        "dht_joined": len(section.named("dht joined")),
        "services_published": _unique(e.text("service") for e in section.named("service published")),
        "services_not_published": _unique(e.text("service") for e in section.named("service publication failed")),
        "services_resolved": len(section.named("service resolved")),
        "relay": _relay(section),
        "hole_punches": _counts(e.text("outcome") for e in section.named("hole punch")),
        "relay_connections": len(section.named("relay connected")),
        "connections": {
            "opened": len(connections_opened),
            "closed": len(section.named("connection closed")),
            "peers": len({e.text("peer") for e in connections_opened}),
            "by_transport": _counts(e.text("transport") for e in connections_opened),
        },
        "pings": {
            "count": sum(p["pings"] for p in pings.values()),
            "failed": sum(p["failed"] for p in pings.values()),
            "peers": len(pings),
            "rtt_ms": lt.describe(rtts),
        },
        "tunnels": _tunnel_totals(lt.tunnel_figures(section)),
        "problems": lt.problems(section),
    }


_REACHABILITY_SHOWN = {"status", "checked_by", "observed", "port_preserving", "error", "duration_ms", "local"}


def _advertised(advertised: list[lt.Event], publications: list[lt.Event]) -> list[str]:
    if advertised:
        last = advertised[-1]
        addresses = last.fields.get("advertised", last.fields.get("addresses"))
    elif publications:
        addresses = publications[-1].fields.get("addresses")
    else:
        return []
    return _unique(addresses if isinstance(addresses, (list, tuple)) else [addresses])


def _unique(values) -> list[str]:
    out: list[str] = []
    for value in values:
        if value and str(value) not in out:
            out.append(str(value))
    return out


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        key = value or "-"
        out[key] = out.get(key, 0) + 1
    return out


def _since(section: lt.Section, event: lt.Event | None) -> float | None:
    if event is None or event.time is None or section.start is None:
        return None
    return round(event.time - section.start, 3)


def _relay(section: lt.Section) -> dict[str, Any]:
    accepted = section.named("relay reservation accepted")
    relays: dict[str, dict[str, Any]] = {}
    for event in accepted + section.named("relay reservation renewed"):
        entry = relays.setdefault(event.text("relay") or "-", {"expires_in_s": None, "addresses": [], "limits": {}})
        if event.number("expires_in_s") is not None:
            entry["expires_in_s"] = event.number("expires_in_s")
        entry["addresses"] = _unique(entry["addresses"] + list(event.get("addresses", [])))
        # Limits the relay granted, under whatever names the runtime gives them.
        entry["limits"].update({k: v for k, v in event.fields.items() if "limit" in k})
    return {
        "accepted": len(accepted),
        "renewed": len(section.named("relay reservation renewed")),
        "failed": len(section.named("relay reservation failed")),
        "renewal_failed": len(section.named("relay reservation renewal failed")),
        "relays": relays,
        "failure_reasons": _counts(
            e.text("reason") for e in section.named("relay reservation failed", "relay reservation renewal failed")
        ),
    }


def _tunnel_totals(figures: dict[str, Any]) -> dict[str, Any]:
    served = {
        name: {k: entry[k] for k in ("accepted", "rejected", "closed", "errors", "bytes_to_service",
                                      "bytes_from_service", "rejections")}
        for name, entry in figures["served"].items()
    }
    used = {
        name: {k: entry[k] for k in ("opened", "rejected", "errors", "closed", "bytes_to_remote",
                                      "bytes_from_remote", "paths", "rejections")}
        for name, entry in figures["used"].items()
    }
    return {"served": served, "used": used}


def render(node: dict[str, Any]) -> list[str]:
    out = []
    identity = node["identity"] or "?"
    if node["identity_created"] is True:
        identity += " (created)"
    out.append(f"  version {node['version'] or '?'}, identity {identity}")
    if node["phases"]:
        phases = " -> ".join(p or "?" for p in node["phases"])
        ready = f"; ready after {lt.fmt_seconds(node['ready_after_s'])}" if node["ready_after_s"] is not None else ""
        out.append(f"  phases: {phases}{ready}")
    else:
        out.append("  phases: no phase transition logged")
    if node["stopped"]:
        signal = f" on {node['shutdown_signal']}" if node["shutdown_signal"] else ""
        out.append(f"  stopped cleanly{signal}")
    else:
        last = node["final_phase"] or "?"
        out.append(f"  no 'stopped' event: still running, killed, or the log is cut (last phase {last})")
    out.append("  listening on:")
    out += [f"    {a}" for a in node["listen_addresses"]] or ["    (none logged)"]
    if node["advertised_addresses"]:
        out.append("  advertised:")
        out += [f"    {a}" for a in node["advertised_addresses"]]

    nat = []
    for check in node["reachability"]:
        detail = [f"checked by {lt.short_peer(check['checked_by'])}"]
        if check["observed"]:
            detail.append(f"seen as {check['observed']}")
        if check["port_preserving"] is not None:
            detail.append("port preserving" if check["port_preserving"] else "ports not preserved")
        if check["error"]:
            detail.append(f"error {check['error']}")
        detail += [f"{k}={v}" for k, v in check["other"].items()]
        nat.append(f"{check['status']} ({', '.join(detail)})")
    out.append(f"  reachability: {'; '.join(nat) if nat else 'not checked'}")
    for item in node["nat"]:
        fields = " ".join(f"{k}={v}" for k, v in item.items() if k != "event")
        out.append(f"  {item['event']}: {fields}")
    dht = f"  DHT: mode {node['dht_mode'] or 'not logged'}, joined through {node['dht_joined']} peer(s)"
    if node["services_published"] or node["services_not_published"]:
        dht += f"; published {', '.join(node['services_published']) or 'nothing'}"
        if node["services_not_published"]:
            dht += f" (publication failed at least once: {', '.join(node['services_not_published'])})"
    if node["services_resolved"]:
        dht += f"; {node['services_resolved']} name lookup(s)"
    out.append(dht)

    relay = node["relay"]
    if relay["accepted"] or relay["failed"] or relay["renewal_failed"]:
        out.append(
            f"  relay reservations: {relay['accepted']} accepted, {relay['renewed']} renewed,"
            f" {relay['failed']} failed, {relay['renewal_failed']} renewals failed"
        )
        for relay_id, entry in relay["relays"].items():
            limits = ", ".join(f"{k}={v}" for k, v in entry["limits"].items())
            expires = lt.fmt_seconds(entry["expires_in_s"]) if entry["expires_in_s"] is not None else "?"
            out.append(f"    {lt.short_peer(relay_id)}: expires in {expires}{'; ' + limits if limits else ''}")
            out += [f"      {a}" for a in entry["addresses"]]
        for reason, count in relay["failure_reasons"].items():
            out.append(f"    failed x{count}: {reason}")
    else:
        out.append("  relay reservations: none")
    if node["hole_punches"] or node["relay_connections"]:
        punches = ", ".join(f"{k} x{v}" for k, v in node["hole_punches"].items()) or "none"
        out.append(f"  relayed connections: {node['relay_connections']}; hole punches: {punches}")

    conn = node["connections"]
    transports = ", ".join(f"{k} {v}" for k, v in conn["by_transport"].items())
    out.append(
        f"  connections: {conn['opened']} opened ({transports or 'none'}), {conn['closed']} closed,"
        f" {conn['peers']} peer(s)"
    )
    pings, rtt = node["pings"], node["pings"]["rtt_ms"]
    if pings["count"]:
        out.append(
            f"  pings: {pings['count']} to {pings['peers']} peer(s), {pings['failed']} failed;"
            f" RTT min {lt.fmt_number(rtt['min'])} / median {lt.fmt_number(rtt['median'])}"
            f" / max {lt.fmt_number(rtt['max'])} ms"
        )
    else:
        out.append("  pings: none logged (one every 30 s per connected peer)")

    tunnels = node["tunnels"]
    if not tunnels["served"] and not tunnels["used"]:
        out.append("  tunnels: none")
    for name, entry in tunnels["served"].items():
        out.append(
            f"  served {name}: {entry['accepted']} accepted, {entry['rejected']} rejected,"
            f" {entry['closed']} closed, {entry['errors']} errors;"
            f" {lt.fmt_bytes(entry['bytes_to_service'])} to the service,"
            f" {lt.fmt_bytes(entry['bytes_from_service'])} back"
        )
        out += [f"    rejected x{n}: {reason}" for reason, n in entry["rejections"].items()]
    for name, entry in tunnels["used"].items():
        paths = ", ".join(f"{k} {v}" for k, v in entry["paths"].items())
        out.append(
            f"  used {name}: {entry['opened']} opened{' (' + paths + ')' if paths else ''},"
            f" {entry['rejected']} rejected, {entry['errors']} errors, {entry['closed']} closed;"
            f" {lt.fmt_bytes(entry['bytes_to_remote'])} sent, {lt.fmt_bytes(entry['bytes_from_remote'])} received"
        )
        out += [f"    rejected x{n}: {reason}" for reason, n in entry["rejections"].items()]

    problems = node["problems"]
    levels = ", ".join(f"{v} {k}" for k, v in problems["by_level"].items())
    out.append(f"  errors and warnings: {levels or 'none'}")
    for kind in problems["kinds"]:
        source = f" [{kind['logger']}]" if kind["logger"] else ""
        example = f": {_clip(kind['example'])}" if kind["example"] else ""
        out.append(f"    {kind['level']:<8} x{kind['count']:<4} {_clip(kind['event'], 60)}{source}{example}")
    if problems["kinds_total"] > len(problems["kinds"]):
        out.append(f"    ... and {problems['kinds_total'] - len(problems['kinds'])} more kinds")
    return out


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


SCRIPT = lt.Script("summary", "One-page overview of each punchgate node log.", analyse, render)

if __name__ == "__main__":
    sys.exit(lt.run_script(SCRIPT))
