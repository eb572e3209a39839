"""The container image and the compose topology (compose/compose.yaml), end to end, plus
the checks that the compose topology and the namespace lab share one description."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from punchgate.devtools.natlab import read_topology
from punchgate.devtools.podman import build_images, skip_or_fail_without_podman

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose" / "compose.yaml"
LAB = REPO / "scripts" / "netns_lab.sh"
IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?:/\d+)?(?![\d.])")
COMPOSE_OWN_VARIABLES = {"PUNCHGATE_IMAGE", "BASE_IMAGE", "BOOTSTRAP_PEER_ID", "NAT_B_MODE"}


def _code(path: Path) -> str:
    """The file without comment lines (their diagrams may show addresses)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))


def test_compose_and_lab_take_every_address_from_the_topology_file():
    topology = read_topology()
    compose = _code(COMPOSE)
    assert [a for a in IPV4.findall(compose) if a != "0.0.0.0"] == []
    used = set(re.findall(r"\$\{([A-Z_]+)", compose))
    assert used - COMPOSE_OWN_VARIABLES <= set(topology), used - COMPOSE_OWN_VARIABLES - set(topology)
    assert {"PUB_IP", "RTRA_WAN", "RTRB_WAN", "RTRA_LAN", "RTRB_LAN", "HOSTA_IP", "HOSTB_IP"} <= used
    lab = _code(LAB)
    # The lab's only literal addresses are in its state-file template and error text: none.
    assert IPV4.findall(lab) == []
    assert 'source "$SCRIPT_DIR/nat_topology.env"' in lab and '"$GATEWAY" rules' in lab
    assert "nat_gateway.sh, container" in compose


@pytest.mark.slow
def test_compose_topology_through_two_nats():
    """scripts/e2e_compose_test.sh: VPS-recipe bootstrap, echo through both NATs, direct with
    port-preserving gateways, relayed with a symmetric one, always torn down."""
    skip_or_fail_without_podman()
    image = build_images().punchgate
    done = subprocess.run(
        [str(REPO / "scripts" / "e2e_compose_test.sh"), "--image", image],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "bootstrap matches the README's VPS recipe" in done.stderr
    assert "cone NATs: 1 MiB echoed through both NATs, tunnel path: direct" in done.stderr
    assert "symmetric nat-b: 1 MiB echoed through both NATs, tunnel path: relayed" in done.stderr
    project = re.search(r"project (pgcompose-[0-9a-f]+)", done.stderr).group(1)
    for kind in ("ps", "network", "volume"):
        args = ["podman", kind, "ls"] if kind != "ps" else ["podman", "ps", "-a"]
        left = subprocess.run([*args, "--filter", f"label=io.podman.compose.project={project}", "--quiet"],
                              capture_output=True, text=True, timeout=60).stdout.split()
        assert left == [], f"{kind} left behind by {project}: {left}"
