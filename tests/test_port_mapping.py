"""Port mapping (NAT-PMP, UPnP IGD) in the namespace lab, with a real miniupnpd on router A.

The lab of ``tests/test_nat.py`` (``scripts/netns_lab.sh``) with both routers symmetric
(``--random-fully``): no hole punch can work. ``punchgate/devtools/upnplab.py`` runs
Debian's miniupnpd in router A's namespace (and a STUN responder on pub, from which
miniupnpd learns that its WAN address is public). pub is the bootstrap node and relay,
hosta exposes an echo service, hostb tunnels to it by name.

* A router that maps (NAT-PMP and UPnP on): hosta maps its listen port, a dial-back gets
  through it, hosta advertises ``/ip4/<router A WAN>/tcp/<port>``; hostb's tunnel is
  direct (its log says so, router A's conntrack table shows the flow to the mapped
  port); after hosta stops, the router holds no mapping.
* UPnP only (NAT-PMP off): the same through UPnP; then a router that grants mappings
  but forwards nothing: hosta finds out, warns, removes the mapping, never advertises it.
* A router without either: hosta says once that no gateway answered, and the tunnel
  rides the relay as before.

Runs only as root with ip, iptables, nft, conntrack and miniupnpd (scripts/test.sh installs them).
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime

import pytest

from punchgate.devtools.natlab import ECHO_PORT, NODE_PORT, PUB_IP, TOPOLOGY, TUNNEL_PORT, NatLab
from punchgate.devtools.upnplab import PortMappingRouter

RTRA_WAN, RTRB_WAN, HOSTA_IP = TOPOLOGY["RTRA_WAN"], TOPOLOGY["RTRB_WAN"], TOPOLOGY["HOSTA_IP"]
START = 30  # process start to an event (python start-up included, 2 cores)
MAPPED_LIMIT = 15  # provider start -> its mapped address advertised (measured: ~2 s; see README)
PAYLOAD = 256 * 1024

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "iptables", "nft", "conntrack", "miniupnpd")),
        reason="needs ip, iptables, nft, conntrack and miniupnpd (scripts/test.sh installs them)",
    ),
]


def seconds_since_start(lab: NatLab, name: str, event: dict) -> float:
    """When ``event`` was logged, in seconds since NAME's process was started."""
    logged = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
    return round(logged - lab.nodes[name].started_at, 3)


def start_pub(lab: NatLab) -> str:
    """pub (bootstrap node and relay, no port mapping: no bootstrap peers); its address."""
    lab.node("pub", "pub")
    pub_id = lab.expect("pub", "punchgate starting", START)["peer_id"]
    lab.expect("pub", "phase transition", START, to_phase="ready")
    return f"/ip4/{PUB_IP}/tcp/{NODE_PORT}/p2p/{pub_id}"


def start_provider(lab: NatLab, bootstrap: str) -> None:
    if "echo server" not in lab.helpers:
        lab.start_echo_server()
    lab.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")


def mapped_and_advertised(lab: NatLab, method: str) -> tuple[str, float]:
    """hosta's mapped address (via METHOD), once it is advertised; seconds from start to then."""
    mapped = lab.expect("hosta", "port mapped", START, method=method)
    address = mapped["addresses"][0]
    assert address.startswith(f"/ip4/{RTRA_WAN}/tcp/"), f"not router A's public address: {mapped}"
    advertised = lab.nodes["hosta"].wait_for(
        lambda e: e.get("event") == "advertising" and addresses(e) == [address], START
    )
    return address, seconds_since_start(lab, "hosta", advertised)


def addresses(event: dict) -> list[str]:
    """The addresses of an ``advertising`` or ``service published`` event, without /p2p/<ours>."""
    return [a.split("/p2p/")[0] if "p2p-circuit" not in a else a for a in event.get("addresses", ())]


def stop_and_check_unmapped(lab: NatLab, router: PortMappingRouter, port: int) -> None:
    assert lab.stop("hosta") == 0
    lab.expect("hosta", "port mapping removed", 5)
    assert port not in [external for external, _, _ in router.redirects()], "the mapping outlived the node"


def run_lab(tmp_path, tag: str, scenario) -> None:
    lab = NatLab(tmp_path, tag, symmetric=True)
    try:
        lab.up()
        try:
            scenario(lab)
        except Exception as exc:  # any failure: say why, with every log of the lab
            reason = str(exc).split("; log:\n")[0]
            raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}") from None
    finally:
        down = lab.close()  # kills miniupnpd and the STUN responder too (by PID), if still running
        assert down is None or down.returncode == 0, f"lab down failed:\n{down.stdout}{down.stderr}"


