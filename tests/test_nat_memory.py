"""A memory of peers: the tunnel works again after a restart without the bootstrap node.

In the namespace lab of ``tests/test_nat.py``: on ``pub`` (a public address) a
bootstrap node (port 4002) and a provider (port 4001) exposing an echo service; on
``hostb``, behind its NAT, a client tunnelling by name. After one tunnel connection all
three stop; provider and client start again, the bootstrap node does not. The client
remembers the provider (its service and addresses, next to its identity), so a new
connection echoes within 10 s of the last start, with no DHT to ask.

Runs only as root with ``ip`` and ``iptables`` installed (CI installs them).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from punchgate.devtools.natlab import ECHO_PORT, NODE_PORT, PUB_IP, NatLab

LIMIT = 10.0
PAYLOAD = 64 * 1024

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None, reason="needs ip (iproute2) and iptables"
    ),
]


def test_restart_without_the_bootstrap_node(tmp_path):
    lab = NatLab(tmp_path, "pgm")
    try:
        lab.up()
        boot = f"/ip4/{PUB_IP}/tcp/{NODE_PORT + 1}/p2p/{lab.peer_id('boot')}"
        provider_id = lab.peer_id("provider")
        lab.start_echo_server(role="pub")
        lab.node("boot", "pub", port=NODE_PORT + 1)
        lab.node("provider", "pub", "--bootstrap", boot, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
        # A provider with a public address: running for a while, it knows it is reachable.
        lab.expect("provider", "nat status", 30, status="public")
        lab.node("client", "hostb", "--bootstrap", boot, "--tunnel-by-name", "echo@127.0.0.1:2222")
        lab.nodes["hostb"] = lab.nodes["client"]  # first_echo reads hostb's log
        first = lab.first_echo("before", lab.started["client"], PAYLOAD, 60)
        assert first["error"] is None and first["received"] == PAYLOAD, first
        lab.expect("client", "client tunnel opened", 5, peer=provider_id)

        for name in ("client", "provider", "boot"):
            assert lab.stop(name) == 0
        kept = json.loads((tmp_path / f"{lab.prefix}-client.key.peers").read_text())
        lab.note(f"client's memory: {kept}")
        assert any(p["peer_id"] == provider_id and "echo" in p["services"] for p in kept["peers"]), kept

        lab.start_again("provider")
        lab.start_again("client")
        lab.nodes["hostb"] = lab.nodes["client"]
        last = max(lab.started["provider"], lab.started["client"])
        again = lab.first_echo("after the restart", last, PAYLOAD, 60)
        lab.note(f"after the restart without the bootstrap node: {again}")
        assert again["error"] is None and again["received"] == PAYLOAD, again
        assert again["first_byte_s"] <= LIMIT, f"first byte {again['first_byte_s']} s after the last start"
    except Exception as exc:
        reason = str(exc).split("; log:\n")[0]
        raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}") from None
    finally:
        down = lab.close()
        assert down is None or down.returncode == 0, f"lab down failed:\n{down.stdout}{down.stderr}"
