"""``punchgate status``: ask a running node over its control socket and show the answer.

The client side of ``runtime/control.py`` (no trio, no libp2p: it answers at once) and
the table renderer (``rich``). Both work on the plain status dict alone, whatever gathers
it in the node.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from punchgate.control_client import NodeNotRunning, exchange

__all__ = ["NodeNotRunning", "print_status", "query"]

QUERY_TIMEOUT = 5.0


def query(path: Path, op: str = "status", timeout: float = QUERY_TIMEOUT) -> dict[str, Any]:
    """Send ``{"op": op}`` to the node at ``path``; return its answer (a dict)."""
    sock, answer, _ = exchange(path, {"op": op}, timeout)
    sock.close()
    if not isinstance(answer, dict):
        raise NodeNotRunning(f"the node at {path} sent an unreadable answer")
    return answer


# ---------------------------------------------------------------- rendering


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _value(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _udp(row: dict[str, Any]) -> str:
    """'/udp' after a UDP service's or tunnel's address, with what it dropped if anything."""
    if row.get("transport") != "udp":
        return ""
    return "/udp" + (f" ({row['dropped']} dropped)" if row.get("dropped") else "")


def _table(title: str, columns: list[str]) -> Table:
    table = Table(
        title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def render(status: dict[str, Any], console: Console, service: dict[str, Any] | None = None) -> None:
    """Print the status (and the service manager's view, if given) as readable tables."""
    if service is not None:
        render_service(service, console)
    nat = status.get("nat") or {}
    how = f"learnt by {nat['learnt_by']}" if nat.get("learnt_by") else "not checked yet"
    if nat.get("port_preserving") is False:
        how += "; ports not preserved (symmetric NAT): no hole punching"
    node = Table.grid(padding=(0, 2))
    node.add_column(style="bold")
    node.add_column(overflow="fold")
    node.add_row("peer", _value(status.get("peer_id")))
    node.add_row("version", f"{_value(status.get('version'))} (pid {_value(status.get('pid'))})")
    node.add_row("uptime", _duration(status.get("uptime_s")))
    node.add_row("phase", _value(status.get("phase")))
    node.add_row("NAT", f"{_value(nat.get('status'))} ({how})")
    mapping = status.get("port_mapping")
    if mapping:  # absent on older nodes, None when turned off
        where = ", ".join(mapping.get("addresses") or []) or "-"
        checked = "reachable" if mapping.get("confirmed") else "not confirmed"
        node.add_row("port mapping", f"{_value(mapping.get('status'))} {_value(mapping.get('method'))}: {where} ({checked})")
    node.add_row("listening", "\n".join(status.get("listen_addrs") or []) or "-")
    node.add_row("advertised", "\n".join(status.get("advertised_addrs") or []) or "-")
    refused = status.get("refused")
    if refused:  # absent on older nodes
        node.add_row("refused", ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in refused.items()))
    console.print(node)

    relays = _table("Relay reservations", ["relay", "status", "expires in", "limit per circuit"])
    for row in status.get("relays") or []:
        relays.add_row(
            row["relay"], _value(row.get("status")), _duration(row.get("expires_in_s")), _value(row.get("limit"))
        )
    peers = _table("Peers", ["peer", "transport", "path", "conns", "rtt"])
    for row in status.get("peers") or []:
        rtt = row.get("rtt_ms")
        peers.add_row(
            row["peer"], "+".join(row.get("transports") or [row.get("transport", "?")]), row.get("path", "?"),
            _value(row.get("connections")), "-" if rtt is None else f"{rtt:.1f} ms",
        )
    services = _table("Services", ["name", "target", "open", "total", "in (from peers)", "out (to peers)"])
    for row in status.get("services") or []:
        services.add_row(
            row["name"], row["target"] + _udp(row), str(row.get("connections", 0)), _value(row.get("total_connections")),
            _size(row.get("bytes_in")), _size(row.get("bytes_out")),
        )
    tunnels = _table("Tunnels", ["bind", "service", "peer", "path", "open", "total", "to remote", "from remote", "oldest"])
    for row in status.get("tunnels") or []:
        kind = row.get("kind", "tunnel")
        tunnels.add_row(
            row["bind"] + _udp(row),
            row["service"] + (f" ({kind})" if kind != "tunnel" else " (by name)" if row.get("by_name") else ""),
            _value(row.get("peer")),
            _value(row.get("path")), str(row.get("connections", 0)), _value(row.get("total_connections")),
            _size(row.get("bytes_to_remote")), _size(row.get("bytes_from_remote")), _duration(row.get("oldest_age_s")),
        )
    for table, empty in (
        (relays, "none"), (peers, "no connected peers"), (services, "none exposed"), (tunnels, "none"),
    ):
        if table.row_count:
            console.print(table)
        else:
            console.print(f"[bold]{table.title}[/bold]: {empty}")


def render_service(service: dict[str, Any], console: Console) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("service", f"{service['state']}, {service['enabled']} ({service['manager']})")
    if service.get("pid"):
        grid.add_row("main pid", f"{service['pid']}" + (f" since {service['since']}" if service.get("since") else ""))
    grid.add_row("unit", service["file"])
    grid.add_row("config", service["config"])
    console.print(grid)
    console.print()


def print_status(status: dict[str, Any], service: dict[str, Any] | None = None, only_service: bool = False) -> None:
    """Render on stdout: colours and the terminal's width on a terminal; plain text, wide
    enough for whole peer IDs and without trailing blanks otherwise (pipes, files)."""
    console = Console(highlight=False)
    if console.is_terminal:
        _render(console, status, service, only_service)
        return
    print(render_text(status, service, only_service), end="")


def render_text(status: dict[str, Any], service: dict[str, Any] | None = None, only_service: bool = False) -> str:
    console = Console(highlight=False, width=200, no_color=True, record=True, file=io.StringIO())
    _render(console, status, service, only_service)
    return "".join(line.rstrip() + "\n" for line in console.export_text().splitlines())


def _render(console: Console, status: dict[str, Any], service: dict[str, Any] | None, only_service: bool) -> None:
    if only_service:
        if service is not None:
            render_service(service, console)
    else:
        render(status, console, service)
