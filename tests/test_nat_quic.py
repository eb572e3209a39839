"""QUIC hole punching between two hosts behind NAT routers, in the network-namespace lab.

The lab of tests/test_nat.py (``scripts/netns_lab.sh``), with ``hosta`` and ``hostb``
listening on QUIC only (``/ip4/0.0.0.0/udp/4001/quic-v1``) and ``pub`` (bootstrap node
and relay) on TCP and QUIC; the hosts join pub over QUIC. Checked, for both NAT kinds:

* hosta learns it is private (our dial-back over QUIC comes from another port than the
  connection it answers, so the NAT drops it) and whether its NAT keeps ports, from
  identify's observed ``/udp/…/quic-v1`` address;
* bytes echo end to end (sha256 of a random payload) through hostb's 127.0.0.1:2222;
* through port-preserving NATs, DCUtR makes a direct QUIC connection: the client says the
  tunnel is ``path=direct transport=quic``, and both routers' conntrack tables show a UDP
  flow between their public addresses that carried the payload;
* through symmetric NATs the punch is not tried (or fails), the tunnel stays on the relay,
  and no UDP flow between the routers ever got an answer;
* killing the provider (SIGKILL) ends an open client connection within 10 s either way.

Runs only as root with ``ip``, ``iptables`` and ``conntrack`` (CI installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from punchgate.devtools.natlab import TUNNEL_PORT, NatLab, conntrack_bytes

PAYLOAD_BYTES = 2 * 1024 * 1024
START_TIMEOUT = 30
SETUP_TIMEOUT = 30
FIRST_ECHO_TIMEOUT = 60
PUNCH_TIMEOUT = 40
PAYLOAD_TIMEOUT = 60
CLOSE_LIMIT = 10

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None, reason="needs ip (iproute2) and iptables"
    ),
]


def run_scenario(lab: NatLab, symmetric: bool) -> None:
    hosta_id = lab.start_tunnel_topology(START_TIMEOUT).hosta_id
    hosta, hostb = lab.nodes["hosta"], lab.nodes["hostb"]
    assert "/udp/4001/quic-v1" in hosta.address("quic")

    reach = lab.expect("hosta", "reachability", SETUP_TIMEOUT, method="dialback")
    assert reach["status"] == "private", f"hosta behind NAT: {reach}"
    assert reach["port_preserving"] is (not symmetric), f"hosta's NAT and its ports: {reach}"
    lab.expect("hosta", "relay reservation accepted", SETUP_TIMEOUT)
    lab.expect("hosta", "service published", SETUP_TIMEOUT, service="echo")

    first = lab.echo_through_tunnel("first client", 64, FIRST_ECHO_TIMEOUT)
    assert first["state"] == "done" and first["error"] is None, f"first connection failed: {first}"
    assert first["received_sha256"] == first["sent_sha256"], f"first connection: echo differs: {first}"

    punch = lab.expect("hostb", "hole punch", PUNCH_TIMEOUT, peer=hosta_id)
    lab.note(f"QUIC hole punch: {punch}")
    if symmetric:
        assert punch["outcome"] in ("failed", "skipped"), f"a punch through symmetric NATs cannot succeed: {punch}"
    else:
        assert punch["outcome"] == "direct", f"QUIC hole punch through port-preserving NATs: {punch}"

    opened_before = hostb.count_events("client tunnel opened")
    result = lab.echo_through_tunnel("payload client", PAYLOAD_BYTES, PAYLOAD_TIMEOUT)
    assert result["state"] == "done" and result["error"] is None, f"payload connection failed: {result}"
    assert result["received"] == PAYLOAD_BYTES and result["received_sha256"] == result["sent_sha256"], result
    opened = lab.expect("hostb", "client tunnel opened", 5, nth=opened_before + 1)
    assert opened["peer"] == hosta_id, f"unexpected tunnel: {opened}"

    rc, flows = lab.direct("--proto", "udp")
    if symmetric:
        assert opened["path"] == "relayed", f"symmetric NAT: the tunnel must use the relay: {opened}"
        assert rc == 1, f"symmetric NAT: a UDP flow between the routers got an answer:\n{flows}"
    else:
        assert (opened["path"], opened["transport"]) == ("direct", "quic"), f"not on the punched QUIC path: {opened}"
        assert rc == 0, f"no answered UDP flow between the routers' public addresses:\n{flows}"
        carried = conntrack_bytes(flows)
        lab.note(f"direct UDP flows (bytes original, reply): {carried}")
        if carried:  # conntrack accounting is on: the payload crossed a direct flow, both ways
            assert set(carried) == {"rtra", "rtrb"} and all(
                any(min(pair) >= PAYLOAD_BYTES for pair in pairs) for pairs in carried.values()
            ), f"no direct UDP flow carried the payload both ways ({carried}):\n{flows}"

    opened_before = hostb.count_events("client tunnel opened")
    _, held = lab.client("held client", "hold", str(TUNNEL_PORT), str(CLOSE_LIMIT + 20))
    _, line = held.wait(lambda text: '"state"' in text, FIRST_ECHO_TIMEOUT, "held connection open")
    assert json.loads(line)["state"] == "open", f"held connection did not open: {line}"
    path = lab.expect("hostb", "client tunnel opened", 5, nth=opened_before + 1)["path"]
    killed_at = time.monotonic()
    hosta.proc.kill()  # SIGKILL, by PID
    arrived, line = held.wait(lambda text: '"closed"' in text, CLOSE_LIMIT + 25, "held connection end")
    how = json.loads(line)["how"]
    lab.note(f"held connection ({path}) ended ({how}) {arrived - killed_at:.2f} s after SIGKILL")
    assert how == "eof" or how.startswith("reset"), f"held connection ({path}) did not end: {how}"
    assert arrived - killed_at < CLOSE_LIMIT, f"held connection ({path}) ended {arrived - killed_at:.1f} s after SIGKILL"


@pytest.mark.parametrize("symmetric", [False, True], ids=["masquerade", "symmetric"])
def test_quic_only_hosts_punch_through_cone_nats_and_stay_relayed_through_symmetric_ones(tmp_path, symmetric):
    lab = NatLab(tmp_path, "pgq", symmetric, transport="quic")
    try:
        lab.up()
        try:
            run_scenario(lab, symmetric)
        except Exception as exc:  # any failure: say why, with every log of the lab
            reason = str(exc).split("; log:\n")[0]
            raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}") from None
    finally:
        down = lab.close()
        assert down is None or down.returncode == 0, f"lab down failed:\n{down.stdout}{down.stderr}"