def test_a_mapped_provider_is_reached_directly_through_symmetric_nats(tmp_path):
    def scenario(lab: NatLab) -> None:
        router = PortMappingRouter(lab, tmp_path / "router")  # NAT-PMP and UPnP
        router.start()
        bootstrap = start_pub(lab)
        start_provider(lab, bootstrap)
        address, took = mapped_and_advertised(lab, "natpmp")
        port = int(address.rsplit("/", 1)[1])
        lab.note(f"mapped address {address} advertised {took} s after the provider started")
        assert (port, HOSTA_IP, NODE_PORT) in router.redirects()
        assert took <= MAPPED_LIMIT, f"mapped address advertised {took} s after start"
        lab.nodes["hosta"].wait_for(lambda e: e.get("event") == "service published" and addresses(e) == [address], START)

        lab.node("hostb", "hostb", "--bootstrap", bootstrap, "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}")
        lab.expect("hostb", "phase transition", START, to_phase="ready")
        result = lab.echo_through_tunnel("client", PAYLOAD, 60)
        assert result["error"] is None and result["received"] == PAYLOAD, f"echo failed: {result}"
        assert result["received_sha256"] == result["sent_sha256"], f"echo differs: {result}"
        opened = lab.expect("hostb", "client tunnel opened", 5)
        assert opened["path"] == "direct", f"a mapped provider must be reached directly: {opened}"
        # Router A's conntrack: hostb's router (its public address) to the mapped port, DNATed to hosta.
        table = lab.lab("conntrack", "rtra").stdout
        flows = [line for line in table.splitlines() if "ESTABLISHED" in line and f"dport={port} " in line
                 and f"src={RTRB_WAN} dst={RTRA_WAN}" in line and f"src={HOSTA_IP} " in line]
        lab.note(f"router A's flows to the mapped port: {flows}")
        assert flows, f"no ESTABLISHED flow to {RTRA_WAN}:{port} on router A:\n{table}"

        stop_and_check_unmapped(lab, router, port)
        router.stop()

    run_lab(tmp_path, "pgm", scenario)


def test_upnp_only_then_a_router_that_forwards_nothing(tmp_path):
    def scenario(lab: NatLab) -> None:
        router = PortMappingRouter(lab, tmp_path / "upnp", natpmp=False)
        router.start()
        bootstrap = start_pub(lab)
        start_provider(lab, bootstrap)
        address, took = mapped_and_advertised(lab, "upnp")
        lab.note(f"UPnP: {address} advertised {took} s after the provider started")
        port = int(address.rsplit("/", 1)[1])
        assert (port, HOSTA_IP, NODE_PORT) in router.redirects()
        stop_and_check_unmapped(lab, router, port)
        router.stop()
        router.remove()

        # A router that says yes and forwards nothing: no rule lets DNATed connections through.
        liar = PortMappingRouter(lab, tmp_path / "liar", forward=False)
        liar.start()
        lab.start_again("hosta")
        mapped = lab.expect("hosta", "port mapped", START, method="natpmp")
        unusable = lab.expect("hosta", "port mapping unusable", START)
        lab.note(f"lying router found out {seconds_since_start(lab, 'hosta', unusable)} s after start: {unusable}")
        assert unusable["level"] == "warning" and unusable["addresses"] == mapped["addresses"]
        lab.expect("hosta", "port mapping removed", 10)
        assert liar.redirects() == [], "the useless mapping was left on the router"
        lab.expect("hosta", "relay reservation accepted", START)  # reached through the relay instead
        assert not any(
            e.get("event") == "advertising" and mapped["addresses"][0] in addresses(e) for e in lab.nodes["hosta"].events()
        ), "the mapped address was advertised"
        liar.stop()

    run_lab(tmp_path, "pgu", scenario)


def test_a_router_without_port_mapping_changes_nothing(tmp_path):
    def scenario(lab: NatLab) -> None:
        bootstrap = start_pub(lab)
        start_provider(lab, bootstrap)
        unavailable = lab.expect("hosta", "port mapping unavailable", START)
        assert unavailable["level"] == "info" and "no port-mapping gateway answered" in unavailable["reason"]
        lab.expect("hosta", "service published", START)
        lab.node("hostb", "hostb", "--bootstrap", bootstrap, "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}")
        lab.expect("hostb", "phase transition", START, to_phase="ready")
        result = lab.echo_through_tunnel("client", PAYLOAD, 60)
        assert result["error"] is None and result["received_sha256"] == result["sent_sha256"], f"echo: {result}"
        assert lab.expect("hostb", "client tunnel opened", 5)["path"] == "relayed"
        assert lab.nodes["hosta"].count_events("port mapping unavailable") == 1
        assert lab.nodes["hosta"].count_events("port mapped") == 0

    run_lab(tmp_path, "pgn", scenario)
