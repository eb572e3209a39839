"""Any start order, and restarts, between two hosts behind NAT routers (namespace lab).

The lab of ``tests/test_nat.py`` (``scripts/netns_lab.sh``): ``pub`` is the bootstrap
node and relay, ``hosta`` exposes an echo service, ``hostb`` tunnels to it by name.
One lab per NAT kind, four situations in a row, each ending in a new local connection
on hostb that must echo a random payload (sha256 compared) soon after the last node
of the situation was started:

1. all three nodes started at the same instant (as a boot starts them);
2. the provider killed (SIGKILL) and started again, same identity, another port;
3. the relay/bootstrap node killed and started again;
4. provider and client stopped; the client started 20 s before the provider.

Through port-preserving NATs the connection must be direct (the client's log says
so, and the routers' conntrack tables show the flow between them); through
symmetric ones it rides the relay and no direct flow exists.

Runs only as root with ``ip`` and ``iptables`` installed (CI installs them).
"""

from __future__ import annotations

import os
import shutil

import pytest

from punchgate.devtools.natlab import SITUATIONS, NatLab

PAYLOAD = 256 * 1024
FIRST_LIMIT = 10.0  # all started at once -> first echoed byte (target 5 s; python start-up included)
RECOVERY_LIMIT = 15.0  # the last node started again -> first echoed byte
CLIENT_AHEAD = 20.0  # situation 4: the client runs this long before the provider starts
CLIENT_TIMEOUT = 45.0  # a client gives up (and says so) after this

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(
        shutil.which("ip") is None or shutil.which("iptables") is None, reason="needs ip (iproute2) and iptables"
    ),
]


def echo_after(lab: NatLab, what: str, node: str, limit: float, symmetric: bool) -> float:
    """A new local connection on hostb echoes; returns seconds from NODE's start to the first byte."""
    opened_before = lab.nodes["hostb"].count_events("client tunnel opened")
    result = lab.first_echo(what, lab.started[node], PAYLOAD, CLIENT_TIMEOUT)
    lab.note(f"{what}: {result}")
    assert result["error"] is None and result["received"] == PAYLOAD, f"{what}: {result}"
    took = result["first_byte_s"]
    opened = lab.expect("hostb", "client tunnel opened", 5, nth=opened_before + 1)
    lab.note(f"{what}: path {opened['path']}, setup {opened['setup_ms']} ms, first byte {took} s after {node} started")
    assert took <= limit, f"{what}: first byte {took} s after {node} started (limit {limit} s)"
    if symmetric:
        assert opened["path"] == "relayed", f"{what}: {opened}"
    else:
        assert opened["path"] == "direct", f"{what}: a punch through port-preserving NATs must succeed: {opened}"
        rc, flows = lab.direct("--state", "ESTABLISHED")
        assert rc == 0, f"{what}: no ESTABLISHED flow between the routers:\n{flows}"
    return took


def run_situations(lab: NatLab, symmetric: bool) -> None:
    for situation in SITUATIONS:
        node = lab.enact(situation, client_ahead=CLIENT_AHEAD)
        limit = FIRST_LIMIT if situation == "all started at once" else RECOVERY_LIMIT
        echo_after(lab, situation, node, limit, symmetric)


@pytest.mark.parametrize("symmetric", [False, True], ids=["cone", "symmetric"])
def test_any_start_order_and_restarts(tmp_path, symmetric):
    lab = NatLab(tmp_path, "pgo", symmetric)
    try:
        lab.up()
        try:
            run_situations(lab, symmetric)
        except Exception as exc:  # any failure: say why, with every log of the lab
            reason = str(exc).split("; log:\n")[0]
            raise AssertionError(f"{type(exc).__name__}: {reason}\n\n{lab.report()}") from None
    finally:
        down = lab.close()
        assert down is None or down.returncode == 0, f"lab down failed:\n{down.stdout}{down.stderr}"
