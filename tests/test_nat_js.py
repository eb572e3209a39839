"""A js-libp2p node as the only public node of a mesh, between two hosts behind NATs.

In the namespace lab of ``tests/test_nat.py``, ``pub`` runs a real js-libp2p 2.x node
(``tests/js/node.mjs``: TCP, Noise, Yamux, identify, ping, kad-dht server, circuit relay
v2 server with js-libp2p's default limits of 2 minutes and 128 KiB per relayed
connection, AutoNAT) instead of punchgate. It speaks none of punchgate's own protocols.
hosta exposes an echo service; hostb tunnels to it by name and by peer ID.

* Through port-preserving NATs both tunnels work, over a direct (hole-punched)
  connection only: the relay's limit is too small for a tunnel, so the relayed
  connection is used to punch through and nothing else.
* Through symmetric NATs no direct connection can be made: the local connection is
  closed, with a log line naming the relay's limit, instead of stalling on the relay.

Runs only as root with ``ip``, ``iptables`` and Node.js (CI has all three).
"""

from __future__ import annotations

import os
import shutil

import pytest

from punchgate.devtools.jsnode import JsNode, JsNodeUnavailable, ensure_installed
from punchgate.devtools.natlab import ECHO_PORT, NODE_PORT, PUB_IP, TUNNEL_PORT, NatLab

BY_ID_PORT = TUNNEL_PORT + 1
PAYLOAD = 512 * 1024  # four times what one relayed connection may carry
LIMIT = 10.0  # first byte (cone), or the connection closed (symmetric), after hostb started

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None, reason="needs ip (iproute2) and iptables"
    ),
]


@pytest.fixture(scope="module")
def node_binary():
    try:
        return ensure_installed()
    except JsNodeUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def start(lab: NatLab, key: str) -> JsNode:
    js = JsNode(
        "--listen", f"/ip4/0.0.0.0/tcp/{NODE_PORT}", "--key-file", key, "--dht", "--relay", "--autonat",
        wrapper=lab.wrap("pub"),
    )
    bootstrap = f"/ip4/{PUB_IP}/tcp/{NODE_PORT}/p2p/{js.peer_id}"
    lab.start_echo_server()
    hosta_id = lab.peer_id("hosta")
    lab.node("hosta", "hosta", "--bootstrap", bootstrap, "--expose", f"echo=127.0.0.1:{ECHO_PORT}")
    lab.node(
        "hostb", "hostb", "--bootstrap", bootstrap,
        "--tunnel-by-name", f"echo@127.0.0.1:{TUNNEL_PORT}",
        "--tunnel", f"{hosta_id}:echo@127.0.0.1:{BY_ID_PORT}",
    )
    return js


@pytest.mark.parametrize("symmetric", [False, True], ids=["cone", "symmetric"])
def test_a_js_libp2p_node_as_the_only_bootstrap_and_relay(tmp_path, node_binary, symmetric):
    lab = NatLab(tmp_path, "pgj", symmetric)
    js = None
    try:
        lab.up()
        js = start(lab, str(tmp_path / "js.key"))
        for name, port in (("by name", TUNNEL_PORT), ("by peer ID", BY_ID_PORT)):
            before = lab.nodes["hostb"].count_events("client tunnel opened")
            result = lab.first_echo(name, lab.started["hostb"], PAYLOAD, 60, port=port)
            lab.note(f"{name}: {result}")
            if symmetric:
                assert result["received"] == 0, f"{name}: bytes went over a limited relay: {result}"
                error = lab.expect("hostb", "client tunnel error", 5, nth=1 if port == TUNNEL_PORT else 2)
                assert "limits each relayed connection" in error["reason"] and js.peer_id in error["reason"], error
                assert result["done_s"] < LIMIT, f"{name}: closed only after {result['done_s']} s"
            else:
                assert result["error"] is None and result["received"] == PAYLOAD, f"{name}: {result}"
                opened = lab.expect("hostb", "client tunnel opened", 5, nth=before + 1)
                assert opened["path"] == "direct", f"{name}: {opened}"
                assert result["first_byte_s"] < LIMIT, f"{name}: first byte after {result['first_byte_s']} s"
        if not symmetric:
            rc, flows = lab.direct("--state", "ESTABLISHED")
            assert rc == 0, f"no direct flow between the routers:\n{flows}"
        reservation = js.wait_event("reservation", 5, peer=lab.peer_id("hosta"))
        lab.note(f"js relay: {reservation}")
    except Exception as exc:
        reason = str(exc).split("; log:\n")[0]
        js_out = "" if js is None else "\n".join(map(str, js.events[-40:]))
        raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}\n===== js node:\n{js_out}") from None
    finally:
        if js is not None:
            js.kill()
        down = lab.close()
        assert down is None or down.returncode == 0, f"lab down failed:\n{down.stdout}{down.stderr}"
